"""The ingest service on real footage: tiny models, real Redis, the index on disk."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memory.codec import decode_chunk
from memory.index import VectorIndex
from memory.types import TokenKind
from streamer.frames import Chunk, Frame
from streamer.importer import iter_chunks
from streamer.ingest import FAILING_AFTER_CHUNKS, IngestService
from streamer.resources import Resources, index_path_for, open_resources
from streamer.settings import CameraSettings, Settings
from vlm.tiny import TinyModels

DATA = Path(__file__).resolve().parent / "data"
EMPTY_ROOM = DATA / "one-by-one-person-detection.mp4"  # nobody in the room for the first ~6 s
START_S = 1_760_000_000.0


def settings_for(prefix: str, tmp_path: Path, models: TinyModels, **compression: Any) -> Settings:
    return Settings.model_validate(
        {
            "data_dir": str(tmp_path),
            "redis": {"key_prefix": prefix},
            "models": {"vlm": str(models.vlm), "embedder": str(models.embedder), "device": "cpu"},
            "compression": compression,
        }
    )


def clip_chunks(n: int, *, chunk_s: float = 3.0, sample_fps: float = 2.0) -> list[Chunk]:
    camera = CameraSettings(url=str(EMPTY_ROOM), sample_fps=sample_fps, chunk_s=chunk_s)
    chunks = []
    for chunk in iter_chunks(EMPTY_ROOM, "room", camera, start_s=START_S):
        chunks.append(chunk)
        if len(chunks) == n:
            break
    return chunks


@contextlib.asynccontextmanager
async def ingest_service(settings: Settings) -> AsyncIterator[tuple[Resources, IngestService]]:
    """The resources and an ingest service over them, composed as ``vigil import`` does."""
    async with open_resources(settings) as res:
        compression = settings.compression
        yield res, IngestService(encoder=res.encoder, store=res.store, index=res.index, compression=compression)


async def payloads(res: Resources, metas: list[Any]) -> list[Any]:
    stored = await res.store.get_chunks([(m.camera, m.chunk_id) for m in metas])
    return [decode_chunk(payload) for _, payload in stored]


async def test_static_footage_skips_the_encoder_and_every_frame_is_accounted_for(
    prefix: str, tmp_path: Path, tiny_models: TinyModels, redis_client: Any
) -> None:
    settings = settings_for(prefix, tmp_path, tiny_models)
    chunks = clip_chunks(2)
    async with ingest_service(settings) as (res, ingest):
        metas = [await ingest.ingest(chunk) for chunk in chunks]
        assert all(meta is not None for meta in metas)
        decoded = await payloads(res, metas)
        stats = ingest.stats
    # An empty room: most sampled frames extend an earlier encoding instead of being encoded.
    assert stats.frames == sum(len(c.frames) for c in chunks)
    assert stats.frames_encoded < stats.frames / 2
    for chunk, meta, compressed in zip(chunks, metas, decoded, strict=True):
        rows, cols = compressed.grid
        # Counts add up to every sampled frame's tokens, reused frames included.
        assert int(compressed.count.sum()) == rows * cols * len(chunk.frames)
        assert meta.n_tokens == compressed.n_tokens <= round(settings.compression.keep_ratio * meta.n_input_tokens) + 1
        # Every memory token's span lies inside its chunk.
        assert float(compressed.t_first.min()) >= chunk.start_s - 1e-6
        assert float(compressed.t_last.max()) <= chunk.end_s + 1e-6
        assert int((compressed.kind == TokenKind.SUMMARY).sum()) == 1


async def test_index_is_saved_on_close_and_agrees_with_redis(
    prefix: str, tmp_path: Path, tiny_models: TinyModels, redis_client: Any, tiny_embedder: Any
) -> None:
    settings = settings_for(prefix, tmp_path, tiny_models)
    async with ingest_service(settings) as (_, ingest):
        metas = [await ingest.ingest(chunk) for chunk in clip_chunks(3)]
    index = VectorIndex.load(index_path_for(settings), tiny_embedder.dim)
    assert index.ids("room") == {m.chunk_id for m in metas if m is not None}
    # Restarted resources find the same memory through the loaded index.
    async with open_resources(settings) as again:
        assert again.index.index.ids("room") == index.ids("room")


@pytest.mark.parametrize("method", ["uniform", "random"])
async def test_baseline_methods_run_through_the_same_pipeline(
    method: str, prefix: str, tmp_path: Path, tiny_models: TinyModels, redis_client: Any
) -> None:
    settings = settings_for(prefix, tmp_path, tiny_models, method=method, codec="fp16", skip_unchanged=False)
    chunk = clip_chunks(1)[0]
    async with ingest_service(settings) as (res, ingest):
        meta = await ingest.ingest(chunk)
        assert meta is not None
        [compressed] = await payloads(res, [meta])
    budget = max(1, round(settings.compression.keep_ratio * meta.n_input_tokens))
    assert 0 < compressed.n_tokens <= budget
    assert meta.codec.startswith("fp16")


async def test_failing_chunks_are_counted_reported_and_the_next_one_is_stored(
    prefix: str, tmp_path: Path, tiny_models: TinyModels, redis_client: Any
) -> None:
    settings = settings_for(prefix, tmp_path, tiny_models)
    good = clip_chunks(1)[0]

    def broken(seq: int) -> Chunk:  # an empty image: the skip check (and the encoder) refuse it
        start = good.end_s + seq
        return Chunk(good.camera, seq, start, start + 1.0, [Frame(good.camera, start, np.zeros((0, 0, 3), np.uint8))])

    async with ingest_service(settings) as (_, ingest):
        assert await ingest.ingest(broken(1)) is None
        assert ingest.stats.failed_chunks == 1
        assert ingest.failing() == {}  # one failed chunk is an incident, not a failing camera
        for seq in range(2, FAILING_AFTER_CHUNKS + 1):
            assert await ingest.ingest(broken(seq)) is None
        why = ingest.failing()["room"]
        assert f"{FAILING_AFTER_CHUNKS} chunks in a row" in why
        assert "ValueError: image 0x0" in why
        assert await ingest.ingest(good) is not None
        assert ingest.stats.chunks == 1
        assert ingest.failing() == {}  # stored again: no longer failing


"""The ingest pipeline on real footage: tiny models, real Redis, the index on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memory.codec import decode_chunk
from memory.index import VectorIndex
from memory.types import TokenKind
from streamer.frames import Chunk, Frame
from streamer.importer import iter_chunks
from streamer.pipeline import Pipeline, index_path_for, open_pipeline
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


async def payloads(pipeline: Pipeline, metas: list[Any]) -> list[Any]:
    stored = await pipeline.store.get_chunks([(m.camera, m.chunk_id) for m in metas])
    return [decode_chunk(payload) for _, payload in stored]


async def test_static_footage_skips_the_encoder_and_every_frame_is_accounted_for(
    prefix: str, tmp_path: Path, tiny_models: TinyModels, redis_client: Any
) -> None:
    settings = settings_for(prefix, tmp_path, tiny_models)
    chunks = clip_chunks(2)
    async with open_pipeline(settings) as pipeline:
        metas = [await pipeline.ingest(chunk) for chunk in chunks]
        assert all(meta is not None for meta in metas)
        decoded = await payloads(pipeline, metas)
        stats = pipeline.stats
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
    async with open_pipeline(settings) as pipeline:
        metas = [await pipeline.ingest(chunk) for chunk in clip_chunks(3)]
    index = VectorIndex.load(index_path_for(settings), tiny_embedder.dim)
    assert index.ids("room") == {m.chunk_id for m in metas if m is not None}
    # A restarted pipeline finds the same memory through its loaded index.
    async with open_pipeline(settings) as again:
        assert again.index.ids("room") == index.ids("room")


@pytest.mark.parametrize("method", ["uniform", "random"])
async def test_baseline_methods_run_through_the_same_pipeline(
    method: str, prefix: str, tmp_path: Path, tiny_models: TinyModels, redis_client: Any
) -> None:
    settings = settings_for(prefix, tmp_path, tiny_models, method=method, codec="fp16", skip_unchanged=False)
    chunk = clip_chunks(1)[0]
    async with open_pipeline(settings) as pipeline:
        meta = await pipeline.ingest(chunk)
        assert meta is not None
        [compressed] = await payloads(pipeline, [meta])
    budget = max(1, round(settings.compression.keep_ratio * meta.n_input_tokens))
    assert 0 < compressed.n_tokens <= budget
    assert meta.codec.startswith("fp16")


async def test_a_failing_chunk_is_counted_and_the_next_one_is_stored(
    prefix: str, tmp_path: Path, tiny_models: TinyModels, redis_client: Any
) -> None:
    settings = settings_for(prefix, tmp_path, tiny_models)
    good = clip_chunks(1)[0]
    # An empty image: the encoder refuses it.
    broken = Chunk(
        good.camera, 99, good.end_s, good.end_s + 1.0, [Frame(good.camera, good.end_s, np.zeros((0, 0, 3), np.uint8))]
    )
    async with open_pipeline(settings) as pipeline:
        assert await pipeline.ingest(broken) is None
        assert pipeline.stats.failed_chunks == 1
        assert await pipeline.ingest(good) is not None
        assert pipeline.stats.chunks == 1

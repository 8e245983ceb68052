"""Chunks of frames → memory: skip unchanged frames, encode, compress, embed, store, index.

One ``IngestService`` serves every camera of a daemon (or one ``vigil import``). It is given what
it uses (the batch encoder, the store, the index) and owns none of it: ``streamer/resources.py``
opens and closes those. Per camera it keeps the state that streaming needs between chunks: the
compressor's run heads, the thumbnail of the last encoded frame (for the skip check) and that
frame's encoding (reused when a chunk starts unchanged).

Failures: a chunk that cannot be stored for a reason we expect (frames the encoder refuses, a
chunk that fails validation, a write Redis refuses) is logged, counted and the camera goes on; a
camera whose chunks keep failing is reported by :meth:`IngestService.failing` (the daemon's
``health``). Anything else is a bug and propagates, ending the daemon so systemd restarts it.
Redis being away is not a failure here: the store buffers the write and retries it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import redis.exceptions
import torch

from memory.baselines import random_keep, uniform_pool
from memory.codec import VERSION as CODEC_VERSION
from memory.codec import encode_chunk
from memory.compress import CompressorConfig, CompressorState, compress_chunk
from memory.outage import Outage
from memory.skip import plan_skips, thumbnail
from memory.store import ChunkMeta, MemoryStore
from memory.types import CompressedChunk
from streamer.frames import Chunk
from streamer.resources import IndexFile
from streamer.settings import CompressionSettings
from vlm.encoding import BatchEncoder

logger = logging.getLogger(__name__)

# Errors that mean "this chunk cannot be stored", not "vigil is broken": frames the encoder
# refuses (vlm.preprocess.FrameError is a ValueError), a chunk the store's validation refuses
# (ValueError, TypeError), a write Redis refuses (WRONGTYPE, say: a RedisError that is not one of
# the "Redis is away" errors, which the store buffers instead of raising).
CHUNK_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, redis.exceptions.RedisError)
# A camera whose last this many chunks all failed makes the daemon report itself degraded: one
# failed chunk is an incident, a run of them is a camera that is not being remembered.
FAILING_AFTER_CHUNKS = 3


@dataclass
class _CameraMemory:
    """What streaming needs to remember about one camera between its chunks."""

    compressor: CompressorState | None = None
    reference: np.ndarray | None = None  # [h, w] thumbnail of the last encoded frame
    last_tokens: torch.Tensor | None = None  # [1, N, C] encoding of that frame
    last_global: torch.Tensor | None = None  # [1, G]
    last_embedding: np.ndarray | None = None  # [1, D]
    grid: tuple[int, int] | None = None  # (rows, cols) of the encoder's token grid
    random: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    failures_in_a_row: int = 0
    last_error: str | None = None
    chunks: int = 0  # stored (or buffered for Redis)
    failed_chunks: int = 0
    frames: int = 0  # sampled frames of the stored chunks


@dataclass
class IngestStats:
    """Counters since start, for the shutdown summary and the status topic."""

    chunks: int = 0  # chunks stored (or buffered for Redis)
    frames: int = 0  # sampled frames of those chunks
    frames_encoded: int = 0  # of which went through the encoder (the rest: unchanged, skipped)
    tokens_in: int = 0
    tokens_kept: int = 0
    failed_chunks: int = 0
    encoding_chunks: int = 0  # chunks waiting for the batch encoder right now

    @property
    def frames_skipped(self) -> int:
        """Sampled frames that reused an earlier encoding instead of going through the encoder."""
        return self.frames - self.frames_encoded


@dataclass(frozen=True, slots=True)
class CameraCounts:
    """One camera's ingest counters since start (streamer/metrics.py exports them)."""

    chunks: int
    failed_chunks: int
    frames: int


# (stage, camera, seconds) for each timed step of a chunk: "encode" (waiting for and running the
# batch encoder), "compress" (compression and serialisation). The daemon feeds streamer/metrics.py.
TimingHook = Callable[[str, str, float], None]
# Called with each chunk once it is stored (or buffered for Redis), with its compressed tokens: the
# watches check it (streamer/watch_service.py). Synchronous and must not block: it only queues.
StoredHook = Callable[[ChunkMeta, CompressedChunk], None]


def frame_spans(times_s: np.ndarray, end_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Each sampled frame's span: from its time to the next frame's time (the last: to end_s).

    times_s: [T] float64 increasing → (t_start [T], t_end [T]).
    """
    t_end = np.append(times_s[1:], end_s)
    return times_s, t_end


def chunk_vector(embeddings: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """One retrieval vector per chunk: the weight-averaged frame embeddings, re-normalised.

    embeddings: [T, D] L2-normalised; weight: [T] sampled frames each stands for → [D] float32.
    """
    mean = (embeddings * weight[:, None]).sum(axis=0) / max(float(weight.sum()), 1.0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm if norm > 0 else mean).astype(np.float32)


class IngestService:
    """``await ingest.ingest(chunk)`` for every chunk of every camera."""

    def __init__(
        self,
        *,
        encoder: BatchEncoder,
        store: MemoryStore,
        index: IndexFile,
        compression: CompressionSettings,
        on_timing: TimingHook | None = None,
        on_stored: StoredHook | None = None,
    ) -> None:
        self._encoder = encoder
        self._on_timing = on_timing
        # Public: the daemon sets it once the watches exist (they publish through the MQTT API).
        self.on_stored = on_stored
        self._store = store
        self._index = index
        self._compression = compression
        thresholds = {
            name: value
            for name, value in (("tau_static", compression.tau_static), ("tau_segment", compression.tau_segment))
            if value is not None
        }
        self._config = CompressorConfig(keep_ratio=compression.keep_ratio, **thresholds)
        self._cameras: dict[str, _CameraMemory] = {}
        self.stats = IngestStats()

    async def ingest(self, chunk: Chunk) -> ChunkMeta | None:
        """Remember one chunk; returns its metadata, or None when it could not be stored.

        Expected failures (``CHUNK_ERRORS``) are logged and counted and the camera goes on;
        anything else propagates.
        """
        if not chunk.frames:
            return None
        mem = self._cameras.setdefault(chunk.camera, _CameraMemory())
        try:
            meta = await self._ingest(chunk, mem)
        except CHUNK_ERRORS as exc:
            self.stats.failed_chunks += 1
            mem.failed_chunks += 1
            mem.failures_in_a_row += 1
            mem.last_error = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "camera %s: chunk %d (%d frames) not stored: %s",
                chunk.camera, chunk.seq, len(chunk.frames), mem.last_error,
            )  # fmt: skip
            return None
        if mem.failures_in_a_row:
            logger.info("camera %s: chunks stored again after %d failed", chunk.camera, mem.failures_in_a_row)
        mem.failures_in_a_row = 0
        return meta

    def camera_counts(self) -> dict[str, CameraCounts]:
        """Camera → its counters, for every camera that sent a chunk."""
        return {
            camera: CameraCounts(mem.chunks, mem.failed_chunks, mem.frames)
            for camera, mem in sorted(self._cameras.items())
        }

    def _timed(self, stage: str, camera: str, started: float) -> None:
        if self._on_timing is not None:
            self._on_timing(stage, camera, time.perf_counter() - started)

    def failing(self) -> dict[str, str]:
        """Cameras whose last ``FAILING_AFTER_CHUNKS`` or more chunks all failed → why (the last error)."""
        return {
            camera: f"{mem.failures_in_a_row} chunks in a row not stored, last: {mem.last_error}"
            for camera, mem in sorted(self._cameras.items())
            if mem.failures_in_a_row >= FAILING_AFTER_CHUNKS
        }

    async def record_outage(self, outage: Outage) -> None:
        """Store an outage (called when it starts and again when it ends); a refused write is logged."""
        try:
            await self._store.put_outage(outage)
        except redis.exceptions.RedisError as exc:  # Redis is up but refuses it; away is buffered
            logger.error("camera %s: outage from %.3f not stored: %s", outage.camera, outage.start_s, exc)

    def log_summary(self) -> None:
        s = self.stats
        logger.info(
            "ingest: %d chunks, %d frames (%d encoded), %d → %d tokens, %d failed chunks",
            s.chunks, s.frames, s.frames_encoded, s.tokens_in, s.tokens_kept, s.failed_chunks,
        )  # fmt: skip

    async def _ingest(self, chunk: Chunk, mem: _CameraMemory) -> ChunkMeta:
        images = np.stack([frame.image for frame in chunk.frames])  # [T, H, W, 3]
        times = np.array([frame.ts_s for frame in chunk.frames], dtype=np.float64)  # [T]
        t_start_all, t_end_all = frame_spans(times, chunk.end_s)

        first, last, encode, reuse_first = self._plan(mem, images)
        started = time.perf_counter()
        tokens, global_feats, embeddings = await self._encode(mem, images, encode, reuse_first)
        if encode:  # a chunk of reused encodings did not use the encoder
            self._timed("encode", chunk.camera, started)
        weight = np.array([b - a + 1 for a, b in zip(first, last, strict=True)], dtype=np.int64)
        t_start = torch.from_numpy(t_start_all[list(first)])  # [T', ] float64
        t_end = torch.from_numpy(t_end_all[list(last)])
        # Compression and serialisation are pure CPU work (tens of ms per chunk with real token
        # shapes): off the event loop, so MQTT and the other cameras never wait on them. Chunks of
        # one camera are ingested one at a time, so its state is never touched concurrently.
        started = time.perf_counter()
        compressed, payload = await asyncio.to_thread(
            self._compress,
            mem,
            tokens=tokens,
            global_feats=global_feats,
            t_start=t_start,
            t_end=t_end,
            weight=torch.from_numpy(weight),
        )
        self._timed("compress", chunk.camera, started)
        vector = chunk_vector(embeddings, weight)
        meta = ChunkMeta.create(
            chunk.camera,
            chunk.start_s,
            chunk.end_s,
            n_frames=len(chunk.frames),
            n_input_tokens=compressed.n_input,
            n_tokens=compressed.n_tokens,
            codec=f"{self._compression.codec}/v{CODEC_VERSION}",
        )
        await self._store.put_chunk(meta, payload, vector)
        # Indexed even while the write waits in the retry buffer: ids are deterministic, a hit
        # whose payload never arrives is skipped at fetch time and dropped by the next catch-up.
        self._index.index.add(meta, vector)
        self._index.dirty = True
        if self.on_stored is not None:
            self.on_stored(meta, compressed)

        s = self.stats
        s.chunks += 1
        s.frames += len(chunk.frames)
        s.frames_encoded += len(encode)
        s.tokens_in += compressed.n_input
        s.tokens_kept += compressed.n_tokens
        mem.chunks += 1
        mem.frames += len(chunk.frames)
        logger.debug(
            "camera %s: chunk %d stored, %d frames (%d encoded), %d → %d tokens",
            chunk.camera, chunk.seq, len(chunk.frames), len(encode), compressed.n_input, compressed.n_tokens,
        )  # fmt: skip
        return meta

    def _plan(
        self, mem: _CameraMemory, images: np.ndarray
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], bool]:
        """(first, last, encode, reuse_first): which frames go to the encoder, what each stands for."""
        n = images.shape[0]
        if not self._compression.skip_unchanged:
            every = tuple(range(n))
            return every, every, every, False
        thumbs = [thumbnail(image) for image in images]
        # Without a cached encoding of the reference frame the chunk must encode its first frame.
        reference = mem.reference if mem.last_tokens is not None else None
        plan = plan_skips(thumbs, reference)
        mem.reference = plan.reference
        return plan.first, plan.last, plan.encode, plan.reuse_first

    async def _encode(
        self, mem: _CameraMemory, images: np.ndarray, encode: tuple[int, ...], reuse_first: bool
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """tokens [T', N, C], global [T', G], embeddings [T', D] for the chunk's output frames."""
        parts_tokens: list[torch.Tensor] = []
        parts_global: list[torch.Tensor] = []
        parts_emb: list[np.ndarray] = []
        if reuse_first:
            # plan_skips only reuses when a cached encoding exists (_plan passes no reference otherwise).
            assert mem.last_tokens is not None
            assert mem.last_global is not None
            assert mem.last_embedding is not None
            parts_tokens.append(mem.last_tokens)
            parts_global.append(mem.last_global)
            parts_emb.append(mem.last_embedding)
        if encode:
            self.stats.encoding_chunks += 1
            try:
                encoded = await self._encoder.encode(images[list(encode)])
            finally:
                self.stats.encoding_chunks -= 1
            parts_tokens.append(encoded.visual.tokens.float().cpu())
            parts_global.append(encoded.visual.global_feats.float().cpu())
            parts_emb.append(encoded.embeddings)
            mem.grid = encoded.visual.grid
        tokens = torch.cat(parts_tokens)
        global_feats = torch.cat(parts_global)
        embeddings = np.concatenate(parts_emb)
        mem.last_tokens, mem.last_global, mem.last_embedding = tokens[-1:], global_feats[-1:], embeddings[-1:]
        return tokens, global_feats, embeddings

    def _compress(
        self,
        mem: _CameraMemory,
        *,
        tokens: torch.Tensor,
        global_feats: torch.Tensor,
        t_start: torch.Tensor,
        t_end: torch.Tensor,
        weight: torch.Tensor,
    ) -> tuple[CompressedChunk, bytes]:
        """tokens [T', N, C], global_feats [T', G], t_start/t_end [T'] float64, weight [T'] →
        (compressed chunk, its codec payload)."""
        assert mem.grid is not None  # set by the first encoded frame of this camera
        grid = mem.grid
        method = self._compression.method
        n_input = tokens.shape[1] * int(weight.sum())
        budget = max(1, round(self._compression.keep_ratio * n_input))
        if method == "vigil":
            compressed, mem.compressor = compress_chunk(
                tokens, global_feats, t_start, t_end, weight, grid=grid, state=mem.compressor, config=self._config
            )
        elif method == "uniform":
            compressed = uniform_pool(tokens, t_start, t_end, weight, grid, budget=budget)
        else:
            compressed = random_keep(tokens, t_start, t_end, weight, grid, budget=budget, generator=mem.random)
        return compressed, encode_chunk(compressed, self._compression.codec)

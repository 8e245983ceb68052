"""Chunks of frames → memory: skip unchanged frames, encode, compress, embed, store, index.

One ``Pipeline`` serves every camera of a daemon (or one ``vigil import``). Per camera it keeps
the state that streaming needs between chunks: the compressor's run heads, the thumbnail of the
last encoded frame (for the skip check) and that frame's encoding (reused when a chunk starts
unchanged). The models run on the BatchEncoder's own thread; Redis writes go through
MemoryStore's retry buffer; the FAISS index is updated in memory and saved atomically by
``run_maintenance`` and on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import redis.asyncio as aioredis
import torch
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from memory.baselines import random_keep, uniform_pool
from memory.codec import VERSION as CODEC_VERSION
from memory.codec import encode_chunk
from memory.compress import CompressorConfig, CompressorState, compress_chunk
from memory.index import VectorIndex
from memory.skip import plan_skips, thumbnail
from memory.store import ChunkMeta, MemoryStore, OutageRecord
from memory.types import CompressedChunk
from streamer.camera import Outage
from streamer.frames import Chunk
from streamer.settings import CompressionSettings, Settings
from vlm.embedder import Embedder, load_embedder
from vlm.encoding import BatchEncoder
from vlm.models import VisionLanguageModel, load_vlm

logger = logging.getLogger(__name__)

INDEX_SAVE_INTERVAL_S = 60.0  # the index is derived from Redis: a stale file only costs catch-up time
RETENTION_INTERVAL_S = 600.0  # retention is by days; checking every 10 minutes is plenty
SECONDS_PER_DAY = 86400.0
REDIS_TIMEOUT_S = 5.0  # a Redis that does not answer within this is treated as away
REDIS_RETRY_CAP_S = 1.0
# Filtered searches score small contiguous slices; OpenMP's thread start-up costs more than it
# saves there, and the cores are better left to the encoder and generation threads
# (docs/storage.md: 12x slower p50 at 10k vectors with 2 threads on a busy 2-core machine).
FAISS_THREADS = 1


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


@dataclass
class PipelineStats:
    """Counters for the shutdown summary and the status topic."""

    chunks: int = 0
    frames: int = 0
    frames_encoded: int = 0
    tokens_in: int = 0
    tokens_kept: int = 0
    failed_chunks: int = 0


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


class Pipeline:
    """``await pipeline.ingest(chunk)`` for every chunk of every camera."""

    def __init__(
        self,
        *,
        vlm: VisionLanguageModel,
        embedder: Embedder,
        encoder: BatchEncoder,
        store: MemoryStore,
        index: VectorIndex,
        index_path: Path,
        compression: CompressionSettings,
    ) -> None:
        self.vlm = vlm
        self.embedder = embedder
        self.encoder = encoder
        self.store = store
        self.index = index
        self.index_path = index_path
        self._compression = compression
        thresholds = {
            name: value
            for name, value in (("tau_static", compression.tau_static), ("tau_segment", compression.tau_segment))
            if value is not None
        }
        self._config = CompressorConfig(keep_ratio=compression.keep_ratio, **thresholds)
        self._cameras: dict[str, _CameraMemory] = {}
        self._index_dirty = False
        self.stats = PipelineStats()

    async def ingest(self, chunk: Chunk) -> ChunkMeta | None:
        """Remember one chunk; returns its metadata, or None when the chunk could not be encoded.

        A chunk that fails (a broken model call, say) is logged and counted; the camera goes on.
        """
        if not chunk.frames:
            return None
        try:
            return await self._ingest(chunk)
        except Exception:
            self.stats.failed_chunks += 1
            logger.exception(
                "camera %s: chunk %d (%d frames) could not be stored", chunk.camera, chunk.seq, len(chunk.frames)
            )
            return None

    async def _ingest(self, chunk: Chunk) -> ChunkMeta:
        mem = self._cameras.setdefault(chunk.camera, _CameraMemory())
        images = np.stack([frame.image for frame in chunk.frames])  # [T, H, W, 3]
        times = np.array([frame.ts_s for frame in chunk.frames], dtype=np.float64)  # [T]
        t_start_all, t_end_all = frame_spans(times, chunk.end_s)

        first, last, encode, reuse_first = self._plan(mem, images)
        tokens, global_feats, embeddings = await self._encode(mem, images, encode, reuse_first)
        weight = np.array([b - a + 1 for a, b in zip(first, last, strict=True)], dtype=np.int64)
        t_start = torch.from_numpy(t_start_all[list(first)])  # [T', ] float64
        t_end = torch.from_numpy(t_end_all[list(last)])
        # Compression and serialisation are pure CPU work (tens of ms per chunk with real token
        # shapes): off the event loop, so MQTT and the other cameras never wait on them. Chunks of
        # one camera are ingested one at a time, so its state is never touched concurrently.
        compressed, payload = await asyncio.to_thread(
            self._compress,
            mem,
            tokens=tokens,
            global_feats=global_feats,
            t_start=t_start,
            t_end=t_end,
            weight=torch.from_numpy(weight),
        )
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
        await self.store.put_chunk(meta, payload, vector)
        # Indexed even while the write waits in the retry buffer: ids are deterministic, a hit
        # whose payload never arrives is skipped at fetch time and dropped by the next catch-up.
        self.index.add(meta, vector)
        self._index_dirty = True

        s = self.stats
        s.chunks += 1
        s.frames += len(chunk.frames)
        s.frames_encoded += len(encode)
        s.tokens_in += compressed.n_input
        s.tokens_kept += compressed.n_tokens
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
            encoded = await self.encoder.encode(images[list(encode)])
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

    async def close(self) -> None:
        """Retry what is buffered once more, then save the index."""
        if self.store.pending:
            await self.store.flush_pending()
        if self.store.pending:
            logger.error("%d writes still buffered at shutdown: Redis is unreachable", self.store.pending)
        await asyncio.to_thread(self.save_index)
        s = self.stats
        logger.info(
            "pipeline closed: %d chunks, %d frames (%d encoded), %d → %d tokens, %d failed chunks",
            s.chunks, s.frames, s.frames_encoded, s.tokens_in, s.tokens_kept, s.failed_chunks,
        )  # fmt: skip

    async def record_outage(self, outage: Outage) -> None:
        """Store an outage (called when it starts and again when it ends)."""
        await self.store.put_outage(OutageRecord(outage.camera, outage.start_s, outage.end_s, outage.reason))

    def save_index(self) -> None:
        """Write the index atomically (the previous file stays intact if this fails)."""
        self.index_path.parent.mkdir(parents=True, exist_ok=True)
        self.index.save(self.index_path)
        self._index_dirty = False

    async def run_maintenance(self, stop: asyncio.Event, retention_days: dict[str, float]) -> None:
        """Until stop: save the index when it changed, apply retention, retry buffered writes."""
        retry = asyncio.create_task(self.store.run_retry_loop(stop), name="store:retry")
        last_retention = 0.0
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=INDEX_SAVE_INTERVAL_S)
                if self._index_dirty:
                    await asyncio.to_thread(self.save_index)
                now = time.time()
                if now - last_retention >= RETENTION_INTERVAL_S:
                    last_retention = now
                    await self.apply_retention(retention_days, now)
        finally:
            await retry

    async def apply_retention(self, retention_days: dict[str, float], now_s: float) -> int:
        """Delete each camera's memory older than its retention, in Redis and in the index."""
        deleted = 0
        for camera, days in retention_days.items():
            cutoff_age_s = days * SECONDS_PER_DAY
            try:
                deleted += await self.store.apply_retention(camera, cutoff_age_s, now_s)
            except Exception as exc:  # Redis away: retention simply waits for its next round
                logger.warning("retention for camera %s skipped: %s", camera, exc)
                continue
            if self.index.remove_before(camera, now_s - cutoff_age_s):
                self._index_dirty = True
        return deleted


def index_path_for(settings: Settings) -> Path:
    return Path(settings.data_dir) / "index" / f"{settings.redis.key_prefix}.npz"


def redis_client(settings: Settings) -> aioredis.Redis:
    """An asyncio client that fails fast: MemoryStore buffers and retries writes itself, so
    redis-py's own retries would only hold a camera's chunk for seconds while Redis is away."""
    password = settings.redis.password.get_secret_value() if settings.redis.password else None
    return aioredis.Redis.from_url(
        settings.redis.url,
        password=password,
        retry=Retry(ExponentialBackoff(cap=REDIS_RETRY_CAP_S), retries=1),
        socket_connect_timeout=REDIS_TIMEOUT_S,
        socket_timeout=REDIS_TIMEOUT_S,
    )


@contextlib.asynccontextmanager
async def open_pipeline(settings: Settings) -> AsyncIterator[Pipeline]:
    """Load the models, connect Redis, load and catch up the index; on exit flush and save.

    Raises what the model loaders raise (``ModelNotFoundError`` with advice) and Redis's
    ``ConnectionError`` when Redis cannot be reached at start.
    """
    models = settings.models
    faiss.omp_set_num_threads(FAISS_THREADS)
    started = time.perf_counter()
    vlm, embedder = await asyncio.gather(
        asyncio.to_thread(load_vlm, models.vlm, models.device, models.dtype),
        asyncio.to_thread(load_embedder, models.embedder, models.device, models.dtype),
    )
    logger.info("models loaded in %.1f s: %s, %s", time.perf_counter() - started, models.vlm, models.embedder)
    client = redis_client(settings)
    try:
        await client.ping()
        store = MemoryStore(
            client, key_prefix=settings.redis.key_prefix, buffer_chunks=settings.redis.write_buffer_chunks
        )
        path = index_path_for(settings)
        index = await asyncio.to_thread(VectorIndex.load_or_new, path, embedder.dim)
        added, removed = await index.catch_up(store)
        logger.info("index at %s: %d chunks (%d added from Redis, %d removed)", path, len(index), added, removed)
        async with BatchEncoder(
            vlm, embedder, max_batch_frames=models.encode_batch_frames, max_wait_ms=models.encode_max_wait_ms
        ) as encoder:
            pipeline = Pipeline(
                vlm=vlm,
                embedder=embedder,
                encoder=encoder,
                store=store,
                index=index,
                index_path=path,
                compression=settings.compression,
            )
            try:
                yield pipeline
            finally:
                await pipeline.close()
    finally:
        await client.aclose()

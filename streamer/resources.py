"""What ingest and answering share, opened together and closed together.

``open_resources(settings)`` loads the models, connects Redis, loads the FAISS index and catches
it up from Redis, and starts the batch encoder; it yields them as one :class:`Resources`. On
exit, in reverse: the encoder finishes what is queued, buffered Redis writes get one bounded
last try, the index is saved, Redis is closed. The exit runs whatever ended the block (a clean
stop, an unexpected exception, a cancellation), so the index file is always saved.

The index file belongs to the daemon. ``vigil import`` opens the resources with
``owns_index=False``: it writes Redis only, and the index stays in memory, never loaded, caught up
or saved. A running daemon's index follows what an import stores (``IndexFile.follow``); a
daemon started later catches up from Redis.

The services are built from these by whoever composes them (``vigil serve`` in
streamer/daemon.py, ``vigil import`` in streamer/importer.py); nothing here ingests or answers.
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
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from memory.aio import wait_set
from memory.index import VectorIndex
from memory.store import REDIS_AWAY_ERRORS, SHUTDOWN_FLUSH_S, MemoryStore
from streamer.settings import Settings
from vlm.embedder import Embedder, load_embedder
from vlm.encoding import BatchEncoder
from vlm.models import VisionLanguageModel, load_vlm

logger = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 5.0  # a Redis that does not answer within this is treated as away
REDIS_RETRY_CAP_S = 1.0
# Filtered searches score small contiguous slices; OpenMP's thread start-up costs more than it
# saves there, and the cores are better left to the encoder and generation threads
# (docs/storage.md: 12x slower p50 at 10k vectors with 2 threads on a busy 2-core machine).
FAISS_THREADS = 1
# How often a daemon's index looks for chunks other processes (vigil import) stored: imported
# memory is searchable this long after it reached Redis; each look is one small read per camera.
FOLLOW_INTERVAL_S = 1.0
# The last look at stop (so the index saved at exit holds what was stored until then) gets this
# long; what it misses the next start's catch-up adds.
FINAL_FOLLOW_S = 5.0


@dataclass
class IndexFile:
    """The FAISS index and the file it is saved to; ``dirty`` when it changed since the last save.

    The index is derived from Redis, so a save that is late only costs catch-up time at the next
    start; a save never leaves a half-written file (``VectorIndex.save`` is atomic).
    """

    index: VectorIndex
    path: Path
    dirty: bool = False
    # Camera → id of the last ``added`` log entry the index has seen (MemoryStore.read_added).
    cursors: dict[str, str] = field(default_factory=dict)

    def save(self) -> None:
        """Write the index now (blocking: FAISS and file I/O; call it in a thread from the loop)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dirty = False  # before the write: a change made while it runs marks it dirty again
        try:
            self.index.save(self.path)
        except BaseException:
            self.dirty = True
            raise

    async def save_if_dirty(self) -> bool:
        """Save off the loop when the index changed; True when it was written."""
        if not self.dirty:
            return False
        await asyncio.to_thread(self.save)
        return True

    async def follow(self, store: MemoryStore, stop: asyncio.Event, interval_s: float = FOLLOW_INTERVAL_S) -> None:
        """Until ``stop``: every ``interval_s``, add the chunks other processes stored (the daemon task
        ``index:follow``); then one last bounded look. Redis being away is waited out; anything else
        propagates."""
        away = False
        followed = 0  # chunks added in the current run of additions, logged when it ends
        while not stop.is_set():
            await wait_set(stop, interval_s)
            try:
                async with asyncio.timeout(FINAL_FOLLOW_S if stop.is_set() else None):
                    added = await self.index.follow(store, self.cursors)
            except (*REDIS_AWAY_ERRORS, TimeoutError) as exc:
                if not away and not stop.is_set():
                    logger.warning("index cannot follow Redis (%s: %s); retrying", type(exc).__name__, exc)
                away = True
                continue
            if away:
                logger.info("index follows Redis again")
                away = False
            if added:
                self.dirty = True
                followed += added
                logger.debug("index: %d chunks stored elsewhere added", added)
            if followed and (not added or stop.is_set()):
                logger.info("index: %d chunks stored by another process (vigil import) added", followed)
                followed = 0


@dataclass(frozen=True)
class Resources:
    """Models, Redis, the index and the batch encoder of one process."""

    vlm: VisionLanguageModel
    embedder: Embedder
    redis: aioredis.Redis
    store: MemoryStore
    index: IndexFile
    encoder: BatchEncoder


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
async def open_resources(settings: Settings, *, owns_index: bool = True) -> AsyncIterator[Resources]:
    """Load the models, connect Redis, load and catch up the index, start the encoder.

    ``owns_index=False`` (``vigil import``): the index is a fresh in-memory one, never read from
    or written to the index file, which a running daemon may own. Raises what the model loaders
    raise (``ModelNotFoundError`` with advice) and Redis's ``ConnectionError`` when Redis cannot
    be reached at start.
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
        if owns_index:
            index = IndexFile(await asyncio.to_thread(VectorIndex.load_or_new, path, embedder.dim), path)
            # Before the catch-up: what is written while it runs is then read again by follow().
            index.cursors = await store.added_cursors()
            added, removed = await index.index.catch_up(store)
            # Counters of memory written before they existed are recounted once (a scan per camera).
            await store.ensure_usage()
            index.dirty = bool(added or removed)
            logger.info(
                "index at %s: %d chunks (%d added from Redis, %d removed)", path, len(index.index), added, removed
            )
        else:
            index = IndexFile(VectorIndex(embedder.dim), path)
        try:
            async with BatchEncoder(
                vlm, embedder, max_batch_frames=models.encode_batch_frames, max_wait_ms=models.encode_max_wait_ms
            ) as encoder:
                yield Resources(vlm, embedder, client, store, index, encoder)
        finally:
            await _flush_writes(store)
            if owns_index:
                await asyncio.to_thread(index.save)
                logger.info("index saved: %d chunks at %s", len(index.index), path)
    finally:
        await client.aclose()


async def _flush_writes(store: MemoryStore) -> None:
    """One bounded last try for writes still buffered (Redis away); what is left is reported lost."""
    if store.pending:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_FLUSH_S):
                await store.flush_pending()
    if store.pending:
        logger.error("%d buffered Redis writes lost at shutdown: Redis is unreachable", store.pending)

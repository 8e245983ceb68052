"""Periodic upkeep of memory while the daemon runs: index saves, retention and compaction.

Retention covers a camera's watch events too (memory/events.py): they are kept as long as the
camera's chunks, with the same cutoff, so an event never outlives the memory it cites.

The retry of buffered Redis writes is the store's own loop (``MemoryStore.run_retry_loop``), run
by the daemon as a task of its own so that each long-lived task has one job and returns on the
stop signal. The final index save is not done here but when the resources close
(streamer/resources.py), whatever ends the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping

import redis.exceptions

from memory.aio import wait_set
from memory.events import EventStore
from memory.store import REDIS_AWAY_ERRORS, MemoryStore
from streamer.compaction import COMPACTION_INTERVAL_S, Compactor
from streamer.resources import IndexFile

logger = logging.getLogger(__name__)

INDEX_SAVE_INTERVAL_S = 60.0  # the index is derived from Redis: a stale file only costs catch-up time
RETENTION_INTERVAL_S = 600.0  # retention is by days; checking every 10 minutes is plenty
SECONDS_PER_DAY = 86400.0


class Maintenance:
    """``await maintenance.run(stop)``: build the index's approximate part when due, save the index
    when it changed, apply each camera's retention, then compact (consolidation tiers and size
    budgets, streamer/compaction.py)."""

    def __init__(
        self,
        store: MemoryStore,
        index: IndexFile,
        retention_days: Mapping[str, float],
        *,
        save_interval_s: float = INDEX_SAVE_INTERVAL_S,
        retention_interval_s: float = RETENTION_INTERVAL_S,
        compactor: Compactor | None = None,
        compaction_interval_s: float = COMPACTION_INTERVAL_S,
        events: EventStore | None = None,
    ) -> None:
        self._store = store
        self._events = events
        self._index = index
        self._retention_days = dict(retention_days)
        self._save_interval_s = save_interval_s
        self._retention_interval_s = retention_interval_s
        self._compactor = compactor
        self._compaction_interval_s = compaction_interval_s

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: retention now and every retention interval, index saves every save interval."""
        next_retention = next_compaction = time.monotonic()
        while not stop.is_set():
            await self.refresh_approximate()
            if time.monotonic() >= next_retention:
                next_retention = time.monotonic() + self._retention_interval_s
                await self.apply_retention(time.time())
            if self._compactor is not None and time.monotonic() >= next_compaction:
                next_compaction = time.monotonic() + self._compaction_interval_s
                await self.compact(time.time())
            await wait_set(stop, self._save_interval_s)
            await self._index.save_if_dirty()

    async def refresh_approximate(self) -> bool:
        """(Re)build the index's approximate part when it is due: at start, then when memory grew or
        shrank enough (memory/index.py). In a worker thread: k-means takes seconds at 1M chunks."""
        return await asyncio.to_thread(self._index.index.refresh_approximate)

    async def apply_retention(self, now_s: float) -> int:
        """Delete each camera's memory older than its retention, in Redis and in the index, and the
        events that ended before the same cutoff. Returns the number of chunks deleted."""
        deleted = 0
        for camera, days in self._retention_days.items():
            cutoff_age_s = days * SECONDS_PER_DAY
            if self._events is not None:
                await self._guarded(camera, "event retention", self._events.prune(camera, now_s - cutoff_age_s))
            chunks = await self._guarded(
                camera, "retention", self._store.apply_retention(camera, cutoff_age_s, now_s)
            )
            if chunks is None:
                continue
            deleted += chunks
            if self._index.index.remove_before(camera, now_s - cutoff_age_s):
                self._index.dirty = True
        return deleted

    @staticmethod
    async def _guarded(camera: str, what: str, step: Awaitable[int]) -> int | None:
        """Run one camera's retention step; None when Redis is away or refuses it (logged)."""
        try:
            return await step
        except REDIS_AWAY_ERRORS as exc:  # retention simply waits for its next round
            logger.warning("%s for camera %s skipped: Redis unavailable (%s)", what, camera, exc)
        except redis.exceptions.RedisError as exc:
            # Redis refuses it (a damaged key: WRONGTYPE): the other cameras still get theirs.
            logger.error("%s for camera %s failed: %s: %s", what, camera, type(exc).__name__, exc)
        return None

    async def compact(self, now_s: float) -> None:
        """One compaction pass; Redis being away or refusing it only postpones it to the next round."""
        if self._compactor is None:
            return
        try:
            await self._compactor.run_once(now_s)
        except REDIS_AWAY_ERRORS as exc:
            logger.warning("compaction skipped: Redis unavailable (%s)", exc)
        except redis.exceptions.RedisError as exc:
            logger.error("compaction failed: %s: %s", type(exc).__name__, exc)

"""Is the daemon doing its job? The ``health`` and counters retained on ``{prefix}/status``.

``{prefix}/available`` only says whether the process is connected (``online``, or the last will
``offline``). A daemon can be online and still remember nothing: every chunk of a camera failing,
or Redis away so that chunks pile up in the retry buffer. ``assess`` turns the ingest and store
state into ``ok`` or ``degraded`` with a reason a person can act on; the daemon publishes it with
the counters (docs/api.md, Status).

The memory held per camera and tier comes from the store's usage counters (``MemoryStore.usage``,
one hash read per camera, never a scan): ``UsageReader`` reads them before each status
publication and keeps the last reading for ``/healthz`` and the metrics, which are synchronous.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from zoneinfo import ZoneInfo

import redis.exceptions

from memory.store import REDIS_AWAY_ERRORS, CameraUsage, MemoryStore, StoreStats
from streamer.ingest import IngestStats
from streamer.timefmt import iso_time

logger = logging.getLogger(__name__)

HealthState = Literal["ok", "degraded"]


@dataclass(frozen=True, slots=True)
class Health:
    state: HealthState
    reason: str | None  # why it is degraded, for people; None when ok
    causes: tuple[str, ...] = ()  # what is wrong, for change detection ("camera:NAME", "redis")


def assess(failing: Mapping[str, str], pending_writes: int, writes_dropped: int) -> Health:
    """``failing``: camera → why its chunks keep failing (``IngestService.failing()``);
    ``pending_writes``: Redis writes waiting in the retry buffer (only while Redis is away)."""
    reasons = [f"camera {camera}: {why}" for camera, why in failing.items()]
    causes = [f"camera:{camera}" for camera in failing]
    if pending_writes:
        dropped = f", {writes_dropped} dropped so far" if writes_dropped else ""
        reasons.append(f"Redis unreachable: {pending_writes} writes waiting for retry{dropped}")
        causes.append("redis")
    if not reasons:
        return Health("ok", None)
    return Health("degraded", "; ".join(reasons), tuple(causes))


class UsageReader:
    """The store's usage counters as last read; ``latest`` is None until a read succeeded."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self.latest: dict[str, CameraUsage] | None = None

    async def refresh(self) -> None:
        """Read the counters again; Redis away or refusing keeps the last reading (logged)."""
        try:
            self.latest = await self._store.usage()
        except REDIS_AWAY_ERRORS as exc:  # the health already says Redis is away; keep what was read
            logger.debug("memory usage not read: Redis unavailable (%s)", exc)
        except redis.exceptions.RedisError as exc:
            logger.warning("memory usage not read: %s: %s", type(exc).__name__, exc)


def memory_payload(usage: Mapping[str, CameraUsage] | None) -> dict[str, Any] | None:
    """The ``memory`` field of the status: camera -> tier ("0", ..., "total") -> chunks and bytes.

    A camera whose counters are incomplete (not yet recounted after an upgrade) is null: unknown,
    rather than a number that is too small. None before the first reading.
    """
    if usage is None:
        return None
    return {camera: row.rows() if row.complete else None for camera, row in usage.items()}


def status_payload(
    health: Health,
    ingest: IngestStats,
    store: StoreStats,
    pending_writes: int,
    *,
    now_s: float,
    tz: ZoneInfo,
    memory: Mapping[str, CameraUsage] | None = None,
) -> dict[str, Any]:
    """The JSON body of ``{prefix}/status``; ``memory``: the usage counters as last read."""
    return {
        "published_at": iso_time(now_s, tz),
        "health": health.state,
        "reason": health.reason,
        "chunks_stored": ingest.chunks,
        "chunks_failed": ingest.failed_chunks,
        "frames_skipped": ingest.frames_skipped,
        "pending_writes": pending_writes,
        "writes_dropped": store.dropped,
        "encoder_queue_chunks": ingest.encoding_chunks,
        "memory": memory_payload(memory),
    }

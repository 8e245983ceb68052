"""Is the daemon doing its job? The ``health`` and counters retained on ``{prefix}/status``.

``{prefix}/available`` only says whether the process is connected (``online``, or the last will
``offline``). A daemon can be online and still remember nothing: every chunk of a camera failing,
or Redis away so that chunks pile up in the retry buffer. ``assess`` turns the ingest and store
state into ``ok`` or ``degraded`` with a reason a person can act on; the daemon publishes it with
the counters (docs/api.md, Status).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from zoneinfo import ZoneInfo

from memory.store import StoreStats
from streamer.ingest import IngestStats
from streamer.timefmt import iso_time

HealthState = Literal["ok", "degraded"]


@dataclass(frozen=True, slots=True)
class Health:
    state: HealthState
    reason: str | None  # why it is degraded; None when ok


def assess(failing: Mapping[str, str], pending_writes: int, writes_dropped: int) -> Health:
    """``failing``: camera → why its chunks keep failing (``IngestService.failing()``);
    ``pending_writes``: Redis writes waiting in the retry buffer (only while Redis is away)."""
    reasons = [f"camera {camera}: {why}" for camera, why in failing.items()]
    if pending_writes:
        dropped = f", {writes_dropped} dropped so far" if writes_dropped else ""
        reasons.append(f"Redis unreachable: {pending_writes} writes waiting for retry{dropped}")
    if not reasons:
        return Health("ok", None)
    return Health("degraded", "; ".join(reasons))


def status_payload(
    health: Health, ingest: IngestStats, store: StoreStats, pending_writes: int, *, now_s: float, tz: ZoneInfo
) -> dict[str, Any]:
    """The JSON body of ``{prefix}/status``."""
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
    }

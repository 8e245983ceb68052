"""Every Redis key vigil writes, in one place.

Per-camera keys wrap the camera name in a Redis Cluster hash tag (``{front_door}``), so all keys of
one camera hash to the same slot and a transaction over them (chunk hash + time index) is legal
in a cluster. No command in vigil touches keys of two cameras at once; the global keys (the set of camera
names, the runtime watches) are always written and read on their own.

Layout (``P`` is the configured key prefix, ``C`` a camera name):

| key | type | contents |
|---|---|---|
| ``P:cameras`` | set | camera names that have memory |
| ``P:{C}:timeline`` | sorted set | member = chunk id (decimal), score = chunk start in UTC ms |
| ``P:{C}:chunk:<id>`` | hash | ``meta`` (JSON), ``payload`` (codec bytes), ``vec`` (float32 bytes) |
| ``P:{C}:outages`` | hash | field = outage start in UTC ms, value = JSON record |
| ``P:{C}:added`` | stream | one entry per chunk write: ``chunk`` (id), ``start_ms``, ``removed``; capped |
| ``P:{C}:max_span`` | string | longest span of a consolidated chunk of the camera, in ms |
| ``P:{C}:events`` | hash | field = event id, value = JSON event (memory/events.py) |
| ``P:{C}:event_starts`` | sorted set | member = event id, score = event start in UTC ms |
| ``P:{C}:event_ends`` | sorted set | member = event id, score = event end in UTC ms (``+inf`` while ongoing) |
| ``P:watches`` | hash | field = watch name, value = JSON of a watch added at runtime (memory/watches.py) |
| ``P:{C}:usage`` | hash | ``chunks:<tier>``, ``bytes:<tier>`` (meta + payload + vec), ``complete`` (1) |

``removed`` (ids, comma-separated) is set when a consolidation replaced chunks or a size budget
deleted them (then ``chunk`` is empty). ``max_span`` is how far back a time-range query looks.
``usage`` is changed by the same Lua script as every chunk write, swap and deletion
(memory/store.py), so it cannot drift; ``complete`` is set by a camera's first chunk or by a
recount from a scan (``MemoryStore.rebuild_usage``), and its absence means "recount me".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Camera names end up inside a hash tag and between ':' separators, so braces, ':' and whitespace
# would break the tag or make keys ambiguous. streamer/settings.py enforces a stricter rule; this
# is the store's own guard, because memory/ must not import streamer/.
# fullmatch, not match with '$': '$' also matches before a final newline ("cam\n").
_CAMERA_RE = re.compile(r"[^{}:\s]{1,128}")
_PREFIX_RE = re.compile(r"[^{}\s]{1,128}")


def check_camera(camera: str) -> str:
    """Return ``camera`` if it can be used inside a key; raise ValueError naming the problem."""
    if not isinstance(camera, str) or not _CAMERA_RE.fullmatch(camera):
        raise ValueError(
            f"camera name {camera!r} cannot be used in a Redis key: use 1-128 characters without "
            "braces, ':' or whitespace"
        )
    return camera


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Key names under one prefix."""

    prefix: str

    def __post_init__(self) -> None:
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise ValueError(
                f"key prefix {self.prefix!r} must be 1-128 characters without braces or whitespace"
            )

    def cameras(self) -> str:
        """Set of camera names that have memory (the only key not tied to one camera)."""
        return f"{self.prefix}:cameras"

    def watches(self) -> str:
        """Hash of the watches added over MQTT (name → JSON fields), so they survive restarts."""
        return f"{self.prefix}:watches"

    def camera_tag(self, camera: str) -> str:
        """The hash tag every key of ``camera`` carries."""
        return "{" + check_camera(camera) + "}"

    def timeline(self, camera: str) -> str:
        """Sorted set of the camera's chunk ids scored by start time in ms."""
        return f"{self.prefix}:{self.camera_tag(camera)}:timeline"

    def chunk(self, camera: str, chunk_id: int) -> str:
        """Hash of one chunk: metadata, payload bytes and retrieval vector."""
        return f"{self.prefix}:{self.camera_tag(camera)}:chunk:{chunk_id}"

    def outages(self, camera: str) -> str:
        """Hash of the camera's outage records keyed by start time in ms."""
        return f"{self.prefix}:{self.camera_tag(camera)}:outages"

    def added(self, camera: str) -> str:
        """Stream logging every chunk write of the camera, so a running daemon's index follows
        writes of other processes (``vigil import``)."""
        return f"{self.prefix}:{self.camera_tag(camera)}:added"

    def max_span(self, camera: str) -> str:
        """Longest span (ms) of the camera's consolidated chunks: how far back a time query looks."""
        return f"{self.prefix}:{self.camera_tag(camera)}:max_span"

    def events(self, camera: str) -> str:
        """Hash of the camera's watch events: id → JSON."""
        return f"{self.prefix}:{self.camera_tag(camera)}:events"

    def event_starts(self, camera: str) -> str:
        """Sorted set of the camera's event ids scored by start time in ms (query order)."""
        return f"{self.prefix}:{self.camera_tag(camera)}:event_starts"

    def event_ends(self, camera: str) -> str:
        """Sorted set of the camera's event ids scored by end time in ms, ``+inf`` while ongoing
        (overlap queries and retention)."""
        return f"{self.prefix}:{self.camera_tag(camera)}:event_ends"
    def usage(self, camera: str) -> str:
        """Hash of the camera's chunk and byte counters per consolidation tier."""
        return f"{self.prefix}:{self.camera_tag(camera)}:usage"

    def camera_keys(self, camera: str, chunk_id: int) -> list[str]:
        """Every per-camera key form (for tests and tools that check slot placement)."""
        return [
            self.timeline(camera),
            self.chunk(camera, chunk_id),
            self.outages(camera),
            self.added(camera),
            self.max_span(camera),
            self.events(camera),
            self.event_starts(camera),
            self.event_ends(camera),
            self.usage(camera),
        ]

"""EventStore: the events watches raise, kept in Redis per camera with a time index.

An event is a span in which a watch's answer was "yes" on one camera (streamer/ watches create
them). The watch code writes an event when it starts, on each update and when it ends; every one
of these is a :meth:`EventStore.put` of the whole event, replacing the stored one with the same
id, so a retried write is harmless.

Per camera (key names in memory/keys.py, all under the camera's hash tag, so one MULTI/EXEC over
them is legal in Redis Cluster):

* a hash ``events``: id → JSON of the event;
* a sorted set ``event_starts`` (score = start in ms): the order queries return;
* a sorted set ``event_ends`` (score = end in ms, ``+inf`` while the event is ongoing): which
  events reach into a window (an ongoing one reaches into every later window) and which ended
  before a retention cutoff. Two indexes rather than one plus a "longest event" look-back (as the
  chunks have): an event has no bounded length, it lasts as long as the watch keeps answering yes.

Queries over all cameras go camera by camera through the cameras set (memory/keys.py), never
with a multi-key command. Errors of Redis propagate: the caller decides whether to retry.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from memory.keys import RedisKeys, check_camera

if TYPE_CHECKING:
    from redis.asyncio import Redis

MS_PER_S = 1000.0
# Ids fetched or deleted per round trip: keeps each Redis command short (as memory/store.py).
BATCH_IDS = 1000
# The most events one query returns: a reply must fit an MQTT message and a terminal.
MAX_QUERY_LIMIT = 10_000
MAX_ID_CHARS = 256  # an event id is a short token (a UUID or watch:camera:start); bounded as a hash field
MAX_WATCH_CHARS = 128  # watch names follow the camera-name rules (memory/keys.py allows 128)


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a watch on one camera. Times are UTC epoch seconds; scores P(yes) in [0, 1]."""

    id: str
    watch: str
    camera: str
    start_s: float
    end_s: float | None  # None while the event is ongoing
    score: float  # the latest check's score
    peak_score: float  # the highest score during the event
    description: str | None  # one sentence, when the watch describes its events

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        return cls(**json.loads(text))


def _ms(value_s: float) -> int:
    return round(value_s * MS_PER_S)


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_event(event: Event) -> Event:
    """Return ``event`` if it can be stored; raise ValueError naming the problem."""
    check_camera(event.camera)
    for name, value, limit in (("id", event.id, MAX_ID_CHARS), ("watch", event.watch, MAX_WATCH_CHARS)):
        if not isinstance(value, str) or not value or len(value) > limit:
            raise ValueError(f"event {name} must be a string of 1-{limit} characters, got {value!r}")
    start_s = _finite("start_s", event.start_s)
    if event.end_s is not None and _finite("end_s", event.end_s) < start_s:
        raise ValueError(f"event end_s {event.end_s!r} is before start_s {event.start_s!r}")
    for name in ("score", "peak_score"):
        if not 0.0 <= _finite(name, getattr(event, name)) <= 1.0:
            raise ValueError(f"event {name} must be in [0, 1], got {getattr(event, name)!r}")
    if event.description is not None and not isinstance(event.description, str):
        raise ValueError(f"event description must be a string or None, got {type(event.description).__name__}")
    return event


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class EventStore:
    """Events of every camera in one Redis (or Redis Cluster)."""

    def __init__(self, redis: Redis, *, key_prefix: str) -> None:
        self._redis = redis
        self.keys = RedisKeys(key_prefix)

    async def put(self, event: Event) -> None:
        """Insert ``event``, or replace the stored event with the same id (update, end).

        Invalid events raise ValueError before anything is written. The camera joins the cameras
        set, so queries over all cameras find it even before its first chunk is stored.
        """
        check_event(event)
        camera = event.camera
        end: float | str = "+inf" if event.end_s is None else _ms(event.end_s)
        await self._redis.sadd(self.keys.cameras(), camera)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.events(camera), event.id, event.to_json())
            pipe.zadd(self.keys.event_starts(camera), {event.id: _ms(event.start_s)})
            pipe.zadd(self.keys.event_ends(camera), {event.id: end})
            await pipe.execute()

    async def query(
        self,
        *,
        camera: str | None = None,
        watch: str | None = None,
        after_s: float | None = None,
        before_s: float | None = None,
        limit: int = 100,
    ) -> list[Event]:
        """Events overlapping [after_s, before_s) (None: unbounded), ordered by start, the earliest
        ``limit``. An event overlaps when it starts before ``before_s`` and ends after ``after_s``
        or is still ongoing. ``camera``/``watch`` None: every camera/watch."""
        if not isinstance(limit, int) or not 1 <= limit <= MAX_QUERY_LIMIT:
            raise ValueError(f"limit must be an integer in [1, {MAX_QUERY_LIMIT}], got {limit!r}")
        if after_s is not None:
            _finite("after_s", after_s)
        if before_s is not None:
            _finite("before_s", before_s)
        if after_s is not None and before_s is not None and after_s >= before_s:
            raise ValueError(f"after_s ({after_s}) must be before before_s ({before_s})")
        cameras = [check_camera(camera)] if camera is not None else await self._cameras()
        found: list[list[Event]] = []
        for name in cameras:
            found.append(await self._query_camera(name, watch, after_s, before_s, limit))
        merged = sorted(itertools.chain.from_iterable(found), key=lambda e: (e.start_s, e.camera, e.id))
        return merged[:limit]

    async def _cameras(self) -> list[str]:
        return sorted(_text(n) for n in await self._redis.smembers(self.keys.cameras()))

    async def _candidates(self, camera: str, after_s: float | None, before_s: float | None) -> list[str]:
        """Ids of the camera's events overlapping the window, in start order (ties by id)."""
        if after_s is None:
            high: float | str = "+inf" if before_s is None else f"({_ms(before_s)}"
            return [_text(m) for m in await self._redis.zrangebyscore(self.keys.event_starts(camera), "-inf", high)]
        # From the end index: what reaches into the window (ends after it opens, or is ongoing),
        # so a query of the last hour reads the last hour's events, not the camera's history.
        reaching = [
            _text(m) for m in await self._redis.zrangebyscore(self.keys.event_ends(camera), f"({_ms(after_s)}", "+inf")
        ]
        if not reaching:
            return []
        starts: list[float | None] = await self._redis.zmscore(self.keys.event_starts(camera), reaching)
        high_ms = math.inf if before_s is None else _ms(before_s)
        kept = [(start, event_id) for event_id, start in zip(reaching, starts, strict=True) if start is not None]
        return [event_id for start, event_id in sorted(kept) if start < high_ms]

    async def _query_camera(
        self, camera: str, watch: str | None, after_s: float | None, before_s: float | None, limit: int
    ) -> list[Event]:
        ids = await self._candidates(camera, after_s, before_s)
        events: list[Event] = []
        for start in range(0, len(ids), BATCH_IDS):
            batch = ids[start : start + BATCH_IDS]
            rows: list[bytes | None] = await self._redis.hmget(self.keys.events(camera), batch)
            for row in rows:
                if row is None:  # pruned between the index read and this one
                    continue
                event = Event.from_json(row)
                if watch is not None and event.watch != watch:
                    continue
                events.append(event)
                if len(events) >= limit:
                    return events
        return events

    async def prune(self, camera: str, before_s: float) -> int:
        """Delete the camera's events that ended before ``before_s`` (retention); ongoing ones stay.

        Each batch deletes the records and both index entries in one transaction. Returns how
        many events were deleted.
        """
        ends = self.keys.event_ends(check_camera(camera))
        cutoff = f"({_ms(_finite('before_s', before_s))}"
        deleted = 0
        while True:
            ids: list[Any] = await self._redis.zrangebyscore(ends, "-inf", cutoff, start=0, num=BATCH_IDS)
            if not ids:
                return deleted
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(self.keys.events(camera), *ids)
                pipe.zrem(self.keys.event_starts(camera), *ids)
                pipe.zrem(ends, *ids)
                await pipe.execute()
            deleted += len(ids)

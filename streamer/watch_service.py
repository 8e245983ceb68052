"""Watches at work: check each new chunk, turn scores into events, publish and store them.

``WatchService`` is the shell around the pure core of streamer/watches.py:

* **Watches.** The config's (read-only at runtime) plus those added over MQTT, which are kept in
  Redis (memory/watches.py) and loaded again at start. On a name in both, the config file wins
  and the stored one is forgotten: the file is what an operator reads and edits, so it stays the
  truth about every watch it lists, and a restart never silently keeps or undoes a change to it.
* **Checks.** Ingest hands over each stored chunk (``submit``, never blocking). Chunks wait in a
  bounded queue (``CHECK_QUEUE_CHUNKS``); when it is full the oldest is dropped and counted for
  every watch on its camera, so a check is either done soon after its chunk or not at all, never
  silently late. One task takes them in order and scores all watches of the chunk's camera in one
  ``vlm.watch.yes_probabilities`` call on the service's own model thread (``vigil-watch``): the
  loop, the encoder thread and the question thread never wait for it.
* **Events.** Each (watch, camera) runs the hysteresis of ``watches.step``; an event is written to
  Redis (``EventStore.put``: new, update, end), published on ``{prefix}/events``, and the watch's
  retained ``state`` (ON while any of its cameras has an event on) and ``attributes`` follow.
  ``describe: true`` generates one sentence about the chunk that started the event (the answer
  path's ``generate_stream``, ``DESCRIBE_MAX_TOKENS``), sent as an ``update``.

A watch that is changed or removed ends its ongoing events (``end``); so does a stop of vigil,
because nothing watches while it is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol
from zoneinfo import ZoneInfo

import redis.exceptions

from memory.events import Event, EventStore
from memory.watches import WatchStore
from retrieval.prompt import format_span, token_order
from streamer.events import SCORE_DIGITS, event_payload
from streamer.requests import RequestError
from streamer.settings import MAX_WATCHES, WatchSettings
from streamer.timefmt import iso_time
from streamer.topics import Topics
from streamer.watches import (
    Change,
    Rule,
    WatchState,
    check_watch_name,
    end_now,
    event_id,
    parse_watch,
    step,
    watch_fields,
    watched_cameras,
)
from vlm.types import PromptPart, TextPart, VisualPart
from vlm.watch import yes_probabilities

if TYPE_CHECKING:
    from memory.store import ChunkMeta
    from memory.types import CompressedChunk
    from vlm.models import VisionLanguageModel

log = logging.getLogger(__name__)

# Chunks waiting for their checks. A check of every watch of a chunk is one model call; more than a
# couple waiting means the checks cannot keep up, and an older chunk's events would be late.
CHECK_QUEUE_CHUNKS = 4
DESCRIBE_MAX_TOKENS = 40  # one sentence
DESCRIBE_TIMEOUT_S = 30.0  # a description later than this is cut where it is
DESCRIBE_PROMPT = "Describe in one short sentence what the camera shows that answers this question: {question}"
CONTEXT_PREAMBLE = "You are vigil, a video memory of live cameras. Below is what camera {camera} saw ({span})."
FINAL_END_S = 5.0  # at stop, ending the ongoing events (store + publish) gets this long
# Errors of a check that mean "this chunk cannot be checked", not "vigil is broken" (a chunk the
# prompt assembly refuses); as ingest's CHUNK_ERRORS.
CHECK_ERRORS: tuple[type[Exception], ...] = (ValueError,)
STORE_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.RedisError, ValueError)


# Called after the watches changed (loaded, added, changed, removed) with the watches now in force:
# Home Assistant discovery announces and removes their entities this way.
ChangeListener = Callable[[Mapping[str, "Watch"]], Awaitable[None]]


class WatchPublisher(Protocol):
    """The part of ``MqttApi`` the watches publish through."""

    async def publish_retained(self, topic: str, payload: bytes) -> None: ...

    async def publish_event(self, body: dict[str, Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class Watch:
    """A watch in force: its name, settings and where it comes from."""

    name: str
    settings: WatchSettings
    origin: Literal["config", "runtime"]

    @property
    def rule(self) -> Rule:
        return Rule.of(self.settings)


@dataclass(frozen=True, slots=True)
class CheckJob:
    """A stored chunk waiting for its checks."""

    camera: str
    start_s: float
    end_s: float
    chunk: CompressedChunk


@dataclass(slots=True)
class WatchCounts:
    """One watch's counters on one camera since start (streamer/metrics.py exports them)."""

    checks: int = 0
    dropped: int = 0
    events: int = 0


@dataclass(slots=True)
class _Latest:
    camera: str
    score: float
    start_s: float
    end_s: float


@dataclass
class WatchStats:
    """Counters of all watches, for the status topic."""

    checks: int = 0  # chunk checks done (one per chunk, all its watches at once)
    dropped: int = 0  # chunks whose checks were dropped because the queue was full
    failed: int = 0  # chunks that could not be checked (CHECK_ERRORS)
    events: int = 0
    per_watch: dict[tuple[str, str], WatchCounts] = field(default_factory=dict)

    def of(self, watch: str, camera: str) -> WatchCounts:
        return self.per_watch.setdefault((watch, camera), WatchCounts())


def chunk_context(camera: str, start_s: float, end_s: float, chunk: CompressedChunk, tz: ZoneInfo) -> list[PromptPart]:
    """The prompt parts every watch of a chunk shares: a line naming camera and span, then its tokens.

    Tokens in (frame, row, col) order, summary tokens last, as retrieval/prompt.py places them.
    """
    order = token_order(chunk.frame, chunk.row, chunk.col)  # [M]
    return [
        TextPart(CONTEXT_PREAMBLE.format(camera=camera, span=format_span(start_s, end_s, tz)) + "\n"),
        VisualPart(tokens=chunk.tokens[order], frame=chunk.frame[order], row=chunk.row[order], col=chunk.col[order]),
        TextPart("\n"),
    ]


class WatchService:
    """The daemon's watches: ``load`` at start, ``submit`` from ingest, ``apply`` from MQTT, ``run`` as a task."""

    def __init__(
        self,
        *,
        vlm: VisionLanguageModel,
        events: EventStore,
        store: WatchStore,
        publisher: WatchPublisher,
        topics: Topics,
        tz: ZoneInfo,
        cameras: Sequence[str],
        queue_chunks: int = CHECK_QUEUE_CHUNKS,
        on_check_seconds: Callable[[str, float], None] | None = None,
    ) -> None:
        self._vlm = vlm
        self._events = events
        self._store = store
        self._publisher = publisher
        self._topics = topics
        self._tz = tz
        self._cameras = sorted(cameras)
        self._on_check_seconds = on_check_seconds
        self._queue: asyncio.Queue[CheckJob] = asyncio.Queue(maxsize=queue_chunks)
        self._watches: dict[str, Watch] = {}
        self._states: dict[tuple[str, str], WatchState] = {}
        self._ongoing: dict[tuple[str, str], Event] = {}
        self._latest: dict[str, _Latest] = {}
        self._lock = asyncio.Lock()  # one change of the watches at a time (MQTT, the check task)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vigil-watch")
        self.stats = WatchStats()
        self._dropped_behind = 0  # chunks dropped since the checks last kept up
        self._listeners: list[ChangeListener] = []

    @property
    def watches(self) -> dict[str, Watch]:
        return dict(self._watches)

    def counts(self) -> dict[tuple[str, str], WatchCounts]:
        """(watch, camera) → counters, for every pair that was checked or dropped (metrics)."""
        return dict(self.stats.per_watch)

    def on_change(self, listener: ChangeListener) -> None:
        """Call ``listener`` with the watches in force after every load and change."""
        self._listeners.append(listener)

    async def _changed(self) -> None:
        for listener in self._listeners:
            await listener(dict(self._watches))

    def close(self) -> None:
        """Stop the model thread (a running check finishes first)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ watches

    async def load(self, configured: Mapping[str, WatchSettings]) -> None:
        """The config's watches plus the stored runtime ones (config wins); their retained topics."""
        for name, settings in configured.items():
            self._watches[name] = Watch(name, settings, "config")
        try:
            stored, unreadable = await self._store.load()
        except redis.exceptions.RedisError as exc:
            log.error("runtime watches not loaded (Redis: %s); only the config's watches run", exc)
            stored, unreadable = {}, {}
        for name, why in unreadable.items():
            log.warning("stored watch %r ignored: %s", name[:70], why)
        for name, fields in stored.items():
            if name in configured:
                log.warning(
                    "stored watch %s is also in the config file: the config's is used, the stored one removed", name
                )
                with contextlib.suppress(redis.exceptions.RedisError):
                    await self._store.remove(name)
                continue
            try:
                check_watch_name(name)
                watch = parse_watch(fields, cameras=self._cameras)
            except RequestError as exc:
                # Kept in Redis: the camera may come back in the config; it can be removed over MQTT.
                log.warning("stored watch %r not loaded: %s", name[:70], exc.message)
                continue
            if len(self._watches) >= MAX_WATCHES:
                log.warning("stored watch %s not loaded: more than %d watches", name, MAX_WATCHES)
                continue
            self._watches[name] = Watch(name, watch, "runtime")
        log.info(
            "watches: %s",
            ", ".join(
                f"{w.name} ({w.origin}, {', '.join(self._cameras_of(w)) or 'no camera'})"
                for w in self._watches.values()
            )
            or "none",
        )
        for watch in self._watches.values():
            await self._publish_watch(watch)
        await self._changed()

    async def apply(self, name: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """``{prefix}/watches/NAME/set``: add or change (``body``) or remove (None) a runtime watch.

        Validated like the config; anything invalid raises RequestError and changes nothing. The
        change is stored before it takes effect, so a Redis that refuses it changes nothing either.
        """
        check_watch_name(name)
        async with self._lock:
            existing = self._watches.get(name)
            if existing is not None and existing.origin == "config":
                raise RequestError("read_only", f"watch {name} is set in the config file; change it there")
            if body is None:
                return await self._remove(name, existing)
            watch = parse_watch(watch_fields(body), cameras=self._cameras)
            if existing is None and len(self._watches) >= MAX_WATCHES:
                raise RequestError("too_many_watches", f"{MAX_WATCHES} watches are in force; remove one first")
            fields = watch.model_dump(mode="json")
            try:
                await self._store.put(name, fields)
            except redis.exceptions.RedisError as exc:
                raise RequestError("unavailable", f"the watch cannot be stored now (Redis: {exc})") from None
            if existing is not None:
                await self._end_all(existing)
            new = Watch(name, watch, "runtime")
            self._watches[name] = new
            log.info(
                "watch %s %s over MQTT: cameras %s", name, "changed" if existing else "added", self._cameras_of(new)
            )
            await self._publish_watch(new)
            await self._changed()
            return {"watch": name, "status": "changed" if existing else "added", "settings": fields}

    async def _remove(self, name: str, existing: Watch | None) -> dict[str, Any]:
        try:
            await self._store.remove(name)
        except redis.exceptions.RedisError as exc:
            raise RequestError("unavailable", f"the watch cannot be removed now (Redis: {exc})") from None
        if existing is not None:
            await self._end_all(existing)
            del self._watches[name]
            self._latest.pop(name, None)
            for key in [key for key in self.stats.per_watch if key[0] == name]:
                del self.stats.per_watch[key]  # its series end: removed names must not pile up
            log.info("watch %s removed over MQTT", name)
        # Cleared even when unknown: that also clears what a watch removed while vigil was down left.
        await self._publisher.publish_retained(self._topics.watch_state(name), b"")
        await self._publisher.publish_retained(self._topics.watch_attributes(name), b"")
        if existing is not None:
            await self._changed()
        return {"watch": name, "status": "removed" if existing else "absent"}

    def _cameras_of(self, watch: Watch) -> list[str]:
        return watched_cameras(watch.settings, self._cameras)

    # ------------------------------------------------------------------ checks

    def submit(self, meta: ChunkMeta, chunk: CompressedChunk) -> None:
        """Queue a stored chunk for the checks of its camera's watches (ingest's hook; never blocks)."""
        if not any(meta.camera in self._cameras_of(w) for w in self._watches.values()):
            return
        job = CheckJob(meta.camera, meta.start_s, meta.end_s, chunk)
        if self._queue.full():
            self._drop(self._queue.get_nowait(), "the checks are behind")
        self._queue.put_nowait(job)

    def _count_dropped(self, job: CheckJob) -> list[str]:
        """Count a chunk whose checks are not done for each watch of its camera; their names."""
        self.stats.dropped += 1
        names = [w.name for w in self._watches.values() if job.camera in self._cameras_of(w)]
        for name in names:
            self.stats.of(name, job.camera).dropped += 1
        return names

    def _drop(self, job: CheckJob, why: str) -> None:
        names = self._count_dropped(job)
        self._dropped_behind += 1
        # A line when the checks fall behind and one when they catch up, not one per chunk.
        level = logging.DEBUG if self._dropped_behind > 1 else logging.WARNING
        log.log(
            level, "camera %s: checks of the chunk from %s dropped (%s): %s; counted in checks_dropped",
            job.camera, iso_time(job.start_s, self._tz), why, ", ".join(names),
        )  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Check queued chunks until ``stop``; then drop what is queued and end ongoing events."""
        while (job := await self._next(stop)) is not None:
            await self._check(job)
            if self._dropped_behind and self._queue.empty():
                log.info("watch checks keep up again; %d chunk(s) were dropped meanwhile", self._dropped_behind)
                self._dropped_behind = 0
        left = 0
        while not self._queue.empty():
            self._count_dropped(self._queue.get_nowait())
            left += 1
        if left:
            log.info("watches: the checks of %d chunk(s) stored at stop were not done", left)
        # Bounded: with Redis away each event write waits for its timeout, and the stop must not.
        try:
            async with asyncio.timeout(FINAL_END_S), self._lock:
                for watch in list(self._watches.values()):
                    await self._end_all(watch)
        except TimeoutError:
            log.warning("watches: ongoing events not all ended within %.0f s at stop", FINAL_END_S)

    async def _next(self, stop: asyncio.Event) -> CheckJob | None:
        """The next queued chunk, or None once ``stop`` is set (what is queued then stays queued)."""
        if stop.is_set():
            return None
        getter = asyncio.ensure_future(self._queue.get())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not getter.done():
                # A cancelled Queue.get leaves its item in the queue, so nothing is lost here.
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
        if getter.cancelled():
            return None
        if stop.is_set():  # both at once: the chunk goes back, to be counted with the rest
            self._queue.put_nowait(getter.result())
            return None
        return getter.result()

    async def _check(self, job: CheckJob) -> None:
        watches = [w for w in self._watches.values() if job.camera in self._cameras_of(w)]
        if not watches:
            return
        context = chunk_context(job.camera, job.start_s, job.end_s, job.chunk, self._tz)
        questions = [w.settings.question for w in watches]
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            scores = await loop.run_in_executor(self._executor, yes_probabilities, self._vlm, context, questions)
        except CHECK_ERRORS as exc:
            self.stats.failed += 1
            log.warning("camera %s: chunk from %s not checked: %s", job.camera, iso_time(job.start_s, self._tz), exc)
            return
        if self._on_check_seconds is not None:
            self._on_check_seconds(job.camera, time.perf_counter() - started)
        if not all(math.isfinite(score) for score in scores):
            # A model that overflowed (fp16 on some devices): no event, no NaN in JSON or Redis.
            self.stats.failed += 1
            log.warning("camera %s: chunk from %s gave non-finite scores; not counted", job.camera,
                        iso_time(job.start_s, self._tz))  # fmt: skip
            return
        self.stats.checks += 1
        started_events: list[tuple[Watch, Event]] = []
        async with self._lock:
            for watch, score in zip(watches, scores, strict=True):
                if self._watches.get(watch.name) is not watch:
                    continue  # changed or removed while the check ran: its score is for the old question
                if (event := await self._score(watch, job, score)) is not None and watch.settings.describe:
                    started_events.append((watch, event))
        # Outside the lock: a description takes seconds, and watch changes over MQTT need not wait.
        for watch, event in started_events:
            await self._describe(watch, job, event)

    async def _score(self, watch: Watch, job: CheckJob, score: float) -> Event | None:
        """Feed one score to the watch's state machine; the event it started, if it did."""
        key = (watch.name, job.camera)
        self.stats.of(*key).checks += 1
        state, change = step(self._states.get(key, WatchState()), score, job.start_s, job.end_s, watch.rule)
        self._states[key] = state
        self._latest[watch.name] = _Latest(job.camera, score, job.start_s, job.end_s)
        ongoing = self._ongoing.get(key)
        if change is None and ongoing is not None:
            self._ongoing[key] = Event(
                ongoing.id, watch.name, job.camera, ongoing.start_s, None,
                score, max(ongoing.peak_score, score), ongoing.description,
            )  # fmt: skip
        elif change is not None and change.kind == "start":
            event = Event(
                event_id(watch.name, job.camera, change.start_s), watch.name, job.camera,
                change.start_s, None, score, change.peak_score, None,
            )  # fmt: skip
            self._ongoing[key] = event
            self.stats.events += 1
            self.stats.of(*key).events += 1
            log.info("watch %s: event on camera %s from %s (P(yes) %.3f)", watch.name, job.camera,
                     iso_time(change.start_s, self._tz), score)  # fmt: skip
            await self._emit(event, "new")
            await self._publish_watch(watch)
            return event
        elif change is not None and ongoing is not None:
            await self._end(key, ongoing, change, score)
        await self._publish_watch(watch)
        return None

    async def _end(self, key: tuple[str, str], ongoing: Event, change: Change, score: float) -> None:
        self._ongoing.pop(key, None)
        event = Event(
            ongoing.id, ongoing.watch, ongoing.camera, ongoing.start_s, change.end_s,
            score, max(ongoing.peak_score, change.peak_score), ongoing.description,
        )  # fmt: skip
        log.info(
            "watch %s: event on camera %s ended at %s", event.watch, event.camera, iso_time(change.end_s, self._tz)
        )
        await self._emit(event, "end")

    async def _end_all(self, watch: Watch) -> None:
        """End the watch's ongoing events (it changes, goes or vigil stops) and forget its states."""
        for camera in self._cameras:
            key = (watch.name, camera)
            state = self._states.pop(key, None)
            if state is None:
                continue
            _, change = end_now(state)
            ongoing = self._ongoing.get(key)
            if change is not None and ongoing is not None:
                await self._end(key, ongoing, change, ongoing.score)
        await self._publish_watch(watch)

    async def _describe(self, watch: Watch, job: CheckJob, event: Event) -> None:
        """One sentence about the chunk that started ``event``, sent as an ``update``."""
        context = chunk_context(job.camera, job.start_s, job.end_s, job.chunk, self._tz)
        parts = [*context, TextPart(DESCRIBE_PROMPT.format(question=watch.settings.question) + "\nAnswer:")]
        loop = asyncio.get_running_loop()
        text = await loop.run_in_executor(self._executor, self._generate, parts)
        key = (watch.name, job.camera)
        async with self._lock:
            current = self._ongoing.get(key)
            if not text or current is None or current.id != event.id:
                return  # nothing said, or the event ended (or its watch changed) meanwhile
            described = Event(
                current.id, current.watch, current.camera, current.start_s, None,
                current.score, current.peak_score, text,
            )  # fmt: skip
            self._ongoing[key] = described
            await self._emit(described, "update")

    def _generate(self, parts: list[PromptPart]) -> str:
        deadline_s = time.monotonic() + DESCRIBE_TIMEOUT_S
        return "".join(
            self._vlm.generate_stream(parts, max_new_tokens=DESCRIBE_MAX_TOKENS, deadline_s=deadline_s)
        ).strip()

    async def _emit(self, event: Event, kind: Literal["new", "update", "end"]) -> None:
        """Store the event (upsert by id) and publish it; a store that refuses is logged, the event still goes out."""
        try:
            await self._events.put(event)
        except STORE_ERRORS as exc:
            log.error("watch %s: event %s not stored (%s: %s)", event.watch, event.id, type(exc).__name__, exc)
        await self._publisher.publish_event(event_payload(event, self._tz, kind))

    # ------------------------------------------------------------------ state topics

    async def _publish_watch(self, watch: Watch) -> None:
        if self._watches.get(watch.name) is not watch:
            return
        on = any(key[0] == watch.name for key in self._ongoing)
        await self._publisher.publish_retained(self._topics.watch_state(watch.name), b"ON" if on else b"OFF")
        body = json.dumps(self.attributes(watch), separators=(",", ":")).encode()
        await self._publisher.publish_retained(self._topics.watch_attributes(watch.name), body)

    def attributes(self, watch: Watch) -> dict[str, Any]:
        """The retained attributes of a watch: latest score and camera, settings, counters."""
        latest = self._latest.get(watch.name)
        cameras = self._cameras_of(watch)
        counts = [self.stats.of(watch.name, c) for c in cameras]
        ongoing = sorted(e.id for key, e in self._ongoing.items() if key[0] == watch.name)
        return {
            "score": None if latest is None else round(latest.score, SCORE_DIGITS),
            "camera": None if latest is None else latest.camera,
            "chunk": None
            if latest is None
            else {"start": iso_time(latest.start_s, self._tz), "end": iso_time(latest.end_s, self._tz)},
            "events_on": ongoing,
            "origin": watch.origin,
            "cameras": cameras,
            **watch.settings.model_dump(mode="json", exclude={"cameras"}),
            "checks": sum(c.checks for c in counts),
            "checks_dropped": sum(c.dropped for c in counts),
            "events": sum(c.events for c in counts),
        }

    def status(self) -> dict[str, Any]:
        """The watches part of ``{prefix}/status``."""
        s = self.stats
        return {
            "watches": len(self._watches),
            "checks": s.checks,
            "checks_dropped": s.dropped,
            "checks_failed": s.failed,
            "events": s.events,
            "queued": self._queue.qsize(),
        }

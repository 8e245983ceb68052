"""One camera: a PyAV decoder thread feeding the event loop, with reconnects and a stall watchdog.

Life of a worker (``CameraWorker.run``)::

    connecting ──first frame──▶ connected ──error / end / stall──▶ reconnecting ──▶ connected …
        │                                                              │
        └── permanent error (bad URL, missing or unreadable file) ──▶ failed        stop ──▶ stopped

Each connection attempt is a *session*: a daemon thread opens the source and runs the decode
chain of ``streamer.sources``; sampled frames go to the loop through a bounded queue that drops
the oldest frame when full (the decoder never blocks on a slow pipeline). The loop side groups
frames into chunks, keeps the rates and runs the watchdog: a session that is open but has decoded
nothing for ``stall_timeout_s`` is abandoned and its thread told to stop. The thread cannot be
interrupted inside a blocking FFmpeg read, but the demuxer's read timeout (``read_timeout_s``)
bounds how long it lingers; its late output is ignored. Closing the container from another thread
instead would race FFmpeg's own use of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal
from zoneinfo import ZoneInfo

import av.container
import av.error

from memory.aio import wait_set
from memory.outage import Outage
from streamer.backoff import backoff_delay_s
from streamer.frames import Chunk, ChunkBuilder, Frame, RateMeter, Sampler, StreamClock
from streamer.redact import redact_text, redact_url
from streamer.settings import CameraSettings
from streamer.sources import (
    OPEN_TIMEOUT_SHARE,
    DecodeStats,
    SourceError,
    SourceSpec,
    creation_time_s,
    describe,
    follows_arrival,
    frames_of,
    is_permanent,
    open_source,
    parse_source,
)
from streamer.timefmt import iso_time

log = logging.getLogger(__name__)

CameraState = Literal["connecting", "connected", "reconnecting", "failed", "stopped"]

# How often the loop side checks for stalls and refreshes rates: fine enough for stall timeouts
# of a second (tests), cheap enough for dozens of cameras.
WATCHDOG_TICK_S = 0.25
# Rates are averaged over a sliding window of this length: long enough to smooth a 1 fps camera.
RATE_WINDOW_S = 5.0
# After stop, how long run() waits for the decoder thread before leaving it (a daemon thread
# blocked in a read ends by itself within read_timeout_s).
THREAD_JOIN_S = 1.0


@dataclass(frozen=True, slots=True)
class CameraStatus:
    """A snapshot of one camera worker."""

    camera: str
    state: CameraState
    source: str  # the URL without credentials, query values or fragment (redact_url)
    input_fps: float  # frames decoded per second (sliding window; 0 while no frames arrive)
    sampled_fps: float  # frames sampled per second (sliding window)
    frames_dropped: int  # sampled frames dropped because the pipeline fell behind
    reconnects: int
    last_frame_age_s: float | None  # seconds since the last decoded frame; None before the first
    error: str | None  # why the camera is reconnecting or failed


class StalledError(Exception):
    """The connection is open but no frame arrived within the stall timeout."""


# --------------------------------------------------------------------------- thread → loop


@dataclass(frozen=True, slots=True)
class _Opened:
    pass


@dataclass(frozen=True, slots=True)
class _Ended:
    error: BaseException | None  # None: the source ended normally


_Item = Frame | _Opened | _Ended


class _Inbox:
    """Thread-to-loop queue of frames and events; frames beyond ``max_frames`` drop the oldest frame.

    The decoder thread never waits: ``put`` appends under a lock and wakes the loop only when the
    queue was empty. Events (opened, ended) are never dropped.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_frames: int) -> None:
        self._loop = loop
        self._max_frames = max_frames
        self._items: deque[_Item] = deque()
        self._frames = 0
        self._lock = threading.Lock()
        self.ready = asyncio.Event()
        self.dropped = 0

    def put(self, item: _Item) -> None:
        with self._lock:
            if isinstance(item, Frame):
                if self._frames >= self._max_frames:
                    oldest = next(i for i in self._items if isinstance(i, Frame))
                    self._items.remove(oldest)
                    self._frames -= 1
                    self.dropped += 1
                self._frames += 1
            wake = not self._items
            self._items.append(item)
        if wake:
            # RuntimeError: the loop is closed, nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.ready.set)

    def drain(self) -> list[_Item]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._frames = 0
            self.ready.clear()
        return items


@dataclass
class _Session:
    """One connection attempt: its thread, inbox and counters."""

    inbox: _Inbox
    stats: DecodeStats = field(default_factory=DecodeStats)
    abort: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    started_mono: float = field(default_factory=time.monotonic)
    opened_mono: float | None = None
    frames: int = 0


# --------------------------------------------------------------------------- worker


class CameraWorker:
    """Ingests one camera until stopped; see the module docstring for the state machine."""

    def __init__(
        self,
        name: str,
        settings: CameraSettings,
        *,
        tz: ZoneInfo,
        on_chunk: Callable[[Chunk], Awaitable[object]],
        on_outage: Callable[[Outage], Awaitable[None]] | None = None,
        on_state: Callable[[CameraStatus], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.tz = tz
        self._on_chunk = on_chunk
        self._on_outage = on_outage
        self._on_state = on_state
        self._rng = rng or random.Random()
        self._state: CameraState = "stopped"
        self._error: str | None = None
        self._display = redact_url(settings.url)
        self._reconnects = 0
        self._dropped_before = 0  # drops of finished sessions
        self._decoded_before = 0  # frames decoded by finished sessions
        self._sampled_before = 0
        self._last_ts_s = 0.0  # stream time of the newest frame of any session
        self._session: _Session | None = None
        self._last_frame_mono: float | None = None
        self._rates = RateMeter(RATE_WINDOW_S)
        self._outage: Outage | None = None
        self._live = True
        self._builder = ChunkBuilder(
            camera=name,
            chunk_s=settings.chunk_s,
            max_frames=settings.max_frames_per_chunk,
            sample_fps=settings.sample_fps,
        )

    # ----------------------------------------------------------------- public

    def status(self) -> CameraStatus:
        session = self._session
        dropped = self._dropped_before + (session.inbox.dropped if session else 0)
        last = self._last_frame_mono
        if session is not None and session.stats.last_frame_mono:
            last = session.stats.last_frame_mono
        input_fps, sampled_fps = self._rates.rates(time.monotonic(), *self._counters())
        return CameraStatus(
            camera=self.name,
            state=self._state,
            source=self._display,
            input_fps=round(input_fps, 2),
            sampled_fps=round(sampled_fps, 2),
            frames_dropped=dropped,
            reconnects=self._reconnects,
            last_frame_age_s=None if last is None else time.monotonic() - last,
            error=self._error,
        )

    def frame_totals(self) -> tuple[int, int]:
        """(decoded, sampled) frames since start, over every session (streamer/metrics.py)."""
        decoded, sampled, _ = self._counters()
        return decoded, sampled

    async def run(self, stop: asyncio.Event) -> None:
        """Ingest until ``stop`` is set (or a file ends, or the source fails for good)."""
        try:
            spec = parse_source(self.settings.url, self.settings)
        except SourceError as exc:
            await self._set_state("failed", str(exc))
            return
        self._display = spec.display
        self._live = spec.live
        log.info("camera %s: starting (%s, %s)", self.name, spec.kind, spec.display)
        await self._set_state("connecting", None)
        attempt = 0
        try:
            while not stop.is_set():
                ended = await self._run_session(spec, stop)
                await self._flush()
                if stop.is_set():
                    break
                if ended.error is None and not spec.live:
                    log.info("camera %s: end of %s", self.name, spec.display)
                    break
                error = ended.error or ConnectionError("stream ended")
                if is_permanent(spec, error):
                    await self._set_state("failed", f"{spec.display}: {self._describe(error)}")
                    return
                if self._session is not None and self._session.frames:
                    attempt = 0  # it worked for a while: start the backoff again from the bottom
                await self._begin_outage(self._describe(error))
                delay = backoff_delay_s(
                    attempt, self.settings.reconnect_initial_s, self.settings.reconnect_max_s, self._rng
                )
                attempt += 1
                self._reconnects += 1
                await self._set_state("reconnecting", self._describe(error))
                log.info("camera %s: reconnecting in %.1f s", self.name, delay)
                await wait_set(stop, delay)
        finally:
            await self._shutdown()

    # ----------------------------------------------------------------- sessions

    async def _run_session(self, spec: SourceSpec, stop: asyncio.Event) -> _Ended:
        loop = asyncio.get_running_loop()
        previous = self._session
        if previous is not None:
            self._dropped_before += previous.inbox.dropped
            self._decoded_before += previous.stats.decoded
            self._sampled_before += previous.stats.sampled
        session = _Session(inbox=_Inbox(loop, self.settings.frame_queue_size))
        self._session = session
        session.thread = threading.Thread(
            target=self._decode_thread, args=(spec, session), name=f"camera:{self.name}", daemon=True
        )
        session.thread.start()
        stop_task = asyncio.create_task(stop.wait())
        try:
            while True:
                for item in session.inbox.drain():
                    if isinstance(item, Frame):
                        await self._on_frame(session, item)
                    elif isinstance(item, _Opened):
                        session.opened_mono = time.monotonic()
                        log.debug("camera %s: opened %s", self.name, spec.display)
                    else:
                        return item
                if stop.is_set():
                    session.abort.set()
                    # Frames sampled before the stop are kept: they belong to the last chunk.
                    for item in session.inbox.drain():
                        if isinstance(item, Frame):
                            await self._on_frame(session, item)
                    return _Ended(None)
                stalled = self._stalled(session)
                if stalled is not None:
                    session.abort.set()
                    return _Ended(StalledError(stalled))
                self._rates.record(time.monotonic(), *self._counters())
                ready_task = asyncio.create_task(session.inbox.ready.wait())
                await asyncio.wait(
                    {ready_task, stop_task}, timeout=WATCHDOG_TICK_S, return_when=asyncio.FIRST_COMPLETED
                )
                ready_task.cancel()
        finally:
            stop_task.cancel()
            if session.stats.last_frame_mono:
                self._last_frame_mono = session.stats.last_frame_mono

    def _stalled(self, session: _Session) -> str | None:
        """Why the session counts as stalled, or None while it is healthy."""
        now = time.monotonic()
        if session.opened_mono is None:
            # PyAV's open timeout normally fires first; this covers sources without one (v4l2, lavfi).
            limit = self.settings.open_timeout_s + self.settings.stall_timeout_s
            if now - session.started_mono > limit:
                return f"stalled: not open after {limit:.1f} s"
            return None
        since = max(session.opened_mono, session.stats.last_frame_mono)
        if now - since > self.settings.stall_timeout_s:
            return f"stalled: no frame for {self.settings.stall_timeout_s:.1f} s"
        return None

    def _decode_thread(self, spec: SourceSpec, session: _Session) -> None:
        """Open the source and push sampled frames until it ends, fails or is aborted."""
        opened_s = time.time()  # frames buffered while probing were captured after this
        try:
            container = open_source(spec)
        except BaseException as exc:  # every failure goes to the loop, which classifies it
            # When PyAV's interrupt callback ends the open, FFmpeg reports ExitError or, from the
            # RTSP demuxer, InvalidDataError: the elapsed time says which it really was.
            error: BaseException = exc
            if spec.timeout is not None and time.time() - opened_s >= spec.timeout[0] * OPEN_TIMEOUT_SHARE:
                error = TimeoutError(f"no answer within {spec.timeout[0]:g} s")
            session.inbox.put(_Ended(error))
            return
        try:
            session.inbox.put(_Opened())
            start_s = self._file_start_s(spec, container)
            clock = StreamClock(
                live=spec.live,
                start_s=start_s,
                opened_s=opened_s,
                wrap_s=spec.wrap_s,
                arrival=follows_arrival(spec, container),
            )
            if clock.arrival:
                log.info("camera %s: %s has no real timestamps: following arrival time", self.name, spec.display)
            sampler = Sampler(self.settings.sample_fps)
            for frame in frames_of(
                container,
                spec,
                self.name,
                clock=clock,
                sampler=sampler,
                stats=session.stats,
                abort=session.abort,
            ):
                if session.abort.is_set():
                    break
                session.inbox.put(frame)
            session.inbox.put(_Ended(None))
        except av.error.ExitError:
            session.inbox.put(_Ended(TimeoutError(f"no data for {self.settings.read_timeout_s:g} s")))
        except BaseException as exc:  # as above
            session.inbox.put(_Ended(exc))
        finally:
            container.close()

    def _file_start_s(self, spec: SourceSpec, container: av.container.InputContainer) -> float | None:
        """Wall time of a file's first frame: configured start, else creation time, else now.

        A paced file plays the part of a live camera, so without a configured start it starts now
        rather than at its recording date.
        """
        if spec.live:
            return None
        start: datetime | None = self.settings.start
        if start is not None:
            return (start if start.tzinfo is not None else start.replace(tzinfo=self.tz)).timestamp()
        if not spec.paced:
            created = creation_time_s(container)
            if created is not None:
                return created
        return time.time()

    # ----------------------------------------------------------------- frames, chunks, state

    async def _on_frame(self, session: _Session, frame: Frame) -> None:
        session.frames += 1
        if self._state != "connected":
            # Back when the first new frame arrived (not at its stream time: a live stream's first
            # frames are stamped back to the open, a file's times may lie in the past).
            first = session.stats.first_frame_mono or time.monotonic()
            await self._end_outage(time.time() - (time.monotonic() - first))
            await self._set_state("connected", None)
        for chunk in self._builder.add(frame):
            await self._on_chunk(chunk)

    async def _flush(self) -> None:
        chunk = self._builder.flush()
        if chunk is not None:
            await self._on_chunk(chunk)

    def _counters(self) -> tuple[int, int, float]:
        """(decoded, sampled) over every session so far, and the newest frame's stream time."""
        decoded, sampled = self._decoded_before, self._sampled_before
        session = self._session
        if session is not None:
            decoded += session.stats.decoded
            sampled += session.stats.sampled
            self._last_ts_s = max(self._last_ts_s, session.stats.last_ts_s)
        return decoded, sampled, self._last_ts_s

    def _describe(self, error: BaseException) -> str:
        """describe(), with any URL in the message redacted (it goes to logs, status and topics)."""
        return redact_text(describe(error))

    async def _set_state(self, state: CameraState, error: str | None) -> None:
        if (state, error) == (self._state, self._error):
            return
        old, self._state, self._error = self._state, state, error
        if error:
            log.warning("camera %s: %s -> %s: %s", self.name, old, state, error)
        else:
            log.info("camera %s: %s -> %s", self.name, old, state)
        if self._on_state is not None:
            await self._on_state(self.status())

    async def _begin_outage(self, reason: str) -> None:
        if self._outage is not None:
            return
        # Offline since the last frame we saw, or since we first tried when we never saw one.
        last = self._last_frame_mono
        start_s = time.time() - (time.monotonic() - last) if last is not None else time.time()
        self._outage = Outage(self.name, start_s, None, reason)
        log.warning("camera %s: offline since %s (%s)", self.name, iso_time(start_s, self.tz), reason)
        if self._on_outage is not None:
            await self._on_outage(self._outage)

    async def _end_outage(self, end_s: float) -> None:
        if self._outage is None:
            return
        start_s = self._outage.start_s
        end_s = max(end_s, start_s)
        outage = Outage(self.name, start_s, end_s, self._outage.reason)
        self._outage = None
        log.info("camera %s: back after %.1f s offline", self.name, end_s - start_s)
        if self._on_outage is not None:
            await self._on_outage(outage)

    async def _shutdown(self) -> None:
        session = self._session
        if session is not None:
            session.abort.set()
            if session.thread is not None and session.thread.is_alive():
                await asyncio.to_thread(session.thread.join, THREAD_JOIN_S)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Cancelled (the daemon is failing): nobody takes chunks or states any more, and
            # waiting on a full chunk queue here would keep the process alive.
            return
        await self._flush()
        # Watching stops here; an outage still open ends with it (the gap after is vigil's, not the camera's).
        await self._end_outage(time.time())
        if self._state != "failed":
            await self._set_state("stopped", None)

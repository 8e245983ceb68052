"""Frames and chunks, and the pure bookkeeping that turns decoded frames into them.

Everything here is free of I/O and of PyAV so it can be tested on plain numbers:

* ``unwrap_pts`` / ``StreamClock``: stream timestamps (PTS, seconds) → UTC wall-clock seconds,
  surviving PTS wrap-around and jumps.
* ``Sampler``: keeps frames at ``sample_fps`` by timestamp (never by frame count, so a 12.5 fps
  and a 30 fps stream give the same sampled times).
* ``ChunkBuilder``: groups sampled frames into ``Chunk``s of ``chunk_s`` seconds, capped at
  ``max_frames_per_chunk`` frames.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

import numpy as np

# A real frame interval is never longer than this; a bigger forward step in PTS is a jump
# (camera reboot, encoder reset, splice) and the clock re-anchors on arrival time instead.
MAX_PTS_STEP_S = 10.0
# How far a live stream's PTS-derived time may fall behind arrival time before it is re-anchored:
# more than network and decoder latency ever add, less than an error worth keeping.
MAX_LIVE_DRIFT_S = 5.0
# Two timestamps closer than this are the same instant (float noise of PTS × time_base).
TIME_EPSILON_S = 1e-6
# Stream timestamps that advance slower than this share of arrival time are not the camera's:
# FFmpeg's MJPEG and raw-stream demuxers invent 25 fps timestamps whatever the real rate is
# (a 10 fps camera then runs at 0.4). Real streams stay near 1; a probing burst only pushes the
# ratio up (frames arrive faster than their timestamps), never down.
MIN_PTS_RATE = 0.75
# The rate is compared as the median of this many recent steps: the median ignores one late
# frame or a burst after a hiccup, and 16 frames are under 2 s of a 10 fps camera.
PTS_RATE_STEPS = 16


@dataclass(frozen=True, slots=True)
class Frame:
    """One sampled frame of one camera."""

    camera: str
    ts_s: float  # UTC wall-clock time of the frame (epoch seconds)
    image: np.ndarray  # [H, W, 3] uint8 RGB


@dataclass(slots=True)
class Chunk:
    """A few seconds of one camera's sampled frames: the unit the compressor consumes."""

    camera: str
    seq: int  # 0, 1, 2 … per worker run
    start_s: float  # ts_s of the first frame
    end_s: float  # ts_s of the last frame + 1 / sample_fps (the span the chunk covers)
    frames: list[Frame]


# --------------------------------------------------------------------------- timestamps


def unwrap_pts(prev_raw_s: float, raw_s: float, wrap_s: float | None) -> float:
    """Step from ``prev_raw_s`` to ``raw_s`` in stream seconds, undoing one wrap-around.

    ``wrap_s`` is the wrap period (2**pts_wrap_bits × time_base; 95443.7 s for MPEG-TS's 33-bit
    90 kHz PTS) or None when the timestamps do not wrap. A backwards step of more than half the
    period is a wrap, so the true step is ``raw_s - prev_raw_s + wrap_s``.
    """
    step = raw_s - prev_raw_s
    if wrap_s is not None and step < -wrap_s / 2:
        step += wrap_s
    return step


@dataclass(slots=True)
class StreamClock:
    """Maps stream timestamps to UTC wall-clock seconds for one connection.

    Live sources follow PTS deltas from an anchor, so frame spacing is the encoder's, not the
    network's. The anchor is the time the connection was opened (``opened_s``) when known, else the
    first frame's arrival: FFmpeg's stream probing holds the first seconds of frames back and
    then delivers them in a burst (about 2 s with GStreamer's server), so arrival would stamp them
    seconds late. A frame is never stamped after its arrival (the anchor moves back instead: the
    camera's clock runs fast or the anchor was late); a step backwards, a step forward of more than
    ``MAX_PTS_STEP_S`` or falling ``MAX_LIVE_DRIFT_S`` behind arrival re-anchors on arrival.
    Files anchor on ``start_s`` (their first frame) and only follow PTS; a backwards step
    continues right after the previous frame. The result never goes backwards.

    Live sources whose timestamps are not real follow arrival time instead: from the start when
    ``arrival`` is set (MJPEG, image streams: the demuxer invents the timestamps), or from the
    moment the median PTS step of the last ``PTS_RATE_STEPS`` frames falls below ``MIN_PTS_RATE``
    of the median arrival step (``pts_rate`` keeps that ratio for the log).
    """

    live: bool
    start_s: float | None = None  # files: wall time of the first frame
    opened_s: float | None = None  # live: wall time the connection was opened
    wrap_s: float | None = None
    arrival: bool = False  # live: stamp every frame with its arrival time
    pts_rate: float | None = None  # median PTS step / median arrival step when ``arrival`` was switched on
    _pts_steps: deque[float] = field(default_factory=lambda: deque(maxlen=PTS_RATE_STEPS), init=False)
    _arrival_steps: deque[float] = field(default_factory=lambda: deque(maxlen=PTS_RATE_STEPS), init=False)
    _prev_arrival_s: float | None = field(default=None, init=False)
    _anchor_wall_s: float | None = field(default=None, init=False)
    _stream_s: float = field(default=0.0, init=False)  # unwrapped stream time since the anchor
    _prev_raw_s: float | None = field(default=None, init=False)
    _last_ts_s: float = field(default=-math.inf, init=False)
    _last_step_s: float = field(default=0.0, init=False)
    reanchors: int = field(default=0, init=False)

    def __call__(self, raw_s: float | None, arrival_s: float) -> float:
        """Wall-clock time of a frame with stream time ``raw_s`` (None: no PTS) seen at ``arrival_s``."""
        if self.live and self.arrival:
            return self._emit(arrival_s)
        if self._anchor_wall_s is None:
            if self.live:
                first = arrival_s if self.opened_s is None else min(self.opened_s, arrival_s)
            else:
                first = arrival_s if self.start_s is None else self.start_s
            self._anchor(raw_s, first)
            return self._emit(first)
        if raw_s is not None and self._prev_raw_s is None:
            # The first frames had no PTS (RTSP's first frame often has none): start following PTS here.
            self._prev_raw_s = raw_s
            return self._emit(self._anchor_wall_s + self._stream_s)
        if raw_s is None or self._prev_raw_s is None:
            # No PTS: for live sources arrival is the best we know; for files, repeat the last step.
            ts = arrival_s if self.live else self._last_ts_s + self._last_step_s
            return self._emit(ts)
        step = unwrap_pts(self._prev_raw_s, raw_s, self.wrap_s)
        if self.live and 0 <= step <= MAX_PTS_STEP_S and self._pts_too_slow(step, arrival_s):
            self.arrival = True
            return self._emit(arrival_s)
        if step < 0 or step > MAX_PTS_STEP_S:
            if self.live:
                self.reanchors += 1
                self._anchor(raw_s, arrival_s)
                return self._emit(arrival_s)
            # A file whose timestamps restart (concatenated recordings): continue after the last frame.
            self.reanchors += 1
            resume_s = self._last_ts_s + self._last_step_s
            self._anchor(raw_s, resume_s)
            return self._emit(resume_s)
        self._stream_s += step
        self._prev_raw_s = raw_s
        ts = self._anchor_wall_s + self._stream_s
        if self.live and ts > arrival_s:
            self._anchor_wall_s -= ts - arrival_s
            ts = arrival_s
        elif self.live and arrival_s - ts > MAX_LIVE_DRIFT_S:
            self.reanchors += 1
            self._anchor(raw_s, arrival_s)
            ts = arrival_s
        if step > 0:
            self._last_step_s = step
        return self._emit(ts)

    def _pts_too_slow(self, step_s: float, arrival_s: float) -> bool:
        """Record one PTS step and its arrival step; whether PTS now runs too slow to be real."""
        if self._prev_arrival_s is not None:
            self._pts_steps.append(step_s)
            self._arrival_steps.append(arrival_s - self._prev_arrival_s)
        self._prev_arrival_s = arrival_s
        if len(self._pts_steps) < PTS_RATE_STEPS:
            return False
        arrival_step = statistics.median(self._arrival_steps)
        if arrival_step <= TIME_EPSILON_S:
            return False
        rate = statistics.median(self._pts_steps) / arrival_step
        if rate >= MIN_PTS_RATE:
            return False
        self.pts_rate = rate
        return True

    def _anchor(self, raw_s: float | None, wall_s: float) -> None:
        self._anchor_wall_s = wall_s
        self._stream_s = 0.0
        self._prev_raw_s = raw_s

    def _emit(self, ts: float) -> float:
        ts = max(ts, self._last_ts_s)
        self._last_ts_s = ts
        return ts


# --------------------------------------------------------------------------- sampling


@dataclass(slots=True)
class Sampler:
    """Keeps frames on a grid of ``1 / sample_fps`` seconds, by timestamp.

    The first frame is kept and starts the grid. Afterwards the frame nearest to each grid point
    is kept without looking ahead: a frame is taken once it is less than half a frame interval
    before the point (the next frame would be farther away). The frame interval is the smallest
    step seen between offered frames, so sparse offers (skipped decoding) do not inflate it. After
    a gap longer than a period the grid restarts at the frame, so an outage never causes a burst.
    """

    sample_fps: float
    frame_interval_s: float | None = None
    # The grid is anchor + k * period, computed afresh for each point: adding the period to a
    # running sum rounds at every step, and at epoch-sized timestamps (ulp ~1e-7 s) the error
    # grows with every point kept, by hundreds of ulps within minutes.
    _anchor_s: float | None = field(default=None, init=False)
    _k: int = field(default=0, init=False)
    _prev_s: float | None = field(default=None, init=False)

    @property
    def period_s(self) -> float:
        return 1.0 / self.sample_fps

    @property
    def next_due_s(self) -> float | None:
        """The next grid point (None before the first frame)."""
        if self._anchor_s is None:
            return None
        return self._anchor_s + self._k * self.period_s

    @property
    def earliest_s(self) -> float | None:
        """The earliest time a frame is taken for the next grid point (None: any frame)."""
        due = self.next_due_s
        if due is None:
            return None
        interval = min(self.frame_interval_s or 0.0, self.period_s)
        return due - interval / 2 - TIME_EPSILON_S

    def __call__(self, ts_s: float) -> bool:
        """Whether the frame at ``ts_s`` is sampled (advances the grid when it is)."""
        if self._prev_s is not None and ts_s - self._prev_s > TIME_EPSILON_S:
            step = ts_s - self._prev_s
            self.frame_interval_s = step if self.frame_interval_s is None else min(self.frame_interval_s, step)
        self._prev_s = ts_s
        due = self.next_due_s
        earliest = self.earliest_s
        if earliest is not None and ts_s < earliest:
            return False
        if due is None or ts_s - due >= self.period_s:
            self._anchor_s, self._k = ts_s, 1  # first frame, or a gap: the grid restarts here
        else:
            self._k += 1
        return True


# --------------------------------------------------------------------------- chunking


@dataclass(slots=True)
class ChunkBuilder:
    """Groups one camera's sampled frames into chunks.

    A chunk closes when the next frame lies ``chunk_s`` or more after the chunk's first frame
    (a gap therefore closes it too) or when it holds ``max_frames`` frames. ``end_s`` is the last
    frame's time plus one sampling period (the span the chunk stands for). A chunk closed by the
    next frame ends no later than that frame; one closed by ``max_frames`` is handed on before the
    next frame exists, so consecutive spans may overlap by the jitter of the frame times.
    """

    camera: str
    chunk_s: float
    max_frames: int
    sample_fps: float
    seq: int = 0
    _frames: list[Frame] = field(default_factory=list, init=False)

    def add(self, frame: Frame) -> list[Chunk]:
        """Add a frame; return the chunks it closed (none, the previous one, and/or a full one)."""
        done: list[Chunk] = []
        if self._frames and frame.ts_s - self._frames[0].ts_s >= self.chunk_s - TIME_EPSILON_S:
            done.append(self._close(next_s=frame.ts_s))
        self._frames.append(frame)
        if len(self._frames) >= self.max_frames:
            # A full chunk is handed on at once, not when the next frame comes.
            done.append(self._close())
        return done

    def flush(self) -> Chunk | None:
        """Close the partial chunk (end of stream, reconnect, stop); None when empty."""
        return self._close() if self._frames else None

    def _close(self, next_s: float | None = None) -> Chunk:
        frames, self._frames = self._frames, []
        end_s = frames[-1].ts_s + 1.0 / self.sample_fps
        chunk = Chunk(
            camera=self.camera,
            seq=self.seq,
            start_s=frames[0].ts_s,
            # Never past the next chunk's first frame, so consecutive spans do not overlap.
            end_s=end_s if next_s is None else min(end_s, next_s),
            frames=frames,
        )
        self.seq += 1
        return chunk

    @property
    def pending(self) -> int:
        return len(self._frames)


# --------------------------------------------------------------------------- rates


@dataclass(slots=True)
class RateMeter:
    """Frames per second over the last ``window_s`` seconds, decaying to 0 when frames stop.

    ``record(now_s, decoded, sampled, ts_s)`` takes cumulative counters (over every connection) and
    the newest frame's stream time, at each watchdog tick; ``rates`` (given the counters as they are
    at ``now_s``) divides the frames
    counted since the record ``window_s`` ago (or the oldest, in the first seconds) by the longer
    of the wall time since that record and the stream time the frames span. Wall time makes the
    rate fall while nothing arrives (a camera reconnecting reads 0 after a window); stream time
    keeps FFmpeg's probing burst (2 s of frames delivered at once) from reading as 10x the rate.
    Records start with the first frame, so the first second already shows the real rate.
    """

    window_s: float
    _marks: deque[tuple[float, int, int, float]] = field(default_factory=deque, init=False)

    def record(self, now_s: float, decoded: int, sampled: int, ts_s: float) -> None:
        if decoded == 0:
            return  # no frame yet: the window starts with the first one
        self._marks.append((now_s, decoded, sampled, ts_s))
        # Keep one mark at or before the window's start: it is the base of the rate.
        while len(self._marks) > 1 and self._marks[1][0] <= now_s - self.window_s:
            self._marks.popleft()

    def rates(self, now_s: float, decoded: int, sampled: int, ts_s: float) -> tuple[float, float]:
        """(decoded, sampled) frames per second at ``now_s``, given the counters as they are now."""
        if not self._marks:
            return 0.0, 0.0
        base = self._marks[0]
        for mark in self._marks:
            if mark[0] > now_s - self.window_s:
                break
            base = mark
        frames, kept = decoded - base[1], sampled - base[2]
        span_s = max(now_s - base[0], ts_s - base[3])
        if frames <= 0 or span_s <= TIME_EPSILON_S:
            return 0.0, 0.0
        return frames / span_s, kept / span_s

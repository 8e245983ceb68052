"""Camera sources: a configured URL → how PyAV opens it, and the decode chain that reads it.

The chain is a row of small generators (after faster-whisper's ``decode_audio``)::

    demux+decode (skip bad packets, loop files) → timestamp → pace (files, lavfi) → sample → Frame

Only sampled frames are converted to RGB numpy arrays: conversion costs about as much as
decoding (docs/ingest.md, decode chain), and at 1 fps of a 10-30 fps camera most frames are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import av
import av.container
import av.error
import av.video.frame
import av.video.stream

from streamer.frames import Frame, Sampler, StreamClock
from streamer.redact import redact_url
from streamer.settings import LAVFI_PREFIX, SOURCE_SCHEMES, V4L2_PREFIX, CameraSettings, url_scheme

log = logging.getLogger(__name__)

SourceKind = Literal["rtsp", "rtmp", "http", "file", "v4l2", "lavfi"]

US_PER_S = 1_000_000  # FFmpeg's socket timeouts are in microseconds
# MPEG-TS (and so HLS) PTS are 33-bit at 90 kHz: they wrap every 2**33 / 90000 s ≈ 26.5 h.
MPEGTS_WRAP_S = 2**33 / 90_000
# Decoder threads per stream: two keep one core per camera busy at most on small machines
# (PyAV's default AUTO threading; docs/ingest.md, Measurements).
DECODE_THREADS = 2
# rtsp_transport: auto tries these in order. TCP first: it passes NAT and firewalls and loses
# nothing; UDP for cameras that refuse interleaved TCP (461 Unsupported Transport).
AUTO_RTSP_TRANSPORTS = ("tcp", "udp")
# An open that failed after this share of open_timeout_s was ended by the timeout.
OPEN_TIMEOUT_SHARE = 0.95
# Demuxers whose timestamps are invented, not the camera's: FFmpeg's multipart-JPEG (MJPEG over
# HTTP) and raw image demuxers stamp frames at a fixed 25 fps (their default framerate option)
# whatever the real rate is. Frames of these follow arrival time (docs/ingest.md, Timestamps).
ARRIVAL_TIME_FORMATS = frozenset(
    {"mpjpeg", "mjpeg", "jpeg_pipe", "image2", "image2pipe", "png_pipe", "webp_pipe", "bmp_pipe", "gif_pipe"}
)


class SourceError(Exception):
    """A source that can never work as configured (bad scheme, missing file): not retried."""


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """How to open one camera's source with ``av.open``."""

    kind: SourceKind
    target: str  # what av.open receives: URL, path, device or lavfi graph
    format: str | None  # forced demuxer (v4l2, lavfi) or None to probe
    options: dict[str, str]  # demuxer/protocol options
    timeout: tuple[float, float] | None  # PyAV (open, read) timeouts in seconds
    live: bool  # timestamps anchored on arrival time
    paced: bool  # decoding waits to follow timestamps in real time
    loop: bool  # start again at the end (files)
    display: str  # the URL without credentials, query values or fragment (redact_url), for logs and status
    transports: tuple[str, ...] = ()  # RTSP: rtsp_transport values tried in order (auto: TCP, UDP)

    @property
    def wrap_s(self) -> float | None:
        """PTS wrap period; FFmpeg already unwraps most streams, this catches the rest."""
        return MPEGTS_WRAP_S if self.kind == "http" else None


def parse_source(url: str, settings: CameraSettings) -> SourceSpec:
    """Turn a configured camera URL into ``av.open`` arguments; raise SourceError if it cannot work."""
    read_us = str(int(settings.read_timeout_s * US_PER_S))
    timeouts = (settings.open_timeout_s, settings.read_timeout_s)
    if url.startswith(LAVFI_PREFIX):
        graph = url[len(LAVFI_PREFIX) :]
        if not graph:
            raise SourceError("lavfi source needs a filter graph, e.g. lavfi:testsrc2=size=640x360:rate=10")
        # A test source decodes as fast as the CPU allows; paced it behaves like a camera.
        return SourceSpec("lavfi", graph, "lavfi", {}, None, live=False, paced=True, loop=False, display=url)
    if url.startswith(V4L2_PREFIX):
        # A webcam that is unplugged may come back, so a missing device is retried, not failed.
        return SourceSpec("v4l2", url, "v4l2", {}, timeouts, live=True, paced=False, loop=False, display=url)
    display = redact_url(url)
    scheme = url_scheme(url)
    kind = SOURCE_SCHEMES.get(scheme)
    if kind is None:
        raise SourceError(
            f"{display}: unsupported scheme {scheme!r} (use rtsp, rtsps, rtmp, rtmps, http(s), a file path, "
            "/dev/videoN or lavfi:GRAPH)"
        )
    if kind != "file":
        try:
            host = urlsplit(url).hostname
        except ValueError:  # a malformed IPv6 host
            host = None
        if not host:
            raise SourceError(f"{display}: no host in URL")
        if kind == "rtsp":
            options = {"timeout": read_us}
            transports = AUTO_RTSP_TRANSPORTS if settings.rtsp_transport == "auto" else (settings.rtsp_transport,)
        else:
            # rw_timeout is the generic protocol I/O timeout (tcp, http, rtmp, hls segments).
            options, transports = {"rw_timeout": read_us}, ()
        return SourceSpec(
            kind,
            url,
            None,
            options,
            timeouts,
            live=True,
            paced=False,
            loop=False,
            display=display,
            transports=transports,
        )
    path = Path(urlsplit(url).path if scheme == "file" else url)
    if not path.is_file():
        raise SourceError(f"{display}: no such file" if not path.exists() else f"{display}: not a regular file")
    return SourceSpec(
        "file",
        str(path),
        None,
        {},
        None,
        live=False,
        paced=settings.paced,
        loop=settings.loop,
        display=display,
    )


def is_permanent(spec: SourceSpec, exc: BaseException) -> bool:
    """Whether an error opening/reading ``spec`` will not go away by retrying.

    Network and device errors are retried (cameras reboot, servers restart). A local file that
    disappeared or that FFmpeg cannot parse stays broken.
    """
    if isinstance(exc, SourceError):
        return True
    if spec.kind in ("file", "lavfi"):
        return isinstance(exc, (av.error.FFmpegError, OSError))
    return False


def describe(exc: BaseException) -> str:
    """A one-line message for an error from PyAV or the network."""
    if isinstance(exc, av.error.FFmpegError):
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    if isinstance(exc, TimeoutError):
        return f"timed out ({exc})" if str(exc) else "timed out"
    if type(exc).__name__ == "StalledError":  # streamer.camera's own error: its message says it all
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def open_attempts(spec: SourceSpec) -> list[dict[str, str]]:
    """The ``av.open`` options to try, in order: one per RTSP transport (auto: TCP, then UDP), else one."""
    if not spec.transports:
        return [dict(spec.options)]
    return [{**spec.options, "rtsp_transport": transport} for transport in spec.transports]


def open_source(spec: SourceSpec) -> av.container.InputContainer:
    """Open the source and set up its video decoder (threads); raise on failure.

    With more than one RTSP transport, a failed open tries the next one. An open that ran into the
    open timeout does not: the camera did not answer at all, and the next transport would only
    wait as long again.
    """
    attempts = open_attempts(spec)
    for number, options in enumerate(attempts, start=1):
        began = time.monotonic()
        try:
            container = av.open(spec.target, mode="r", format=spec.format, options=options, timeout=spec.timeout)
        except av.error.FFmpegError as exc:
            timed_out = spec.timeout is not None and time.monotonic() - began >= spec.timeout[0] * OPEN_TIMEOUT_SHARE
            if number == len(attempts) or timed_out:
                raise
            log.info(
                "%s: RTSP over %s failed (%s); trying %s",
                spec.display,
                options["rtsp_transport"].upper(),
                describe(exc),
                attempts[number]["rtsp_transport"].upper(),
            )
            continue
        break
    try:
        if not container.streams.video:
            raise SourceError(f"{spec.display}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = DECODE_THREADS
    except BaseException:
        container.close()
        raise
    return container


def follows_arrival(spec: SourceSpec, container: av.container.InputContainer) -> bool:
    """Whether a live source's frames are stamped with their arrival time from the first frame:
    its demuxer invents timestamps (``ARRIVAL_TIME_FORMATS``). Other live sources follow their
    timestamps until ``StreamClock`` finds them running slower than real time."""
    names = set((container.format.name or "").split(","))
    return spec.live and bool(names & ARRIVAL_TIME_FORMATS)


def creation_time_s(container: av.container.InputContainer) -> float | None:
    """The container's ``creation_time`` tag as UTC epoch seconds, if present and parseable."""
    tags = [container.metadata, *(s.metadata for s in container.streams.video)]
    for text in (tag.get("creation_time") for tag in tags):
        if not text:
            continue
        try:
            stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            continue
        if stamp.tzinfo is not None and stamp.year > 1970:  # some muxers write 1970/1904 for "unknown"
            return stamp.timestamp()
    return None


# --------------------------------------------------------------------------- decode chain


@dataclass(slots=True)
class DecodeStats:
    """Counters the decoder thread updates and the event loop reads (plain attribute writes)."""

    decoded: int = 0
    bad_packets: int = 0
    sampled: int = 0
    loops: int = 0
    first_frame_mono: float = 0.0  # time.monotonic() of the first decoded frame (0: none yet)
    last_frame_mono: float = 0.0  # time.monotonic() of the last decoded frame (0: none yet)
    last_ts_s: float = 0.0  # wall-clock stamp of the last decoded frame (for rates in stream time)


def decode(
    container: av.container.InputContainer,
    stats: DecodeStats,
    *,
    loop: bool = False,
    abort: threading.Event | None = None,
) -> Iterator[av.video.frame.VideoFrame]:
    """Decoded video frames; corrupt packets are skipped and counted, files restart when ``loop``."""
    stream = container.streams.video[0]
    while True:
        for packet in container.demux(stream):
            if abort is not None and abort.is_set():
                return
            try:
                frames = packet.decode()
            except (av.error.InvalidDataError, av.error.UndefinedError, ValueError):
                # A damaged packet spoils at most a GOP; the decoder resyncs on the next keyframe.
                stats.bad_packets += 1
                continue
            for frame in frames:
                stats.decoded += 1
                stats.last_frame_mono = time.monotonic()
                if not stats.first_frame_mono:
                    stats.first_frame_mono = stats.last_frame_mono
                yield frame
        if not loop or stats.decoded == 0:
            return
        stats.loops += 1
        container.seek(0)  # also flushes the decoder


def frame_time_s(frame: av.video.frame.VideoFrame, time_base: float) -> float | None:
    """A frame's PTS in seconds. Uses the stream's time base: frames flushed out of the decoder
    at the end carry none of their own (``frame.time`` is NaN for them)."""
    return None if frame.pts is None else frame.pts * time_base


def timestamped(
    frames: Iterator[av.video.frame.VideoFrame], clock: StreamClock, time_base: float, label: str = ""
) -> Iterator[tuple[float, av.video.frame.VideoFrame]]:
    """Attach the UTC wall-clock time to each frame; say so once when the clock turns to arrival time."""
    arrival = clock.arrival
    for frame in frames:
        ts = clock(frame_time_s(frame, time_base), time.time())
        if clock.arrival and not arrival:
            arrival = True
            log.info(
                "%s: stream timestamps advance at %.2f of real time (invented by the demuxer?): "
                "following arrival time",
                label,
                clock.pts_rate or 0.0,
            )
        yield ts, frame


def paced(
    items: Iterator[tuple[float, av.video.frame.VideoFrame]], abort: threading.Event | None = None
) -> Iterator[tuple[float, av.video.frame.VideoFrame]]:
    """Hold each frame back until its timestamp is due in real time (files acting as cameras)."""
    waiter = abort or threading.Event()
    origin: tuple[float, float] | None = None  # (first ts_s, monotonic time it was emitted)
    for ts, frame in items:
        if origin is None:
            origin = (ts, time.monotonic())
        delay = origin[1] + (ts - origin[0]) - time.monotonic()
        if delay > 0 and waiter.wait(delay):
            return
        yield ts, frame


def sampled(
    items: Iterator[tuple[float, av.video.frame.VideoFrame]],
    sampler: Callable[[float], bool],
    camera: str,
    stats: DecodeStats,
) -> Iterator[Frame]:
    """Keep the frames the sampler wants, converted to RGB only now."""
    for ts, frame in items:
        stats.last_ts_s = ts
        if sampler(ts):
            stats.sampled += 1
            yield Frame(camera=camera, ts_s=ts, image=frame.to_ndarray(format="rgb24"))  # [H, W, 3]


def frames_of(
    container: av.container.InputContainer,
    spec: SourceSpec,
    camera: str,
    *,
    clock: StreamClock,
    sampler: Sampler,
    stats: DecodeStats,
    abort: threading.Event | None = None,
) -> Iterator[Frame]:
    """The whole chain for one open source: sampled, timestamped RGB frames."""
    time_base = float(container.streams.video[0].time_base or 1)
    items = timestamped(
        decode(container, stats, loop=spec.loop, abort=abort), clock, time_base, f"camera {camera}"
    )
    if spec.paced:
        items = paced(items, abort)
    return sampled(items, sampler, camera, stats)

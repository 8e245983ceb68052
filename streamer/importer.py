"""``vigil import``: ingest a recorded file as fast as the machine allows.

The file goes through the same chain as a live camera (timestamp → sample → chunk), so the chunks
are the ones a camera playing that footage would have produced, with times starting at ``start``
(argument, else the camera's configured ``start``, else the container's creation time, else now).

At ``sample_fps`` far below the stream's rate most frames are thrown away, so the importer does
not decode them (``DecodeSkip``, measured in docs/ingest.md):

* ``gop``: packets are read a GOP (keyframe to keyframe) at a time; a GOP is decoded only up to
  the last frame still wanted before the next keyframe, the rest is never decoded. Exact: the same
  frames are sampled as with decoding everything. Needs closed GOPs (x264's default); with open
  GOPs the first B-frames after a skipped GOP would lack a reference, so use ``none`` there.
* ``nonref``: ``skip_frame = "NONREF"`` - the decoder drops non-reference (B) frames; the sampler
  then picks among the rest, so sampled frames can move by a frame or two.
* ``none``: decode everything.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

import av
import av.container
import av.error
import av.packet
import av.video.frame
from tqdm import tqdm

from streamer.frames import Chunk, ChunkBuilder, Sampler, StreamClock
from streamer.redact import redact_text, redact_url
from streamer.settings import CAMERA_NAME_RE, CameraSettings, load_settings
from streamer.sources import (
    DecodeStats,
    SourceError,
    creation_time_s,
    decode,
    describe,
    frame_time_s,
    open_source,
    parse_source,
    sampled,
    timestamped,
)
from streamer.timefmt import BadTimeError, parse_time

log = logging.getLogger(__name__)

DecodeSkip = Literal["none", "nonref", "gop"]
DEFAULT_SKIP: DecodeSkip = "gop"
# Chunks decoded ahead of the pipeline: enough to keep both busy, small enough to bound memory
# (a 16-frame 768x432 chunk is 16 MB of RGB).
IMPORT_QUEUE_CHUNKS = 4
# See _WantGate: between the wanted frame's interval (1.0) and the sampler's half-interval tolerance (0.5).
GATE_MARGIN = 0.75


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What an import produced."""

    camera: str
    path: str
    chunks: int
    frames: int  # sampled frames
    decoded: int  # frames the decoder produced (the rest were never decoded)
    bad_packets: int  # corrupt packets skipped
    start_s: float | None  # first frame's time
    end_s: float | None  # end of the last chunk
    wall_s: float  # time the import took


class ImportFileError(Exception):
    """The file cannot be imported (missing, unreadable, no video)."""


# --------------------------------------------------------------------------- sparse decoding


class _WantGate:
    """Answers "can a frame before stream time t still be sampled?" from the sampler's state."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.offset_s: float | None = None  # wall time - stream time, known after the first frame

    def __call__(self, raw_s: float) -> bool:
        earliest = self.sampler.earliest_s
        interval = self.sampler.frame_interval_s
        if earliest is None or interval is None or self.offset_s is None:
            return True
        # The last frame before ``raw_s`` is at raw_s - interval; it is wanted when it is not
        # before ``earliest``. Comparing with the midpoint (0.75 of an interval back) keeps the
        # decision clear of float noise on both sides.
        return earliest - self.offset_s < raw_s - GATE_MARGIN * interval


def decode_gops(
    container: av.container.InputContainer, stats: DecodeStats, wanted_before: Callable[[float], bool]
) -> Iterator[av.video.frame.VideoFrame]:
    """Decode only what the sampler can still use: each GOP up to its last wanted frame.

    Packets are buffered one GOP at a time so the next keyframe's time is known before deciding.
    """
    stream = container.streams.video[0]
    time_base = float(stream.time_base or 1)

    def run(gop: list[av.packet.Packet], next_key_s: float) -> Iterator[av.video.frame.VideoFrame]:
        for packet in gop:
            if not wanted_before(next_key_s):
                return
            try:
                frames = packet.decode()
            except (av.error.InvalidDataError, ValueError):
                stats.bad_packets += 1
                continue
            for frame in frames:
                stats.decoded += 1
                yield frame

    gop: list[av.packet.Packet] = []
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream marker; flushing happens below
            continue
        if packet.is_keyframe and gop and packet.pts is not None:
            yield from run(gop, packet.pts * time_base)
            gop = []
        gop.append(packet)
    yield from run(gop, math.inf)
    for frame in stream.decode(None):  # frames still held by the decoder
        stats.decoded += 1
        yield frame


def iter_chunks(
    path: str | Path,
    camera: str,
    settings: CameraSettings,
    *,
    start_s: float | None = None,
    tz: ZoneInfo | None = None,
    skip: DecodeSkip = DEFAULT_SKIP,
    stats: DecodeStats | None = None,
    abort: threading.Event | None = None,
    on_open: Callable[[float | None], None] | None = None,
) -> Iterator[Chunk]:
    """Chunks of a file, as fast as decoding allows (blocking; run it in a thread).

    ``on_open`` receives the file's duration in seconds (None if unknown) once it is open.
    Raises ImportFileError when the file cannot be opened.
    """
    stats = stats if stats is not None else DecodeStats()
    file_settings = settings.model_copy(update={"url": str(path), "loop": False, "realtime": False})
    try:
        spec = parse_source(str(path), file_settings)
        container = open_source(spec)
    except (SourceError, av.error.FFmpegError, OSError) as exc:
        reason = str(exc) if isinstance(exc, SourceError) else redact_text(describe(exc))
        raise ImportFileError(f"cannot open {redact_url(str(path))}: {reason}") from exc
    try:
        if on_open is not None:
            on_open(container.duration / av.time_base if container.duration else None)
        if start_s is None and settings.start is not None:
            start = settings.start if settings.start.tzinfo else settings.start.replace(tzinfo=tz or ZoneInfo("UTC"))
            start_s = start.timestamp()
        if start_s is None:
            start_s = creation_time_s(container)
        clock = StreamClock(live=False, start_s=start_s if start_s is not None else time.time())
        sampler = Sampler(settings.sample_fps)
        stream = container.streams.video[0]
        time_base = float(stream.time_base or 1)
        if skip == "nonref":
            stream.codec_context.skip_frame = "NONREF"
        if skip == "gop":
            # Frame threading holds frames back (one per thread), so the decoder would run past
            # the wanted frame before it came out; slice threading returns each frame at once.
            stream.thread_type = "SLICE"
            gate = _WantGate(sampler)
            frames = decode_gops(container, stats, gate)
            items = _offsets(timestamped(frames, clock, time_base), gate, time_base)
        else:
            items = timestamped(decode(container, stats, abort=abort), clock, time_base)
        builder = ChunkBuilder(camera, settings.chunk_s, settings.max_frames_per_chunk, settings.sample_fps)
        for frame in sampled(items, sampler, camera, stats):
            if abort is not None and abort.is_set():
                return
            yield from builder.add(frame)
        last = builder.flush()
        if last is not None:
            yield last
    finally:
        container.close()


def _offsets(
    items: Iterator[tuple[float, av.video.frame.VideoFrame]], gate: _WantGate, time_base: float
) -> Iterator[tuple[float, av.video.frame.VideoFrame]]:
    """Tell the gate how stream time maps to wall time (a file's clock is a constant shift)."""
    for ts, frame in items:
        raw_s = frame_time_s(frame, time_base)
        if raw_s is not None:
            gate.offset_s = ts - raw_s
        yield ts, frame


# --------------------------------------------------------------------------- async import


async def import_file(
    path: str | Path,
    camera: str,
    cam_settings: CameraSettings,
    *,
    start_s: float | None,
    tz: ZoneInfo,
    on_chunk: Callable[[Chunk], Awaitable[object]],
    progress: bool,
    skip: DecodeSkip = DEFAULT_SKIP,
) -> ImportResult:
    """Import a recording: decode in a thread, hand chunks to ``on_chunk`` in order, nothing dropped.

    The decoder waits for the pipeline (a bounded queue of ``IMPORT_QUEUE_CHUNKS``) instead of
    dropping frames as a live camera would. Raises ImportFileError for files that cannot be read.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Chunk | BaseException | None] = asyncio.Queue(IMPORT_QUEUE_CHUNKS)
    stats = DecodeStats()
    abort = threading.Event()
    bar = tqdm(total=None, unit="s", desc=camera, disable=not progress, file=sys.stderr, leave=False)
    began = time.monotonic()

    def on_open(duration_s: float | None) -> None:
        bar.total = round(duration_s, 1) if duration_s else None

    def produce() -> None:
        def put(item: Chunk | BaseException | None) -> None:
            asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

        try:
            for chunk in iter_chunks(
                path,
                camera,
                cam_settings,
                start_s=start_s,
                tz=tz,
                skip=skip,
                stats=stats,
                abort=abort,
                on_open=on_open,
            ):
                if abort.is_set():
                    return
                put(chunk)
            put(None)
        except BaseException as exc:  # handed to the loop, which re-raises it
            if not abort.is_set():
                put(exc)

    thread = threading.Thread(target=produce, name=f"import:{camera}", daemon=True)
    thread.start()
    chunks = frames = 0
    first_s: float | None = None
    last_s: float | None = None
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            chunks += 1
            frames += len(item.frames)
            first_s = item.start_s if first_s is None else first_s
            last_s = item.end_s
            bar.update(round(item.end_s - item.start_s, 1))
            await on_chunk(item)
    finally:
        abort.set()
        while not queue.empty():  # unblock a producer waiting on a full queue
            queue.get_nowait()
        bar.close()
        await asyncio.to_thread(thread.join)
    return ImportResult(
        camera=camera,
        path=str(path),
        chunks=chunks,
        frames=frames,
        decoded=stats.decoded,
        bad_packets=stats.bad_packets,
        start_s=first_s,
        end_s=last_s,
        wall_s=time.monotonic() - began,
    )


# --------------------------------------------------------------------------- CLI


def probe_file(path: str | Path) -> None:
    """Raise ImportFileError unless ``path`` opens as a video (cheap: header only)."""
    try:
        # model_copy: parse_source gives the clear error for a path validation would refuse.
        spec = parse_source(str(path), CameraSettings(url="file").model_copy(update={"url": str(path)}))
        open_source(spec).close()
    except (SourceError, av.error.FFmpegError, OSError) as exc:
        reason = str(exc) if isinstance(exc, SourceError) else redact_text(describe(exc))
        raise ImportFileError(f"cannot open {redact_url(str(path))}: {reason}") from exc


def cli_import(args: argparse.Namespace) -> int:
    """``vigil import FILE --camera NAME [--start ISO] [-c CONFIG] [--no-progress]``.

    An invalid config raises ConfigError, which streamer.cli.main reports (exit 2). The file is
    checked before the pipeline (models, Redis) is loaded, so a typo fails in milliseconds.
    """
    config = Path(args.config) if args.config else None
    settings = load_settings(config if config is not None and config.exists() else None)
    tz = settings.tz
    if not CAMERA_NAME_RE.fullmatch(args.camera):
        print(f"invalid camera name {args.camera!r}: use 1-64 characters of a-z, 0-9, '_' or '-'", file=sys.stderr)
        return 2
    try:
        start_s = None if args.start is None else parse_time(args.start, tz)
    except BadTimeError as exc:
        print(f"--start: {exc}", file=sys.stderr)
        return 2
    try:
        probe_file(args.file)
    except ImportFileError as exc:
        print(f"import failed: {exc}", file=sys.stderr)
        return 1
    cam_settings = settings.cameras.get(args.camera) or CameraSettings(url=args.file)

    # These load models: imported only when an import really runs.
    from streamer.ingest import IngestService  # noqa: PLC0415
    from streamer.resources import open_resources  # noqa: PLC0415

    async def run() -> ImportResult:
        async with open_resources(settings) as res:
            ingest = IngestService(
                encoder=res.encoder, store=res.store, index=res.index, compression=settings.compression
            )
            try:
                return await import_file(
                    args.file,
                    args.camera,
                    cam_settings,
                    start_s=start_s,
                    tz=tz,
                    on_chunk=ingest.ingest,
                    progress=not args.no_progress,
                )
            finally:
                ingest.log_summary()

    try:
        result = asyncio.run(run())
    except ImportFileError as exc:
        print(f"import failed: {exc}", file=sys.stderr)
        return 1
    print(summary(result, tz))
    return 0


def summary(result: ImportResult, tz: ZoneInfo) -> str:
    """One line: what was imported and the time span it covers."""

    def fmt(ts: float | None) -> str:
        return "-" if ts is None else datetime.fromtimestamp(ts, tz).isoformat(timespec="seconds")

    span = (result.end_s - result.start_s) if result.start_s is not None and result.end_s is not None else 0.0
    return (
        f"{result.path}: camera {result.camera}: {result.chunks} chunks, {result.frames} frames "
        f"({result.decoded} decoded), {fmt(result.start_s)} .. {fmt(result.end_s)} ({span:.1f} s) "
        f"in {result.wall_s:.1f} s"
    )

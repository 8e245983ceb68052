"""``vigil import``: ingest recorded files as fast as the machine allows.

The files go through the same chain as a live camera (timestamp → sample → chunk), so the chunks
are the ones a camera playing that footage would have produced. Several files (a folder of
segments, as Frigate records them) are one stream in time order: one sampler and one chunk
builder run across them, so chunks do not break at every segment, and the models load once.

Each file's start time comes from (``resolve_start``): ``--start`` (one file only), the camera's
configured ``start`` (one file only), the container's ``creation_time``, a time in the file's path
(``start_from_name``: Frigate's ``YYYY-MM-DD/HH/<camera>/MM.SS.mp4``, a date and time, or an
epoch in the name), and for a single file at last the current time. With several files a file
whose start cannot be told is refused, since it cannot be placed in time.

A file that ends before the duration its header gives (a truncated copy, a recorder that died) is
imported as far as it goes and reported with the span it covers and the span that is missing;
the command then exits 1. Chunks of the imported part stay in memory.

The importer writes Redis only. The index file belongs to the daemon (``owns_index=False``): a
running daemon's index follows the chunks an import stores within about a second
(``IndexFile.follow``), and a daemon started later catches up from Redis.

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
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
StartSource = Literal["--start", "config", "creation_time", "name", "now"]
# Chunks decoded ahead of the pipeline: enough to keep both busy, small enough to bound memory
# (a 16-frame 768x432 chunk is 16 MB of RGB).
IMPORT_QUEUE_CHUNKS = 4
# See _WantGate: between the wanted frame's interval (1.0) and the sampler's half-interval tolerance (0.5).
GATE_MARGIN = 0.75
# A file whose packets end more than this before the duration in its header is incomplete. Whole
# files end within a frame of it (the bundled clips: exactly); half a second is 5+ frames at the
# frame rates cameras use, well clear of rounding in either number.
INCOMPLETE_TOLERANCE_S = 0.5
# What a folder is searched for (case-insensitive): containers PyAV opens that recorders write.
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mts", ".flv"})
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Recording:
    """One file to import, placed in time."""

    path: Path
    start_s: float  # UTC epoch seconds of its first frame
    start_from: StartSource  # where start_s came from
    duration_s: float | None  # what the file's header says (None: unknown)


@dataclass(slots=True)
class FileCoverage:
    """How much of one file was read: the demuxer's progress, written by the decoding thread."""

    recording: Recording
    first_s: float | None = None  # stream seconds of the first packet
    end_s: float | None = None  # stream seconds where the last packet read ends
    error: str | None = None  # why reading stopped early, when the demuxer said so

    def see(self, pts_s: float, duration_s: float) -> None:
        self.first_s = pts_s if self.first_s is None else min(self.first_s, pts_s)
        end = pts_s + duration_s
        self.end_s = end if self.end_s is None else max(self.end_s, end)

    @property
    def covered_s(self) -> float:
        """Seconds of the file read, from its first packet."""
        return 0.0 if self.end_s is None or self.first_s is None else self.end_s - self.first_s

    @property
    def missing_s(self) -> float:
        """Seconds the header promises beyond what was read (0 when the duration is unknown)."""
        duration = self.recording.duration_s
        return 0.0 if duration is None else max(0.0, duration - self.covered_s)

    @property
    def incomplete(self) -> bool:
        return self.error is not None or self.missing_s > INCOMPLETE_TOLERANCE_S


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What an import produced."""

    camera: str
    path: str  # the file, or "N files"
    chunks: int
    frames: int  # sampled frames
    decoded: int  # frames the decoder produced (the rest were never decoded)
    bad_packets: int  # corrupt packets skipped
    start_s: float | None  # first frame's time
    end_s: float | None  # end of the last chunk
    wall_s: float  # time the import took
    files: list[FileCoverage] = field(default_factory=list)

    @property
    def incomplete(self) -> list[FileCoverage]:
        """Files that ended before their header's duration (or with a read error)."""
        return [f for f in self.files if f.incomplete]


class ImportFileError(Exception):
    """The file cannot be imported (missing, unreadable, no video, no known start)."""


# --------------------------------------------------------------------------- when a file begins

# Frigate keeps recordings as RECORD_DIR/YYYY-MM-DD/HH/<camera>/MM.SS.mp4 (before 0.12:
# YYYY-MM/DD/HH/<camera>/MM.SS.mp4), times in UTC (frigate/record/maintainer.py, store_segment).
_MM_SS = re.compile(r"^(\d{2})\.(\d{2})$")
_HH_MM_SS = re.compile(r"^(\d{2})\.(\d{2})\.(\d{2})$")
_DAY = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_HOUR = re.compile(r"^(\d{2})$")
# A date and time in a name: 2026-11-19T08:00:00, 2026-11-19_08-00-00, 20261119080000,
# 20261119_080000, optionally with Z or a +hhmm / +hh:mm offset; naive ones are in the configured zone.
_DATETIME = re.compile(
    r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})[T_ -]?(\d{2})[:.-]?(\d{2})[:.-]?(\d{2})(?:\.\d+)?"
    r"(Z|[+-]\d{2}:?\d{2})?(?!\d)"
)
# An epoch in a name: 10 digits (seconds, 2001-2286) or 13 (milliseconds).
_EPOCH = re.compile(r"(?<!\d)(\d{10}|\d{13})(?!\d)")


def _iso_utc(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()
    except ValueError:  # 2026-13-45 in a path is not a time
        return None


def _frigate_start(path: Path) -> float | None:
    """Start of a file in Frigate's layout (or ``HH.MM.SS.mp4`` under a ``YYYY-MM-DD`` folder), else None."""
    *dirs, name = path.parts
    stem = Path(name).stem
    if (mm_ss := _MM_SS.match(stem)) and len(dirs) >= 3 and _HOUR.match(dirs[-2]):
        # dirs[-1] is the camera's folder, dirs[-2] the hour
        if _DAY.match(dirs[-3]):
            day = dirs[-3]
        elif len(dirs) >= 4 and _HOUR.match(dirs[-3]) and _MONTH.match(dirs[-4]):
            day = f"{dirs[-4]}-{dirs[-3]}"
        else:
            return None
        return _iso_utc(f"{day}T{dirs[-2]}:{mm_ss[1]}:{mm_ss[2]}")
    if (hh_mm_ss := _HH_MM_SS.match(stem)) and (day := next((d for d in reversed(dirs) if _DAY.match(d)), None)):
        return _iso_utc(f"{day}T{hh_mm_ss[1]}:{hh_mm_ss[2]}:{hh_mm_ss[3]}")
    return None


def start_from_name(path: str | Path, tz: ZoneInfo) -> float | None:
    """When a recording began, from its path alone; None when the path tells nothing.

    Tried in order: Frigate's layout (UTC), a date and time in the file name (naive: in ``tz``,
    the zone the recorder's clock is taken to run in), an epoch in the file name.
    """
    path = Path(path)
    if (frigate := _frigate_start(path)) is not None:
        return frigate
    if match := _DATETIME.search(path.name):
        year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
        try:
            moment = datetime(year, month, day, hour, minute, second)
        except ValueError:
            moment = None
        if moment is not None:
            offset = match[7]
            if offset is None:
                return moment.replace(tzinfo=tz).timestamp()
            text = moment.isoformat() + ("+00:00" if offset == "Z" else offset[:3] + ":" + offset[-2:])
            return datetime.fromisoformat(text).timestamp()
    if match := _EPOCH.search(path.stem):
        value = int(match[1])
        seconds = value / 1000 if len(match[1]) == 13 else float(value)
        if datetime(2001, 1, 1, tzinfo=UTC).timestamp() <= seconds < datetime(2286, 1, 1, tzinfo=UTC).timestamp():
            return seconds
    return None


def resolve_start(
    path: Path,
    container: av.container.InputContainer,
    *,
    start_s: float | None,
    settings: CameraSettings,
    tz: ZoneInfo,
    single: bool,
) -> tuple[float, StartSource]:
    """A file's start time and where it came from (see the module docstring for the order)."""
    if single and start_s is not None:
        return start_s, "--start"
    if single and settings.start is not None:
        start = settings.start if settings.start.tzinfo else settings.start.replace(tzinfo=tz)
        return start.timestamp(), "config"
    if (created := creation_time_s(container)) is not None:
        return created, "creation_time"
    if (named := start_from_name(path, tz)) is not None:
        return named, "name"
    if single:
        return time.time(), "now"
    raise ImportFileError(
        f"cannot tell when {path} was recorded: it has no creation_time and its name holds no time "
        "(import it alone with --start)"
    )


def _duration_s(container: av.container.InputContainer) -> float | None:
    """The video's duration from the header: the stream's, else the container's."""
    stream = container.streams.video[0]
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else None


def _open(path: Path, settings: CameraSettings) -> av.container.InputContainer:
    file_settings = settings.model_copy(update={"url": str(path), "loop": False, "realtime": False})
    try:
        return open_source(parse_source(str(path), file_settings))
    except (SourceError, av.error.FFmpegError, OSError) as exc:
        reason = str(exc) if isinstance(exc, SourceError) else redact_text(describe(exc))
        raise ImportFileError(f"cannot open {redact_url(str(path))}: {reason}") from exc


def probe_recording(
    path: str | Path, *, start_s: float | None, settings: CameraSettings, tz: ZoneInfo, single: bool = True
) -> Recording:
    """Open ``path``'s header (cheap) and place it in time; ImportFileError when it cannot be used."""
    path = Path(path)
    container = _open(path, settings)
    try:
        start, source = resolve_start(path, container, start_s=start_s, settings=settings, tz=tz, single=single)
        return Recording(path, start, source, _duration_s(container))
    finally:
        container.close()


def collect_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files named, and the video files under the folders named (hidden ones skipped)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in VIDEO_SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise ImportFileError(f"no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) under {path}")
            files.extend(found)
        else:
            files.append(path)
    return list(dict.fromkeys(files))


def frigate_cameras(files: Sequence[Path]) -> set[str]:
    """Camera folders of the files that sit in Frigate's layout."""
    return {f.parent.name for f in files if _frigate_start(f) is not None and _MM_SS.match(f.stem)}


def plan_import(
    paths: Sequence[str | Path], *, start_s: float | None, settings: CameraSettings, tz: ZoneInfo
) -> tuple[list[Recording], list[ImportFileError]]:
    """The recordings to import in time order, and the files that cannot be imported (and why).

    ``start_s`` (``--start``) is only allowed for a single file (ValueError otherwise). Raises
    ImportFileError when a folder holds no video.
    """
    files = collect_files(paths)
    single = len(files) == 1 and not Path(paths[0]).is_dir()
    if start_s is not None and not single:
        raise ValueError("only for a single file: several files are placed by their creation_time or name")
    recordings: list[Recording] = []
    failed: list[ImportFileError] = []
    for file in files:
        try:
            recordings.append(probe_recording(file, start_s=start_s, settings=settings, tz=tz, single=single))
        except ImportFileError as exc:
            failed.append(exc)
    recordings.sort(key=lambda r: (r.start_s, str(r.path)))
    return recordings, failed


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
    container: av.container.InputContainer,
    stats: DecodeStats,
    wanted_before: Callable[[float], bool],
    coverage: FileCoverage | None = None,
) -> Iterator[av.video.frame.VideoFrame]:
    """Decode only what the sampler can still use: each GOP up to its last wanted frame.

    Packets are buffered one GOP at a time so the next keyframe's time is known before deciding.
    ``coverage`` learns how far the packets go (all are demuxed, decoded or not).
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
        if coverage is not None and packet.pts is not None:
            coverage.see(packet.pts * time_base, (packet.duration or 0) * time_base)
        if packet.is_keyframe and gop and packet.pts is not None:
            yield from run(gop, packet.pts * time_base)
            gop = []
        gop.append(packet)
    yield from run(gop, math.inf)
    for frame in stream.decode(None):  # frames still held by the decoder
        stats.decoded += 1
        yield frame


def _covering(
    frames: Iterator[av.video.frame.VideoFrame], coverage: FileCoverage, time_base: float
) -> Iterator[av.video.frame.VideoFrame]:
    """Decoded frames, telling ``coverage`` how far they go (when every frame is decoded)."""
    for frame in frames:
        if frame.pts is not None:
            coverage.see(frame.pts * time_base, (frame.duration or 0) * time_base)
        yield frame


def _file_frames(
    container: av.container.InputContainer,
    recording: Recording,
    sampler: Sampler,
    coverage: FileCoverage,
    *,
    skip: DecodeSkip,
    stats: DecodeStats,
    abort: threading.Event | None,
) -> Iterator[tuple[float, av.video.frame.VideoFrame]]:
    """(wall time, frame) of one open file, decoding only what ``skip`` allows."""
    clock = StreamClock(live=False, start_s=recording.start_s)
    stream = container.streams.video[0]
    time_base = float(stream.time_base or 1)
    if skip == "nonref":
        stream.codec_context.skip_frame = "NONREF"
    if skip == "gop":
        # Frame threading holds frames back (one per thread), so the decoder would run past
        # the wanted frame before it came out; slice threading returns each frame at once.
        stream.thread_type = "SLICE"
        gate = _WantGate(sampler)
        frames = decode_gops(container, stats, gate, coverage)
        return _offsets(timestamped(frames, clock, time_base), gate, time_base)
    return timestamped(_covering(decode(container, stats, abort=abort), coverage, time_base), clock, time_base)


def iter_recordings(
    recordings: Sequence[Recording],
    camera: str,
    settings: CameraSettings,
    *,
    skip: DecodeSkip = DEFAULT_SKIP,
    stats: DecodeStats | None = None,
    abort: threading.Event | None = None,
    coverage: list[FileCoverage] | None = None,
) -> Iterator[Chunk]:
    """Chunks of recordings in the given order as one stream (blocking; run it in a thread).

    One sampler and one chunk builder run across the files, so a chunk may span two segments.
    ``coverage`` receives each file's FileCoverage as its reading starts; a file that cannot be
    opened any more or stops with a demuxer error is recorded there and the next file follows.
    """
    stats = stats if stats is not None else DecodeStats()
    sampler = Sampler(settings.sample_fps)
    builder = ChunkBuilder(camera, settings.chunk_s, settings.max_frames_per_chunk, settings.sample_fps)
    for recording in recordings:
        seen = FileCoverage(recording)
        if coverage is not None:
            coverage.append(seen)
        try:
            container = _open(recording.path, settings)
        except ImportFileError as exc:  # gone or changed since it was probed: the others go on
            seen.error = str(exc)
            continue
        try:
            frames = _file_frames(container, recording, sampler, seen, skip=skip, stats=stats, abort=abort)
            for frame in sampled(frames, sampler, camera, stats):
                if abort is not None and abort.is_set():
                    return
                yield from builder.add(frame)
        except (av.error.FFmpegError, OSError) as exc:
            # A file damaged past what packet-level skipping absorbs: what was read is kept.
            seen.error = redact_text(describe(exc))
        finally:
            container.close()
    last = builder.flush()
    if last is not None:
        yield last


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
) -> Iterator[Chunk]:
    """Chunks of one file (blocking). Its start: ``start_s``, else as ``resolve_start`` finds it."""
    recording = probe_recording(path, start_s=start_s, settings=settings, tz=tz or ZoneInfo("UTC"))
    yield from iter_recordings([recording], camera, settings, skip=skip, stats=stats, abort=abort)


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


async def import_recordings(
    recordings: Sequence[Recording],
    camera: str,
    cam_settings: CameraSettings,
    *,
    on_chunk: Callable[[Chunk], Awaitable[object]],
    progress: bool,
    skip: DecodeSkip = DEFAULT_SKIP,
) -> ImportResult:
    """Import recordings: decode in a thread, hand chunks to ``on_chunk`` in order, nothing dropped.

    The decoder waits for the pipeline (a bounded queue of ``IMPORT_QUEUE_CHUNKS``) instead of
    dropping frames as a live camera would. The progress bar counts seconds of video read and
    stays on screen at the end, so an import that stopped short shows where. Files that could
    not be read whole are in the result's ``incomplete``.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Chunk | BaseException | None] = asyncio.Queue(IMPORT_QUEUE_CHUNKS)
    stats = DecodeStats()
    abort = threading.Event()
    coverage: list[FileCoverage] = []
    durations = [r.duration_s for r in recordings]
    total = round(sum(d for d in durations if d is not None), 1) if None not in durations else None
    bar = tqdm(total=total, unit="s", desc=camera, disable=not progress, file=sys.stderr, leave=True)
    began = time.monotonic()

    def produce() -> None:
        def put(item: Chunk | BaseException | None) -> None:
            asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

        try:
            for chunk in iter_recordings(
                recordings, camera, cam_settings, skip=skip, stats=stats, abort=abort, coverage=coverage
            ):
                if abort.is_set():
                    return
                put(chunk)
            put(None)
        except BaseException as exc:  # handed to the loop, which re-raises it
            if not abort.is_set():
                put(exc)

    def show_progress() -> None:
        bar.n = round(sum(c.covered_s for c in list(coverage)), 1)
        bar.refresh()

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
            show_progress()
            await on_chunk(item)
        show_progress()
    finally:
        abort.set()
        while not queue.empty():  # unblock a producer waiting on a full queue
            queue.get_nowait()
        bar.close()
        await asyncio.to_thread(thread.join)
    return ImportResult(
        camera=camera,
        path=str(recordings[0].path) if len(recordings) == 1 else f"{len(recordings)} files",
        chunks=chunks,
        frames=frames,
        decoded=stats.decoded,
        bad_packets=stats.bad_packets,
        start_s=first_s,
        end_s=last_s,
        wall_s=time.monotonic() - began,
        files=coverage,
    )


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
    """Import one recording (its start as ``resolve_start`` finds it); see ``import_recordings``."""
    recording = await asyncio.to_thread(probe_recording, path, start_s=start_s, settings=cam_settings, tz=tz)
    return await import_recordings([recording], camera, cam_settings, on_chunk=on_chunk, progress=progress, skip=skip)


# --------------------------------------------------------------------------- CLI


def cli_import(args: argparse.Namespace) -> int:
    """``vigil import PATH... --camera NAME [--start ISO] [-c CONFIG] [--no-progress]``.

    Exit 0 when every file was imported whole; 1 when a file could not be read or ended early
    (the rest is imported, and what was read stays in memory); 2 for invalid usage. An invalid
    config raises ConfigError, which streamer.cli.main reports (exit 2). Every file is checked
    before the pipeline (models, Redis) is loaded, so a typo fails in milliseconds.
    """
    config = Path(args.config) if args.config else None
    settings = load_settings(config if config is not None and config.exists() else None)
    tz = settings.tz
    if not CAMERA_NAME_RE.fullmatch(args.camera):
        print(f"invalid camera name {args.camera!r}: use 1-64 characters of a-z, 0-9, '_' or '-'", file=sys.stderr)
        return EXIT_USAGE
    try:
        start_s = None if args.start is None else parse_time(args.start, tz)
    except BadTimeError as exc:
        print(f"--start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    paths: list[str] = list(args.paths)
    # model_copy: a path that URL validation would refuse gets parse_source's clearer error.
    cam_settings = settings.cameras.get(args.camera) or CameraSettings(url="file").model_copy(update={"url": paths[0]})
    try:
        recordings, failed = plan_import(paths, start_s=start_s, settings=cam_settings, tz=tz)
    except ValueError as exc:
        print(f"--start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImportFileError as exc:
        print(f"import failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    others = frigate_cameras([r.path for r in recordings])
    if len(others) > 1:
        print(
            f"the files belong to several cameras' Frigate folders ({', '.join(sorted(others))}): "
            f"import one camera's folder at a time as --camera {args.camera}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    for exc in failed:
        print(f"import failed: {exc}", file=sys.stderr)
    if not recordings:
        return EXIT_FAILED

    # These load models: imported only when an import really runs.
    from streamer.ingest import IngestService  # noqa: PLC0415
    from streamer.resources import open_resources  # noqa: PLC0415

    async def run() -> ImportResult:
        # Redis only: the index file is the daemon's, and a running daemon follows what we store.
        async with open_resources(settings, owns_index=False) as res:
            ingest = IngestService(
                encoder=res.encoder, store=res.store, index=res.index, compression=settings.compression
            )
            try:
                return await import_recordings(
                    recordings, args.camera, cam_settings, on_chunk=ingest.ingest, progress=not args.no_progress
                )
            finally:
                ingest.log_summary()

    try:
        result = asyncio.run(run())
    except ImportFileError as exc:
        print(f"import failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(summary(result, tz))
    for seen in result.incomplete:
        print(f"import incomplete: {incomplete_message(seen, tz)}", file=sys.stderr)
    return EXIT_FAILED if failed or result.incomplete else EXIT_OK


def _fmt(ts: float | None, tz: ZoneInfo) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, tz).isoformat(timespec="seconds")


def summary(result: ImportResult, tz: ZoneInfo) -> str:
    """One line: what was imported and the time span it covers."""
    span = (result.end_s - result.start_s) if result.start_s is not None and result.end_s is not None else 0.0
    return (
        f"{result.path}: camera {result.camera}: {result.chunks} chunks, {result.frames} frames "
        f"({result.decoded} decoded), {_fmt(result.start_s, tz)} .. {_fmt(result.end_s, tz)} ({span:.1f} s) "
        f"in {result.wall_s:.1f} s"
    )


def incomplete_message(seen: FileCoverage, tz: ZoneInfo) -> str:
    """Which span of a file was imported and which is missing."""
    rec = seen.recording
    read_end = rec.start_s + seen.covered_s
    why = f"reading stopped: {seen.error}" if seen.error else "the file ends early (truncated?)"
    text = f"{rec.path}: {why}; imported {_fmt(rec.start_s, tz)} .. {_fmt(read_end, tz)} ({seen.covered_s:.1f} s"
    if rec.duration_s is None:
        return text + ")"
    return (
        f"{text} of {rec.duration_s:.1f} s), missing {_fmt(read_end, tz)} .. "
        f"{_fmt(rec.start_s + rec.duration_s, tz)} ({seen.missing_s:.1f} s)"
    )

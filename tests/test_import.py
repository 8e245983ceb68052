"""``vigil import``: a recording becomes the chunks a camera would have given, as fast as possible."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import av
import numpy as np
import pytest
import yaml

from memory.store import MemoryStore
from streamer.frames import Chunk
from streamer.importer import (
    ImportFileError,
    cli_import,
    import_file,
    import_recordings,
    iter_chunks,
    plan_import,
    start_from_name,
)
from streamer.resources import index_path_for
from streamer.settings import CameraSettings, Settings
from streamer.sources import DecodeStats
from streamer.timefmt import BadTimeError, parse_time
from tests.test_e2e import _ask_when_up, ask_v5, daemon_config, running_daemon
from tests.test_lifecycle import index_agrees_with_redis

DATA = Path(__file__).parent / "data"
CAR = DATA / "car-detection.mp4"  # 30.16 s, 12.5 fps, creation_time 2018-04-19T22:46:00Z
PEOPLE = DATA / "one-by-one-person-detection.mp4"  # 139.4 s, 10 fps, a keyframe every second
UTC_ZONE = ZoneInfo("UTC")


def _duration_s(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.duration is not None
        assert stream.time_base is not None
        return float(stream.duration * stream.time_base)


async def _import(path: Path, settings: CameraSettings, **kwargs: object) -> tuple[list[Chunk], object]:
    chunks: list[Chunk] = []

    async def on_chunk(chunk: Chunk) -> None:
        await asyncio.sleep(0)  # a pipeline that yields to the loop
        chunks.append(chunk)

    result = await import_file(
        path,
        "lot",
        settings,
        tz=UTC_ZONE,
        on_chunk=on_chunk,
        progress=False,
        **kwargs,  # type: ignore[arg-type]
    )
    return chunks, result


async def test_import_with_start_covers_the_clip_duration_in_ordered_chunks() -> None:
    start = datetime(2026, 5, 1, 14, 30, tzinfo=UTC).timestamp()
    sample_fps = 2.0
    settings = CameraSettings(url=str(CAR), sample_fps=sample_fps, chunk_s=4.0, max_frames_per_chunk=16)
    chunks, result = await _import(CAR, settings, start_s=start)
    duration = _duration_s(CAR)
    assert chunks[0].start_s == start
    # The last chunk ends one sampling period after the last frame, which is within a frame of the end.
    assert abs(chunks[-1].end_s - (start + duration)) <= 1 / sample_fps
    times = [f.ts_s for c in chunks for f in c.frames]
    assert np.all(np.diff(times) > 0)
    assert len(times) == pytest.approx(duration * sample_fps, abs=1)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert len(chunks) == pytest.approx(duration / 4.0, abs=1)
    for a, b in itertools.pairwise(chunks):
        assert a.end_s <= b.start_s + 1e-6
    assert {c.camera for c in chunks} == {"lot"}
    assert chunks[0].frames[0].image.shape == (432, 768, 3)
    assert result.chunks == len(chunks)  # type: ignore[attr-defined]
    assert result.frames == len(times)  # type: ignore[attr-defined]
    assert result.start_s == start
    assert result.end_s == chunks[-1].end_s


async def test_import_without_start_uses_the_container_creation_time() -> None:
    chunks, _ = await _import(CAR, CameraSettings(url=str(CAR), sample_fps=1.0), start_s=None)
    assert chunks[0].start_s == datetime(2018, 4, 19, 22, 46, tzinfo=UTC).timestamp()


async def test_configured_naive_start_is_in_the_configured_zone() -> None:
    settings = CameraSettings(url=str(CAR), sample_fps=1.0, start=datetime(2026, 1, 2, 8, 0))
    zone = ZoneInfo("Europe/Berlin")
    chunks = list(iter_chunks(CAR, "lot", settings, tz=zone))
    assert chunks[0].start_s == datetime(2026, 1, 2, 8, 0, tzinfo=zone).timestamp()
    assert parse_time("2026-01-02T08:00:00", zone) == chunks[0].start_s  # how --start is read
    assert parse_time("2026-01-02T07:00:00Z", zone) == chunks[0].start_s
    with pytest.raises(BadTimeError, match="ISO 8601"):
        parse_time("yesterday", zone)


def test_skipping_undecoded_gops_samples_exactly_the_frames_decode_all_samples() -> None:
    settings = CameraSettings(url=str(PEOPLE), sample_fps=1.0, chunk_s=8.0)
    full, sparse = DecodeStats(), DecodeStats()
    every = list(iter_chunks(PEOPLE, "hall", settings, start_s=0.0, skip="none", stats=full))
    gops = list(iter_chunks(PEOPLE, "hall", settings, start_s=0.0, skip="gop", stats=sparse))
    assert [f.ts_s for c in gops for f in c.frames] == [f.ts_s for c in every for f in c.frames]
    assert [(c.start_s, c.end_s) for c in gops] == [(c.start_s, c.end_s) for c in every]
    first, other = every[3].frames[2].image, gops[3].frames[2].image
    assert np.array_equal(first, other)  # the same decoded pixels, not a neighbouring frame
    assert full.decoded == 1394
    assert sparse.decoded < full.decoded / 2  # most frames were never decoded


async def test_unreadable_files_raise_a_clear_error_and_the_cli_returns_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes((DATA / "bottle-detection.mp4").read_bytes()[:100_000])  # moov is at the end
    settings = CameraSettings(url=str(broken))
    with pytest.raises(ImportFileError, match=r"cannot open .*broken\.mp4: InvalidDataError"):
        await _import(broken, settings, start_s=None)
    with pytest.raises(ImportFileError, match="no such file"):
        await _import(tmp_path / "missing.mp4", settings, start_s=None)

    def args(file: Path, camera: str = "lot", start: str | None = None) -> argparse.Namespace:
        return argparse.Namespace(
            paths=[str(file)], camera=camera, start=start, config=str(tmp_path / "none.yaml"), no_progress=True
        )

    assert cli_import(args(broken)) == 1
    assert "import failed: cannot open" in capsys.readouterr().err
    assert cli_import(args(CAR, camera="Bad Name!")) == 2
    assert "invalid camera name" in capsys.readouterr().err
    assert cli_import(args(CAR, start="not a time")) == 2
    assert "ISO 8601" in capsys.readouterr().err


async def test_a_failing_pipeline_stops_the_import_without_hanging() -> None:
    settings = CameraSettings(url=str(PEOPLE), sample_fps=2.0, chunk_s=2.0)
    seen: list[Chunk] = []

    async def on_chunk(chunk: Chunk) -> None:
        seen.append(chunk)
        if len(seen) == 3:
            raise RuntimeError("store down")

    with pytest.raises(RuntimeError, match="store down"):
        await asyncio.wait_for(
            import_file(PEOPLE, "hall", settings, start_s=0.0, tz=UTC_ZONE, on_chunk=on_chunk, progress=False), 30
        )
    assert len(seen) == 3


def test_cli_import_feeds_the_real_pipeline(
    tmp_path: Path, tiny_models, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``vigil import`` end to end: tiny models, real Redis, chunks stored under this test's prefix."""
    import redis

    config = tmp_path / "vigil.yaml"
    config.write_text(
        "\n".join(
            [
                f"data_dir: {tmp_path / 'state'}",
                "timezone: Europe/Berlin",
                f"redis: {{url: '{redis_url}', key_prefix: {prefix}}}",
                f"models: {{vlm: '{tiny_models.vlm}', embedder: '{tiny_models.embedder}',",
                "          device: cpu, dtype: float32}",
                f"cameras: {{lot: {{url: '{CAR}', sample_fps: 1.0, chunk_s: 8.0}}}}",
            ]
        )
    )
    args = argparse.Namespace(
        paths=[str(CAR)], camera="lot", start="2026-05-01T14:30:00", config=str(config), no_progress=True
    )
    client = redis.Redis.from_url(redis_url)
    try:
        assert cli_import(args) == 0
        out = capsys.readouterr().out
        assert "camera lot: 4 chunks, 31 frames" in out  # 30.2 s at 1 fps in 8 s chunks
        assert "2026-05-01T14:30:00+02:00" in out  # naive --start read in the configured zone
        assert any(True for _ in client.scan_iter(match=f"{prefix}*", count=1000))
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


# --------------------------------------------------------------------------- folders of segments

SEGMENT_S = 10.0
SEGMENT_STARTS = ("2026-11-19T08:00:00Z", "2026-11-19T08:00:10Z", "2026-11-19T08:00:20Z")


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def segments(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three 10-s segments cut from CAR, each with its own creation_time, named out of time order."""
    folder = tmp_path_factory.mktemp("segments")
    paths: list[Path] = []
    for i, (name, created) in enumerate(zip(("c.mp4", "a.mp4", "b.mp4"), SEGMENT_STARTS, strict=True)):
        out = folder / name
        _ffmpeg(
            "-ss", str(i * SEGMENT_S), "-i", str(CAR), "-t", str(SEGMENT_S), "-an", "-c:v", "libx264",
            "-preset", "ultrafast", "-g", "5", "-pix_fmt", "yuv420p", "-metadata", f"creation_time={created}",
            str(out),
        )  # fmt: skip
        paths.append(out)
    return paths


def _frigate_copy(segments: list[Path], root: Path, camera: str = "yard") -> Path:
    """The segments in Frigate's layout, creation_time removed: only the path says when."""
    folder = root / "2026-11-19" / "08" / camera
    folder.mkdir(parents=True)
    for segment, created in zip(segments, SEGMENT_STARTS, strict=True):
        name = created[14:16] + "." + created[17:19] + ".mp4"  # MM.SS
        _ffmpeg("-i", str(segment), "-map_metadata", "-1", "-c", "copy", str(folder / name))
    return root / "2026-11-19"


def _check_one_stream(chunks: list[Chunk], start_s: float, chunk_s: float, sample_fps: float) -> None:
    """Chunks of 30 s of segments as one stream: ordered, tiling, not broken at the segment ends."""
    assert chunks[0].start_s == start_s
    times = [f.ts_s for c in chunks for f in c.frames]
    assert np.all(np.diff(times) > 0)
    assert times[-1] == pytest.approx(start_s + 3 * SEGMENT_S - 1 / sample_fps, abs=1 / sample_fps)
    np.testing.assert_allclose(np.diff(times), 1 / sample_fps, atol=0.1)  # one grid across the files
    for a, b in itertools.pairwise(chunks):
        assert a.end_s == pytest.approx(b.start_s, abs=1e-6)
    # Per-file flushing would give ceil(10 / 4) = 3 chunks per segment, 9 in all; one stream gives 8.
    assert [round(c.end_s - c.start_s, 3) for c in chunks[:-1]] == [chunk_s] * (len(chunks) - 1)
    assert len(chunks) == math.ceil(3 * SEGMENT_S / chunk_s)


async def test_a_folder_of_segments_imports_in_creation_time_order_as_one_stream(segments: list[Path]) -> None:
    settings = CameraSettings(url=str(CAR), sample_fps=2.0, chunk_s=4.0)
    recordings, failed = plan_import([segments[0].parent], start_s=None, settings=settings, tz=UTC_ZONE)
    assert failed == []
    assert [r.path.name for r in recordings] == ["c.mp4", "a.mp4", "b.mp4"]  # by time, not by name
    assert [r.start_from for r in recordings] == ["creation_time"] * 3
    chunks: list[Chunk] = []

    async def on_chunk(chunk: Chunk) -> None:
        chunks.append(chunk)

    result = await import_recordings(recordings, "yard", settings, on_chunk=on_chunk, progress=False)
    _check_one_stream(chunks, parse_time(SEGMENT_STARTS[0], UTC_ZONE), 4.0, 2.0)
    assert result.path == "3 files"
    assert result.incomplete == []
    # Several files given one by one are the same stream.
    again, _ = plan_import([str(p) for p in reversed(segments)], start_s=None, settings=settings, tz=UTC_ZONE)
    assert again == recordings


async def test_frigate_segments_are_placed_by_their_path(segments: list[Path], tmp_path: Path) -> None:
    day = _frigate_copy(segments, tmp_path)
    settings = CameraSettings(url=str(CAR), sample_fps=2.0, chunk_s=4.0)
    recordings, failed = plan_import([day], start_s=None, settings=settings, tz=ZoneInfo("Europe/Berlin"))
    assert failed == []
    assert [r.start_from for r in recordings] == ["name"] * 3
    assert [r.start_s for r in recordings] == [parse_time(t, UTC_ZONE) for t in SEGMENT_STARTS]  # UTC
    chunks: list[Chunk] = []

    async def on_chunk(chunk: Chunk) -> None:
        chunks.append(chunk)

    await import_recordings(recordings, "yard", settings, on_chunk=on_chunk, progress=False)
    _check_one_stream(chunks, parse_time(SEGMENT_STARTS[0], UTC_ZONE), 4.0, 2.0)


def test_start_times_from_names() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    utc8 = datetime(2026, 11, 19, 8, 0, 5, tzinfo=UTC).timestamp()
    assert start_from_name("/media/frigate/recordings/2026-11-19/08/yard/00.05.mp4", berlin) == utc8
    assert start_from_name("/media/frigate/recordings/2026-11/19/08/yard/00.05.mp4", berlin) == utc8  # < 0.12
    assert start_from_name("/rec/2026-11-19/yard/08.00.05.mp4", berlin) == utc8
    assert start_from_name("/rec/yard_20261119_080005.mp4", UTC_ZONE) == utc8
    assert start_from_name("/rec/yard 2026-11-19T09:00:05.mkv", berlin) == utc8  # naive: the configured zone
    assert start_from_name("/rec/yard-2026-11-19T08-00-05Z.mp4", berlin) == utc8
    assert start_from_name("/rec/yard@20261119100005+0200.mp4", UTC_ZONE) == utc8
    assert start_from_name(f"/rec/clip-{int(utc8)}.mp4", berlin) == utc8
    assert start_from_name(f"/rec/clip-{int(utc8) * 1000 + 250}.mp4", berlin) == utc8 + 0.25
    for nothing in ("/rec/recording.mp4", "/rec/2026-13-45/08/yard/00.05.mp4", "/rec/cam-12345.mp4"):
        assert start_from_name(nothing, berlin) is None


def test_several_files_need_their_own_times_and_start_is_for_one_file(
    segments: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = CameraSettings(url=str(CAR))
    untimed = tmp_path / "untimed.mp4"
    _ffmpeg("-i", str(segments[0]), "-map_metadata", "-1", "-c", "copy", str(untimed))
    recordings, failed = plan_import([untimed, *segments], start_s=None, settings=settings, tz=UTC_ZONE)
    assert len(recordings) == 3
    assert [str(e) for e in failed] == [
        f"cannot tell when {untimed} was recorded: it has no creation_time and its name holds no time "
        "(import it alone with --start)"
    ]
    # Alone, the same file is imported at --start (or now).
    [alone], _ = plan_import([untimed], start_s=5.0, settings=settings, tz=UTC_ZONE)
    assert (alone.start_s, alone.start_from) == (5.0, "--start")

    def args(*paths: Path, start: str | None = None) -> argparse.Namespace:
        return argparse.Namespace(
            paths=[str(p) for p in paths], camera="yard", start=start, config=str(tmp_path / "none.yaml"),
            no_progress=True,
        )  # fmt: skip

    assert cli_import(args(segments[0].parent, start="2026-11-19T08:00:00Z")) == 2
    assert (
        "--start: only for a single file: several files are placed by their creation_time or name"
        in capsys.readouterr().err
    )
    assert cli_import(args(tmp_path / "empty-dir-does-not-exist.mp4")) == 1
    assert "no such file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_import(args(empty)) == 1
    assert (
        f"no video files (.avi, .flv, .m4v, .mkv, .mov, .mp4, .mts, .ts, .webm) under {empty}"
        in capsys.readouterr().err
    )
    # A Frigate day folder holds every camera's folders: one camera's footage at a time.
    day = _frigate_copy(segments, tmp_path / "frigate", "yard")
    (day / "08" / "front").mkdir()
    (day / "08" / "front" / "00.00.mp4").write_bytes((day / "08" / "yard" / "00.00.mp4").read_bytes())
    assert cli_import(args(day)) == 2
    assert "several cameras' Frigate folders (front, yard)" in capsys.readouterr().err


# --------------------------------------------------------------------------- with the real pipeline


def _config(tmp_path: Path, tiny_models, redis_url: str, prefix: str, cameras: str = "{}") -> Path:
    config = tmp_path / "vigil.yaml"
    config.write_text(
        "\n".join(
            [
                f"data_dir: {tmp_path / 'state'}",
                "timezone: UTC",
                f"redis: {{url: '{redis_url}', key_prefix: {prefix}}}",
                f"models: {{vlm: '{tiny_models.vlm}', embedder: '{tiny_models.embedder}',",
                "          device: cpu, dtype: float32}",
                f"cameras: {cameras}",
            ]
        )
    )
    return config


async def test_a_truncated_recording_reports_the_missing_span_and_exits_1(
    tmp_path: Path, tiny_models, redis_client, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cut at half its size with the index (moov) at the front: the header promises 139.4 s."""
    whole = tmp_path / "whole.mp4"
    _ffmpeg("-i", str(PEOPLE), "-c", "copy", "-movflags", "+faststart", str(whole))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    config = _config(tmp_path, tiny_models, redis_url, prefix, "{hall: {url: x.mp4, sample_fps: 0.5, chunk_s: 8.0}}")
    args = argparse.Namespace(
        paths=[str(cut)], camera="hall", start="2026-05-01T14:30:00Z", config=str(config), no_progress=False
    )
    assert await asyncio.to_thread(cli_import, args) == 1
    captured = capsys.readouterr()
    assert (
        f"import incomplete: {cut}: the file ends early (truncated?); imported 2026-05-01T14:30:00+00:00 .. "
        "2026-05-01T14:31:09+00:00 (69.0 s of 139.4 s), missing 2026-05-01T14:31:09+00:00 .. "
        "2026-05-01T14:32:19+00:00 (70.4 s)"
    ) in captured.err
    assert "69.0/139.4" in captured.err.rsplit("\r", 1)[-1]  # the bar's last state stays on screen
    assert "camera hall: 9 chunks" in captured.out
    # What was read stays in memory: chunks up to where the file ends.
    store = MemoryStore(redis_client, key_prefix=prefix)
    metas = await store.chunks_in_range("hall", None, None)
    start = parse_time("2026-05-01T14:30:00Z", UTC_ZONE)
    assert len(metas) == 9
    assert metas[0].start_s == start
    # The last chunk ends a sampling period (2 s) after its last frame, which is at most 69 s in.
    assert start + 68.0 <= metas[-1].end_s <= start + 69.0 + 2.0
    assert not (tmp_path / "state" / "index").exists()  # the importer never writes the index file


@pytest.mark.slow
async def test_an_import_into_a_running_daemon_is_searchable_within_seconds(
    segments: list[Path],
    tmp_path: Path,
    tiny_models,
    tiny_embedder,
    broker: tuple[str, int],
    redis_url: str,
    prefix: str,
) -> None:
    """README's example: camera "yard" exists only through the import of a Frigate folder."""
    config = daemon_config(prefix, tmp_path, tiny_models, broker, {})
    config["timezone"] = "UTC"
    config_path = tmp_path / "vigil.yaml"
    config_path.write_text(yaml.safe_dump(config))
    settings = Settings.model_validate(config)
    index_file = index_path_for(settings)
    day = _frigate_copy(segments, tmp_path / "frigate")
    window = {"after": "2026-11-19T07:59:00Z", "before": "2026-11-19T08:01:00Z"}
    async with running_daemon(settings):
        [before] = await _ask_when_up(broker, prefix)
        assert "answer" in before, before
        saved_before = index_file.stat().st_mtime_ns if index_file.exists() else None
        args = argparse.Namespace(
            paths=[str(day)], camera="yard", start=None, config=str(config_path), no_progress=True
        )
        assert await asyncio.to_thread(cli_import, args) == 0
        assert (index_file.stat().st_mtime_ns if index_file.exists() else None) == saved_before  # Redis only
        deadline = time.monotonic() + 10.0
        while True:
            [named] = await ask_v5(broker, prefix, {"question": "Who was in the yard?", "cameras": ["yard"], **window})
            if "error" not in named and named["citations"]:
                break
            assert time.monotonic() < deadline, named  # unknown_camera, or nothing indexed
            await asyncio.sleep(0.5)
        assert {c["camera"] for c in named["citations"]} == {"yard"}
        [unfiltered] = await ask_v5(broker, prefix, {"question": "What happened?", **window})
        assert unfiltered["citations"], unfiltered
        assert {c["camera"] for c in unfiltered["citations"]} == {"yard"}
    # The index the daemon saved on its way out holds the imported chunks: nothing overwritten,
    # nothing left for the next start to catch up.
    assert (
        await index_agrees_with_redis(settings, redis_url, tiny_embedder.dim, camera="yard") == 4
    )  # 30 s in 8-s chunks

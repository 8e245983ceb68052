"""``vigil import``: a recording becomes the chunks a camera would have given, as fast as possible."""

from __future__ import annotations

import argparse
import asyncio
import itertools
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import av
import numpy as np
import pytest

from streamer.frames import Chunk
from streamer.importer import ImportFileError, cli_import, import_file, iter_chunks
from streamer.settings import CameraSettings
from streamer.sources import DecodeStats
from streamer.timefmt import BadTimeError, parse_time

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
        path, "lot", settings, tz=UTC_ZONE, on_chunk=on_chunk, progress=False, **kwargs  # type: ignore[arg-type]
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

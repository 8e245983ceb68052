"""CameraWorker against real sources: a GStreamer RTSP server streaming real clips, lavfi, files."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from streamer.camera import RATE_WINDOW_S, CameraStatus, CameraWorker, Outage
from streamer.frames import Chunk
from streamer.settings import CameraSettings
from tests.plugins.net import free_port
from tests.plugins.rtsp import DATA, RtspServer

UTC = ZoneInfo("UTC")
# Short timeouts keep the resilience tests fast; production defaults are seconds to tens of seconds.
FAST = {
    "open_timeout_s": 5.0,
    "read_timeout_s": 5.0,
    "stall_timeout_s": 3.0,
    "reconnect_initial_s": 0.2,
    "reconnect_max_s": 1.0,
}
# The GStreamer server needs about 1.5-2 s from connect to first frame (preroll, keyframe wait;
# docs/ingest.md, Timestamps); more on a loaded 2-core machine.
FIRST_FRAME_S = 10.0


@dataclass
class Recorder:
    """Collects what a worker reports."""

    chunks: list[Chunk] = field(default_factory=list)
    states: list[CameraStatus] = field(default_factory=list)
    state_at: list[float] = field(default_factory=list)  # wall time each state was reported
    outages: list[Outage] = field(default_factory=list)

    async def on_chunk(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)

    async def on_state(self, status: CameraStatus) -> None:
        self.states.append(status)
        self.state_at.append(time.time())

    def last_time_in(self, state: str) -> float:
        return max(at for at, s in zip(self.state_at, self.states, strict=True) if s.state == state)

    async def on_outage(self, outage: Outage) -> None:
        self.outages.append(outage)

    @property
    def frame_times(self) -> list[float]:
        return [f.ts_s for c in self.chunks for f in c.frames]


class Running:
    """A worker running as a task, stopped (and awaited) at exit."""

    def __init__(self, name: str, settings: CameraSettings) -> None:
        self.rec = Recorder()
        self.worker = CameraWorker(
            name,
            settings,
            tz=UTC,
            on_chunk=self.rec.on_chunk,
            on_outage=self.rec.on_outage,
            on_state=self.rec.on_state,
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.worker.run(self.stop), name=f"camera:{self.worker.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)


async def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll until ``predicate()``; return the seconds it took, fail with ``what`` on timeout."""
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - began


def _settings(url: str, **kwargs: object) -> CameraSettings:
    return CameraSettings(url=url, **{**FAST, **kwargs})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- live RTSP


@pytest.mark.slow
async def test_rtsp_stream_gives_monotonic_wall_clock_frames_at_the_sample_rate(rtsp_server_factory) -> None:
    server = rtsp_server_factory("car-detection.mp4")  # 768x432 at 12.5 fps
    sample_fps = 2.0
    began = time.time()
    async with Running("lot", _settings(server.url, sample_fps=sample_fps, chunk_s=2.0)) as cam:
        await wait_for(lambda: cam.worker.status().state == "connected", FIRST_FRAME_S, "the first frame")
        connected = time.time()
        await asyncio.sleep(7.0)  # long enough for one rate window (5 s)
        status = cam.worker.status()
    ended = time.time()
    times = cam.rec.frame_times
    assert [s.state for s in cam.rec.states][:2] == ["connecting", "connected"]
    assert cam.rec.states[-1].state == "stopped"
    assert np.all(np.diff(times) > 0)
    # Wall-clock times: inside the run (the first frame predates "connected" by the probing
    # burst) and never in the future.
    assert began <= times[0] <= connected
    assert times[-1] <= ended + 0.5
    steps = np.diff(times)
    frame_interval = 1 / 12.5
    assert np.all(np.abs(steps - 1 / sample_fps) <= frame_interval + 1e-3), steps
    expected = (times[-1] - times[0]) * sample_fps + 1
    assert abs(len(times) - expected) <= 1
    assert 10.0 <= status.input_fps <= 15.0, status
    assert 1.5 <= status.sampled_fps <= 2.5, status
    assert status.frames_dropped == 0
    assert status.last_frame_age_s is not None
    assert status.last_frame_age_s < 1.0
    frame = cam.rec.chunks[0].frames[0]
    assert frame.image.shape == (432, 768, 3)
    assert frame.image.dtype == np.uint8
    assert frame.image.std() > 5  # real pixels, not a blank frame
    for chunk in cam.rec.chunks:
        assert chunk.camera == "lot"
        assert chunk.start_s == chunk.frames[0].ts_s
        assert chunk.frames[-1].ts_s < chunk.end_s <= chunk.frames[-1].ts_s + 1 / sample_fps + 1e-6
        assert chunk.frames[-1].ts_s - chunk.start_s < 2.0
    assert [c.seq for c in cam.rec.chunks] == list(range(len(cam.rec.chunks)))


@pytest.mark.slow
async def test_server_killed_and_restarted_mid_stream_resumes_and_records_the_outage(
    rtsp_server_factory,
) -> None:
    server: RtspServer = rtsp_server_factory("one-by-one-person-detection.mp4")
    async with Running("hall", _settings(server.url, sample_fps=2.0, chunk_s=2.0)) as cam:
        await wait_for(lambda: len(cam.rec.frame_times) >= 4, FIRST_FRAME_S, "frames before the outage")
        killed = time.time()
        streaming = cam.worker.status()
        server.kill()
        await wait_for(lambda: cam.worker.status().state == "reconnecting", 8.0, "the worker to notice")
        # Refused reconnects meanwhile, backoff growing to its cap; the rates fall to 0 within a
        # window instead of showing the last stream's rate.
        await wait_for(lambda: cam.worker.status().input_fps == 0.0, RATE_WINDOW_S + 1.0, "the rate to decay")
        offline = cam.worker.status()
        frames_before = len(cam.rec.frame_times)
        restarted = time.time()
        server.start()
        took_s = await wait_for(
            lambda: cam.worker.status().state == "connected", FAST["reconnect_max_s"] + FIRST_FRAME_S, "resume"
        )
        # 3 s of frames: more than the probing burst stamped back to the open.
        await wait_for(lambda: len(cam.rec.frame_times) >= frames_before + 6, 8.0, "frames after the outage")
        status = cam.worker.status()
    # Back within one capped backoff plus the server's time to the first frame.
    assert took_s <= FAST["reconnect_max_s"] + FIRST_FRAME_S
    assert streaming.input_fps > 5.0, streaming
    assert offline.sampled_fps == 0.0
    assert offline.state == "reconnecting"
    assert status.reconnects >= 2  # the lost stream, then refused attempts while the server was down
    assert len(cam.rec.outages) == 2
    begun, ended = cam.rec.outages
    assert begun.end_s is None
    assert begun.reason
    assert ended.start_s == begun.start_s
    assert ended.end_s is not None
    assert begun.start_s <= killed + 0.5  # offline since the last frame before the kill
    # Back when the first new frame arrived (just before "connected"), not when the connection
    # that brought it was opened (~2 s earlier: RTSP set-up and FFmpeg's probing).
    back_at = cam.rec.last_time_in("connected")
    assert restarted <= back_at - 0.5 <= ended.end_s <= back_at
    times = cam.rec.frame_times
    assert np.all(np.diff(times) > 0)
    assert any(t >= ended.end_s for t in times)
    # Nothing is stamped while the server was down. The first frames after it are stamped back
    # to the open of their connection (FFmpeg's probing holds them back; docs/ingest.md,
    # Timestamps), so they may fall in the outage's last second or two, which ends on arrival.
    assert not any(begun.start_s < t < restarted for t in times)
    states = [s.state for s in cam.rec.states]
    assert states[:4] == ["connecting", "connected", "reconnecting", "connected"] or (
        states.index("reconnecting") < len(states) - 1 - states[::-1].index("connected")
    )


async def test_open_connection_without_frames_is_detected_as_stalled(rtsp_server_factory) -> None:
    server = rtsp_server_factory("car-detection.mp4", stall_after_s=4.0)  # probing takes ~2 s of it
    settings = _settings(server.url, stall_timeout_s=1.0, read_timeout_s=10.0)  # the watchdog, not the socket
    async with Running("frozen", settings) as cam:
        await wait_for(lambda: cam.worker.status().state == "connected", FIRST_FRAME_S, "the first frame")
        await wait_for(lambda: bool(cam.rec.outages), 8.0, "the stall to be detected")
        status = cam.worker.status()
    assert status.error is not None
    assert "stalled" in status.error
    assert cam.rec.outages[0].reason == "stalled: no frame for 1.0 s"
    assert status.reconnects >= 1


async def test_an_outage_lasts_from_the_last_frame_to_the_first_new_one(rtsp_server_factory) -> None:
    server = rtsp_server_factory("car-detection.mp4", stall_after_s=4.0)  # each new session streams again
    settings = _settings(server.url, stall_timeout_s=1.0, read_timeout_s=10.0)
    async with Running("frozen", settings) as cam:
        await wait_for(lambda: len(cam.rec.outages) >= 2, FIRST_FRAME_S + 8.0, "the stream to come back")
    begun, ended = cam.rec.outages[:2]
    assert ended.start_s == begun.start_s
    assert ended.end_s is not None
    # The new session opened right after the stall was noticed, but its first frame came ~2 s
    # later (RTSP set-up, FFmpeg's probing): the outage ends with that frame, not with the open.
    states = [s.state for s in cam.rec.states]
    noticed = states.index("reconnecting")
    back = states.index("connected", noticed)
    noticed_at, back_at = cam.rec.state_at[noticed], cam.rec.state_at[back]
    assert back_at - 0.5 <= ended.end_s <= back_at
    assert ended.end_s >= noticed_at + 0.5


async def test_rates_are_right_in_the_first_seconds() -> None:
    async with Running("gen", _settings("lavfi:testsrc2=size=64x36:rate=10", sample_fps=2.0)) as cam:
        await wait_for(lambda: cam.worker.status().state == "connected", 5.0, "the first frame")
        await asyncio.sleep(1.5)
        status = cam.worker.status()
    assert 8.0 <= status.input_fps <= 12.0, status
    assert 1.3 <= status.sampled_fps <= 2.7, status


async def test_server_that_accepts_and_never_answers_times_out_and_is_retried(rtsp_server_factory) -> None:
    server = rtsp_server_factory(None, silent=True)
    settings = _settings(server.url, open_timeout_s=1.0)
    async with Running("mute", settings) as cam:
        await wait_for(lambda: cam.worker.status().reconnects >= 1, 6.0, "the open timeout")
        status = cam.worker.status()
    assert status.state == "reconnecting"
    assert status.error is not None
    assert "no answer within 1 s" in status.error
    assert cam.rec.outages
    assert cam.rec.outages[0].end_s is None


@pytest.mark.slow
async def test_rtsp_transport_auto_falls_back_to_udp_when_the_camera_refuses_tcp(
    rtsp_server_factory, caplog: pytest.LogCaptureFixture
) -> None:
    server = rtsp_server_factory("car-detection.mp4", protocols="udp")  # SETUP over TCP: 461
    caplog.set_level("INFO", logger="streamer.sources")
    async with (
        Running("auto", _settings(server.url, sample_fps=2.0, chunk_s=1.0)) as auto,
        Running("tcp", _settings(server.url, sample_fps=2.0, chunk_s=1.0, rtsp_transport="tcp")) as tcp,
    ):
        await wait_for(lambda: len(auto.rec.chunks) >= 2, FIRST_FRAME_S + 5.0, "chunks over UDP")
        await wait_for(lambda: tcp.worker.status().reconnects >= 2, 10.0, "refused TCP attempts")
        tcp_status = tcp.worker.status()
    assert auto.rec.states[1].state == "connected"
    assert np.all(np.diff(auto.rec.frame_times) > 0)
    assert "RTSP over TCP failed" in caplog.text
    assert "trying UDP" in caplog.text
    # tcp alone does not fall back: the camera keeps refusing it.
    assert not tcp.rec.chunks
    assert tcp_status.state == "reconnecting"
    assert "not supported" in (tcp_status.error or ""), tcp_status


# --------------------------------------------------------------------------- MJPEG over HTTP

MJPEG_FPS = 10


@pytest.fixture
def mjpeg_url() -> Iterator[str]:
    """FFmpeg's own MJPEG server (multipart JPEG over HTTP, one client) at MJPEG_FPS real frames/s."""
    if shutil.which("ffmpeg") is None:
        pytest.fail("the ffmpeg CLI is not installed: `apt-get install ffmpeg` (scripts/setup.sh)", pytrace=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}/cam.mjpg"
    # -re: at the clip's real time; fps=10: the camera's rate; -listen 1: serve the first client.
    cmd = [
        "ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-i", str(DATA / "car-detection.mp4"),
        "-vf", f"fps={MJPEG_FPS},scale=320:-2", "-c:v", "mjpeg", "-q:v", "5", "-f", "mpjpeg", "-listen", "1", url,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield url  # not probed: a probe would be the one client; the worker retries until it listens
    finally:
        proc.kill()
        proc.wait()


async def test_mjpeg_over_http_follows_arrival_time_not_the_demuxers_invented_25_fps(mjpeg_url: str) -> None:
    sample_fps = 2.0
    async with Running("mjpeg", _settings(mjpeg_url, sample_fps=sample_fps, chunk_s=2.0)) as cam:
        await wait_for(lambda: cam.worker.status().state == "connected", FIRST_FRAME_S, "the first frame")
        connected = time.time()
        await asyncio.sleep(8.0)
        status = cam.worker.status()
        stopped = time.time()
    times = cam.rec.frame_times
    assert status.state == "connected", status
    # FFmpeg's mpjpeg demuxer stamps frames at 25 fps; the camera sends 10.
    assert MJPEG_FPS * 0.85 <= status.input_fps <= MJPEG_FPS * 1.15, status
    assert sample_fps * 0.8 <= status.sampled_fps <= sample_fps * 1.2, status
    # Stored frames follow arrival: they cover the run at the sample rate, in real time.
    assert connected - 1.0 <= times[0] <= connected
    assert times[-1] <= stopped
    covered_s = times[-1] - times[0]
    assert covered_s >= (stopped - connected) - 1.5, times
    assert abs(len(times) - covered_s * sample_fps - 1) <= 2, times
    steps = np.diff(times)
    assert np.all(np.abs(steps - 1 / sample_fps) <= 1.5 / MJPEG_FPS), steps
    # Chunks tile the stream: each covers its chunk_s, no holes between them.
    for prev, nxt in zip(cam.rec.chunks, cam.rec.chunks[1:], strict=False):
        assert nxt.start_s - prev.end_s <= 1.5 / MJPEG_FPS, (prev, nxt)


# --------------------------------------------------------------------------- bad sources, isolation


async def test_bad_sources_fail_clearly_while_another_camera_keeps_ingesting(tmp_path: Path) -> None:
    # moov atom at the end: cut in half, the file cannot be opened at all.
    unopenable = tmp_path / "cut.mp4"
    unopenable.write_bytes((DATA / "bottle-detection.mp4").read_bytes()[:250_000])
    # moov atom at the start: cut in half, the first half still decodes.
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes((DATA / "car-detection.mp4").read_bytes()[:1_400_000])
    # Garbage in the middle of the media data: corrupt packets are skipped.
    corrupt = tmp_path / "corrupt.mp4"
    data = bytearray((DATA / "car-detection.mp4").read_bytes())
    rng = np.random.default_rng(0)
    data[1_000_000:1_200_000] = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    corrupt.write_bytes(bytes(data))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    closed_port = "rtsp://127.0.0.1:9/cam"  # discard port: nothing listens, the connection is refused

    cameras = {
        "good": _settings("lavfi:testsrc2=size=160x90:rate=10", sample_fps=2.0, chunk_s=1.0),
        # check-config refuses it; the worker has its own guard for settings built in code.
        "ftp": _settings("rtsp://example.com/cam").model_copy(update={"url": "ftp://example.com/cam"}),
        "missing": _settings(str(tmp_path / "nope.mp4")),
        "unopenable": _settings(str(unopenable)),
        "garbage": _settings(str(garbage)),
        "truncated": _settings(str(truncated), sample_fps=2.0),
        "corrupt": _settings(str(corrupt), sample_fps=2.0),
        "refused": _settings(closed_port),
    }
    running = {name: Running(name, s) for name, s in cameras.items()}
    for cam in running.values():
        await cam.__aenter__()
    try:
        await wait_for(lambda: len(running["good"].rec.chunks) >= 2, 10.0, "the good camera's chunks")
        await wait_for(lambda: running["refused"].worker.status().reconnects >= 2, 10.0, "refused retries")
        statuses = {name: cam.worker.status() for name, cam in running.items()}
        good_chunks = len(running["good"].rec.chunks)
        await asyncio.sleep(1.5)
        assert len(running["good"].rec.chunks) > good_chunks  # still ingesting after the others failed
    finally:
        for cam in running.values():
            await cam.__aexit__()

    assert statuses["good"].state == "connected"
    assert statuses["ftp"].state == "failed"
    assert "unsupported scheme 'ftp'" in (statuses["ftp"].error or "")
    assert statuses["missing"].state == "failed"
    assert "no such file" in (statuses["missing"].error or "")
    for name in ("unopenable", "garbage"):
        assert statuses[name].state == "failed", statuses[name]
        assert "InvalidDataError" in (statuses[name].error or ""), statuses[name]
    # Not permanent: a refused connection is retried with backoff.
    assert statuses["refused"].state == "reconnecting"
    assert "ConnectionRefusedError" in (statuses["refused"].error or "")
    # Damaged but readable files deliver what they can and end normally.
    for name, min_s in (("truncated", 10.0), ("corrupt", 25.0)):
        rec = running[name].rec
        assert rec.states[-1].state == "stopped", rec.states
        assert rec.states[-1].error is None
        span = rec.chunks[-1].end_s - rec.chunks[0].start_s
        assert min_s <= span <= 31.0, (name, span)
        assert np.all(np.diff(rec.frame_times) > 0)


async def test_looping_lavfi_and_file_sources_act_as_live_cameras(tmp_path: Path) -> None:
    clip = tmp_path / "short.mp4"
    shutil.copy(DATA / "scene-change_3cuts.mp4", clip)
    began = time.time()
    async with (
        Running("test", _settings("lavfi:testsrc2=size=160x90:rate=10", sample_fps=4.0, chunk_s=1.0)) as gen,
        Running("clip", _settings(str(clip), loop=True, sample_fps=2.0, chunk_s=1.0)) as loop,
    ):
        await asyncio.sleep(3.0)
    for cam, fps in ((gen, 4.0), (loop, 2.0)):
        times = cam.rec.frame_times
        assert np.all(np.diff(times) > 0)
        # Paced at real time and stamped from now: about fps × elapsed frames, all within the run.
        assert began - 0.5 <= times[0]
        assert times[-1] <= time.time() + 0.5
        assert 2.0 * fps <= len(times) <= 3.5 * fps + 1, (cam.worker.name, len(times))


async def test_a_slow_pipeline_drops_the_oldest_frames_and_counts_them() -> None:
    settings = _settings(
        "lavfi:testsrc2=size=64x36:rate=30", sample_fps=30.0, chunk_s=0.1, max_frames_per_chunk=1, frame_queue_size=4
    )
    rec = Recorder()
    seen_at: list[float] = []

    async def slow_chunk(chunk: Chunk) -> None:
        seen_at.append(time.time())
        await rec.on_chunk(chunk)
        await asyncio.sleep(0.3)  # a pipeline ten times slower than the camera

    worker = CameraWorker("busy", settings, tz=UTC, on_chunk=slow_chunk, on_state=rec.on_state)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(3.0)
    status = worker.status()
    stop.set()
    await asyncio.wait_for(task, 10)
    # The decoder kept its pace (~90 frames in 3 s) while the pipeline took ~3 a second: the
    # rest were dropped, not waited for.
    assert status.frames_dropped >= 50
    assert status.frames_dropped + len(rec.frame_times) >= 70
    times = rec.frame_times
    assert np.all(np.diff(times) > 0)
    # Drop-oldest: what the pipeline gets is recent, never a backlog from the start. The worker
    # hands over what the 4-frame queue holds, so a frame waits at most for the 4 slow chunks
    # ahead of it (~1.2 s); a backlog would grow towards the whole 3 s run instead.
    lag = [at - t for at, t in zip(seen_at, times, strict=True)]
    assert max(lag[3:]) < 4 * 0.3 + 4 / 30 + 0.5, lag

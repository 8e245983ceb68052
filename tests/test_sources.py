"""Pure parts of camera ingest: timestamps, sampling, chunking, source URLs, backoff."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.frames import (
    MAX_PTS_STEP_S,
    PTS_RATE_STEPS,
    ChunkBuilder,
    Frame,
    RateMeter,
    Sampler,
    StreamClock,
    unwrap_pts,
)
from streamer.redact import redact_text, redact_url
from streamer.settings import CameraSettings
from streamer.sources import MPEGTS_WRAP_S, SourceError, open_attempts, parse_source

DATA = Path(__file__).parent / "data"
IMAGE = np.zeros((2, 2, 3), np.uint8)

# --------------------------------------------------------------------------- timestamps


def test_unwrap_pts_undoes_one_wrap_and_keeps_ordinary_steps() -> None:
    assert unwrap_pts(10.0, 10.1, MPEGTS_WRAP_S) == pytest.approx(0.1)
    assert unwrap_pts(MPEGTS_WRAP_S - 0.04, 0.06, MPEGTS_WRAP_S) == pytest.approx(0.1)
    # A small step back is not a wrap: it stays negative for the clock to treat as a jump.
    assert unwrap_pts(10.0, 9.0, MPEGTS_WRAP_S) == pytest.approx(-1.0)
    assert unwrap_pts(MPEGTS_WRAP_S - 0.04, 0.06, None) < 0


def test_live_clock_follows_pts_across_a_wrap_not_arrival_jitter() -> None:
    arrival = 1_700_000_000.0
    clock = StreamClock(live=True, wrap_s=MPEGTS_WRAP_S, opened_s=arrival)
    rng = random.Random(0)
    raw = MPEGTS_WRAP_S - 1.0  # the stream wraps one second in
    times = []
    for _ in range(30):
        times.append(clock(raw % MPEGTS_WRAP_S, arrival + rng.uniform(0, 0.3)))  # network delay, jittered
        raw += 0.1
        arrival += 0.1
    steps = np.diff(times)
    assert np.allclose(steps, 0.1, atol=1e-6), steps  # PTS spacing, no jitter, no jump at the wrap
    assert clock.reanchors == 0
    assert times[0] >= 1_700_000_000.0


@pytest.mark.parametrize("jump_s", [-50.0, -0.5, MAX_PTS_STEP_S * 3])
def test_live_clock_reanchors_on_pts_jump_and_stays_monotonic(jump_s: float) -> None:
    clock = StreamClock(live=True)
    arrival = 1000.0
    for i in range(10):
        clock(5.0 + i * 0.1, arrival + i * 0.1)
    before = clock(5.0 + 10 * 0.1, arrival + 1.0)
    after = clock(6.0 + jump_s, arrival + 1.1)  # encoder reset: PTS jump
    nxt = clock(6.1 + jump_s, arrival + 1.2)
    assert clock.reanchors == 1
    assert after == pytest.approx(max(arrival + 1.1, before))
    assert nxt == pytest.approx(after + 0.1)
    assert before <= after < nxt


def test_live_clock_never_stamps_a_frame_after_its_arrival() -> None:
    clock = StreamClock(live=True)
    clock(0.0, 100.0)
    # The camera's clock runs fast: PTS says 9 s passed, arrival says 1 s.
    for i in range(1, 10):
        arrival = 100.0 + i / 9
        assert clock(float(i), arrival) == pytest.approx(arrival)


def test_live_clock_anchors_a_probing_burst_on_the_open_time() -> None:
    # FFmpeg probes ~2 s of frames during open, then hands them over at once.
    clock = StreamClock(live=True, opened_s=1000.0)
    burst = [clock(i * 0.08, 1002.3 + i * 0.001) for i in range(30)]
    assert burst[0] == 1000.0
    assert np.allclose(np.diff(burst), 0.08)  # real spacing, not squeezed onto arrival
    assert clock(30 * 0.08, 1002.45) == pytest.approx(1002.4)


def test_live_clock_reanchors_when_falling_behind_arrival() -> None:
    clock = StreamClock(live=True)
    clock(0.0, 100.0)
    ts = clock(1.0, 108.0)  # PTS advanced 1 s while 8 s passed (a slow camera clock, a frozen encoder)
    assert clock.reanchors == 1
    assert ts == 108.0


def test_file_clock_starts_at_start_and_continues_after_a_restart() -> None:
    clock = StreamClock(live=False, start_s=5000.0)
    times = [clock(0.5 + i * 0.04, 0.0) for i in range(25)]  # arrival is ignored for files
    assert times[0] == 5000.0
    assert times[-1] == pytest.approx(5000.0 + 24 * 0.04)
    restarted = clock(0.5, 0.0)  # concatenated recording: PTS start over
    assert restarted == pytest.approx(times[-1] + 0.04)


def test_clock_without_pts_uses_arrival_live_and_last_step_for_files() -> None:
    live = StreamClock(live=True)
    live(1.0, 50.0)
    assert live(None, 50.3) == 50.3
    file = StreamClock(live=False, start_s=0.0)
    file(0.0, 0.0)
    file(0.5, 0.0)
    assert file(None, 0.0) == pytest.approx(1.0)


def test_live_clock_follows_arrival_when_pts_run_slower_than_real_time() -> None:
    # FFmpeg's mpjpeg demuxer stamps a 10 fps camera at 25 fps: PTS advance 0.4 s per second.
    clock = StreamClock(live=True, opened_s=1000.0)
    rng = random.Random(1)
    arrivals = [1000.2 + i * 0.1 + rng.uniform(-0.02, 0.02) for i in range(60)]
    times = [clock(i * 0.04, a) for i, a in enumerate(arrivals)]
    assert clock.arrival
    assert clock.pts_rate == pytest.approx(0.4, abs=0.05)
    switched = PTS_RATE_STEPS + 2  # the anchor frame, the first PTS step, then PTS_RATE_STEPS steps
    assert times[switched:] == pytest.approx(arrivals[switched:])
    assert np.all(np.diff(times) >= 0)
    # Before the switch frames lag by the open delay (0.2 s) plus what 1.7 s of slow PTS lost
    # (1 s), and never lead arrival.
    assert all(a - 1.3 <= t <= a for t, a in zip(times, arrivals, strict=True))


def test_live_clock_keeps_real_pts_through_a_burst_and_jitter() -> None:
    clock = StreamClock(live=True, opened_s=1000.0)
    rng = random.Random(2)
    burst = [clock(i * 0.1, 1002.0 + i * 0.001) for i in range(20)]  # probing: 2 s of frames at once
    steady = [clock(i * 0.1, 1002.05 + (i - 20) * 0.1 + rng.uniform(0, 0.05)) for i in range(20, 80)]
    assert not clock.arrival
    assert np.allclose(np.diff(burst + steady), 0.1)


def test_live_clock_told_to_follow_arrival_uses_it_from_the_first_frame() -> None:
    clock = StreamClock(live=True, opened_s=1000.0, arrival=True)
    arrivals = [1000.5, 1000.6, 1000.6, 1000.75]
    assert [clock(i * 0.04, a) for i, a in enumerate(arrivals)] == arrivals
    file = StreamClock(live=False, start_s=0.0, arrival=True)  # files always follow their PTS
    assert [file(i * 0.04, 99.0) for i in range(3)] == pytest.approx([0.0, 0.04, 0.08])


# --------------------------------------------------------------------------- rates


def test_rate_meter_shows_the_rate_in_the_first_second_and_ignores_a_burst() -> None:
    meter = RateMeter(window_s=5.0)
    # 20 frames (2 s of stream) arrive at once at t=2, then 10 fps in real time.
    decoded, ts = 20, 102.0
    meter.record(2.0, decoded, 2, ts)
    for tick in range(1, 5):  # ticks every 0.25 s
        now = 2.0 + tick * 0.25
        decoded, ts = 20 + int(tick * 2.5), 102.0 + tick * 0.25
        meter.record(now, decoded, 2, ts)
    fps, _ = meter.rates(3.0, 30, 3, 103.0)
    assert fps == pytest.approx(10.0)
    # Bursty from the start: 20 frames in 0.25 s of wall time span 2 s of stream time.
    burst = RateMeter(window_s=5.0)
    burst.record(0.0, 1, 1, 100.0)
    assert burst.rates(0.25, 21, 2, 102.0)[0] == pytest.approx(10.0)


def test_rate_meter_decays_to_zero_while_no_frames_arrive() -> None:
    meter = RateMeter(window_s=5.0)
    for tick in range(41):  # 10 s at 10 fps, 1 fps sampled
        now = tick * 0.25
        meter.record(now, 1 + int(now * 10), 1 + int(now), 100.0 + now)
    assert meter.rates(10.0, 101, 11, 110.0) == pytest.approx((10.0, 1.0), rel=0.06)
    # The camera goes away: nothing is recorded any more (the worker is reconnecting).
    half = meter.rates(12.5, 101, 11, 110.0)[0]
    assert 3.0 < half < 7.0
    assert meter.rates(15.1, 101, 11, 110.0) == (0.0, 0.0)
    assert RateMeter(window_s=5.0).rates(1.0, 0, 0, 0.0) == (0.0, 0.0)


# --------------------------------------------------------------------------- sampling


def _sample(sample_fps: float, times: list[float]) -> list[float]:
    sampler = Sampler(sample_fps)
    return [t for t in times if sampler(t)]


@settings(max_examples=60, deadline=None)
@given(
    input_fps=st.floats(2.0, 60.0),
    ratio=st.floats(1.0, 20.0),
    t0=st.floats(0.0, 1e9),
    duration_s=st.floats(5.0, 40.0),
)
def test_sampler_keeps_the_frame_nearest_each_grid_point(
    input_fps: float, ratio: float, t0: float, duration_s: float
) -> None:
    """Against a naive reference: grid t0 + k/sample_fps, nearest frame within half an interval."""
    sample_fps = input_fps / ratio
    interval = 1.0 / input_fps
    times = [t0 + i * interval for i in range(int(duration_s * input_fps))]
    kept = _sample(sample_fps, times)
    period = 1.0 / sample_fps
    grid = [t0 + k * period for k in range(int((times[-1] - t0) / period + 0.5) + 1)]
    grid = [g for g in grid if g <= times[-1] + interval / 2 - 1e-6]
    assert abs(len(kept) - len(grid)) <= 1
    for g, t in zip(grid, kept, strict=False):
        assert abs(t - g) <= interval / 2 + 1e-6  # 1e-6: float noise of t0 + i * interval at t0 ~ 1e9


def test_sampler_grid_does_not_drift_at_epoch_timestamps() -> None:
    """Ten minutes at 33.15 fps sampled at a non-integer ratio, at a 2026 epoch time (ulp ~2.4e-7 s).

    Every kept frame stays within half a frame interval of t0 + k / sample_fps. A grid built by
    adding the period to a running sum rounds at each point and was measured 0.48 ms past that
    bound here (hypothesis found the same at t0 ~3.4e7 over 34 s, by a hair).
    """
    input_fps, t0 = 33.15, 1_795_000_000.0
    sample_fps = input_fps / 2.628
    times = [t0 + i / input_fps for i in range(int(600 * input_fps))]
    kept = np.array(_sample(sample_fps, times))
    grid = t0 + np.arange(len(kept)) / sample_fps
    assert abs(len(kept) - 600 * sample_fps) <= 1
    assert np.abs(kept - grid).max() <= 0.5 / input_fps + 1e-6


def test_sampler_rate_is_by_time_not_frame_count() -> None:
    ten_s = 10.0
    for input_fps in (12.5, 30.0, 29.83):
        times = [i / input_fps for i in range(int(ten_s * input_fps))]
        kept = _sample(2.0, times)
        assert len(kept) == 20, (input_fps, len(kept))
        # Each kept frame lies within half a frame interval of its grid point.
        assert np.allclose(np.array(kept) - np.arange(20) * 0.5, 0.0, atol=0.5 / input_fps + 1e-9)


def test_sampler_restarts_its_grid_after_a_gap_without_a_burst() -> None:
    sampler = Sampler(1.0)
    first = [t for t in np.arange(0.0, 5.0, 0.1) if sampler(float(t))]
    after_gap = [t for t in np.arange(60.05, 63.0, 0.1) if sampler(float(t))]
    assert len(first) == 5
    assert after_gap[0] == pytest.approx(60.05)
    assert np.allclose(np.diff(after_gap), 1.0, atol=0.051)


def test_sampler_keeps_every_frame_when_sampling_faster_than_input() -> None:
    times = [i * 0.2 for i in range(20)]
    assert _sample(10.0, times) == times


# --------------------------------------------------------------------------- chunking


def _frames(times: list[float]) -> list[Frame]:
    return [Frame("cam", t, IMAGE) for t in times]


def test_chunks_cover_the_stream_in_order_without_losing_frames() -> None:
    builder = ChunkBuilder("cam", chunk_s=4.0, max_frames=16, sample_fps=2.0)
    times = [100.0 + i * 0.5 for i in range(41)]
    chunks = [c for f in _frames(times) for c in builder.add(f)]
    tail = builder.flush()
    assert tail is not None
    chunks.append(tail)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [f.ts_s for c in chunks for f in c.frames] == times
    for c in chunks:
        assert c.start_s == c.frames[0].ts_s
        assert c.end_s == pytest.approx(c.frames[-1].ts_s + 0.5)
        assert c.frames[-1].ts_s - c.start_s < 4.0
    for a, b in itertools.pairwise(chunks):
        assert a.end_s <= b.start_s + 1e-9
    assert [len(c.frames) for c in chunks[:-1]] == [8] * (len(chunks) - 1)
    assert builder.flush() is None


def test_chunk_closes_at_the_frame_cap_and_on_a_gap() -> None:
    builder = ChunkBuilder("cam", chunk_s=8.0, max_frames=3, sample_fps=1.0)
    out = [c for f in _frames([0.0, 1.0, 2.0, 3.0, 30.0]) for c in builder.add(f)]
    assert [len(c.frames) for c in out] == [3, 1]  # cap at 3, then the gap closes [3.0]
    assert out[1].end_s == 4.0
    assert builder.pending == 1
    single = ChunkBuilder("cam", chunk_s=8.0, max_frames=1, sample_fps=1.0)
    assert [len(single.add(f)) for f in _frames([0.0, 9.0, 10.0])] == [1, 1, 1]


# --------------------------------------------------------------------------- sources


def _cam(url: str, **kwargs: object) -> CameraSettings:
    return CameraSettings(url=url, **kwargs)  # type: ignore[arg-type]


def _unchecked(url: str) -> CameraSettings:
    """Settings with a URL that validation would refuse: parse_source has its own guard."""
    return CameraSettings(url="rtsp://cam/x").model_copy(update={"url": url})


def test_rtsp_tries_tcp_then_udp_by_default_with_socket_timeout_and_redacts_credentials() -> None:
    url = "rtsp://admin:s3cret@10.0.0.5:554/stream1"
    spec = parse_source(url, _cam(url, read_timeout_s=2.5, open_timeout_s=4.0))
    assert spec.kind == "rtsp"
    assert spec.live
    assert spec.options == {"timeout": "2500000"}
    # auto: the options av.open gets, in order: TCP first, then UDP.
    assert open_attempts(spec) == [
        {"timeout": "2500000", "rtsp_transport": "tcp"},
        {"timeout": "2500000", "rtsp_transport": "udp"},
    ]
    assert spec.timeout == (4.0, 2.5)
    assert "s3cret" not in spec.display
    assert spec.display == "rtsp://***@10.0.0.5:554/stream1"
    for transport in ("tcp", "udp"):
        one = parse_source("rtsps://cam/x", _cam("rtsps://cam/x", rtsp_transport=transport))
        assert open_attempts(one) == [{"timeout": "10000000", "rtsp_transport": transport}]
    http = parse_source("http://cam/x.mjpg", _cam("http://cam/x.mjpg"))
    assert open_attempts(http) == [{"rw_timeout": "10000000"}]


@pytest.mark.parametrize("url", ["rtmp://host/live/key", "https://host/cam/index.m3u8", "http://host/mjpg/video.mjpg"])
def test_network_sources_get_an_io_timeout(url: str) -> None:
    spec = parse_source(url, _cam(url, read_timeout_s=3.0))
    assert spec.live
    assert spec.options == {"rw_timeout": "3000000"}


def test_files_devices_and_lavfi() -> None:
    clip = str(DATA / "car-detection.mp4")
    plain = parse_source(clip, _cam(clip))
    assert (plain.kind, plain.live, plain.paced, plain.loop) == ("file", False, False, False)
    looped = parse_source(clip, _cam(clip, loop=True))
    assert (looped.paced, looped.loop) == (True, True)
    assert parse_source(f"file://{clip}", _cam(clip)).target == clip
    cam = parse_source("/dev/video0", _cam("/dev/video0"))
    assert (cam.kind, cam.format, cam.live) == ("v4l2", "v4l2", True)
    lavfi = parse_source("lavfi:testsrc2=size=64x36:rate=5", _cam("lavfi:x"))
    assert (lavfi.kind, lavfi.format, lavfi.paced) == ("lavfi", "lavfi", True)
    assert lavfi.target == "testsrc2=size=64x36:rate=5"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/video.mp4", "unsupported scheme 'ftp'"),
        ("/nonexistent/clip.mp4", "no such file"),
        ("rtsp:///nohost", "no host"),
        ("lavfi:", "filter graph"),
    ],
)
def test_bad_urls_raise_a_clear_source_error(url: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        parse_source(url, _unchecked(url))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rtsp://admin:s3cret@10.0.0.5:554/stream1", "rtsp://***@10.0.0.5:554/stream1"),
        ("rtsp://s3cret@cam/x", "rtsp://***@cam/x"),  # a user-only credential (a token) is a secret too
        ("rtsp://u:p@[::1]:554/x", "rtsp://***@[::1]:554/x"),
        ("rtsp://u:p@[::1/x", "rtsp://***@[::1/x"),  # malformed IPv6: urlsplit raises, redact_url does not
        ("rtsp://us@r:p@ss@cam/x", "rtsp://***@cam/x"),  # '@' inside an unescaped password
        ("https://cam/live.m3u8?token=s3cret&key=k3y&x", "https://cam/live.m3u8?token=***&key=***&***"),
        ("http://cam/video.mjpg?user=admin&pwd=", "http://cam/video.mjpg?user=***&pwd="),
        ("http://cam/a#access_token=s3cret", "http://cam/a#***"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
        ("rtsp://cam:554/x", "rtsp://cam:554/x"),
        ("/srv/clips/a?b#c.mp4", "/srv/clips/a?b#c.mp4"),  # a path, not a URL
        ("lavfi:testsrc2=rate=10", "lavfi:testsrc2=rate=10"),
        ("", ""),
    ],
)
def test_redact_url_removes_credentials_query_values_and_fragments(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_text_redacts_every_url_and_named_secrets() -> None:
    text = "open 'rtsp://a:pw1@cam/x' failed; retry http://tok2@h/y?k=v3 with hunter2"
    out = redact_text(text, ["hunter2", ""])
    for secret in ("pw1", "tok2", "v3", "hunter2"):
        assert secret not in out
    assert "'rtsp://***@cam/x'" in out
    assert "http://***@h/y?k=***" in out


@pytest.mark.parametrize("url", ["ftp://s3cret@cam/x", "ftp://u:s3cret@cam/x?token=s3cret"])
def test_source_errors_do_not_show_the_secret(url: str) -> None:
    with pytest.raises(SourceError, match="unsupported scheme 'ftp'") as info:
        parse_source(url, _unchecked(url))
    assert "s3cret" not in str(info.value)

"""Ingest benchmark: our import path against plain ffmpeg decoding, and what skipping decode buys.

    .venv/bin/python bench/ingest.py [--clips tests/data/a.mp4 ...] [--sample-fps 1] [--live 8 --live-s 30]

For each clip, measured in this run on this machine:

* ``ffmpeg``: ``ffmpeg -threads 2 -i CLIP -f null -`` decodes every frame (the practical limit);
  CPU time from ``resource.getrusage(RUSAGE_CHILDREN)``.
* ``all``: our import path (timestamps, sampling at ``--sample-fps``, RGB conversion of sampled
  frames, chunking) decoding every frame; CPU time from ``getrusage(RUSAGE_SELF)``.
* ``nonref``: the same with the decoder skipping non-reference frames.
* ``gop``: the same decoding each GOP only up to the last frame still wanted (the default).

Printed per clip: CPU seconds, sampled frames per wall second, times real time (clip duration /
wall time), and two separate ratios: ``all/ffm``, our path decoding every frame against ffmpeg
decoding every frame (the like-for-like overhead of our path), and ``all/gop`` (and
``all/nonref``), what skipping decode gains on top. ``gop`` against ffmpeg would mix the two
(less work, not a faster path), so it is not printed. Targets (reported, not asserted):
like-for-like overhead <= 1.2x ffmpeg CPU; skipping >= 2x faster than decode-all at 1 fps.

``--live N`` also starts N GStreamer RTSP servers (scripts/rtsp_server.py, the 768x432 clip) and a
CameraWorker per server at ``--sample-fps``, and reports dropped frames and the largest last-frame
age seen over ``--live-s`` seconds (target: 8 cameras, no drops, age < 2 s on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamer.camera import CameraWorker  # noqa: E402
from streamer.frames import Chunk  # noqa: E402
from streamer.importer import DecodeSkip, iter_chunks  # noqa: E402
from streamer.settings import CameraSettings  # noqa: E402
from streamer.sources import DecodeStats  # noqa: E402

DATA = ROOT / "tests" / "data"
LIVE_CLIP = DATA / "one-by-one-person-detection.mp4"  # 768x432, 139 s: no loop needed
FFMPEG_THREADS = "2"  # the same decoder thread count as streamer.sources.DECODE_THREADS


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_ffmpeg(clip: Path) -> tuple[float, float]:
    """(CPU s, wall s) of ffmpeg decoding every frame of ``clip`` to nothing."""
    before, began = _cpu_children(), time.perf_counter()
    subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-threads", FFMPEG_THREADS, "-i", str(clip), "-an", "-f", "null", "-"],
        check=True,
    )
    return _cpu_children() - before, time.perf_counter() - began


def run_ours(clip: Path, sample_fps: float, skip: DecodeSkip) -> tuple[float, float, int, int]:
    """(CPU s, wall s, sampled frames, decoded frames) of our import path."""
    settings = CameraSettings(url=str(clip), sample_fps=sample_fps)
    stats = DecodeStats()
    before, began = _cpu_self(), time.perf_counter()
    frames = sum(len(c.frames) for c in iter_chunks(clip, "bench", settings, start_s=0.0, skip=skip, stats=stats))
    return _cpu_self() - before, time.perf_counter() - began, frames, stats.decoded


def duration_s(clip: Path) -> float:
    import av

    with av.open(str(clip)) as container:
        return float(container.duration or 0) / av.time_base


def bench_files(clips: list[Path], sample_fps: float, repeats: int) -> None:
    print(
        f"# file ingest at sample_fps={sample_fps} (best of {repeats}; CPU seconds); "
        "all/ffm: like-for-like overhead (both decode every frame); all/gop, all/nonref: skipping gain"
    )
    header = (
        f"{'clip':34} {'dur s':>6} {'ffmpeg':>7} {'all':>7} {'nonref':>7} {'gop':>7} "
        f"{'all/ffm':>7} {'all/gop':>7} {'all/nonref':>10} {'x real':>7} {'smp/s':>7} {'decoded':>12}"
    )
    print(header)
    for clip in clips:
        ffmpeg_cpu = min(run_ffmpeg(clip)[0] for _ in range(repeats))
        runs = {
            skip: min((run_ours(clip, sample_fps, skip) for _ in range(repeats)), key=lambda r: r[0])
            for skip in ("none", "nonref", "gop")
        }
        cpu = {skip: r[0] for skip, r in runs.items()}
        _, wall, sampled, decoded = runs["gop"]
        dur = duration_s(clip)
        print(
            f"{clip.name:34} {dur:6.1f} {ffmpeg_cpu:7.2f} {cpu['none']:7.2f} {cpu['nonref']:7.2f} {cpu['gop']:7.2f} "
            f"{cpu['none'] / ffmpeg_cpu:7.2f} {cpu['none'] / cpu['gop']:7.2f} {cpu['none'] / cpu['nonref']:10.2f} "
            f"{dur / wall:7.0f} {sampled / wall:7.0f} {decoded:5d}/{runs['none'][3]:<6d}"
        )


async def bench_live(n: int, seconds: float, sample_fps: float) -> None:
    from tests.plugins.rtsp import RtspServer

    servers = [RtspServer(clip=LIVE_CLIP).start() for _ in range(n)]
    try:
        chunks = [0] * n

        def counter(i: int):
            async def on_chunk(_chunk: Chunk) -> None:
                chunks[i] += 1

            return on_chunk

        workers = [
            CameraWorker(
                f"cam{i}", CameraSettings(url=s.url, sample_fps=sample_fps), tz=ZoneInfo("UTC"), on_chunk=counter(i)
            )
            for i, s in enumerate(servers)
        ]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(w.run(stop)) for w in workers]
        cpu0 = _cpu_self()
        began = time.monotonic()
        max_age = 0.0
        while time.monotonic() - began < seconds:
            await asyncio.sleep(0.25)
            if time.monotonic() - began > 5.0:  # after connecting and the probing burst
                ages = [w.status().last_frame_age_s for w in workers]
                max_age = max([max_age, *(a for a in ages if a is not None)])
        statuses = [w.status() for w in workers]
        cpu = _cpu_self() - cpu0
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        for s in servers:
            s.kill()
    dropped = sum(s.frames_dropped for s in statuses)
    print(f"# live: {n} RTSP cameras (768x432, 10 fps) at sample_fps={sample_fps} for {seconds:.0f} s")
    print(
        f"states={sorted({s.state for s in statuses})} dropped={dropped} max_last_frame_age_s={max_age:.2f} "
        f"input_fps={[round(s.input_fps, 1) for s in statuses]} chunks={sum(chunks)} "
        f"worker_cpu_share={cpu / seconds:.2f} cores"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", nargs="*", type=Path, default=sorted(DATA.glob("*.mp4")))
    parser.add_argument("--sample-fps", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement; the best is kept")
    parser.add_argument("--live", type=int, default=0, help="also run N live RTSP cameras")
    parser.add_argument("--live-s", type=float, default=30.0)
    args = parser.parse_args()
    bench_files(args.clips, args.sample_fps, args.repeats)
    if args.live:
        asyncio.run(bench_live(args.live, args.live_s, args.sample_fps))


if __name__ == "__main__":
    main()

"""Does ingest keep up while a question is answered? Last-frame age of live cameras, same run.

Target: while a question is being answered, no camera's last-frame age grows past 2 s.

A 768x432 clip (default tests/data/one-by-one-person-detection.mp4, 10 fps) is served over RTSP by
one GStreamer server per camera (scripts/rtsp_server.py, system python) to ``--cameras``
``CameraWorker``s at sample_fps 1; ``on_chunk`` only counts. Every camera's
``status().last_frame_age_s`` is sampled every 0.25 s on the event loop, through three phases:

* ``before``: cameras only (the baseline);
* ``answering``: the LLM of realistic size with random weights (bench/answer.py: Qwen2-0.5B shapes
  in a LLaVA-OneVision checkpoint, bf16 on CPU) runs ``generate_stream`` on a single-thread
  executor, as ``retrieval.answer.Answerer`` does, over a prompt of about 2,000 tokens (real
  footage, 9 frames × 196 visual tokens plus the text), repeated until ``--answer-s`` have passed;
  torch keeps its default thread count, as in the daemon (which sets none);
* ``after``: cameras only again, so a drift over the run shows.

Printed per phase: max and p99 last-frame age over all cameras, frames dropped by the cameras'
queues, chunks delivered, and the event loop's worst lateness (how much a 0.25 s sleep overran).

    .venv/bin/python -m bench.ingest_while_answering [--cameras 3] [--answer-s 20] [--idle-s 15]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import torch

from bench.answer import QUESTION, build_model, full_chunk, items_of, load_footage
from retrieval.prompt import build_prompt
from streamer.camera import CameraWorker
from streamer.frames import Chunk
from streamer.settings import CameraSettings
from vlm.models import VisionLanguageModel
from vlm.types import PromptPart

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CLIP = ROOT / "tests" / "data" / "one-by-one-person-detection.mp4"
SERVER_SCRIPT = ROOT / "scripts" / "rtsp_server.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # GStreamer's Python bindings come from apt (docs/install.md)
SERVER_START_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 30.0  # first RTSP frame takes ~1.5-2 s on an idle machine; allow for load
POLL_S = 0.05
SAMPLE_EVERY_S = 0.25  # the brief's sampling period (and CameraWorker's watchdog tick)
MAX_AGE_TARGET_S = 2.0
SAMPLE_FPS = 1.0
PROMPT_FRAMES = 9  # 9 × 196 visual tokens + ~250 text tokens ≈ the 2,000-token prompt asked for
MAX_NEW_TOKENS = 512  # far more than fit in --answer-s on CPU: the deadline ends each answer
PHASES = ("before", "answering", "after")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def rtsp_servers(clip: Path, count: int) -> Iterator[list[str]]:
    """``count`` RTSP servers of ``clip`` on free loopback ports; yields their URLs, kills them after."""
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for _ in range(count):
            port = free_port()
            cmd = [SYSTEM_PYTHON, str(SERVER_SCRIPT), "--port", str(port), "--file", str(clip)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while not _accepts(port):
                if procs[-1].poll() is not None:
                    raise RuntimeError(
                        f"RTSP server exited with {procs[-1].returncode}: run `bash scripts/setup.sh` "
                        "(installs gir1.2-gst-rtsp-server-1.0 and python3-gi)"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"RTSP server did not listen on port {port} within {SERVER_START_TIMEOUT_S} s")
                time.sleep(POLL_S)
            urls.append(f"rtsp://127.0.0.1:{port}/cam")
        yield urls
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@dataclass
class PhaseStats:
    ages_s: list[float] = field(default_factory=list)
    dropped_start: int = 0
    dropped_end: int = 0
    chunks: int = 0
    max_lateness_s: float = 0.0
    seconds: float = 0.0


@dataclass
class Generation:
    prompt_tokens: int = 0
    answers: int = 0
    forwards: int = 0  # prefills + decode steps (one forward each)
    prefill_s: float | None = None  # start → end of the first prefill (the first token's cost)
    seconds: float = 0.0


def generate_for(vlm: VisionLanguageModel, parts: list[PromptPart], seconds: float, out: Generation) -> None:
    """Answer the prompt again and again for ``seconds`` (runs on the generation thread)."""
    started = time.monotonic()
    deadline = started + seconds

    def count(*_: object) -> None:
        out.forwards += 1
        if out.prefill_s is None:
            out.prefill_s = time.monotonic() - started

    counter = vlm.model.get_decoder().register_forward_hook(count)
    try:
        while time.monotonic() < deadline:
            for _ in vlm.generate_stream(parts, max_new_tokens=MAX_NEW_TOKENS, deadline_s=deadline):
                # The bench tokenizer decodes the random model's ids (mostly beyond its 566-token
                # vocabulary) to nothing, so deltas are rare; the forward hook counts the steps.
                pass
            out.answers += 1
    finally:
        counter.remove()
        out.seconds = time.monotonic() - started


async def sample_phase(
    workers: list[CameraWorker], stats: PhaseStats, until: asyncio.Future[None] | float, chunks: list[int]
) -> None:
    """Sample every worker's status each SAMPLE_EVERY_S until the future is done or the time has passed."""
    started = time.monotonic()
    stats.dropped_start = sum(w.status().frames_dropped for w in workers)
    chunks_start = chunks[0]
    while True:
        if isinstance(until, float) and time.monotonic() - started >= until:
            break
        if isinstance(until, asyncio.Future) and until.done():
            break
        before = time.monotonic()
        await asyncio.sleep(SAMPLE_EVERY_S)
        stats.max_lateness_s = max(stats.max_lateness_s, time.monotonic() - before - SAMPLE_EVERY_S)
        for worker in workers:
            status = worker.status()
            if status.last_frame_age_s is not None:
                stats.ages_s.append(status.last_frame_age_s)
    stats.dropped_end = sum(w.status().frames_dropped for w in workers)
    stats.chunks = chunks[0] - chunks_start
    stats.seconds = time.monotonic() - started


async def run(args: argparse.Namespace, vlm: VisionLanguageModel, parts: list[PromptPart]) -> None:
    chunks = [0]

    async def on_chunk(chunk: Chunk) -> None:
        chunks[0] += 1

    stats = {phase: PhaseStats() for phase in PHASES}
    generation = Generation(prompt_tokens=int(vlm.assemble(parts)[0].shape[1]))
    with rtsp_servers(args.clip, args.cameras) as urls:
        settings = [CameraSettings(url=url, sample_fps=SAMPLE_FPS) for url in urls]
        workers = [CameraWorker(f"cam{i}", s, tz=ZoneInfo("UTC"), on_chunk=on_chunk) for i, s in enumerate(settings)]
        stop = asyncio.Event()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vigil-generate")
        try:
            async with asyncio.TaskGroup() as group:
                for worker in workers:
                    group.create_task(worker.run(stop), name=f"camera:{worker.name}")
                try:
                    deadline = time.monotonic() + CONNECT_TIMEOUT_S
                    while not all(w.status().state == "connected" for w in workers):
                        if time.monotonic() > deadline:
                            states = {w.name: (w.status().state, w.status().error) for w in workers}
                            raise RuntimeError(f"cameras not connected after {CONNECT_TIMEOUT_S} s: {states}")
                        await asyncio.sleep(POLL_S)
                    print(f"{len(workers)} cameras connected; torch threads {torch.get_num_threads()}", flush=True)
                    await sample_phase(workers, stats["before"], args.idle_s, chunks)
                    future = asyncio.get_running_loop().run_in_executor(
                        executor, generate_for, vlm, parts, args.answer_s, generation
                    )
                    await sample_phase(workers, stats["answering"], future, chunks)
                    await future
                    await sample_phase(workers, stats["after"], args.idle_s, chunks)
                finally:
                    stop.set()
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
    report(stats, generation, args.cameras)


def report(stats: dict[str, PhaseStats], generation: Generation, cameras: int) -> None:
    prefill = "-" if generation.prefill_s is None else f"{generation.prefill_s:.1f} s"
    print(
        f"generation: prompt {generation.prompt_tokens} tokens, {generation.answers} answer(s), "
        f"{generation.forwards} forwards (prefills + steps) in {generation.seconds:.1f} s, first prefill {prefill}"
    )
    print(
        f"{'phase':<10}{'s':>6}{'samples':>9}{'max age s':>11}{'p99 age s':>11}{'dropped':>9}"
        f"{'chunks':>8}{'loop late s':>12}"
    )
    for phase, s in stats.items():
        ages = np.asarray(s.ages_s)
        worst = float(ages.max()) if ages.size else float("nan")
        p99 = float(np.percentile(ages, 99)) if ages.size else float("nan")
        print(
            f"{phase:<10}{s.seconds:>6.1f}{ages.size:>9}{worst:>11.2f}{p99:>11.2f}"
            f"{s.dropped_end - s.dropped_start:>9}{s.chunks:>8}{s.max_lateness_s:>12.3f}"
        )
    answering = stats["answering"].ages_s
    met = bool(answering) and max(answering) <= MAX_AGE_TARGET_S
    verdict = "met" if met else "NOT met"
    print(f"target (max last-frame age <= {MAX_AGE_TARGET_S:g} s while answering, {cameras} cameras): {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", type=int, default=3, choices=range(1, 9), help="cameras (RTSP servers)")
    parser.add_argument("--answer-s", type=float, default=20.0, help="seconds of generation")
    parser.add_argument("--idle-s", type=float, default=15.0, help="seconds of each phase without generation")
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP, help="768x432 clip served to every camera")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "vigil-bench-answer")
    args = parser.parse_args()
    t = time.perf_counter()
    vlm = build_model(args.model_dir)
    footage = load_footage(args.clip, vlm.hidden_size)
    items = items_of([full_chunk(footage, list(range(PROMPT_FRAMES)))])
    parts = build_prompt(QUESTION, items, [], tz=ZoneInfo("UTC"))
    print(f"model and prompt ready in {time.perf_counter() - t:.1f} s", flush=True)
    asyncio.run(run(args, vlm, parts))


if __name__ == "__main__":
    main()

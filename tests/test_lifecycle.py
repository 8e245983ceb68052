"""The daemon's lifecycle with real parts: failures are visible, every task stops, crashes are seen.

A looping file camera (paced at real time) stands in for a live one; real Redis, real Mosquitto,
tiny models, `vigil serve` as a process where signals, exit codes and kill -9 matter.
"""

from __future__ import annotations

import asyncio
import configparser
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis
import yaml

from memory.index import VectorIndex
from memory.keys import RedisKeys
from memory.store import MemoryStore
from streamer.client import status as vigil_status
from streamer.daemon import run_daemon
from streamer.notify import Notifier
from streamer.resources import index_path_for
from streamer.settings import Settings
from streamer.timefmt import parse_time
from tests.faulty_daemon import FAULTS, inject
from tests.plugins.brokers import retained
from tests.plugins.net import free_port
from tests.test_e2e import VIGIL, NotifyListener, daemon_config, running_daemon, wait_for_chunks
from vlm.tiny import TinyModels

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FAULTY = ROOT / "tests" / "faulty_daemon.py"
CLIP = ROOT / "tests" / "data" / "car-detection.mp4"
UTC = ZoneInfo("UTC")
# After an unexpected exception the process must be gone within this: cancelled tasks, one
# bounded flush of buffered writes and the index save, not minutes.
EXIT_WITHIN_S = 30.0
WAIT_S = 90.0


def stop_timeout_s() -> float:
    """TimeoutStopSec of systemd/vigil.service: how long systemd waits after SIGTERM."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment, method-assign]
    unit.read_string((ROOT / "systemd" / "vigil.service").read_text())
    return float(unit["Service"]["TimeoutStopSec"])


def file_camera(**extra: Any) -> dict[str, Any]:
    return {"url": str(CLIP), "loop": True, "realtime": True, "sample_fps": 2.0, "chunk_s": 1.0, **extra}


def config_for(
    prefix: str, tmp_path: Path, models: TinyModels, mqtt: tuple[str, int], **cameras: Any
) -> dict[str, Any]:
    return daemon_config(prefix, tmp_path, models, mqtt, cameras or {"lot": file_camera()})


def start_process(
    argv: list[str], config: dict[str, Any], tmp_path: Path, notify: Path, *, stdout: int | None = None
) -> subprocess.Popen[bytes]:
    path = tmp_path / "vigil.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WATCHDOG_USEC": "2000000", "NOTIFY_SOCKET": str(notify)}
    with (tmp_path / "vigil.log").open("ab") as log:  # a file, not a pipe: a full pipe would block the daemon
        return subprocess.Popen([*argv, str(path)], env=env, stdout=stdout, stderr=log)


def serve(config: dict[str, Any], tmp_path: Path, notify: Path) -> subprocess.Popen[bytes]:
    return start_process([str(VIGIL), "serve", "-c"], config, tmp_path, notify)


def daemon_log(tmp_path: Path) -> str:
    return (tmp_path / "vigil.log").read_bytes().decode(errors="replace")


async def index_agrees_with_redis(settings: Settings, redis_url: str, dim: int, camera: str = "lot") -> int:
    """The saved index holds exactly the chunks Redis holds; returns how many."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        ids, _ = await MemoryStore(client, key_prefix=settings.redis.key_prefix).timeline(camera)
    finally:
        await client.aclose()
    index = VectorIndex.load(index_path_for(settings), dim)
    assert index.ids(camera) == set(ids.tolist())
    return len(ids)


async def status_text(settings: Settings) -> tuple[int, str]:
    out = io.StringIO()
    code = await vigil_status(settings.mqtt, timeout_s=1.0, out=out, err=io.StringIO())
    return code, out.getvalue()


# --------------------------------------------------------------------------- unexpected exceptions


@pytest.mark.parametrize("task", sorted(FAULTS))
async def test_an_unexpected_exception_in_any_task_ends_the_daemon_with_the_index_saved(
    task: str,
    monkeypatch: pytest.MonkeyPatch,
    prefix: str,
    tmp_path: Path,
    tiny_models: TinyModels,
    tiny_embedder: Any,
    broker: tuple[str, int],
    redis_url: str,
) -> None:
    """In process (fast): run_daemon raises the fault within seconds; the resources closed."""
    settings = Settings.model_validate(config_for(prefix, tmp_path, tiny_models, broker))
    fired = inject(task, monkeypatch.setattr)
    listener = NotifyListener(tmp_path / "notify.sock")  # the watchdog task pings only under systemd
    notifier = Notifier({"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "2000000"})
    try:
        with pytest.raises(BaseExceptionGroup) as caught:
            await asyncio.wait_for(run_daemon(settings, asyncio.Event(), notifier=notifier), WAIT_S)
        ended_s = time.time()
    finally:
        listener.close()
    assert caught.group_contains(RuntimeError, match=f"injected fault in {task}")
    assert fired
    assert ended_s - fired[0] < EXIT_WITHIN_S
    assert index_path_for(settings).stat().st_mtime >= fired[0]  # saved on the way out
    await index_agrees_with_redis(settings, redis_url, tiny_embedder.dim)


# The process as systemd runs it: a fault in the task that used to hang shutdown (the retry loop
# that maintenance waited for) and in one with threads of its own (the camera's decoder).
@pytest.mark.parametrize("task", ["store:retry", "camera:lot"])
async def test_an_unexpected_exception_ends_the_process_non_zero(
    task: str,
    prefix: str,
    tmp_path: Path,
    tiny_models: TinyModels,
    tiny_embedder: Any,
    broker: tuple[str, int],
    redis_url: str,
) -> None:
    config = config_for(prefix, tmp_path, tiny_models, broker)
    settings = Settings.model_validate(config)
    listener = NotifyListener(tmp_path / "notify.sock")
    proc = start_process([sys.executable, str(FAULTY), task], config, tmp_path, listener.path, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), WAIT_S)
        assert line.decode().strip() == f"FAULT {task}", daemon_log(tmp_path)[-3000:]
        fired_s = time.time()
        code = await asyncio.to_thread(proc.wait, EXIT_WITHIN_S)
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    log = daemon_log(tmp_path)
    assert code not in (0, None), log[-3000:]
    assert f"task {task} failed" in log
    assert "RuntimeError: injected fault" in log
    assert index_path_for(settings).stat().st_mtime >= fired_s - 1.0  # saved on the way out
    await index_agrees_with_redis(settings, redis_url, tiny_embedder.dim)


# --------------------------------------------------------------------------- broker down at start


async def test_with_the_broker_down_it_is_ready_records_and_ends_on_sigterm(
    prefix: str, tmp_path: Path, tiny_models: TinyModels, tiny_embedder: Any, redis_url: str
) -> None:
    nowhere = ("127.0.0.1", free_port())  # nothing listens there
    config = config_for(prefix, tmp_path, tiny_models, nowhere)
    settings = Settings.model_validate(config)
    listener = NotifyListener(tmp_path / "notify.sock")
    proc = serve(config, tmp_path, listener.path)
    try:
        ready = await listener.wait_for("READY", timeout_s=WAIT_S)
        assert ready["READY"] == "1"
        assert f"MQTT broker {nowhere[0]}:{nowhere[1]} unreachable" in ready["STATUS"]
        await wait_for_chunks(settings, "lot", 2)  # the cameras record without the broker
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, stop_timeout_s())
        took_s = time.monotonic() - sent
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
    log = daemon_log(tmp_path)
    assert code == 0, log[-3000:]
    assert took_s < stop_timeout_s()
    assert await index_agrees_with_redis(settings, redis_url, tiny_embedder.dim) >= 2
    # Every task the daemon runs has a fault in tests/faulty_daemon.py, so the test above covers all.
    tasks = re.search(r"tasks: (.*)", log)
    assert tasks is not None
    assert set(tasks.group(1).split(", ")) == set(FAULTS)


# --------------------------------------------------------------------------- health on {prefix}/status


async def test_a_camera_whose_chunks_keep_failing_is_reported_degraded(
    prefix: str, tmp_path: Path, tiny_models: TinyModels, broker: tuple[str, int], redis_client: Any
) -> None:
    # Redis refuses every chunk of camera "bad": its timeline key holds a string (WRONGTYPE).
    await redis_client.set(RedisKeys(prefix).timeline("bad"), b"not a sorted set")
    config = config_for(prefix, tmp_path, tiny_models, broker, lot=file_camera(), bad=file_camera())
    settings = Settings.model_validate(config)
    topic = f"{prefix}/status"

    async def reported() -> dict[str, Any]:
        body = (await retained(*broker, topic, wait_s=0.5)).get(topic)
        return json.loads(body) if body else {}

    async with running_daemon(settings):
        deadline = time.monotonic() + WAIT_S
        while (first := await reported()).get("health") != "degraded":
            assert time.monotonic() < deadline, f"never degraded: {first}"
        assert "camera bad:" in first["reason"]
        assert "WRONGTYPE" in first["reason"]
        assert "camera lot" not in first["reason"]
        assert first["chunks_failed"] >= 3
        assert parse_time(first["published_at"], UTC) == pytest.approx(time.time(), abs=15.0)
        # The counters move while it runs: the good camera keeps storing.
        while (later := await reported())["chunks_stored"] <= first["chunks_stored"]:
            assert time.monotonic() < deadline, f"chunks_stored did not move: {later}"
        assert later["chunks_failed"] >= first["chunks_failed"]
        assert later["pending_writes"] == 0
        # `{prefix}/available` keeps its meaning; `vigil status` says what is wrong, exit 1.
        available = await retained(*broker, f"{prefix}/available")
        assert available[f"{prefix}/available"] == b"online"
        code, text = await status_text(settings)
        assert code == 1
        assert "health: degraded: camera bad:" in text
        assert re.search(r"chunks_stored=\d+ +chunks_failed=\d+", text)


# --------------------------------------------------------------------------- kill -9


async def test_after_kill_9_cameras_show_stale_and_a_restart_republishes_them(
    prefix: str, tmp_path: Path, tiny_models: TinyModels, broker: tuple[str, int], redis_url: str
) -> None:
    config = config_for(prefix, tmp_path, tiny_models, broker)
    settings = Settings.model_validate(config)
    state_topic = f"{prefix}/cameras/lot/state"

    async def camera_state() -> dict[str, Any]:
        body = (await retained(*broker, state_topic, wait_s=0.5)).get(state_topic)
        return json.loads(body) if body else {}

    listener = NotifyListener(tmp_path / "notify.sock")
    proc = serve(config, tmp_path, listener.path)
    try:
        await listener.wait_for("READY", timeout_s=WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while (state := await camera_state()).get("state") != "connected":
            assert time.monotonic() < deadline, state
        code, text = await status_text(settings)
        assert code == 0, text
        assert re.search(r"^lot +connected", text, re.MULTILINE)
        proc.kill()  # SIGKILL: nothing gets the chance to publish "stopped" or "offline"
        await asyncio.to_thread(proc.wait, 10)
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
    assert (await camera_state())["state"] == "connected"  # the lie the broker keeps retained
    deadline = time.monotonic() + 10
    while (code_text := await status_text(settings))[1].splitlines()[0] != f"vigil ({prefix}): offline":
        assert time.monotonic() < deadline, code_text  # the broker publishes the last will
    code, text = code_text
    assert code == 1
    assert re.search(r"^lot +unknown .*stale: vigil is offline; last: connected", text, re.MULTILINE), text

    # A restart republishes the states before anything else (here in process, to keep it quick).
    restarted_s = time.time()
    async with running_daemon(settings):
        deadline = time.monotonic() + WAIT_S
        while (fresh := await camera_state()).get("published_at") is None or parse_time(
            fresh["published_at"], UTC
        ) < restarted_s:
            assert time.monotonic() < deadline, fresh
        assert fresh["state"] in {"connecting", "connected"}
        while (await retained(*broker, f"{prefix}/available")).get(f"{prefix}/available") != b"online":
            assert time.monotonic() < deadline
        code, text = await status_text(settings)
        assert code == 0, text
        assert re.search(r"^lot +(connecting|connected) ", text, re.MULTILINE), text

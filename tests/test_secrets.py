"""Secrets never appear in logs, status or topics: a real `vigil serve` configured with secrets in
every place, its whole log and every retained topic under its prefix searched for each of them.

The broker (a private Mosquitto) and Redis (a private redis-server) require the passwords, so the
daemon only runs if it passed them on exactly: the MQTT one comes from the environment and is full
of characters that YAML would have eaten ('#', ' ', '@', quotes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import redis.asyncio as aioredis
import yaml

from memory.store import MemoryStore
from streamer.cli import RedactingFormatter
from tests.plugins.net import accepts, free_port
from tests.plugins.rtsp import RtspServer
from vlm.tiny import TinyModels

pytestmark = pytest.mark.slow

VIGIL = Path(sys.executable).with_name("vigil")
START_TIMEOUT_S = 10.0
CHUNKS_TIMEOUT_S = 120.0
MQTT_USER = "vigil"
# Each distinct, so a hit names the place that leaked.
SECRETS = {
    "camera password": "campass-4d2f",
    "camera user-only credential": "camtoken-91ab",
    "camera query token": "qtoken-77ce",
    "camera fragment": "fragsecret-3a1b",
    "failing camera password": "failpass-beef",
    "failing camera query key": "qkey-5150",
    "MQTT password (env)": "mqtt pass #5e @'x'",
    "Redis URL password": "redispass-c0de",
}


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[int]:
    """A Mosquitto of this test that accepts only MQTT_USER with the MQTT secret."""
    if shutil.which("mosquitto") is None or shutil.which("mosquitto_passwd") is None:
        pytest.fail("mosquitto is not installed; install it with `bash scripts/setup.sh`", pytrace=False)
    passwd = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), MQTT_USER, SECRETS["MQTT password (env)"]],
        check=True,
        capture_output=True,
        timeout=30,
    )
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
        "persistence false\nset_tcp_nodelay true\n"
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc, "mosquitto")
        yield port
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def password_redis() -> Iterator[int]:
    """A redis-server of this test that requires the Redis secret (AUTH)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; install it with `bash scripts/setup.sh`", pytrace=False)
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [*cmd, "--requirepass", SECRETS["Redis URL password"]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_listening(port, proc, "redis-server")
        yield port
    finally:
        proc.kill()
        proc.wait()


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not accepts(port):
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}", pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not listen on port {port} within {START_TIMEOUT_S} s", pytrace=False)
        time.sleep(0.05)


def _config(
    prefix: str, tmp_path: Path, models: TinyModels, mqtt_port: int, redis_url: str, rtsp_port: int
) -> dict[str, Any]:
    s = SECRETS
    camera = {"sample_fps": 2.0, "chunk_s": 2.0, "stall_timeout_s": 5.0, "reconnect_max_s": 1.0}
    cam = f"127.0.0.1:{rtsp_port}/cam"
    return {
        "data_dir": str(tmp_path / "state"),
        "log_level": "DEBUG",  # the most the daemon ever says
        "mqtt": {"port": mqtt_port, "topic_prefix": prefix, "client_id": prefix, "reconnect_max_s": 1.0},
        "redis": {"url": redis_url, "key_prefix": prefix},
        "models": {
            "vlm": str(models.vlm),
            "embedder": str(models.embedder),
            "device": "cpu",
            "encode_max_wait_ms": 5.0,
        },
        "cameras": {
            "pw": camera | {"url": f"rtsp://admin:{s['camera password']}@{cam}?token={s['camera query token']}"},
            "tok": camera | {"url": f"rtsp://{s['camera user-only credential']}@{cam}"},
            # FFmpeg sends the fragment; GStreamer answers 404: an error path that is retried.
            "frag": camera | {"url": f"rtsp://{cam}#{s['camera fragment']}"},
            # Nothing listens on the discard port: refused, retried, reported in status.
            "refused": camera
            | {"url": f"rtsp://u:{s['failing camera password']}@127.0.0.1:9/x?key={s['failing camera query key']}"},
        },
    }


async def _retained(port: int, prefix: str, wait_s: float = 1.5) -> dict[str, bytes]:
    seen: dict[str, bytes] = {}
    async with aiomqtt.Client(
        "127.0.0.1", port, username=MQTT_USER, password=SECRETS["MQTT password (env)"], identifier=f"{prefix}-peek"
    ) as client:
        await client.subscribe(f"{prefix}/#", qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                async for message in client.messages:
                    if message.retain and isinstance(message.payload, bytes):
                        seen[str(message.topic)] = message.payload
    return seen


def _both_failing_reported(retained: dict[str, bytes]) -> bool:
    states = [json.loads(body) for topic, body in retained.items() if topic.endswith("/state")]
    return all(any(st["camera"] == name and st["error"] for st in states) for name in ("refused", "frag"))


def _leaks(text: str) -> list[str]:
    return [place for place, secret in SECRETS.items() if secret in text]


async def test_no_secret_reaches_logs_status_or_retained_topics(
    prefix: str,
    tmp_path: Path,
    tiny_models: TinyModels,
    password_broker: int,
    password_redis: int,
    rtsp_server_factory: Any,
) -> None:
    server: RtspServer = rtsp_server_factory("car-detection.mp4")
    redis_url = f"redis://:{SECRETS['Redis URL password']}@127.0.0.1:{password_redis}/0"
    config = _config(prefix, tmp_path, tiny_models, password_broker, redis_url, server.port)
    config_path = tmp_path / "vigil.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VIGIL_MQTT__USERNAME": MQTT_USER,
        "VIGIL_MQTT__PASSWORD": SECRETS["MQTT password (env)"],
    }
    proc = subprocess.Popen([str(VIGIL), "serve", "-c", str(config_path)], env=env, stderr=subprocess.PIPE)
    client = aioredis.Redis.from_url(redis_url)
    store = MemoryStore(client, key_prefix=prefix)
    try:
        deadline = time.monotonic() + CHUNKS_TIMEOUT_S
        # Both streaming cameras store chunks: Redis took the password from the URL.
        while not all([await store.chunks_in_range(c, None, None) for c in ("pw", "tok")]):
            assert proc.poll() is None, "vigil serve exited early"
            assert time.monotonic() < deadline, "no chunks stored for both streaming cameras"
            await asyncio.sleep(0.5)
        # The failing cameras retry and report their errors meanwhile (with rtsp_transport auto a
        # refused camera tries TCP, then UDP, so how long it takes depends on the machine's load).
        while not _both_failing_reported(running := await _retained(password_broker, prefix)):
            assert proc.poll() is None, "vigil serve exited early"
            assert time.monotonic() < deadline, "the failing cameras never reported an error"
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        stopped = await _retained(password_broker, prefix)
    finally:
        if proc.poll() is None:
            proc.kill()
        await client.aclose()
    log = err.decode(errors="replace")
    assert proc.returncode == 0, log[-3000:]

    # The search covers something: every camera's state is retained, with its redacted source.
    states = {topic: json.loads(body) for topic, body in running.items() if topic.endswith("/state")}
    assert set(states) == {f"{prefix}/cameras/{name}/state" for name in config["cameras"]}
    sources = {body["camera"]: body["source"] for body in states.values()}
    assert sources["pw"] == f"rtsp://***@127.0.0.1:{server.port}/cam?token=***"
    assert sources["tok"] == f"rtsp://***@127.0.0.1:{server.port}/cam"
    assert sources["frag"] == f"rtsp://127.0.0.1:{server.port}/cam#***"
    assert sources["refused"] == "rtsp://***@127.0.0.1:9/x?key=***"
    errors = {body["camera"]: body["error"] for body in states.values()}
    assert errors["refused"], errors
    assert errors["frag"], errors
    assert running[f"{prefix}/available"] == b"online"
    assert f"{prefix}/status" in running
    assert "camera pw: starting" in log
    assert "camera refused" in log

    for topic, body in (running | {f"after stop: {t}": b for t, b in stopped.items()}).items():
        assert not _leaks(topic), topic
        assert not _leaks(body.decode(errors="replace")), (topic, _leaks(body.decode(errors="replace")))
    assert not _leaks(log), [(place, log.count(SECRETS[place])) for place in _leaks(log)]


async def test_unreachable_redis_is_reported_without_its_password(
    prefix: str, tmp_path: Path, tiny_models: TinyModels, mqtt_broker: tuple[str, int]
) -> None:
    closed = free_port()
    url = f"redis://:{SECRETS['Redis URL password']}@127.0.0.1:{closed}/0"
    config = _config(prefix, tmp_path, tiny_models, mqtt_broker[1], url, 9) | {"cameras": {}}
    config_path = tmp_path / "vigil.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VIGIL_REDIS__PASSWORD": "redis-env-secret"}
    result = await asyncio.to_thread(
        subprocess.run, [str(VIGIL), "serve", "-c", str(config_path)], env=env, capture_output=True, timeout=120
    )
    log = result.stderr.decode(errors="replace")
    assert result.returncode == 1, log[-2000:]
    assert f"Redis at redis://***@127.0.0.1:{closed}/0 is unreachable" in log
    assert SECRETS["Redis URL password"] not in log
    assert "redis-env-secret" not in log


def test_the_log_formatter_redacts_urls_and_masks_configured_secrets() -> None:
    formatter = RedactingFormatter("%(levelname)s %(message)s", secrets=["hunter2-long", "abc"])
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "open %s failed: %s", ("rtsp://a:pw9@cam/x?t=tok9", "hunter2-long"), None
    )
    try:
        raise ValueError("connecting to redis://:pw8@h:1/0")
    except ValueError:
        record.exc_info = sys.exc_info()
    out = formatter.format(record)
    for secret in ("pw9", "tok9", "hunter2-long", "pw8"):
        assert secret not in out, out
    assert "rtsp://***@cam/x?t=***" in out
    assert "redis://***@h:1/0" in out  # in the traceback too

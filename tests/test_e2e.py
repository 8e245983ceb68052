"""End to end: a real RTSP camera, `vigil serve` with tiny models, questions over real MQTT.

The daemon runs as a task in the test's loop (or as a `vigil serve` process where a real SIGTERM
matters); questions come from independent aiomqtt clients, v5 and v3.1.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
import redis.asyncio as aioredis
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from memory.index import VectorIndex
from memory.store import MemoryStore
from streamer.daemon import run_daemon
from streamer.resources import index_path_for
from streamer.settings import Settings
from tests.plugins.brokers import PrivateBroker, retained
from tests.plugins.net import free_port
from tests.plugins.redis_server import PrivateRedis
from tests.plugins.rtsp import RtspServer
from vlm.tiny import TinyModels

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VIGIL = Path(sys.executable).with_name("vigil")
CLIP = "car-detection.mp4"  # 30 s of a parking lot: cars come and go
REPLY_TIMEOUT_S = 60.0


def daemon_config(
    prefix: str, tmp_path: Path, models: TinyModels, mqtt: tuple[str, int], cameras: dict[str, Any]
) -> dict[str, Any]:
    return {
        "data_dir": str(tmp_path / "state"),
        "mqtt": {"host": mqtt[0], "port": mqtt[1], "topic_prefix": prefix, "client_id": prefix, "reconnect_max_s": 1.0},
        "redis": {"key_prefix": prefix},
        "models": {
            "vlm": str(models.vlm),
            "embedder": str(models.embedder),
            "device": "cpu",
            "max_new_tokens": 12,
            "encode_max_wait_ms": 5.0,
        },
        "retrieval": {"top_k": 4},
        # A port of its own: test daemons (and a vigil running on this machine) never share 9464.
        "metrics": {"port": free_port()},
        "cameras": cameras,
    }


def rtsp_camera(url: str) -> dict[str, Any]:
    return {"url": url, "sample_fps": 2.0, "chunk_s": 3.0, "stall_timeout_s": 5.0, "reconnect_max_s": 2.0}


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_daemon(settings, stop), name="daemon")
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


async def wait_for_chunks(
    settings: Settings, camera: str, n: int, *, after_s: float | None = None, timeout_s: float = 90.0
) -> list[Any]:
    """Every stored chunk of ``camera`` once at least ``n`` of them start after ``after_s``."""
    client = aioredis.Redis.from_url(settings.redis.url)
    store = MemoryStore(client, key_prefix=settings.redis.key_prefix)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with contextlib.suppress(aioredis.ConnectionError):
                metas = await store.chunks_in_range(camera, None, None)
                if sum(after_s is None or m.start_s >= after_s for m in metas) >= n:
                    return metas
            assert time.monotonic() < deadline, f"fewer than {n} chunks stored for {camera} in {timeout_s} s"
            await asyncio.sleep(0.5)
    finally:
        await client.aclose()


async def ask_v5(broker: tuple[str, int], prefix: str, request: dict[str, Any] | bytes) -> list[dict[str, Any]]:
    """Publish one question with a v5 response topic; collect replies until a final one."""
    reply_topic = f"{prefix}/test-replies/{uuid.uuid4().hex[:8]}"
    correlation = uuid.uuid4().bytes
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply_topic
    props.CorrelationData = correlation
    payload = request if isinstance(request, bytes) else json.dumps(request).encode()
    replies: list[dict[str, Any]] = []
    async with aiomqtt.Client(
        broker[0], broker[1], protocol=aiomqtt.ProtocolVersion.V5, identifier=f"asker-{uuid.uuid4().hex[:8]}"
    ) as client:
        await client.subscribe(reply_topic, qos=1)
        await client.publish(f"{prefix}/ask", payload, qos=1, properties=props)
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            async for message in client.messages:
                assert message.properties is not None
                assert message.properties.CorrelationData == correlation
                body = json.loads(message.payload)
                replies.append(body)
                if "delta" not in body or body.get("done"):
                    return replies
    raise AssertionError("no reply")


async def ask_v311(broker: tuple[str, int], prefix: str, request: dict[str, Any]) -> dict[str, Any]:
    reply_topic = f"{prefix}/test-replies/{uuid.uuid4().hex[:8]}"
    request_id = uuid.uuid4().hex
    async with aiomqtt.Client(
        broker[0], broker[1], protocol=aiomqtt.ProtocolVersion.V311, identifier=f"old-{uuid.uuid4().hex[:8]}"
    ) as client:
        await client.subscribe(reply_topic, qos=1)
        body = {**request, "reply_to": reply_topic, "id": request_id}
        await client.publish(f"{prefix}/ask", json.dumps(body), qos=1)
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            async for message in client.messages:
                reply = json.loads(message.payload)
                assert reply["id"] == request_id
                return reply
    raise AssertionError("no reply")


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


async def test_serve_answers_questions_over_mqtt_v5_and_v311(
    prefix: str,
    tmp_path: Path,
    tiny_models: TinyModels,
    broker: tuple[str, int],
    redis_url: str,
    rtsp_server_factory: Any,
) -> None:
    server: RtspServer = rtsp_server_factory(CLIP)
    settings = Settings.model_validate(
        daemon_config(prefix, tmp_path, tiny_models, broker, {"lot": rtsp_camera(server.url)})
    )
    streamed_from = time.time()
    async with running_daemon(settings):
        metas = await wait_for_chunks(settings, "lot", 3)
        first_start = min(m.start_s for m in metas)
        assert first_start >= streamed_from - 1.0

        [v5] = await ask_v5(broker, prefix, {"question": "Is a car in the lot right now?", "cameras": ["LOT"]})
        assert "error" not in v5, v5
        assert isinstance(v5["answer"], str)
        assert v5["citations"], v5
        now = time.time()
        for citation in v5["citations"]:
            assert citation["camera"] == "lot"
            assert first_start - 0.01 <= ts(citation["start"]) < ts(citation["end"]) <= now + 0.01

        # A time filter: only memory after the second chunk began may be cited.
        after = sorted(m.start_s for m in metas)[1]
        after_iso = datetime.fromtimestamp(after).astimezone().isoformat()
        old = await ask_v311(broker, prefix, {"question": "What happened?", "after": after_iso})
        assert "error" not in old, old
        assert old["citations"]
        for citation in old["citations"]:
            assert ts(citation["end"]) > after - 0.01
        assert ts(old["window"]["after"]) == pytest.approx(after, abs=0.01)

        # Streaming: ordered deltas, then a final message with the citations.
        parts = await ask_v5(broker, prefix, {"question": "Describe the lot.", "stream": True})
        deltas, final = parts[:-1], parts[-1]
        assert final["done"] is True
        assert final["citations"]
        assert [p["seq"] for p in deltas] == list(range(len(deltas)))
        assert "".join(p["delta"] for p in deltas) == final["answer"]

        # Malformed requests get error replies and the daemon keeps serving.
        [bad_json] = await ask_v5(broker, prefix, b"{not json")
        assert bad_json["error"]["code"]
        [unknown] = await ask_v5(broker, prefix, {"question": "?", "cameras": ["garage"]})
        assert "garage" in unknown["error"]["message"]
        [again] = await ask_v5(broker, prefix, {"question": "And now?"})
        assert "answer" in again

        # Home Assistant discovery: the device config is retained, with a sensor for the camera
        # (the daemon's client id is the prefix, so it is the device id too).
        topic = f"homeassistant/device/{prefix}/config"
        config = json.loads((await retained(*broker, topic))[topic])
        assert config["components"]["camera_lot"]["state_topic"] == f"{prefix}/cameras/lot/state"
        assert config["availability_topic"] == f"{prefix}/available"


async def test_sigterm_stores_every_sampled_chunk(
    prefix: str,
    tmp_path: Path,
    tiny_models: TinyModels,
    tiny_embedder: Any,
    broker: tuple[str, int],
    redis_url: str,
    rtsp_server_factory: Any,
) -> None:
    server: RtspServer = rtsp_server_factory(CLIP)
    camera = rtsp_camera(server.url) | {"chunk_s": 6.0}
    config = daemon_config(prefix, tmp_path, tiny_models, broker, {"lot": camera})
    config_path = tmp_path / "vigil.yaml"
    config_path.write_text(yaml.safe_dump(config))
    settings = Settings.model_validate(config)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([str(VIGIL), "serve", "-c", str(config_path)], env=env, stderr=subprocess.PIPE)
    try:
        metas = await wait_for_chunks(settings, "lot", 1)
        # Half-way into the next chunk: without a flush on shutdown those seconds would be lost.
        await asyncio.sleep(max(0.0, metas[-1].end_s + 3.0 - time.time()))
        sent_s = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = err.decode(errors="replace")
    assert proc.returncode == 0, log[-2000:]

    client = aioredis.Redis.from_url(redis_url)
    try:
        store = MemoryStore(client, key_prefix=prefix)
        stored = await store.chunks_in_range("lot", None, None)
        # The partial chunk sampled before SIGTERM was stored: memory reaches (almost) the signal.
        last_end = max(m.end_s for m in stored)
        assert last_end >= sent_s - 1.5, (last_end, sent_s)
        # Chunks tile the stream without holes.
        spans = sorted((m.start_s, m.end_s) for m in stored)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start == pytest.approx(end, abs=0.6)

        # After a restart the index file agrees with Redis and finds every chunk by its vector.
        index = VectorIndex.load(index_path_for(settings), dim=tiny_embedder.dim)
        assert index.ids("lot") == {m.chunk_id for m in stored}
        vectors = await store.get_vectors("lot", [m.chunk_id for m in stored])
        for meta, vector in vectors:
            hits = index.search(np.asarray(vector), 1, cameras={"lot"}, after_s=meta.start_s, before_s=meta.end_s)
            assert hits[0].chunk_id == meta.chunk_id
    finally:
        await client.aclose()


async def test_questions_work_again_after_a_broker_restart(
    prefix: str, tmp_path: Path, tiny_models: TinyModels, redis_url: str, private_broker: PrivateBroker
) -> None:
    broker = ("127.0.0.1", private_broker.port)
    settings = Settings.model_validate(daemon_config(prefix, tmp_path, tiny_models, broker, {}))
    async with running_daemon(settings):
        [before] = await _ask_when_up(broker, prefix)
        assert "answer" in before
        private_broker.stop()  # the broker goes away under the running daemon
        await asyncio.sleep(1.0)
        await private_broker.start()
        [after] = await _ask_when_up(broker, prefix)
        assert "answer" in after, after


async def _ask_when_up(broker: tuple[str, int], prefix: str) -> list[dict[str, Any]]:
    """Ask once the daemon is (again) subscribed: it announces itself with a retained `online`."""
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(aiomqtt.MqttError):
            async with aiomqtt.Client(broker[0], broker[1], identifier=f"probe-{uuid.uuid4().hex[:6]}") as client:
                await client.subscribe(f"{prefix}/available", qos=1)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2):
                        async for message in client.messages:
                            if message.payload == b"online":
                                return await ask_v5(broker, prefix, {"question": "Anything?"})
        assert time.monotonic() < deadline, "the daemon did not come back online"
        await asyncio.sleep(0.3)


class NotifyListener:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    async def wait_for(self, key: str, timeout_s: float = 90.0) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            while True:
                data = await loop.sock_recv(self.sock, 4096)
                message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
                self.messages.append(message)
                if key in message:
                    return message

    def close(self) -> None:
        self.sock.close()


def serve_process(config: dict[str, Any], tmp_path: Path, notify: Path | None) -> subprocess.Popen[bytes]:
    config_path = tmp_path / "vigil.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WATCHDOG_USEC": "2000000"}
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify)
    return subprocess.Popen([str(VIGIL), "serve", "-c", str(config_path)], env=env, stderr=subprocess.PIPE)


async def retained_availability(broker: tuple[str, int], prefix: str) -> bytes | None:
    topic = f"{prefix}/available"
    return (await retained(*broker, topic)).get(topic)


async def retained_status(broker: tuple[str, int], prefix: str) -> dict[str, Any]:
    topic = f"{prefix}/status"
    body = (await retained(*broker, topic)).get(topic)
    assert body is not None, "no retained status"
    return json.loads(body)


async def test_serve_speaks_the_systemd_notify_protocol(
    prefix: str, tmp_path: Path, tiny_models: TinyModels, broker: tuple[str, int], redis_url: str
) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    proc = serve_process(daemon_config(prefix, tmp_path, tiny_models, broker, {}), tmp_path, listener.path)
    try:
        ready = await listener.wait_for("READY")
        assert ready["READY"] == "1"
        # READY comes only once the broker connection is up: `online` is already retained.
        assert await retained_availability(broker, prefix) == b"online"
        await listener.wait_for("WATCHDOG", timeout_s=5)  # pinged at half of WATCHDOG_USEC
        proc.send_signal(signal.SIGTERM)
        stopping = await listener.wait_for("STOPPING")
        assert stopping["STOPPING"] == "1"
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        assert await retained_availability(broker, prefix) == b"offline"
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()


async def test_a_second_signal_exits_at_once(
    prefix: str, tmp_path: Path, tiny_models: TinyModels, broker: tuple[str, int], redis_url: str
) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    proc = serve_process(daemon_config(prefix, tmp_path, tiny_models, broker, {}), tmp_path, listener.path)
    try:
        await listener.wait_for("READY")
        # Two different signals, so the kernel cannot merge them into one pending signal.
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 130  # forced: the staged shutdown did not run to its end
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()


async def test_chunks_sampled_while_redis_is_away_are_stored_when_it_returns(
    prefix: str,
    tmp_path: Path,
    tiny_models: TinyModels,
    broker: tuple[str, int],
    rtsp_server_factory: Any,
) -> None:
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis_server = PrivateRedis(free_port(), data_dir=redis_dir)
    redis_server.start()
    server: RtspServer = rtsp_server_factory(CLIP)
    config = daemon_config(prefix, tmp_path, tiny_models, broker, {"lot": rtsp_camera(server.url)})
    config["redis"]["url"] = redis_server.url
    settings = Settings.model_validate(config)
    try:
        async with running_daemon(settings):
            await wait_for_chunks(settings, "lot", 2)
            redis_server.stop()
            away_from = time.time()
            await asyncio.sleep(7.0)  # two to three chunks are sampled with nowhere to go
            # Questions still get a reply (an answer or an error), never silence.
            [during] = await ask_v5(broker, prefix, {"question": "Anything in the lot?"})
            assert "answer" in during or "error" in during
            # Still online, but {prefix}/status says what is wrong.
            away = await retained_status(broker, prefix)
            assert away["health"] == "degraded", away
            assert "Redis unreachable" in away["reason"]
            assert away["pending_writes"] >= 1
            assert await retained_availability(broker, prefix) == b"online"
            redis_server.start()
            back_at = time.time()
            # The retry buffer delivers what was sampled meanwhile, and ingest goes on.
            metas = await wait_for_chunks(settings, "lot", 1, after_s=back_at + 3.0)
            [after] = await ask_v5(broker, prefix, {"question": "Anything in the lot now?"})
            assert after.get("citations"), after
            back = await retained_status(broker, prefix)
            assert back["health"] == "ok", back
            assert back["pending_writes"] == 0
            assert back["chunks_stored"] > away["chunks_stored"]
        spans = sorted((m.start_s, m.end_s) for m in metas)
        assert any(start >= away_from and end <= back_at for start, end in spans), "nothing from the outage"
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start == pytest.approx(end, abs=0.6), "a hole in memory"
    finally:
        redis_server.stop()

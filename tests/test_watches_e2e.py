"""Watches end to end: a live RTSP camera, `vigil serve` with tiny models, events over real MQTT.

One daemon run covers a watch that always fires (threshold 0) and one that never does
(threshold 1), runtime add/change/remove over MQTT (v5 and v3.1.1), invalid changes refused
with error replies, the watch metrics; a second run shows that runtime watches survive a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import redis.asyncio as aioredis
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from memory.events import EventStore
from memory.watches import WatchStore
from streamer.settings import Settings
from tests.plugins.brokers import retained
from tests.plugins.rtsp import RtspServer
from tests.test_e2e import CLIP, daemon_config, rtsp_camera, running_daemon, wait_for_chunks
from tests.test_metrics import promtool
from vlm.tiny import TinyModels

pytestmark = pytest.mark.slow

WAIT_S = 60.0


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


class Listener:
    """Every message on the test's events and watch topics, in order, from a subscriber of its own."""

    def __init__(self, broker: tuple[str, int], prefix: str) -> None:
        self._broker = broker
        self._prefix = prefix
        self.messages: list[tuple[str, bytes, bool]] = []  # (topic, payload, retained)
        self._changed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Listener]:
        ready = asyncio.Event()
        task = asyncio.create_task(self._read(ready))
        await asyncio.wait_for(ready.wait(), 10)
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _read(self, ready: asyncio.Event) -> None:
        async with aiomqtt.Client(*self._broker, identifier=f"listen-{uuid.uuid4().hex[:8]}") as client:
            await client.subscribe(f"{self._prefix}/events", qos=1)
            await client.subscribe(f"{self._prefix}/watches/#", qos=1)
            ready.set()
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                self.messages.append((str(message.topic), message.payload, message.retain))
                self._changed.set()

    def events(self, watch: str | None = None) -> list[dict[str, Any]]:
        found = [json.loads(p) for t, p, _ in self.messages if t == f"{self._prefix}/events"]
        return [e for e in found if watch is None or e["watch"] == watch]

    async def wait_for(self, what: str, predicate: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while not (found := predicate()):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {what} within {timeout_s} s; saw {self.messages[-10:]}"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return found


async def set_watch_v5(
    broker: tuple[str, int], prefix: str, name: str, body: dict[str, Any] | bytes | None
) -> dict[str, Any]:
    """Publish to {prefix}/watches/NAME/set with a v5 response topic (None: empty); the one reply."""
    reply_topic = f"{prefix}/test-replies/{uuid.uuid4().hex[:8]}"
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply_topic
    props.CorrelationData = correlation = uuid.uuid4().bytes
    payload = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiomqtt.Client(
        *broker, protocol=aiomqtt.ProtocolVersion.V5, identifier=f"w-{uuid.uuid4().hex[:8]}"
    ) as c:
        await c.subscribe(reply_topic, qos=1)
        await c.publish(f"{prefix}/watches/{name}/set", payload, qos=1, properties=props)
        async with asyncio.timeout(WAIT_S):
            async for message in c.messages:
                assert message.properties is not None
                assert message.properties.CorrelationData == correlation
                return json.loads(message.payload)
    raise AssertionError("no reply")


async def set_watch_v311(broker: tuple[str, int], prefix: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
    reply_topic = f"{prefix}/test-replies/{uuid.uuid4().hex[:8]}"
    async with aiomqtt.Client(
        *broker, protocol=aiomqtt.ProtocolVersion.V311, identifier=f"o-{uuid.uuid4().hex[:8]}"
    ) as c:
        await c.subscribe(reply_topic, qos=1)
        await c.publish(f"{prefix}/watches/{name}/set", json.dumps({**body, "reply_to": reply_topic}), qos=1)
        async with asyncio.timeout(WAIT_S):
            async for message in c.messages:
                return json.loads(message.payload)
    raise AssertionError("no reply")


async def publish_plain(broker: tuple[str, int], topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(*broker, identifier=f"p-{uuid.uuid4().hex[:8]}") as client:
        await client.publish(topic, payload, qos=1)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_watches_raise_events_change_at_runtime_and_survive_a_restart(
    prefix: str,
    tmp_path: Path,
    tiny_models: TinyModels,
    broker: tuple[str, int],
    redis_url: str,
    rtsp_server_factory: Any,
) -> None:
    server: RtspServer = rtsp_server_factory(CLIP)
    config = daemon_config(prefix, tmp_path, tiny_models, broker, {"lot": rtsp_camera(server.url)})
    config["watches"] = {
        "always": {"question": "Is anything in the lot?", "cameras": ["lot"], "threshold": 0.0},
        "never": {"question": "Is a car in the lot?", "threshold": 1.0, "describe": False},
    }
    settings = Settings.model_validate(config)
    state = f"{prefix}/watches/{{}}/state"
    streamed_from = time.time()
    async with Listener(broker, prefix).running() as seen, running_daemon(settings):
        # Threshold 0: the first checked chunk starts an event, cited inside what was streamed.
        [new] = await seen.wait_for("new event", lambda: [e for e in seen.events("always") if e["type"] == "new"])
        assert new["camera"] == "lot"
        assert new["end"] is None
        assert new["citation"]["camera"] == "lot"
        assert streamed_from - 1.0 <= ts(new["citation"]["start"]) <= time.time()
        assert 0.0 <= new["score"] <= 1.0
        assert new["peak_score"] >= new["score"]
        await seen.wait_for("state ON", lambda: latest(seen, state.format("always")) == b"ON")
        metas = await wait_for_chunks(settings, "lot", 3)
        # describe: true: an update with the description of the chunk that started the event.
        await seen.wait_for("update", lambda: [e for e in seen.events("always") if e["type"] == "update"])

        # Threshold 1 never fires, though every chunk is checked.
        attributes = json.loads(
            (await retained(*broker, f"{prefix}/watches/never/attributes"))[f"{prefix}/watches/never/attributes"]
        )
        assert attributes["checks"] >= 1
        assert attributes["camera"] == "lot"
        assert attributes["origin"] == "config"
        assert (await retained(*broker, state.format("never")))[state.format("never")] == b"OFF"
        assert seen.events("never") == []

        # Runtime: add (threshold 0 fires), change (to threshold 1: its event ends), remove.
        added = await set_watch_v5(broker, prefix, "rt", {"question": "Is it day?", "threshold": 0, "describe": False})
        assert added["status"] == "added"
        assert added["settings"]["threshold"] == 0.0
        [rt_new] = await seen.wait_for("rt event", lambda: [e for e in seen.events("rt") if e["type"] == "new"])
        changed = await set_watch_v5(broker, prefix, "rt", {"question": "Is it day?", "threshold": 1})
        assert changed["status"] == "changed"
        [rt_end] = await seen.wait_for("rt end", lambda: [e for e in seen.events("rt") if e["type"] == "end"])
        assert rt_end["id"] == rt_new["id"]
        assert rt_end["end"] is not None
        removed = await set_watch_v5(broker, prefix, "rt", None)
        assert removed == {"watch": "rt", "status": "removed"}
        left = await retained(*broker, f"{prefix}/watches/rt/#")
        assert left == {}, left

        # Invalid changes: error replies, nothing changes.
        bad = await set_watch_v5(broker, prefix, "bad", {"question": "q?", "threshold": 2})
        assert bad["error"]["code"] == "bad_request"
        assert "threshold" in bad["error"]["message"]
        unknown = await set_watch_v311(broker, prefix, "bad", {"question": "q?", "cameras": ["attic"], "id": 7})
        assert unknown["id"] == 7
        assert unknown["error"]["code"] == "unknown_camera"
        as_text = await set_watch_v5(broker, prefix, "bad", {"question": "q?", "on_after": "2"})
        assert as_text["error"]["code"] == "bad_request"
        read_only = await set_watch_v5(broker, prefix, "always", {"question": "Changed?"})
        assert read_only["error"]["code"] == "read_only"
        await publish_plain(broker, f"{prefix}/watches/bad/set", b"{not json")  # no reply address: counted
        assert await retained(*broker, f"{prefix}/watches/bad/#") == {}

        # A runtime watch that will have to survive the restart.
        kept = await set_watch_v5(
            broker, prefix, "kept", {"question": "Is it night?", "threshold": 0, "describe": False}
        )
        assert kept["status"] == "added"
        await seen.wait_for("kept event", lambda: [e for e in seen.events("kept") if e["type"] == "new"])

        text = await asyncio.to_thread(scrape, settings.metrics.port)
        assert metric(text, "vigil_watch_checks_total", watch="never", camera="lot") >= 1
        assert metric(text, "vigil_watch_events_total", watch="always", camera="lot") == 1
        assert metric(text, "vigil_watch_check_seconds_count", camera="lot") >= 1
        assert metric(text, "vigil_mqtt_unanswerable_total") >= 1
        assert "Is anything" not in text  # never question text in metrics
        checked = promtool(text)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.strip() == "", checked.stdout  # no lint findings either
    # Stopping ended the ongoing events ("end"), in Redis too.
    client = aioredis.Redis.from_url(redis_url)
    try:
        stored = await EventStore(client, key_prefix=prefix).query(camera="lot", watch="always")
        assert [e.id for e in stored] == [new["id"]]
        assert stored[0].end_s is not None
        assert stored[0].description  # the update's description was stored with it
        assert any(e["type"] == "end" for e in seen.events("always"))
        first = min(m.start_s for m in metas)
        assert first - 0.01 <= stored[0].start_s
        runtime, _ = await WatchStore(client, key_prefix=prefix).load()
        assert set(runtime) == {"kept"}
    finally:
        await client.aclose()

    # Restart: the stored runtime watch is checked again (a new event of it in the second run).
    async with Listener(broker, prefix).running() as again, running_daemon(settings):
        [second] = await again.wait_for(
            "kept event after restart", lambda: [e for e in again.events("kept") if e["type"] == "new"]
        )
        attributes = json.loads(
            await again.wait_for("kept attributes", lambda: latest(again, f"{prefix}/watches/kept/attributes"))
        )
        assert attributes["origin"] == "runtime"
        assert attributes["question"] == "Is it night?"
        assert second["watch"] == "kept"


def latest(listener: Listener, topic: str) -> bytes | None:
    payloads = [p for t, p, _ in listener.messages if t == topic]
    return payloads[-1] if payloads else None

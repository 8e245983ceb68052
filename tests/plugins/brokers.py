"""MQTT broker fixtures: the shared broker with per-test cleanup, and private brokers.

A private broker belongs to one test, so the test may stop and restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from streamer.topics import HOME_ASSISTANT_PREFIX
from tests.plugins.net import accepts, free_port


async def retained(host: str, port: int, topic: str, *, wait_s: float = 1.0) -> dict[str, bytes]:
    """Messages retained under ``topic`` (a filter) as seen by a fresh subscriber."""
    seen: dict[str, bytes] = {}
    async with aiomqtt.Client(host, port, identifier=f"peek-{uuid.uuid4().hex[:8]}") as client:
        await client.subscribe(topic, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                async for message in client.messages:
                    if message.retain:
                        assert isinstance(message.payload, bytes)
                        seen[str(message.topic)] = message.payload
    return seen


async def clear_retained(host: str, port: int, prefix: str) -> None:
    found = await retained(host, port, f"{prefix}/#", wait_s=0.3)
    async with aiomqtt.Client(host, port) as client:
        for topic in found:
            await client.publish(topic, b"", qos=1, retain=True)


@pytest.fixture
async def broker(mqtt_broker: tuple[str, int], prefix: str) -> AsyncIterator[tuple[str, int]]:
    """The shared broker; this test's retained topics are cleared afterwards, with the Home
    Assistant discovery config of a daemon whose client id is the prefix (tests/test_e2e.py)."""
    yield mqtt_broker
    await clear_retained(*mqtt_broker, prefix)
    await clear_retained(*mqtt_broker, f"{HOME_ASSISTANT_PREFIX}/device/{prefix}")


class PrivateBroker:
    """A mosquitto of this test alone (so it can be killed and restarted), with the repo's settings."""

    def __init__(self, tmp_path: Path) -> None:
        if shutil.which("mosquitto") is None:
            pytest.fail("mosquitto is not installed; install it with `apt-get install mosquitto`", pytrace=False)
        self.port = free_port()
        self.conf = tmp_path / "mosquitto.conf"
        # Persistence (saved on a clean stop) keeps sessions and queued QoS 1 messages across a
        # restart, as a production broker would.
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
            f"persistence true\npersistence_location {tmp_path}/\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        # Popen only forks and execs; stop() needs the synchronous handle for its SIGTERM + wait.
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(100):
            if accepts(self.port):
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"private mosquitto did not listen on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
async def private_broker(tmp_path: Path) -> AsyncIterator[PrivateBroker]:
    broker = PrivateBroker(tmp_path)
    await broker.start()
    try:
        yield broker
    finally:
        broker.stop()

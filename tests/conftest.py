"""Shared fixtures: real Redis, real Mosquitto, unique key/topic prefixes, offline hub.

Services are never mocked and never skipped: a missing one fails the test with the command that
starts it. Fixture modules of each area live in tests/plugins/.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.plugins.net import accepts

# Nothing in the tests may reach the network: tiny models are built locally and loaded offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

pytest_plugins = ["tests.plugins.brokers", "tests.plugins.redis_server", "tests.plugins.rtsp", "tests.plugins.models"]

REDIS_URL = os.environ.get("VIGIL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MQTT_HOST = os.environ.get("VIGIL_TEST_MQTT_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("VIGIL_TEST_MQTT_PORT", "1883"))


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key and topic prefix of this test alone; its keys in the shared Redis go afterwards."""
    value = f"vigiltest-{uuid.uuid4().hex[:10]}"
    yield value
    if accepts(6379):
        import redis

        with contextlib.suppress(redis.RedisError), redis.Redis.from_url(REDIS_URL) as client:
            keys = list(client.scan_iter(match=f"{value}*", count=1000))
            if keys:
                client.delete(*keys)


@pytest.fixture
def redis_url() -> str:
    if not accepts(6379) and REDIS_URL.startswith("redis://127.0.0.1"):
        pytest.fail(
            "Redis is not listening on 127.0.0.1:6379. Start it with `bash scripts/setup.sh` or "
            "`redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no`",
            pytrace=False,
        )
    return REDIS_URL


@pytest.fixture
async def redis_client(redis_url: str, prefix: str) -> AsyncIterator[object]:
    """An asyncio Redis client for this test (its prefix's keys are deleted afterwards)."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(redis_url)
    try:
        await client.ping()
    except Exception as exc:
        pytest.fail(
            f"Redis at {redis_url} does not answer PING ({exc}); start it with `bash scripts/setup.sh`", pytrace=False
        )
    yield client  # the prefix fixture deletes this test's keys afterwards
    await client.aclose()


@pytest.fixture
def mqtt_broker() -> tuple[str, int]:
    """(host, port) of a running Mosquitto broker."""
    if not accepts(MQTT_PORT, MQTT_HOST):
        pytest.fail(
            f"No MQTT broker on {MQTT_HOST}:{MQTT_PORT}. Start one with `bash scripts/setup.sh` or "
            "`mkdir -p var/mosquitto && mosquitto -d -c configs/mosquitto.conf` (from the repository root)",
            pytrace=False,
        )
    return MQTT_HOST, MQTT_PORT

"""``/metrics`` and ``/healthz`` (streamer/metrics.py) from a real daemon: tiny models, a bundled
clip played as a live camera, real Redis and Mosquitto; the exposition checked by Debian's
``promtool check metrics`` (package ``prometheus``, installed by scripts/setup.sh)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from memory.store import MemoryStore
from streamer.resources import redis_client
from streamer.settings import Settings
from tests.test_e2e import ask_v5, daemon_config, running_daemon, wait_for_chunks
from tests.test_lifecycle import file_camera
from vlm.tiny import TinyModels

pytestmark = pytest.mark.slow

WAIT_S = 60.0
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


async def get(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 exchange → (status code, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), WAIT_S)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def samples(text: str) -> dict[str, float]:
    """'name{labels}' → value for every sample of an exposition."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, line
            found[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return found


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool not found: apt-get install prometheus (scripts/setup.sh does)"
    return subprocess.run(
        [tool, "check", "metrics"], check=False, input=text, capture_output=True, text=True, timeout=30
    )


async def scrape(port: int) -> str:
    status, headers, body = await get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return body.decode()


async def stored_in_redis(settings: Settings, camera: str) -> tuple[int, int]:
    """Chunks and bytes of ``camera`` in Redis now, from a scan."""
    client = redis_client(settings)
    try:
        sizes = await MemoryStore(client, key_prefix=settings.redis.key_prefix).chunk_sizes(camera)
    finally:
        await client.aclose()
    return len(sizes), sum(size for _, size in sizes)


async def wait_listening(port: int) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while True:
        try:
            await get(port, b"GET /healthz HTTP/1.1\r\n\r\n")
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_metrics_pass_promtool_and_move_while_a_camera_streams(
    prefix: str, tmp_path: Path, tiny_models: TinyModels, broker: tuple[str, int]
) -> None:
    settings = Settings.model_validate(daemon_config(prefix, tmp_path, tiny_models, broker, {"lot": file_camera()}))
    port = settings.metrics.port
    async with running_daemon(settings):
        await wait_listening(port)
        await wait_for_chunks(settings, "lot", 1)
        first = samples(await scrape(port))
        await wait_for_chunks(settings, "lot", int(first['vigil_chunks_stored_total{camera="lot"}']) + 2)
        [answer] = await ask_v5(broker, prefix, {"question": "What happened in the last minute?"})
        assert "error" not in answer, answer
        text = await scrape(port)
        second = samples(text)

        status, headers, body = await get(port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert status == 200
        assert headers["Content-Type"] == "application/json"
        health = json.loads(body)

        # Hostile requests get an error or a closed connection, and the server goes on.
        assert (await get(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == 405
        assert (await get(port, b"GET /questions HTTP/1.1\r\n\r\n"))[0] == 404
        assert (await get(port, b"\x00\xff nonsense\r\n\r\n"))[0] == 400
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n")  # a request line over the limit
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
        writer.close()
        # The usage counters are read before each status publication (every 10 s).
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while (memory_chunks := samples(await scrape(port)).get('vigil_memory_chunks{camera="lot",tier="0"}')) is None:
            assert asyncio.get_running_loop().time() < deadline, "no vigil_memory_chunks for camera lot"
            await asyncio.sleep(0.5)
        memory_bytes = samples(await scrape(port))['vigil_memory_bytes{camera="lot",tier="0"}']
        stored_chunks, stored_bytes = await stored_in_redis(settings, "lot")
        head_status, _, head_body = await get(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert (head_status, head_body) == (200, b"")
        assert await scrape(port)

    checked = promtool(text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "", checked.stdout  # no lint findings either

    lot = '{camera="lot"}'
    moving = ("vigil_camera_frames_sampled_total", "vigil_camera_frames_decoded_total", "vigil_chunks_stored_total")
    for counter in moving:
        assert second[counter + lot] > first[counter + lot] > 0, counter
    assert second["vigil_chunks_failed_total" + lot] == 0
    assert second['vigil_encode_seconds_count{camera="lot"}'] >= second["vigil_chunks_stored_total" + lot] - 1
    assert second['vigil_compress_seconds_count{camera="lot"}'] == second["vigil_chunks_stored_total" + lot]
    assert second["vigil_question_seconds_count"] == 1
    assert second["vigil_question_first_token_seconds_count"] == 1
    assert second["vigil_mqtt_answered_total"] == 1
    assert second["vigil_redis_pending_writes"] == 0
    assert second["vigil_healthy"] == 1
    assert second["vigil_camera_connected" + lot] == 1
    # No label but camera anywhere: never question text.
    labels = {name for key in second for name in re.findall(r"(\w+)=", key)}
    assert labels <= {"camera", "tier", "le"}, labels
    # Memory per camera and tier, from the store's usage counters as the status last read them.
    assert 0 < memory_chunks <= stored_chunks
    assert 0 < memory_bytes <= stored_bytes

    # /healthz carries what {prefix}/status carries.
    assert health["health"] == "ok"
    assert health["reason"] is None
    assert health["chunks_stored"] >= first["vigil_chunks_stored_total" + lot]
    assert {"published_at", "chunks_failed", "frames_skipped", "pending_writes", "writes_dropped"} <= set(health)


def test_promtool_catches_a_misnamed_counter() -> None:
    # promtool really lints: the check above would catch a counter without _total.
    bad = "# HELP vigil_chunks_stored Chunks.\n# TYPE vigil_chunks_stored counter\nvigil_chunks_stored 1\n"
    checked = promtool(bad)
    assert 'counter metrics should have "_total" suffix' in checked.stdout + checked.stderr

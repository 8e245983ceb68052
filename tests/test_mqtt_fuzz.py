"""Whole-path fuzz: a seeded stream of hostile MQTT packets against MqttApi on a real broker.

Raw packets (bench/hostile.py) carry what client libraries refuse to send: deep JSON, huge
integers, bad UTF-8, lone surrogates, NUL/wildcard/reserved/``$`` reply topics, oversized v3.1.1
and v5 requests, bad v5 Response Topics and bad topic names. Afterwards the service still answers,
every message with a usable reply address got its error reply (and only those got a reply),
nothing was published on vigil's own topics or Home Assistant's, and RSS stayed within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import uuid
from pathlib import Path

import aiomqtt

from bench.hostile import RawSender, fire, hostile_messages
from streamer.mqtt_api import MqttApi
from tests.test_mqtt_api import CAMERAS, TZ, Requester, echo_answer, running, settings_for

MESSAGES = 3000
WARMUP = 300
BATCH = 64  # messages sent before waiting for their replies: well under the inbox (256)
SEED = 20261202
MAX_PAYLOAD = 8192
# RSS growth allowed over the fuzz after a warm-up: the counters and per-address rate buckets
# (bounded at 4,096) are all that should stay; the rest is allocator noise.
RSS_GROWTH_BOUND_KIB = 16 * 1024


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


async def test_hostile_stream_is_absorbed_and_the_service_keeps_answering(private_broker, prefix):
    host, port = "127.0.0.1", private_broker.port
    settings = settings_for(host, port, prefix, max_payload_bytes=MAX_PAYLOAD)
    api = MqttApi(settings, tz=TZ, cameras=CAMERAS, answer=echo_answer)
    reply_base = f"fuzz-{uuid.uuid4().hex[:8]}"
    replies: dict[str, list[dict]] = {}
    trespass: list[tuple[str, bytes]] = []  # vigil's replies where they must never go
    seen = asyncio.Event()

    async def watch(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic, payload = str(message.topic), message.payload
            assert isinstance(payload, bytes)
            if topic.startswith(reply_base + "/"):
                replies.setdefault(topic, []).append(json.loads(payload))
                seen.set()
                continue
            # A byte test, not json.loads: the watched topics carry the hostile requests too.
            if b'"error":{"code":' in payload or b'"citations":' in payload:
                trespass.append((topic, payload))

    async with (
        running(api),
        aiomqtt.Client(host, port, identifier=f"{prefix}-watch", max_queued_incoming_messages=0) as watcher,
    ):
        for topic in (f"{reply_base}/#", f"{prefix}/#", "homeassistant/#", "me/#"):
            await watcher.subscribe(topic, qos=1)
        watch_task = asyncio.create_task(watch(watcher))
        sender = RawSender(host, port, f"{prefix}-raw")
        try:
            warm_msgs = hostile_messages(
                SEED + 1, WARMUP, prefix=prefix, reply_base=reply_base + "/w", max_payload_bytes=MAX_PAYLOAD
            )
            warm, warm_missing = await fire(warm_msgs, sender, api.ask_topic, replies, seen, batch=BATCH)
            gc.collect()
            before_kib = rss_kib()
            fuzz_msgs = hostile_messages(
                SEED, MESSAGES, prefix=prefix, reply_base=reply_base, max_payload_bytes=MAX_PAYLOAD
            )
            fuzz, fuzz_missing = await fire(fuzz_msgs, sender, api.ask_topic, replies, seen, batch=BATCH)
            await asyncio.sleep(0.5)  # let stray replies (there must be none) arrive
            gc.collect()
            after_kib = rss_kib()
        finally:
            await sender.close()
        async with Requester(host, port, prefix, reply_topic=f"ok/{reply_base}") as req:
            await req.ask({"question": "after the storm"})
            final, _ = await req.reply()
        watch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await watch_task

    assert warm_missing == [], api.counters
    assert fuzz_missing == [], api.counters
    assert final["answer"] == "you asked: after the storm"
    assert api.connected is False  # stopped cleanly by running()
    assert trespass == []
    kinds = {m.kind for m in fuzz}
    assert {"deep_json", "big_int", "bad_utf8", "v311_refused", "v5_bad_response_topic", "bad_publish_topic"} <= kinds
    for m in fuzz:
        got = replies.get(m.reply_topic or "", [])
        if m.expect == "error":
            assert got, m.kind
            assert all("error" in r for r in got), (m.kind, got)
        elif m.expect == "answer":
            assert got[-1].get("answer") == "you asked: is anyone there?", got
        else:
            assert got == [], (m.kind, got)
    # Only the fuzz's own reply topics (error/answer ones) got replies.
    allowed = {m.reply_topic for m in [*warm, *fuzz] if m.expect != "drop"}
    assert set(replies) <= allowed
    assert api.counters["inbox_dropped"] == 0
    assert api.counters["replies_failed"] == 0
    assert api.counters["bad_reply_topic"] > 0
    growth = after_kib - before_kib
    assert growth < RSS_GROWTH_BOUND_KIB, f"RSS grew {growth} KiB over {MESSAGES} hostile messages"

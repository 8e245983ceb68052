"""``{prefix}/events/query`` against a real Mosquitto and Redis: v5 and v3.1.1 requests answered
with stored events, bad requests answered with errors, unusable reply addresses dropped, Redis
away answered with ``unavailable``."""

from __future__ import annotations

import asyncio
from datetime import datetime

import redis.asyncio as redis

from memory.events import Event, EventStore
from streamer.events import event_payload
from streamer.mqtt_api import MqttApi
from streamer.topics import Topics
from tests.test_mqtt_api import CAMERAS, TZ, Requester, echo_answer, running, settings_for

START_S = datetime(2026, 11, 20, 10, 0, 0, tzinfo=TZ).timestamp()
DOOR = Event("e1", "person", "front_door", START_S, START_S + 30, 0.8, 0.91, "A person rings the bell.")
CAR = Event("e2", "car", "garage", START_S + 3600, None, 0.6, 0.7, None)


async def _stored(redis_client, prefix: str) -> EventStore:
    store = EventStore(redis_client, key_prefix=prefix)
    for event in (DOOR, CAR):
        await store.put(event)
    return store


def _api(broker, prefix: str, store: EventStore, **overrides: object) -> MqttApi:
    return MqttApi(settings_for(*broker, prefix, **overrides), tz=TZ, cameras=CAMERAS, answer=echo_answer, events=store)


async def test_v5_and_v311_queries_list_events(broker, prefix, redis_client) -> None:
    store = await _stored(redis_client, prefix)
    topic = Topics(prefix).events_query
    api = _api(broker, prefix, store)
    async with running(api), Requester(*broker, prefix) as v5, Requester(*broker, prefix, v5=False) as old:
        await v5.ask({}, correlation=b"all", topic=topic)
        body, message = await v5.reply()
        assert message.properties is not None
        assert message.properties.CorrelationData == b"all"
        assert body == {"events": [event_payload(DOOR, TZ), event_payload(CAR, TZ)]}

        # Camera names match case-insensitively; naive times are in the configured zone.
        await v5.ask({"camera": "GARAGE", "after": "2026-11-20T10:30:00"}, correlation=b"cam", topic=topic)
        body, _ = await v5.reply()
        assert [e["id"] for e in body["events"]] == ["e2"]
        await v5.ask({"watch": "person", "before": "2026-11-20T10:00:10+01:00", "limit": 5}, topic=topic)
        body, _ = await v5.reply()
        assert [e["id"] for e in body["events"]] == ["e1"]
        await v5.ask({"limit": 1}, topic=topic)
        body, _ = await v5.reply()
        assert [e["id"] for e in body["events"]] == ["e1"]

        await old.ask({"watch": "car", "reply_to": old.reply_topic, "id": "q-7"}, topic=topic)
        body, _ = await old.reply()
        assert body == {"id": "q-7", "events": [event_payload(CAR, TZ)]}
    assert api.counters["events_queried"] == 5


async def test_bad_queries_get_error_replies(broker, prefix, redis_client) -> None:
    store = await _stored(redis_client, prefix)
    topic = Topics(prefix).events_query
    api = _api(broker, prefix, store, max_payload_bytes=1024)
    cases = {
        "bad_json": b"{not json",
        "bad_request": {"camera": "front_door", "question": "extra field"},
        "bad_time": {"after": "yesterday"},
        "unknown_camera": {"camera": "attic"},
        "payload_too_large": {"watch": "x" * 2000},
    }
    async with running(api), Requester(*broker, prefix) as req, Requester(*broker, prefix, v5=False) as old:
        for code, body in cases.items():
            await req.ask(body, correlation=code.encode(), topic=topic)
            reply, message = await req.reply()
            assert message.properties.CorrelationData == code.encode()
            assert reply["error"]["code"] == code, reply
        for bad in ({"limit": 0}, {"limit": 1001}, {"limit": "5"}, {"camera": ["front_door"]}, {"id": True}):
            await req.ask(bad, topic=topic)
            reply, _ = await req.reply()
            assert reply["error"]["code"] == "bad_request", (bad, reply)
        # v3.1.1: the error goes to reply_to with the id, as for questions.
        await old.ask(
            {"after": "2026-11-20T11:00", "before": "2026-11-20T10:00", "reply_to": old.reply_topic, "id": 3},
            topic=topic,
        )
        reply, _ = await old.reply()
        assert reply["id"] == 3
        assert reply["error"]["code"] == "bad_time"
        # No usable reply address: dropped and counted, never published onto vigil's own topics.
        await old.ask({"reply_to": f"{prefix}/status"}, topic=topic)
        await old.ask({}, topic=topic)
        await req.ask({}, correlation=b"after", topic=topic)  # still serving
        reply, _ = await req.reply()
        assert "events" in reply
    assert api.counters["bad_reply_topic"] == 1
    assert api.counters["unanswerable"] == 1
    assert api.counters["events_queried"] == 1
    assert req.replies.empty()
    assert old.replies.empty()


async def test_rate_limit_applies_to_queries(broker, prefix, redis_client) -> None:
    store = await _stored(redis_client, prefix)
    topic = Topics(prefix).events_query
    api = _api(broker, prefix, store, client_rate_per_s=0.01, client_burst=2)
    async with running(api), Requester(*broker, prefix) as req:
        for i in range(3):
            await req.ask({}, correlation=str(i).encode(), topic=topic)
        codes = []
        for _ in range(3):
            reply, _ = await req.reply()
            codes.append(reply.get("error", {}).get("code", "ok"))
    assert sorted(codes) == ["busy", "ok", "ok"]


async def test_redis_away_gets_unavailable(broker, prefix) -> None:
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1.0)  # nothing listens there
    try:
        api = _api(broker, prefix, EventStore(client, key_prefix=prefix))
        async with running(api), Requester(*broker, prefix) as req:
            await req.ask({}, correlation=b"down", topic=Topics(prefix).events_query)
            reply, _ = await req.reply()
        assert reply["error"]["code"] == "unavailable"
        assert "ConnectionError" in reply["error"]["message"]
    finally:
        await client.aclose()


async def test_without_a_store_queries_are_not_served(broker, prefix) -> None:
    api = MqttApi(settings_for(*broker, prefix), tz=TZ, cameras=CAMERAS, answer=echo_answer)
    async with running(api), Requester(*broker, prefix) as req:
        await req.ask({}, topic=Topics(prefix).events_query)
        await req.ask({"question": "still there?"}, correlation=b"q")
        reply, message = await req.reply()
    assert message.properties.CorrelationData == b"q"  # the query was never answered
    assert "answer" in reply
    await asyncio.sleep(0)
    assert req.replies.empty()

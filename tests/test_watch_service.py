"""Watches around the pure core: the Redis store of runtime watches, the service's rules for
loading and changing them, its bounded check queue, and the placeholder scorer (vlm/watch.py).

Real Redis, the real tiny VLM, a real (unconnected) MqttApi as the publisher.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import torch

from memory.events import EventStore
from memory.keys import RedisKeys
from memory.store import ChunkMeta
from memory.types import CompressedChunk
from memory.watches import WatchStore
from retrieval.answer import Answer, Question
from streamer.mqtt_api import MqttApi
from streamer.requests import RequestError, reply_topic_problem
from streamer.settings import MAX_WATCHES, MqttSettings, WatchSettings
from streamer.topics import Topics
from streamer.watch_service import WatchService, chunk_context
from tests.plugins.brokers import retained
from tests.test_mqtt_api import running, settings_for
from tests.test_watches_e2e import publish_plain, set_watch_v5
from vlm.models import VisionLanguageModel
from vlm.types import TextPart
from vlm.watch import yes_probabilities

TZ = ZoneInfo("Europe/Berlin")
CAMERAS = ["front_door", "garage"]


def compressed(m: int, channels: int, seed: int = 0) -> CompressedChunk:
    """A chunk of ``m`` tokens of width ``channels`` on a 2x2 grid over two frames."""
    g = torch.Generator().manual_seed(seed)
    frame = torch.arange(m, dtype=torch.int32) // 4
    return CompressedChunk(
        tokens=torch.randn(m, channels, generator=g),
        t_first=torch.full((m,), 1000.0, dtype=torch.float64),
        t_last=torch.full((m,), 1008.0, dtype=torch.float64),
        frame=frame,
        row=(torch.arange(m) % 4 // 2).to(torch.int16),
        col=(torch.arange(m) % 2).to(torch.int16),
        count=torch.ones(m, dtype=torch.int32),
        kind=torch.zeros(m, dtype=torch.int8),
        segment=torch.zeros(m, dtype=torch.int16),
        grid=(2, 2),
        n_input=m,
    )


def meta_of(camera: str, start_s: float) -> ChunkMeta:
    return ChunkMeta.create(camera, start_s, start_s + 8.0, n_frames=2, n_input_tokens=8, n_tokens=8, codec="fp16/v1")


async def never_answer(question: Question, on_delta: Any) -> Answer:
    raise AssertionError("no question is asked here")


def service(
    redis_client: Any, prefix: str, vlm: VisionLanguageModel, api: MqttApi | None = None, **kwargs: Any
) -> WatchService:
    if api is None:
        api = MqttApi(MqttSettings(topic_prefix=prefix, client_id=prefix), tz=TZ, cameras=CAMERAS, answer=never_answer)
    return WatchService(
        vlm=vlm,
        events=EventStore(redis_client, key_prefix=prefix),
        store=WatchStore(redis_client, key_prefix=prefix),
        publisher=api,
        topics=api.topics,
        tz=TZ,
        cameras=CAMERAS,
        **kwargs,
    )


async def test_the_store_keeps_runtime_watches_and_reports_what_it_cannot_read(redis_client: Any, prefix: str) -> None:
    store = WatchStore(redis_client, key_prefix=prefix)
    await store.put("door", {"question": "Is the door open?", "threshold": 0.7})
    await store.put("car", {"question": "A car?"})
    await store.put("car", {"question": "A red car?"})  # replaced
    await redis_client.hset(RedisKeys(prefix).watches(), mapping={"junk": b"\xff{", "list": b"[1]"})
    found, bad = await store.load()
    assert found == {"car": {"question": "A red car?"}, "door": {"question": "Is the door open?", "threshold": 0.7}}
    assert set(bad) == {"junk", "list"}
    assert await store.remove("car") is True
    assert await store.remove("car") is False
    assert set((await store.load())[0]) == {"door"}


async def test_config_wins_over_a_stored_watch_of_the_same_name(
    redis_client: Any, prefix: str, tiny_vlm: VisionLanguageModel
) -> None:
    store = WatchStore(redis_client, key_prefix=prefix)
    await store.put("door", {"question": "Stored door?"})
    await store.put("attic", {"question": "Attic?", "cameras": ["attic"]})  # a camera no longer configured
    await store.put("car", {"question": "A car?", "threshold": 0.9})
    watches = service(redis_client, prefix, tiny_vlm)
    await watches.load({"door": WatchSettings(question="Config door?", cameras=["front_door"])})
    loaded = watches.watches
    assert sorted(loaded) == ["car", "door"]
    assert loaded["door"].origin == "config"
    assert loaded["door"].settings.question == "Config door?"
    assert loaded["car"].origin == "runtime"
    assert loaded["car"].settings.threshold == 0.9
    stored, _ = await store.load()
    assert set(stored) == {"attic", "car"}  # the shadowed one is forgotten; the unloadable one is kept


async def test_runtime_changes_are_validated_stored_and_refused_without_a_trace(
    redis_client: Any, prefix: str, tiny_vlm: VisionLanguageModel
) -> None:
    watches = service(redis_client, prefix, tiny_vlm)
    store = WatchStore(redis_client, key_prefix=prefix)
    seen: list[list[str]] = []

    async def listener(now: Any) -> None:
        seen.append(sorted(now))

    watches.on_change(listener)
    await watches.load({"door": WatchSettings(question="Door?")})
    reply = await watches.apply("car", {"question": "A car?", "cameras": ["garage"], "reply_to": "x/y", "id": 3})
    assert reply["status"] == "added"
    assert (await store.load())[0]["car"]["cameras"] == ["garage"]
    assert (await watches.apply("car", {"question": "A blue car?"}))["status"] == "changed"
    assert watches.watches["car"].settings.cameras is None
    before = (await store.load())[0]
    for name, body, code in [
        ("door", {"question": "Changed?"}, "read_only"),
        ("door", None, "read_only"),
        ("car", {"question": "q?", "threshold": 2}, "bad_request"),
        ("car", {"question": "q?", "cameras": ["attic"]}, "unknown_camera"),
        ("Bad Name", {"question": "q?"}, "bad_name"),
    ]:
        with pytest.raises(RequestError) as err:
            await watches.apply(name, body)
        assert err.value.code == code, (name, body)
    assert (await store.load())[0] == before
    assert watches.watches["car"].settings.question == "A blue car?"
    assert await watches.apply("car", None) == {"watch": "car", "status": "removed"}
    assert await watches.apply("car", None) == {"watch": "car", "status": "absent"}
    assert "car" not in (await store.load())[0]
    # Listeners hear each change that took effect, and none of the refused ones.
    assert seen == [["door"], ["car", "door"], ["car", "door"], ["door"]]
    for i in range(MAX_WATCHES - 1):
        await watches.apply(f"w{i}", {"question": "q?"})
    with pytest.raises(RequestError) as err:
        await watches.apply("one-more", {"question": "q?"})
    assert err.value.code == "too_many_watches"


async def test_a_full_check_queue_drops_the_oldest_chunk_and_counts_it(
    redis_client: Any, prefix: str, tiny_vlm: VisionLanguageModel
) -> None:
    watches = service(redis_client, prefix, tiny_vlm, queue_chunks=2)
    await watches.load({"door": WatchSettings(question="Door?", cameras=["front_door"])})
    chunk = compressed(8, tiny_vlm.hidden_size)
    for i in range(5):
        meta = ChunkMeta.create(
            "front_door", 1000.0 + 8 * i, 1008.0 + 8 * i, n_frames=2, n_input_tokens=8, n_tokens=8, codec="fp16/v1"
        )
        watches.submit(meta, chunk)
    garage = ChunkMeta.create("garage", 1000.0, 1008.0, n_frames=2, n_input_tokens=8, n_tokens=8, codec="fp16/v1")
    watches.submit(garage, chunk)  # no watch on the garage: not queued, not dropped
    assert watches.status()["queued"] == 2
    assert watches.status()["checks_dropped"] == 3
    assert watches.counts()[("door", "front_door")].dropped == 3
    assert ("door", "garage") not in watches.counts()


def test_chunk_context_is_what_the_checks_score(tiny_vlm: VisionLanguageModel) -> None:
    """The check's context names the camera and its span; scores are per question (their agreement
    with the model's own prefill is tests/test_watch_scoring.py's)."""
    context = chunk_context("front_door", 1000.0, 1008.0, compressed(8, tiny_vlm.hidden_size), TZ)
    questions = ["Is the door open?", "Is a person there?"]
    scores = yes_probabilities(tiny_vlm, context, questions)
    assert len(scores) == 2
    assert all(0.0 <= score <= 1.0 for score in scores)
    assert scores[0] != scores[1]  # the question matters
    assert isinstance(context[0], TextPart)
    assert "front_door" in context[0].text


def test_replies_never_go_to_the_watch_or_event_topics() -> None:
    topics = Topics("vigil")
    for topic in ("vigil/watches/door/state", "vigil/watches/door/set", "vigil/events", "vigil/events/query"):
        assert reply_topic_problem(topic, topics) is not None, topic
    assert topics.watch_of_set("vigil/watches/door/set") == "door"
    assert topics.watch_of_set("vigil/watches/a/b/set") is None


async def test_hostile_watch_changes_over_mqtt_get_error_replies_and_change_nothing(
    redis_client: Any, prefix: str, tiny_vlm: VisionLanguageModel, broker: tuple[str, int]
) -> None:
    api = MqttApi(settings_for(*broker, prefix, max_payload_bytes=1024), tz=TZ, cameras=CAMERAS, answer=never_answer)
    watches = service(redis_client, prefix, tiny_vlm, api)
    await watches.load({})
    api.serve_watches(watches)
    async with running(api):
        for payload, code in [
            (b"x" * 2000, "payload_too_large"),
            (b"[" * 100 + b"]" * 100, "bad_json"),
            (b'{"question": "q?", "on_after": ' + b"9" * 50 + b"}", "bad_json"),
            (b"\xff\xfe", "bad_json"),
            (b"[1]", "bad_json"),
            (b'{"question": "q?", "threshold": NaN}', "bad_json"),
            (b'{"question": "q?", "cameras": "garage"}', "bad_request"),
            (b'{"question": "\\ud800"}', "bad_request"),
        ]:
            reply = await set_watch_v5(broker, prefix, "door", payload)
            assert reply["error"]["code"] == code, payload[:40]
        assert (await set_watch_v5(broker, prefix, "Door", {"question": "q?"}))["error"]["code"] == "bad_name"
        # A reply address on vigil's own topics: dropped, counted, not applied.
        bad_reply = json.dumps({"question": "q?", "reply_to": f"{prefix}/watches/door/state"}).encode()
        await publish_plain(broker, f"{prefix}/watches/door/set", bad_reply)
        await asyncio.sleep(0.5)
        assert api.counters["bad_reply_topic"] == 1
        assert watches.watches == {}
        assert await WatchStore(redis_client, key_prefix=prefix).load() == ({}, {})
        assert await retained(*broker, f"{prefix}/watches/#", wait_s=0.5) == {}
        # And the service still takes a valid change.
        added = await set_watch_v5(broker, prefix, "door", {"question": "Is the door open?", "cameras": ["front_door"]})
        assert added["status"] == "added"
        seen = await retained(*broker, f"{prefix}/watches/door/#")
        assert seen[f"{prefix}/watches/door/state"] == b"OFF"
        assert json.loads(seen[f"{prefix}/watches/door/attributes"])["cameras"] == ["front_door"]

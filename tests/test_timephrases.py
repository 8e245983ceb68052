"""Time in the question (retrieval/timephrases.py): phrases → windows at a fixed now and zone, and
the window an MQTT answer reports when only the question's words gave it (real Redis, broker, index
and tiny models through the Answerer)."""

from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from memory.codec import encode_chunk
from memory.index import VectorIndex
from memory.store import ChunkMeta, MemoryStore
from retrieval.answer import Answerer
from retrieval.search import Retriever
from retrieval.timephrases import read_window
from streamer.mqtt_api import MqttApi
from tests.test_mqtt_api import Requester, running, settings_for
from tests.test_prompt import make_chunk

TZ = ZoneInfo("Europe/Berlin")
NOW = datetime(2026, 11, 20, 14, 3, tzinfo=TZ)  # a Friday, 14:03 in Berlin (+01:00)


def at(day: int, hour: int, minute: int = 0, month: int = 11) -> float:
    return datetime(2026, month, day, hour, minute, tzinfo=TZ).timestamp()


@pytest.mark.parametrize(
    ("question", "after", "before", "phrase"),
    [
        ("what happened in the last 10 minutes?", at(20, 13, 53), None, "in the last 10 minutes"),
        ("anything in the past hour", at(20, 13, 3), None, "in the past hour"),
        ("the last few minutes", at(20, 14, 0), None, "the last few minutes"),
        ("who came this morning", at(20, 6), at(20, 12), "this morning"),
        ("was there a car this afternoon", at(20, 12), None, "this afternoon"),  # ends after now: open
        ("anyone at the door yesterday after 3 pm?", at(19, 15), at(20, 0), "yesterday after 3 pm"),
        ("did the dog bark yesterday", at(19, 0), at(20, 0), "yesterday"),
        ("yesterday morning", at(19, 6), at(19, 12), "yesterday morning"),
        ("what happened since Monday", at(16, 0), None, "since monday"),
        ("since monday did anyone come", at(16, 0), None, "since monday"),
        ("since 2 hours ago", at(20, 12, 3), None, "since 2 hours ago"),
        ("since 8 am", at(20, 8), None, "since 8 am"),
        ("what did the cat do today", at(20, 0), None, "today"),
        ("was there noise last night?", at(19, 18), at(20, 6), "last night"),
        ("on Tuesday between 2 and 4 pm", at(17, 14), at(17, 16), "tuesday between 2 pm and 4 pm"),
        ("monday evening", at(16, 18), at(16, 22), "monday evening"),
        ("did a car leave before 9:30", None, at(20, 9, 30), "before 9:30"),
        ("after 3 pm", at(19, 15), None, "after 3 pm"),  # still to come today: yesterday's
        ("what about 20 november", at(20, 0), None, "20 november"),
    ],
)
def test_phrases_give_windows(question, after, before, phrase):
    window = read_window(question, now_s=NOW.timestamp(), tz=TZ)
    assert window is not None, question
    assert (window.after_s, window.before_s, window.phrase) == (after, before, phrase)


@pytest.mark.parametrize(
    "question",
    ["is a person at the door?", "after 2 people came, what happened", "may I ask what happened", "the last car"],
)
def test_no_time_words_no_window(question):
    assert read_window(question, now_s=NOW.timestamp(), tz=TZ) is None


def test_the_zone_decides_the_day():
    # 00:30 in Berlin is still yesterday in UTC: "today" starts at Berlin's midnight.
    now = datetime(2026, 11, 20, 0, 30, tzinfo=TZ).timestamp()
    window = read_window("what happened today", now_s=now, tz=TZ)
    assert window is not None
    assert window.after_s == at(20, 0)
    utc = read_window("what happened today", now_s=now, tz=ZoneInfo("UTC"))
    assert utc is not None
    assert utc.after_s == datetime(2026, 11, 19, tzinfo=ZoneInfo("UTC")).timestamp()


async def store_at(store: MemoryStore, index: VectorIndex, embedder, c: int, start: float, seed: int) -> ChunkMeta:
    chunk = make_chunk(10, c, t0=start, seed=seed)
    meta = ChunkMeta.create(
        "front_door", start, start + 8.0, n_frames=3, n_input_tokens=chunk.n_input, n_tokens=10, codec="fp16/v1"
    )
    vector = embedder.embed_text(["a person at the front door"])[0]
    assert await store.put_chunk(meta, encode_chunk(chunk), vector)
    index.add(meta, vector)
    return meta


async def test_mqtt_answer_shows_the_window_read_from_the_question(
    broker, prefix, redis_client, tiny_embedder, tiny_vlm
):
    store = MemoryStore(redis_client, key_prefix=prefix)
    index = VectorIndex(tiny_embedder.dim)
    now = time.time()
    recent = await store_at(store, index, tiny_embedder, tiny_vlm.hidden_size, now - 120.0, seed=1)
    await store_at(store, index, tiny_embedder, tiny_vlm.hidden_size, now - 3600.0, seed=2)  # an hour ago
    retriever = Retriever(tiny_embedder, store, index, top_k=4, recent_chunks=0, max_chunks=4)
    answerer = Answerer(tiny_vlm, retriever, tz=TZ, max_new_tokens=2, generation_timeout_s=30.0)
    api = MqttApi(settings_for(*broker, prefix), tz=TZ, cameras=lambda: ["front_door"], answer=answerer.answer)
    try:
        async with running(api), Requester(*broker, prefix) as req:
            await req.ask({"question": "who came to the door in the last 10 minutes?"})
            body, _ = await req.reply()
            # An explicit after wins over the words.
            explicit = datetime.fromtimestamp(now - 7200.0, TZ).isoformat()
            await req.ask({"question": "who came to the door in the last 10 minutes?", "after": explicit})
            wins, _ = await req.reply()
    finally:
        answerer.close()
    window = body["window"]
    assert window["phrase"] == "in the last 10 minutes"
    assert window["before"] is None
    after = datetime.fromisoformat(window["after"])
    assert after.utcoffset() == datetime.fromtimestamp(now, TZ).utcoffset()  # in the configured zone
    assert after.timestamp() == pytest.approx(now - 600.0, abs=30.0)
    # Only the chunk inside the window was cited; the one an hour ago was not.
    assert [datetime.fromisoformat(c["start"]).timestamp() for c in body["citations"]] == [
        pytest.approx(recent.start_s, abs=0.01)
    ]
    assert wins["window"]["phrase"] is None
    assert datetime.fromisoformat(wins["window"]["after"]).timestamp() == pytest.approx(now - 7200.0, abs=0.01)
    assert len(wins["citations"]) == 2

"""EventStore against a real Redis (insert/replace, overlap queries, retention, key slots) and the
event JSON (streamer/events.py)."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from redis.crc import key_slot

from memory.events import Event, EventStore
from streamer.events import event_payload
from streamer.timefmt import parse_time

T0 = 1_700_000_000.0
TZ = ZoneInfo("Europe/Berlin")


def _event(
    camera: str, start_s: float, end_s: float | None, *, watch: str = "person", score: float = 0.7, n: int = 0
) -> Event:
    return Event(
        id=f"{watch}-{camera}-{n or int(start_s)}",
        watch=watch,
        camera=camera,
        start_s=start_s,
        end_s=end_s,
        score=score,
        peak_score=max(score, 0.9),
        description=None,
    )


async def test_put_replaces_by_id_through_new_update_end(redis_client, prefix) -> None:
    store = EventStore(redis_client, key_prefix=prefix)
    new = _event("front", T0, None, score=0.6)
    await store.put(new)
    assert await store.query() == [new]
    update = dataclasses.replace(new, score=0.8, peak_score=0.95)
    await store.put(update)
    end = dataclasses.replace(update, end_s=T0 + 30, description="A person waits at the door.")
    await store.put(end)
    assert await store.query() == [end]  # one event, the last write
    assert await store.query(camera="front", after_s=T0 + 40) == []  # ended: no longer reaches forward


async def test_query_overlap_order_filters_and_limit(redis_client, prefix) -> None:
    store = EventStore(redis_client, key_prefix=prefix)
    early = _event("front", T0, T0 + 10)  # entirely before the window
    straddle = _event("back", T0 + 50, T0 + 120)  # starts before the window, ends inside
    inside = _event("front", T0 + 110, T0 + 115, watch="car")
    ongoing = _event("front", T0 + 60, None)  # ongoing: reaches into every later window
    late = _event("back", T0 + 200, T0 + 210)  # starts at before_s: outside [after, before)
    for event in (late, inside, early, ongoing, straddle):
        await store.put(event)

    assert await store.query() == [early, straddle, ongoing, inside, late]
    window = await store.query(after_s=T0 + 100, before_s=T0 + 200)
    assert window == [straddle, ongoing, inside]
    assert await store.query(after_s=T0 + 100, before_s=T0 + 200, camera="front") == [ongoing, inside]
    assert await store.query(after_s=T0 + 100, before_s=T0 + 200, watch="car") == [inside]
    assert await store.query(before_s=T0 + 50) == [early]  # an event starting at before_s is out
    assert await store.query(after_s=T0 + 10) == [straddle, ongoing, inside, late]  # ending at after_s is out
    assert await store.query(after_s=T0 + 1000) == [ongoing]
    assert await store.query(limit=2) == [early, straddle]
    assert await store.query(camera="front", watch="person", limit=1) == [early]
    assert await store.query(camera="side") == []
    assert await store.query(watch="nobody") == []


async def test_invalid_input_is_refused_before_writing(redis_client, prefix) -> None:
    store = EventStore(redis_client, key_prefix=prefix)
    good = _event("front", T0, T0 + 5)
    bad = [
        dataclasses.replace(good, camera="a:b"),
        dataclasses.replace(good, id=""),
        dataclasses.replace(good, watch="x" * 129),
        dataclasses.replace(good, end_s=T0 - 1),
        dataclasses.replace(good, start_s=float("nan")),
        dataclasses.replace(good, score=1.5),
        dataclasses.replace(good, peak_score=-0.1),
    ]
    for event in bad:
        with pytest.raises(ValueError, match=r"event|camera|finite"):
            await store.put(event)
    assert await store.query() == []
    assert await redis_client.keys(f"{prefix}*") == []
    with pytest.raises(ValueError, match="limit"):
        await store.query(limit=0)
    with pytest.raises(ValueError, match="before"):
        await store.query(after_s=T0 + 10, before_s=T0)


async def test_prune_deletes_what_ended_before_the_cutoff(redis_client, prefix) -> None:
    store = EventStore(redis_client, key_prefix=prefix)
    old = _event("front", T0, T0 + 10)
    crossing = _event("front", T0 + 90, T0 + 110)  # ends after the cutoff: kept
    ongoing = _event("front", T0 + 5, None)  # started long ago but not over: kept
    other_camera = _event("back", T0, T0 + 10)
    for event in (old, crossing, ongoing, other_camera):
        await store.put(event)
    assert await store.prune("front", T0 + 100) == 1
    assert await store.query(camera="front") == [ongoing, crossing]
    assert await store.query(camera="back") == [other_camera]  # prune is per camera
    assert await store.prune("front", T0 + 100) == 0
    # Nothing of the pruned event is left in the record hash or either index.
    assert not await redis_client.hexists(store.keys.events("front"), old.id)
    assert await redis_client.zscore(store.keys.event_starts("front"), old.id) is None
    assert await redis_client.zscore(store.keys.event_ends("front"), old.id) is None


async def test_prune_goes_in_batches(redis_client, prefix) -> None:
    store = EventStore(redis_client, key_prefix=prefix)
    n = 1_205  # more than one BATCH_IDS
    for i in range(n):
        await store.put(_event("front", T0 + i, T0 + i + 0.5, n=i + 1))
    assert await store.prune("front", T0 + n) == n
    assert await store.query(camera="front") == []


async def test_event_keys_share_the_camera_slot(redis_client, prefix) -> None:
    store = EventStore(redis_client, key_prefix=prefix)
    for camera in ("front-door", "cam7"):
        await store.put(_event(camera, T0, None))
    keys = [k.decode() for k in await redis_client.keys(f"{prefix}*")]
    per_camera = [k for k in keys if k != store.keys.cameras()]
    assert len(per_camera) == 6
    for key in per_camera:
        camera = key.split("{", 1)[1].split("}", 1)[0]
        assert key_slot(key.encode()) == key_slot(camera.encode())


def test_event_payload_in_zone_with_citation() -> None:
    start_s = datetime(2026, 11, 20, 10, 0, 0, tzinfo=TZ).timestamp()
    event = Event("e1", "person", "front", start_s, start_s + 12.5, 0.812345, 0.93, "A person at the door.")
    body = event_payload(event, TZ, "end")
    assert body == {
        "type": "end",
        "id": "e1",
        "watch": "person",
        "camera": "front",
        "start": "2026-11-20T10:00:00.000+01:00",
        "end": "2026-11-20T10:00:12.500+01:00",
        "score": 0.8123,
        "peak_score": 0.93,
        "description": "A person at the door.",
        "citation": {
            "camera": "front",
            "start": "2026-11-20T10:00:00.000+01:00",
            "end": "2026-11-20T10:00:12.500+01:00",
        },
    }
    assert next(iter(body)) == "type"
    assert parse_time(body["start"], TZ) == start_s
    ongoing = event_payload(dataclasses.replace(event, end_s=None), TZ)
    assert "type" not in ongoing
    assert ongoing["end"] is None
    assert ongoing["citation"]["end"] is None

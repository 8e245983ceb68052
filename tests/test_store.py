"""MemoryStore against a real Redis: round trips, time queries, retention, key slots, retry buffer."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from memory.index import VectorIndex
from memory.keys import RedisKeys
from memory.outage import Outage
from memory.store import ChunkMeta, MemoryStore, chunk_id_for

DIM = 16
T0 = 1_700_000_000.0
CHUNK_S = 8.0


def _meta(camera: str, start_s: float, span_s: float = CHUNK_S) -> ChunkMeta:
    return ChunkMeta.create(camera, start_s, start_s + span_s, n_frames=8, n_input_tokens=512, n_tokens=51, codec="t/1")


def _vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def _payload(meta: ChunkMeta) -> bytes:
    return f"payload-{meta.camera}-{meta.chunk_id}".encode() * 3


async def _put_series(store: MemoryStore, camera: str, n: int, t0: float = T0) -> list[ChunkMeta]:
    metas = [_meta(camera, t0 + i * CHUNK_S) for i in range(n)]
    for i, meta in enumerate(metas):
        assert await store.put_chunk(meta, _payload(meta), _vec(i))
    return metas


def test_chunk_id_is_deterministic_63_bit() -> None:
    a = chunk_id_for("front", T0 + 1.0004)
    assert a == chunk_id_for("front", T0 + 1.0)  # same millisecond
    assert a != chunk_id_for("front", T0 + 1.002)
    assert a != chunk_id_for("back", T0 + 1.0)
    ids = {chunk_id_for("front", T0 + i * 0.001) for i in range(2000)}
    assert len(ids) == 2000
    assert all(0 <= i < 2**63 for i in ids)


async def test_put_get_round_trip_and_idempotent_retry(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    metas = await _put_series(store, "front", 5)
    got = await store.get_chunks([("front", m.chunk_id) for m in reversed(metas)] + [("front", 42)])
    assert [meta for meta, _ in got] == list(reversed(metas))
    assert [payload for _, payload in got] == [_payload(m) for m in reversed(metas)]
    vectors = await store.get_vectors("front", [m.chunk_id for m in metas])
    for i, (meta, vec) in enumerate(vectors):
        assert meta == metas[i]
        np.testing.assert_array_equal(vec, _vec(i))
    # Writing the same chunk again (a retry) changes nothing.
    assert await store.put_chunk(metas[0], _payload(metas[0]), _vec(0))
    ids, starts = await store.timeline("front")
    assert ids.tolist() == [m.chunk_id for m in metas]
    np.testing.assert_allclose(starts, [m.start_s for m in metas])
    assert await store.cameras() == ["front"]
    assert store.stats.written == 6
    assert store.stats.buffered == store.stats.dropped == 0


async def test_time_range_latest_and_out_of_order(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    metas = [_meta("yard", T0 + i * CHUNK_S) for i in range(20)]
    order = np.random.default_rng(0).permutation(20)
    for i in order:  # out of order, as after a retry
        await store.put_chunk(metas[i], _payload(metas[i]), _vec(int(i)))
    await _put_series(store, "gate", 3)

    # Overlap semantics: a chunk counts when start < before and end > after.
    after, before = T0 + 3 * CHUNK_S + 1.0, T0 + 7 * CHUNK_S
    got = await store.chunks_in_range("yard", after, before)
    assert got == metas[3:7]
    assert await store.chunks_in_range("yard", after, before, limit=2) == metas[3:5]
    assert await store.chunks_in_range("yard", None, T0 + 2 * CHUNK_S) == metas[:2]
    assert await store.chunks_in_range("yard", T0 + 18 * CHUNK_S, None) == metas[18:]
    assert await store.chunks_in_range("yard", None, None) == metas
    assert await store.chunks_in_range("yard", T0 - 100, T0) == []
    assert await store.chunks_in_range("nowhere", None, None) == []
    assert await store.latest_chunks("yard", 3) == metas[-3:]
    assert await store.latest_chunks("yard", 0) == []
    assert await store.cameras() == ["gate", "yard"]


async def test_bad_input_is_refused_and_nothing_written(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    good = _meta("front", T0)
    with pytest.raises(ValueError, match="cannot be used in a Redis key"):
        await store.put_chunk(ChunkMeta("bad{cam}", 1, T0, T0 + 1, 1, 1, 1, "x"), b"p", _vec(0))
    with pytest.raises(ValueError, match="is not chunk_id_for"):
        await store.put_chunk(ChunkMeta("front", 1, T0, T0 + 1, 1, 1, 1, "x"), b"p", _vec(0))
    with pytest.raises(ValueError, match="end_s must be after start_s"):
        await store.put_chunk(_meta("front", T0, span_s=0.0), b"p", _vec(0))
    with pytest.raises(ValueError, match="end_s must be after start_s"):
        await store.put_chunk(_meta("front", T0, span_s=3600.0), b"p", _vec(0))
    with pytest.raises(ValueError, match="finite"):
        await store.put_chunk(ChunkMeta("front", 1, float("nan"), T0, 1, 1, 1, "x"), b"p", _vec(0))
    with pytest.raises(ValueError, match="NaN"):
        await store.put_chunk(good, b"p", np.full(DIM, np.inf, dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \[D\]"):
        await store.put_chunk(good, b"p", np.zeros((2, DIM), dtype=np.float32))
    with pytest.raises(TypeError, match="payload must be bytes"):
        await store.put_chunk(good, "text", _vec(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="before start_s"):
        await store.put_outage(Outage("front", T0, T0 - 1, "x"))
    assert [k async for k in redis_client.scan_iter(match=f"{prefix}*")] == []
    assert store.pending == 0
    assert store.stats.written == store.stats.buffered == 0


async def test_keys_carry_camera_hash_tag_and_share_a_slot(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    for camera in ("front-door", "back_yard", "cam7"):
        await _put_series(store, camera, 3)
        await store.put_outage(Outage(camera, T0 - 50, T0 - 10, "stream ended"))
    keys = [k.decode() async for k in redis_client.scan_iter(match=f"{prefix}*")]
    # cameras set + per camera: timeline, chunks, outages, added log, usage counters
    assert len(keys) == 1 + 3 * (1 + 3 + 1 + 1 + 1)
    slots: dict[str, set[int]] = {}
    for key in keys:
        if key == store.keys.cameras():
            continue
        camera = key.split("{", 1)[1].split("}", 1)[0]
        assert key.startswith(f"{prefix}:{{{camera}}}:")
        slots.setdefault(camera, set()).add(key_slot(key.encode()))
    assert sorted(slots) == ["back_yard", "cam7", "front-door"]
    for camera, camera_slots in slots.items():
        assert camera_slots == {key_slot(camera.encode())}, camera
    # The helper lists every key form, all in the camera's slot.
    forms = RedisKeys(prefix).camera_keys("cam7", 1)
    assert {key_slot(k.encode()) for k in forms} == {key_slot(b"cam7")}
    with pytest.raises(ValueError, match="cannot be used"):
        RedisKeys(prefix).timeline("a:b")


async def test_outages_put_update_and_query(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    await store.put_outage(Outage("front", T0 + 100, None, "connection refused"))
    await store.put_outage(Outage("back", T0 + 50, T0 + 60, "stalled"))
    await store.put_outage(Outage("front", T0 + 10, T0 + 20, "stalled"))
    everything = await store.outages()
    assert [(o.camera, o.start_s) for o in everything] == [
        ("front", T0 + 10),
        ("back", T0 + 50),
        ("front", T0 + 100),
    ]
    # An open outage overlaps every later window; updating it (same start) replaces the record.
    assert [o.start_s for o in await store.outages(["front"], T0 + 500, T0 + 600)] == [T0 + 100]
    await store.put_outage(Outage("front", T0 + 100, T0 + 130, "connection refused"))
    assert await store.outages(["front"], T0 + 500, T0 + 600) == []
    assert await store.outages(["front"], T0 + 125, None) == [
        Outage("front", T0 + 100, T0 + 130, "connection refused")
    ]
    assert [o.camera for o in await store.outages(["back"], T0, T0 + 55)] == ["back"]
    assert await store.outages(["back"], T0 + 60, None) == []


async def test_retention_deletes_old_chunks_in_redis_and_index(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    front = await _put_series(store, "front", 30)
    back = await _put_series(store, "back", 10)
    await store.put_outage(Outage("front", T0 - 100, T0 - 90, "stalled"))
    await store.put_outage(Outage("front", T0 + 200, T0 + 210, "stalled"))
    index = VectorIndex(DIM)
    assert await index.catch_up(store) == (40, 0)

    now = T0 + 30 * CHUNK_S
    max_age = 20 * CHUNK_S - 1.0  # chunks starting before T0 + 10 * CHUNK_S + 1 go
    assert await store.apply_retention("front", max_age, now) == 11
    assert await store.chunks_in_range("front", None, None) == front[11:]
    assert await store.get_chunks([("front", m.chunk_id) for m in front[:11]]) == []
    assert [o.start_s for o in await store.outages(["front"])] == [T0 + 200]
    assert await store.chunks_in_range("back", None, None) == back
    assert await store.apply_retention("front", max_age, now) == 0

    assert await index.catch_up(store) == (0, 11)
    assert index.ids("front") == {m.chunk_id for m in front[11:]}
    assert index.ids("back") == {m.chunk_id for m in back}
    # The index's own cheap retention drops the same chunks.
    twin = VectorIndex(DIM)
    twin.add_many(front, np.stack([_vec(i) for i in range(30)]))
    assert twin.remove_before("front", now - max_age) == 11
    assert twin.ids("front") == index.ids("front")


async def test_catch_up_adds_removes_and_matches_search(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    metas = await _put_series(store, "front", 12)
    index = VectorIndex(DIM)
    index.add_many(metas[:4], np.stack([_vec(i) for i in range(4)]))
    ghost = _meta("front", T0 - 1000)  # indexed, but its write never reached Redis
    index.add(ghost, _vec(99))
    assert await index.catch_up(store) == (8, 1)
    assert index.ids() == {m.chunk_id for m in metas}
    for i, meta in enumerate(metas):
        assert index.search(_vec(i), 1, cameras={"front"}, after_s=meta.start_s, before_s=meta.end_s)[0].chunk_id == (
            meta.chunk_id
        )
    assert await index.catch_up(store) == (0, 0)


# --------------------------------------------------------------------------- retry buffer


def _client(url: str) -> redis.Redis:
    # No client-side retries: the store's own buffer is what is under test.
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1, socket_timeout=1)


async def test_writes_buffered_while_redis_is_away_then_flushed(private_redis, prefix) -> None:
    client = _client(private_redis.url)
    try:
        store = MemoryStore(client, key_prefix=prefix, buffer_chunks=8)
        first = await _put_series(store, "front", 2)
        private_redis.stop()
        away = [_meta("front", T0 + 100 + i * CHUNK_S) for i in range(5)]
        for i, meta in enumerate(away):
            assert not await store.put_chunk(meta, _payload(meta), _vec(i))
        assert not await store.put_outage(Outage("front", T0 + 99, None, "redis test"))
        assert store.pending == 6
        assert await store.flush_pending() == 0  # still away
        assert store.pending == 6
        private_redis.start()  # a fresh server: what was written before is gone, the buffer is not
        # A write Redis refuses for good (WRONGTYPE) is dropped without blocking the others.
        poisoned = away[2]
        await client.set(store.keys.chunk("front", poisoned.chunk_id), b"not a hash")
        assert await store.flush_pending() == 5
        assert store.pending == 0
        stored = await store.get_chunks([("front", m.chunk_id) for m in away])
        assert [meta for meta, _ in stored] == [m for m in away if m != poisoned]
        assert [o.start_s for o in await store.outages(["front"])] == [T0 + 99]
        stats = store.stats
        assert (stats.written, stats.buffered, stats.retried, stats.dropped) == (7, 6, 5, 1)
        assert len(first) == 2
    finally:
        await client.aclose()


async def test_buffer_overflow_drops_oldest_and_retry_loop_flushes(private_redis, prefix, caplog) -> None:
    client = _client(private_redis.url)
    stop = asyncio.Event()
    try:
        store = MemoryStore(client, key_prefix=prefix, buffer_chunks=3)
        private_redis.stop()
        metas = [_meta("gate", T0 + i * CHUNK_S) for i in range(5)]
        with caplog.at_level("WARNING", logger="memory.store"):
            for i, meta in enumerate(metas):
                assert not await store.put_chunk(meta, _payload(meta), _vec(i))
        assert store.pending == 3
        assert store.stats.dropped == 2
        warnings = [r.getMessage() for r in caplog.records if r.name == "memory.store"]
        assert sum("unavailable" in m for m in warnings) == 1  # one line per state change
        assert sum("buffer full" in m for m in warnings) == 1

        loop_task = asyncio.create_task(store.run_retry_loop(stop, interval_s=0.05))
        private_redis.start()
        for _ in range(200):  # up to 10 s for the loop to notice
            if not store.pending:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(loop_task, 10)
        assert store.pending == 0
        # The two oldest were dropped; the three newest arrived.
        assert await store.chunks_in_range("gate", None, None) == metas[2:]
        assert store.stats.retried == 3
    finally:
        stop.set()
        await client.aclose()


async def test_index_follows_chunks_another_process_stores(redis_client, redis_url, prefix) -> None:
    """A daemon's index (cursors taken before its catch-up) picks up what a second writer
    (`vigil import`, its own client) stores afterwards; its own chunks are skipped, repeats too."""
    daemon = MemoryStore(redis_client, key_prefix=prefix)
    own = await _put_series(daemon, "front", 3)
    index = VectorIndex(DIM)
    cursors = await daemon.added_cursors()
    assert set(cursors) == {"front"}
    await index.catch_up(daemon)
    assert await index.follow(daemon, cursors) == 0  # nothing new since the catch-up

    importer_client = _client(redis_url)
    try:
        importer = MemoryStore(importer_client, key_prefix=prefix)
        imported = await _put_series(importer, "yard", 4, t0=T0 - 3600)  # a camera new to the daemon
        later = await _put_series(importer, "front", 2, t0=T0 + 100 * CHUNK_S)
        await importer.put_chunk(imported[0], _payload(imported[0]), _vec(0))  # a re-import of one chunk
    finally:
        await importer_client.aclose()
    # The daemon ingests one chunk itself: it is indexed already and must not be read back.
    mine = _meta("front", T0 + 200 * CHUNK_S)
    await daemon.put_chunk(mine, _payload(mine), _vec(99))
    index.add(mine, _vec(99))

    assert await index.follow(daemon, cursors) == len(imported) + len(later)
    assert index.ids("yard") == {m.chunk_id for m in imported}
    assert index.ids("front") == {m.chunk_id for m in own + later} | {mine.chunk_id}
    for i, meta in enumerate(imported):  # the stored retrieval vector is what gets indexed
        [hit] = index.search(_vec(i), 1, cameras={"yard"}, after_s=meta.start_s, before_s=meta.end_s)
        assert hit.chunk_id == meta.chunk_id
        assert hit.score == pytest.approx(float(_vec(i) @ _vec(i)), rel=1e-5)
    assert await index.follow(daemon, cursors) == 0  # idempotent: the cursors moved past them


async def test_follow_catches_up_when_the_added_log_was_trimmed_past_its_cursor(
    redis_client, prefix, caplog
) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix, added_log_len=5)
    await _put_series(store, "front", 3)
    index = VectorIndex(DIM)
    cursors = await store.added_cursors()
    await index.catch_up(store)
    metas = await _put_series(store, "front", 12, t0=T0 + 1000.0)  # 12 > 5: the log lost 7 of them
    assert await redis_client.xlen(store.keys.added("front")) == 5
    with caplog.at_level("WARNING", logger="memory.index"):
        assert await index.follow(store, cursors) == 12
    assert "fell behind the added log of front" in caplog.text
    assert {m.chunk_id for m in metas} <= index.ids("front")
    assert len(index) == 15
    # A camera the cursors never saw, whose log was already trimmed, is caught up too.
    await _put_series(store, "gate", 7)
    assert await index.follow(store, cursors) == 7
    assert len(index.ids("gate")) == 7
    # Within the bound, no catch-up: only the log is read.
    caplog.clear()
    await _put_series(store, "gate", 2, t0=T0 + 5000.0)
    with caplog.at_level("WARNING", logger="memory.index"):
        assert await index.follow(store, cursors) == 2
    assert "fell behind" not in caplog.text

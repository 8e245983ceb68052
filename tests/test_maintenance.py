"""Maintenance over a real Redis and a real index file: retention per camera, saves when changed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np

from memory.events import Event, EventStore
from memory.index import VectorIndex
from memory.store import ChunkMeta, MemoryStore
from streamer.maintenance import SECONDS_PER_DAY, Maintenance
from streamer.resources import IndexFile

DIM = 8


async def put(store: MemoryStore, index: VectorIndex, camera: str, start_s: float) -> ChunkMeta:
    meta = ChunkMeta.create(camera, start_s, start_s + 8.0, n_frames=8, n_input_tokens=64, n_tokens=4, codec="fp16/v1")
    vector = np.random.default_rng(int(start_s) % 1000).standard_normal(DIM).astype(np.float32)
    vector /= np.linalg.norm(vector)
    assert await store.put_chunk(meta, b"payload", vector)
    index.add(meta, vector)
    return meta


async def test_retention_deletes_old_memory_per_camera_and_survives_a_refused_key(
    redis_client: Any, prefix: str, tmp_path: Path
) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    index = IndexFile(VectorIndex(DIM), tmp_path / "index.npz")
    now_s = time.time()
    old = await put(store, index.index, "front", now_s - 3 * SECONDS_PER_DAY)
    new = await put(store, index.index, "front", now_s - 60.0)
    # "back" has a damaged timeline key: Redis answers WRONGTYPE to every retention command.
    await redis_client.set(store.keys.timeline("back"), b"not a sorted set")
    maintenance = Maintenance(store, index, {"back": 1.0, "front": 1.0})
    assert await maintenance.apply_retention(now_s) == 1  # front's old chunk; back skipped, not fatal
    assert index.index.ids("front") == {new.chunk_id}
    assert [m.chunk_id for m in await store.chunks_in_range("front", None, None)] == [new.chunk_id]
    assert old.chunk_id not in index.index
    assert index.dirty


async def test_run_saves_a_changed_index_and_returns_on_stop(redis_client: Any, prefix: str, tmp_path: Path) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    index = IndexFile(VectorIndex(DIM), tmp_path / "index" / "vigil.npz")
    meta = await put(store, index.index, "front", time.time() - 60.0)
    index.dirty = True
    maintenance = Maintenance(store, index, {"front": 7.0}, save_interval_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(maintenance.run(stop))
    for _ in range(200):
        if index.path.exists():
            break
        await asyncio.sleep(0.02)
    assert VectorIndex.load(index.path, DIM).ids("front") == {meta.chunk_id}
    assert not index.dirty
    saved = index.path.stat().st_mtime_ns
    await asyncio.sleep(0.2)
    assert index.path.stat().st_mtime_ns == saved  # unchanged: not written again
    stop.set()
    await asyncio.wait_for(task, 2.0)


async def test_retention_prunes_events_with_the_chunks_cutoff(redis_client: Any, prefix: str, tmp_path: Path) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    events = EventStore(redis_client, key_prefix=prefix)
    index = IndexFile(VectorIndex(DIM), tmp_path / "index.npz")
    now_s = time.time()
    old_chunk = await put(store, index.index, "front", now_s - 3 * SECONDS_PER_DAY)

    def event(name: str, camera: str, start_s: float, end_s: float | None) -> Event:
        return Event(name, "person", camera, start_s, end_s, 0.7, 0.9, None)

    ended_long_ago = event("old", "front", now_s - 3 * SECONDS_PER_DAY, now_s - 3 * SECONDS_PER_DAY + 30)
    recent = event("recent", "front", now_s - 600, now_s - 500)
    ongoing = event("ongoing", "front", now_s - 3 * SECONDS_PER_DAY, None)  # still going: kept
    # "back" keeps memory for a week: the same age is inside its retention.
    back = event("back", "back", now_s - 3 * SECONDS_PER_DAY, now_s - 3 * SECONDS_PER_DAY + 30)
    for e in (ended_long_ago, recent, ongoing, back):
        await events.put(e)
    # "side" has a damaged event index: its chunks' retention still runs.
    side_chunk = await put(store, index.index, "side", now_s - 3 * SECONDS_PER_DAY)
    await redis_client.set(events.keys.event_ends("side"), b"not a sorted set")

    maintenance = Maintenance(store, index, {"front": 1.0, "back": 7.0, "side": 1.0}, events=events)
    assert await maintenance.apply_retention(now_s) == 2  # front's and side's old chunks
    assert old_chunk.chunk_id not in index.index
    assert side_chunk.chunk_id not in index.index
    assert await events.query(camera="front") == [ongoing, recent]
    assert await events.query(camera="back") == [back]

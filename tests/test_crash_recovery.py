"""Crash recovery: a writer killed with SIGKILL mid-stream loses nothing that reached Redis.

The writer (tests/crash_writer.py) stores chunks in Redis and saves the index every few chunks, as
the daemon does. After the kill, the saved index is loaded and caught up from Redis; it must then
hold exactly the chunks Redis holds, with their vectors.
"""

from __future__ import annotations

import numpy as np

from memory.index import VectorIndex
from memory.store import MemoryStore
from tests.plugins.crash import REPO, sigkill_after

WRITER = REPO / "tests" / "crash_writer.py"
DIM = 256
PRELOAD_CHUNKS = 500  # tests/crash_writer.py prints its first line after this many
# Chunks written after the preload before the kill: several saves (every 4) have happened, and
# the kill lands at an arbitrary point between or inside them.
EXTRA_CHUNKS = 61


async def test_sigkill_mid_stream_then_index_agrees_with_redis(
    redis_client, redis_url, prefix, tmp_path
) -> None:
    index_path = tmp_path / "index.npz"
    args = [redis_url, prefix, str(index_path), "--dim", str(DIM), "--save-every", "4"]
    written = await sigkill_after(WRITER, *args, progress=PRELOAD_CHUNKS + EXTRA_CHUNKS)

    store = MemoryStore(redis_client, key_prefix=prefix)
    cameras = await store.cameras()
    assert cameras == ["north", "south"]
    in_redis = {camera: set((await store.timeline(camera))[0].tolist()) for camera in cameras}
    assert sum(len(ids) for ids in in_redis.values()) >= written

    index = VectorIndex.load(index_path, DIM)  # whatever the kill interrupted, the last save is whole
    assert index.ids() <= set().union(*in_redis.values())  # Redis is written first: never behind
    assert len(index) >= PRELOAD_CHUNKS

    indexed_before = len(index)
    added, removed = await index.catch_up(store)
    assert removed == 0
    assert added == sum(len(ids) for ids in in_redis.values()) - indexed_before
    for camera in cameras:
        assert index.ids(camera) == in_redis[camera]

    # The vectors came back too: each chunk is its own best match within its time span. Checked
    # for the newest chunks (those catch-up added) and a sample of the rest.
    rng = np.random.default_rng(0)
    for camera in cameras:
        ids = (await store.timeline(camera))[0]
        sample = np.concatenate([ids[-40:], rng.choice(ids[:-40], size=40, replace=False)])
        for meta, vector in await store.get_vectors(camera, sample.tolist()):
            hits = index.search(vector, 1, cameras={camera}, after_s=meta.start_s, before_s=meta.end_s)
            assert hits[0].chunk_id == meta.chunk_id
            np.testing.assert_allclose(hits[0].score, float(vector @ vector), rtol=1e-4)

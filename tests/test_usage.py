"""Usage counters (``P:{C}:usage``) on real Redis: exact after every kind of change, rebuilt from a scan."""

from __future__ import annotations

import numpy as np

from memory.store import CameraUsage, ChunkMeta, MemoryStore, TierUsage
from streamer.compaction import checked_stats
from streamer.health import UsageReader, memory_payload
from tests.swap_writer import CAMERA, DIM, T0, member_metas, merged_meta

DAY = 86400.0


def _vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


async def _scan(store: MemoryStore, camera: str = CAMERA) -> CameraUsage:
    return CameraUsage.from_sizes(camera, await store.chunk_sizes(camera))


async def _counted(store: MemoryStore, camera: str = CAMERA) -> CameraUsage:
    return (await store.usage([camera]))[camera]


async def _put_group(store: MemoryStore, group: int, payload_bytes: int = 100) -> list[ChunkMeta]:
    metas = member_metas(group)
    for i, meta in enumerate(metas):
        assert await store.put_chunk(meta, b"p" * (payload_bytes + i), _vec(group * 100 + i))
    return metas


async def test_counters_equal_a_scan_after_writes_swaps_budget_deletes_and_retention(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    groups = [await _put_group(store, g) for g in range(4)]
    counted = await _counted(store)
    assert counted.complete  # the camera's first chunk started its counters
    assert counted == await _scan(store)
    assert counted.tiers == {0: TierUsage(32, counted.tiers[0].bytes)}
    # A rewrite of the same chunk (a retried write, a re-import with another payload) replaces its count.
    first = groups[0][0]
    assert await store.put_chunk(first, b"q" * 5000, _vec(1))
    assert (await _counted(store)).total.chunks == 32
    assert await _counted(store) == await _scan(store)

    # Consolidation: members out of tier 0, the merge into tier 1; a retried swap changes nothing.
    for g in (0, 1):
        ids = [m.chunk_id for m in groups[g]]
        assert await store.swap_chunks(merged_meta(g), b"m" * 300, _vec(7), ids) == "swapped"
    swapped = await _counted(store)
    assert swapped == await _scan(store)
    assert (swapped.tiers[0].chunks, swapped.tiers[1].chunks) == (16, 2)
    assert await store.swap_chunks(merged_meta(0), b"m" * 300, _vec(7), [m.chunk_id for m in groups[0]]) == "already"
    assert await _counted(store) == swapped
    # Refused (a member is gone): nothing moves.
    await store.delete_chunks(CAMERA, [groups[2][0].chunk_id])
    after_delete = await _counted(store)
    assert after_delete == await _scan(store)
    assert after_delete.tiers[0].chunks == 15
    ids = [m.chunk_id for m in groups[2]]
    assert await store.swap_chunks(merged_meta(2), b"m" * 300, _vec(7), ids) == "refused"
    assert await _counted(store) == after_delete

    # Size-budget deletion of a consolidated chunk and ingested ones (unknown ids count nothing).
    assert await store.delete_chunks(CAMERA, [merged_meta(0).chunk_id, groups[3][0].chunk_id, 12345]) == 2
    budgeted = await _counted(store)
    assert budgeted == await _scan(store)
    assert (budgeted.tiers[0].chunks, budgeted.tiers[1].chunks) == (14, 1)

    # Retention: everything that started before group 3 goes, the tier-1 merge of group 1 included.
    cutoff_s = groups[3][1].start_s
    deleted = await store.apply_retention(CAMERA, DAY, cutoff_s + DAY)
    assert deleted == 1 + 7  # merge 1, group 2's seven members
    kept = await _counted(store)
    assert kept == await _scan(store)
    assert kept.tiers == {0: TierUsage(7, kept.tiers[0].bytes)}
    # Everything gone: zero counts are left out, the counters stay complete.
    await store.apply_retention(CAMERA, DAY, T0 + 10 * DAY)
    assert await _counted(store) == CameraUsage(CAMERA, {}, complete=True)


async def test_counters_of_older_memory_are_rebuilt_from_a_scan(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    await _put_group(store, 0)
    other = ChunkMeta.create("yard", T0, T0 + 8.0, n_frames=8, n_input_tokens=1, n_tokens=1, codec="t/1")
    assert await store.put_chunk(other, b"y" * 10, _vec(3))
    truth = await _scan(store)
    # Memory written before the counters existed: the key is missing, and a later write only
    # counts itself, so the counters are incomplete and shown as unknown, not as too small.
    await redis_client.delete(store.keys.usage(CAMERA))
    await _put_group(store, 1)
    assert not (await _counted(store)).complete
    assert memory_payload(await store.usage())[CAMERA] is None
    assert await store.ensure_usage() == [CAMERA]  # yard's counters were complete: not recounted
    rebuilt = await _counted(store)
    assert rebuilt.complete
    assert rebuilt == await _scan(store)
    assert rebuilt.total.chunks == truth.total.chunks + 8
    assert await store.ensure_usage() == []
    # Counters that disagree with the scan (damaged by hand) are found and recounted by memory stats.
    await redis_client.hincrby(store.keys.usage(CAMERA), "bytes:0", 999)
    stats, differed = await checked_stats(store)
    assert differed == [CAMERA]
    assert stats[CAMERA]["total"]["bytes"] == rebuilt.total.bytes
    assert await _counted(store) == rebuilt
    assert (await checked_stats(store))[1] == []


class _WriteDuringScan(MemoryStore):
    """A store whose first scan is overtaken by a chunk write, as a running daemon's would be."""

    interleaved = 0

    async def chunk_sizes(self, camera: str) -> list[tuple[ChunkMeta, int]]:
        sizes = await super().chunk_sizes(camera)
        if self.interleaved == 0:
            self.interleaved += 1
            await _put_group(self, 5)
        return sizes


async def test_a_write_during_the_rebuild_scan_makes_it_scan_again(redis_client, prefix) -> None:
    store = _WriteDuringScan(redis_client, key_prefix=prefix)
    store.interleaved = 1  # no interleaving while the memory is written
    await _put_group(store, 0)
    await redis_client.delete(store.keys.usage(CAMERA))
    store.interleaved = 0
    rebuilt = await store.rebuild_usage(CAMERA)
    # The first scan missed group 5; storing its count would have lost 8 chunks for good.
    assert rebuilt is not None
    assert rebuilt.total.chunks == 16
    assert await _counted(store) == await _scan(store) == rebuilt


async def test_usage_reader_keeps_the_last_reading(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    reader = UsageReader(store)
    assert reader.latest is None
    await _put_group(store, 0, payload_bytes=1000)
    await reader.refresh()
    assert reader.latest == {CAMERA: await _scan(store)}
    body = memory_payload(reader.latest)
    assert body is not None
    assert body[CAMERA]["0"]["chunks"] == 8
    assert body[CAMERA]["total"] == body[CAMERA]["0"]
    assert body[CAMERA]["total"]["bytes"] > 8 * 1000

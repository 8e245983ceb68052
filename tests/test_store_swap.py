"""Consolidation swaps and size-budget deletes in MemoryStore, against a real Redis."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from memory.index import VectorIndex
from memory.store import CameraUsage, ChunkMeta, MemoryStore, chunk_id_for
from tests.plugins.crash import REPO, sigkill_after
from tests.swap_writer import CAMERA, DIM, PAYLOAD_BYTES, T0, member_metas, merged_meta

WRITER = REPO / "tests" / "swap_writer.py"


def _vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


async def _put_group(store: MemoryStore, group: int, payload: bytes = b"p" * 100) -> list[ChunkMeta]:
    metas = member_metas(group)
    for i, meta in enumerate(metas):
        assert await store.put_chunk(meta, payload, _vec(group * 100 + i))
    return metas


def test_consolidated_ids_differ_from_their_first_member_and_meta_round_trips() -> None:
    merged = merged_meta(0)
    assert merged.chunk_id != chunk_id_for(CAMERA, merged.start_s)
    assert merged.chunk_id == chunk_id_for(CAMERA, merged.start_s, 1)
    assert ChunkMeta.from_json(merged.to_json()) == merged
    plain = member_metas(0)[0]
    assert "tier" not in plain.to_json()  # ingested chunks keep their old JSON
    assert ChunkMeta.from_json(plain.to_json()) == plain


async def test_swap_replaces_members_once_and_followers_see_it(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    follower = VectorIndex(DIM)
    cursors = await store.added_cursors()
    members = await _put_group(store, 0)
    await _put_group(store, 1)
    assert await follower.follow(store, cursors) == 16
    merged = merged_meta(0)
    ids = [m.chunk_id for m in members]
    assert await store.swap_chunks(merged, b"merged", _vec(7), ids) == "swapped"
    timeline, _ = await store.timeline(CAMERA)
    assert merged.chunk_id in set(timeline.tolist())
    assert not set(ids) & set(timeline.tolist())
    assert len(timeline) == 1 + 8
    assert await store.get_chunks([(CAMERA, i) for i in ids]) == []
    assert await store.get_chunks([(CAMERA, merged.chunk_id)]) == [(merged, b"merged")]
    # A retry after the swap writes nothing new.
    assert await store.swap_chunks(merged, b"merged", _vec(7), ids) == "already"
    assert len((await store.timeline(CAMERA))[0]) == 9
    # Another process's index follows: members out, merge in.
    assert await follower.follow(store, cursors) == 1
    assert merged.chunk_id in follower
    assert not any(i in follower for i in ids)
    assert len(follower) == 9
    # A time query inside the merge's long span (longer than any ingested chunk) finds it.
    late = merged.end_s - 1.0
    found = await store.chunks_in_range(CAMERA, late, late + 0.5)
    assert [m.chunk_id for m in found] == [merged.chunk_id]


async def test_swap_is_refused_when_a_member_is_gone(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    members = await _put_group(store, 0)
    await store.delete_chunks(CAMERA, [members[3].chunk_id])
    merged = merged_meta(0)
    assert await store.swap_chunks(merged, b"merged", _vec(7), [m.chunk_id for m in members]) == "refused"
    timeline, _ = await store.timeline(CAMERA)
    assert merged.chunk_id not in set(timeline.tolist())
    assert len(timeline) == 7


async def test_bad_swaps_are_rejected_before_anything_is_written(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    members = await _put_group(store, 0)
    ids = [m.chunk_id for m in members]
    with pytest.raises(ValueError, match="tier >= 1"):
        await store.swap_chunks(members[0], b"x", _vec(1), ids[1:])
    bad_members = dataclasses.replace(merged_meta(0), members=((T0, T0 + 1.0),))
    with pytest.raises(ValueError, match="members"):
        await store.swap_chunks(bad_members, b"x", _vec(1), ids)
    with pytest.raises(ValueError, match="distinct"):
        await store.swap_chunks(merged_meta(0), b"x", _vec(1), [ids[0], ids[0]])
    assert len((await store.timeline(CAMERA))[0]) == 8


async def test_delete_chunks_and_sizes(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    members = await _put_group(store, 0, payload=b"q" * 1000)
    sizes = await store.chunk_sizes(CAMERA)
    assert [m for m, _ in sizes] == members
    assert all(1000 + DIM * 4 < size < 1000 + DIM * 4 + 400 for _, size in sizes)
    follower = VectorIndex(DIM)
    await follower.catch_up(store)
    cursors = await store.added_cursors()
    assert await store.delete_chunks(CAMERA, [m.chunk_id for m in members[:3]]) == 3
    assert [m for m, _ in await store.chunk_sizes(CAMERA)] == members[3:]
    await follower.follow(store, cursors)
    assert follower.ids(CAMERA) == {m.chunk_id for m in members[3:]}


async def test_sigkill_during_swaps_leaves_members_or_merge(redis_client, redis_url, prefix) -> None:
    groups = 40
    store = MemoryStore(redis_client, key_prefix=prefix)
    for g in range(groups):
        await _put_group(store, g, payload=b"p" * PAYLOAD_BYTES)
    index = VectorIndex(DIM)  # as a daemon's index stood before the writer began
    await index.catch_up(store)
    done = await sigkill_after(WRITER, redis_url, prefix, str(groups), progress=groups // 2)
    in_timeline = set((await store.timeline(CAMERA))[0].tolist())
    swapped = 0
    for g in range(groups):
        member_ids = {m.chunk_id for m in member_metas(g)}
        merged_id = merged_meta(g).chunk_id
        has_members = member_ids <= in_timeline
        has_merge = merged_id in in_timeline
        assert has_members != has_merge, f"group {g}: members {has_members}, merge {has_merge}"
        assert not (member_ids & in_timeline) or has_members  # never some of the members
        hashes = await store.get_chunks([(CAMERA, i) for i in [*member_ids, merged_id]])
        assert {m.chunk_id for m, _ in hashes} == (member_ids if has_members else {merged_id})
        swapped += has_merge
    assert swapped >= done + 1  # at least the swaps it reported
    # The index, caught up after the crash as at a restart, agrees with Redis.
    await index.catch_up(store)
    assert index.ids(CAMERA) == in_timeline
    # The usage counters moved in the same scripts as the chunks: a kill leaves them exact.
    scanned = CameraUsage.from_sizes(CAMERA, await store.chunk_sizes(CAMERA))
    assert (await store.usage([CAMERA]))[CAMERA] == scanned
    assert scanned.total.chunks == len(in_timeline)
    # The rest can be finished: the swaps are idempotent.
    for g in range(groups):
        result = await store.swap_chunks(merged_meta(g), b"m" * 10, _vec(0), [m.chunk_id for m in member_metas(g)])
        assert result in {"swapped", "already"}
    assert len((await store.timeline(CAMERA))[0]) == groups

"""The approximate index for whole-memory search (memory/index.py): agreement with the exact scan,
removals, consolidation swaps (real Redis), and the rebuild at start."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from memory.index import VectorIndex, _Approximate
from memory.store import ChunkMeta, MemoryStore
from streamer.maintenance import Maintenance
from streamer.resources import IndexFile
from tests.swap_writer import CAMERA, member_metas, merged_meta

DIM = 32
T0 = 1_700_000_000.0
CHUNK_S = 8.0
N = 4000
SCENES = 60  # a camera's views: chunks of one scene are near each other, as real footage is
MIN_VECTORS = 1000  # small enough that the test corpus is searched approximately
RECALL_BOUND = 0.95  # the target at 1M
# The shipped 128 probes would cover all 100 lists of this small corpus (an exact search): 16 keep
# the test approximate (recall 0.98 here, 0.92 at 8 probes, so the bound can fail).
NPROBE = 16


def _corpus(seed: int = 0, n: int = N, dim: int = DIM) -> tuple[list[ChunkMeta], np.ndarray]:
    """``n`` chunks of 4 cameras in time order with clustered unit vectors [n, dim]."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((SCENES, dim)).astype(np.float32)
    scene = rng.integers(0, SCENES, n)
    vectors = centers[scene] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    metas = [
        ChunkMeta.create(
            f"cam{i % 4}", T0 + i * CHUNK_S, T0 + (i + 1) * CHUNK_S, n_frames=8, n_input_tokens=1, n_tokens=1,
            codec="t/1",
        )
        for i in range(n)
    ]
    return metas, vectors


def _queries(seed: int, n: int, dim: int = DIM) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _built(metas: list[ChunkMeta], vectors: np.ndarray) -> VectorIndex:
    index = VectorIndex(DIM, approx_min_vectors=MIN_VECTORS)
    index.approx_nprobe = NPROBE
    index.add_many(metas, vectors)
    assert index.refresh_approximate()
    assert index.approximate
    return index


def _recall(index: VectorIndex, queries: np.ndarray) -> float:
    found = 0
    for q in queries:
        approx = {h.chunk_id for h in index.search(q, 10)}
        exact = {h.chunk_id for h in index.search(q, 10, exact=True)}
        found += len(approx & exact)
    return found / (10 * len(queries))


def test_approximate_agrees_with_exact_and_filtered_searches_stay_exact() -> None:
    metas, vectors = _corpus()
    index = _built(metas, vectors)
    queries = _queries(1, 200)
    assert _recall(index, queries) >= RECALL_BOUND
    # Hits carry the right spans and exact inner products, best first.
    by_id = {m.chunk_id: (m, v) for m, v in zip(metas, vectors, strict=True)}
    hits = index.search(queries[0], 10)
    assert len(hits) == 10
    for hit in hits:
        meta, vec = by_id[hit.chunk_id]
        assert (hit.camera, hit.start_s, hit.end_s) == (meta.camera, meta.start_s, meta.end_s)
        assert abs(hit.score - float(vec @ queries[0])) < 1e-5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # A filter (camera or time) takes the exact path: identical to the forced exact search.
    for q in queries[:20]:
        assert index.search(q, 10, cameras={"cam1"}) == index.search(q, 10, cameras={"cam1"}, exact=True)
        window = {"after_s": T0 + 1000.0, "before_s": T0 + 5000.0}
        assert index.search(q, 10, **window) == index.search(q, 10, exact=True, **window)


def test_small_memory_is_searched_exactly() -> None:
    metas, vectors = _corpus(n=MIN_VECTORS - 1)
    index = VectorIndex(DIM, approx_min_vectors=MIN_VECTORS)
    index.add_many(metas, vectors)
    assert not index.refresh_approximate()
    assert not index.approximate
    q = _queries(2, 1)[0]
    assert index.search(q, 10) == index.search(q, 10, exact=True)


def test_removed_and_expired_ids_are_never_returned() -> None:
    metas, vectors = _corpus(seed=3)
    index = _built(metas, vectors)
    rng = np.random.default_rng(4)
    removed = rng.choice(N, 400, replace=False)
    assert index.remove([metas[i].chunk_id for i in removed]) == 400
    cutoff_s = T0 + 800 * CHUNK_S  # retention: cam0's chunks of the first 800 slots
    expired = [i for i in range(800) if metas[i].camera == "cam0" and i not in set(removed)]
    assert index.remove_before("cam0", cutoff_s) == len(expired)
    gone = {metas[i].chunk_id for i in [*removed, *expired]}
    # Each gone chunk's own vector is the query it would answer first.
    for i in [*removed[:100], *expired[:100]]:
        hits = index.search(vectors[i], 10)
        assert len(hits) == 10
        assert not gone & {h.chunk_id for h in hits}
    assert index.approximate
    assert _recall(index, _queries(5, 100)) >= RECALL_BOUND


def test_new_chunks_are_found_without_a_rebuild() -> None:
    metas, vectors = _corpus(seed=6)
    index = _built(metas[:3000], vectors[:3000])
    index.add_many(metas[3000:], vectors[3000:])
    for i in range(3000, 3100):
        assert index.search(vectors[i], 1)[0].chunk_id == metas[i].chunk_id


async def test_approximate_index_follows_consolidation_swaps(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    metas, vectors = _corpus(seed=7, n=1200)
    # The swap writer's 3 groups of 8 members (camera "swap") among the corpus, each with its own vector.
    member_vecs = {g: _queries(100 + g, 8) for g in range(3)}
    for meta, vec in zip(metas, vectors, strict=True):
        assert await store.put_chunk(meta, b"p", vec)
    for g in range(3):
        for meta, vec in zip(member_metas(g), member_vecs[g], strict=True):
            assert await store.put_chunk(meta, b"p", vec)
    follower = VectorIndex(DIM, approx_min_vectors=MIN_VECTORS)
    follower.approx_nprobe = NPROBE
    cursors = await store.added_cursors()
    await follower.catch_up(store)
    assert follower.refresh_approximate()
    merged_vecs = {}
    for g in range(3):
        ids = [m.chunk_id for m in member_metas(g)]
        merged_vecs[g] = _queries(200 + g, 1)[0]
        assert await store.swap_chunks(merged_meta(g), b"m", merged_vecs[g], ids) == "swapped"
    await follower.follow(store, cursors)  # removals and the merges arrive through the added log
    members = {m.chunk_id for g in range(3) for m in member_metas(g)}
    for g in range(3):
        assert follower.search(merged_vecs[g], 1)[0].chunk_id == merged_meta(g).chunk_id
        for vec in member_vecs[g]:
            assert not members & {h.chunk_id for h in follower.search(vec, 10)}
    assert follower.approximate
    assert len(follower) == 1200 + 3


async def test_rebuilt_at_start_by_maintenance(redis_client, prefix, tmp_path: Path) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    all_metas, all_vectors = _corpus(seed=9, n=3200)
    metas, vectors = all_metas[:1500], all_vectors[:1500]
    index = _built(metas, vectors)
    path = tmp_path / "index.npz"
    index.save(path)
    # The approximate part is not saved: a loaded index searches exactly until maintenance runs.
    loaded = VectorIndex.load(path, DIM)
    loaded.approx_min_vectors = MIN_VECTORS
    loaded.approx_nprobe = NPROBE
    assert not loaded.approximate
    maintenance = Maintenance(store, IndexFile(loaded, path), {CAMERA: 30.0})
    assert await maintenance.refresh_approximate()
    assert loaded.approximate
    assert not await maintenance.refresh_approximate()  # nothing changed: no second build
    queries = _queries(10, 50)
    for q in queries:
        assert [h.chunk_id for h in loaded.search(q, 10)] == [h.chunk_id for h in index.search(q, 10)]
    # Memory more than doubles since the lists were trained: they are trained again.
    loaded.add_many(all_metas[1500:], all_vectors[1500:])
    assert await maintenance.refresh_approximate()
    assert _recall(loaded, queries) >= RECALL_BOUND
    # Memory falls below the threshold: the approximate part goes, searches are exact again.
    loaded.remove([m.chunk_id for m in all_metas[: 3200 - 700]])
    assert not await maintenance.refresh_approximate()
    assert not loaded.approximate
    assert loaded.search(queries[0], 10) == loaded.search(queries[0], 10, exact=True)


def test_changes_during_a_rebuild_reach_the_new_index(monkeypatch) -> None:
    metas, vectors = _corpus(seed=11)
    index = VectorIndex(DIM, approx_min_vectors=MIN_VECTORS)
    index.approx_nprobe = NPROBE
    index.add_many(metas[:3000], vectors[:3000])
    build = _Approximate.build
    during = threading.Event()
    go_on = threading.Event()

    def slow_build(dim: int, views: list) -> _Approximate:
        # The real build, held until the test has changed the index behind the snapshot.
        during.set()
        assert go_on.wait(30)
        return build(dim, views)

    monkeypatch.setattr(_Approximate, "build", staticmethod(slow_build))
    builder = threading.Thread(target=index.refresh_approximate)
    builder.start()
    assert during.wait(30)
    index.add_many(metas[3000:], vectors[3000:])  # after the snapshot
    gone = [m.chunk_id for m in metas[:200]]
    index.remove(gone)
    go_on.set()
    builder.join(30)
    assert index.approximate
    for i in range(3000, 3050):
        assert index.search(vectors[i], 1)[0].chunk_id == metas[i].chunk_id
    for i in range(50):
        assert not set(gone) & {h.chunk_id for h in index.search(vectors[i], 10)}


def test_lists_are_retrained_once_memory_has_turned_over() -> None:
    metas, vectors = _corpus(seed=12)
    index = _built(metas[:2000], vectors[:2000])
    # Retention and new footage at the same rate: the size stays, the memory is new.
    index.remove([m.chunk_id for m in metas[:1000]])
    index.add_many(metas[2000:2999], vectors[2000:2999])
    assert not index.refresh_approximate()  # 1999 changes for 2000 trained on: not yet
    index.remove([metas[1000].chunk_id])
    assert index.refresh_approximate()
    assert not index.refresh_approximate()
    assert _recall(index, _queries(13, 50)) >= RECALL_BOUND

"""VectorIndex: exact agreement with a numpy brute-force scan, filters, removal, atomic save/load."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from memory.index import VectorIndex
from memory.store import ChunkMeta

DIM = 24
CAMERAS = ("front", "back", "yard")
T0 = 1_700_000_000.0


def _meta(camera: str, start_s: float, end_s: float) -> ChunkMeta:
    return ChunkMeta.create(camera, start_s, end_s, n_frames=8, n_input_tokens=64, n_tokens=7, codec="x")


def _corpus(rng: np.random.Generator, n: int) -> tuple[list[ChunkMeta], np.ndarray]:
    """n chunks over three cameras with jittered, partly overlapping spans; vectors [n, DIM]."""
    metas = []
    for _ in range(n):
        camera = CAMERAS[int(rng.integers(len(CAMERAS)))]
        start = T0 + float(rng.uniform(0, 3600))
        span = float(rng.uniform(0.5, 40.0))
        metas.append(_meta(camera, start, start + span))
    # Low-rank vectors so that scores have structure (not all nearly equal).
    latent = rng.standard_normal((n, 6)).astype(np.float32)
    basis = rng.standard_normal((6, DIM)).astype(np.float32)
    return metas, latent @ basis + 0.1 * rng.standard_normal((n, DIM)).astype(np.float32)


def _brute(
    metas: list[ChunkMeta],
    vectors: np.ndarray,
    query: np.ndarray,
    k: int,
    *,
    cameras: set[str] | None,
    after_s: float | None,
    before_s: float | None,
) -> list[tuple[int, float]]:
    scores = vectors.astype(np.float64) @ query.astype(np.float64)  # [n]
    rows = [
        i
        for i, m in enumerate(metas)
        if (cameras is None or m.camera in cameras)
        and (after_s is None or m.end_s > after_s)
        and (before_s is None or m.start_s < before_s)
    ]
    rows.sort(key=lambda i: (-scores[i], metas[i].chunk_id))
    return [(metas[i].chunk_id, float(scores[i])) for i in rows[:k]]


def _assert_same(hits: list, expected: list[tuple[int, float]]) -> None:
    assert [h.chunk_id for h in hits] == [cid for cid, _ in expected]
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], rtol=1e-4, atol=1e-4)


def _random_filters(rng: np.random.Generator) -> tuple[set[str] | None, float | None, float | None]:
    n_cameras = int(rng.integers(1, 3))
    cameras = None if rng.random() < 0.3 else set(rng.choice(CAMERAS, size=n_cameras, replace=False))
    after = None if rng.random() < 0.3 else T0 + float(rng.uniform(-100, 3600))
    before = None if rng.random() < 0.3 else (after or T0) + float(rng.uniform(1, 900))
    return cameras, after, before


def test_search_equals_brute_force_with_and_without_filters() -> None:
    rng = np.random.default_rng(7)
    metas, vectors = _corpus(rng, 600)
    index = VectorIndex(DIM)
    # Added in shuffled batches and one by one, so shards see in-order and out-of-order arrivals.
    assert index.add_many(metas[:400], vectors[:400]) == 400
    for meta, vec in zip(metas[400:], vectors[400:], strict=True):
        assert index.add(meta, vec)
    assert len(index) == 600
    for trial in range(150):
        query = rng.standard_normal(DIM).astype(np.float32)
        k = int(rng.choice([1, 5, 20, 700]))
        cameras, after, before = _random_filters(rng) if trial else (None, None, None)
        hits = index.search(query, k, cameras=cameras, after_s=after, before_s=before)
        _assert_same(hits, _brute(metas, vectors, query, k, cameras=cameras, after_s=after, before_s=before))
        for hit in hits:
            assert cameras is None or hit.camera in cameras
            assert after is None or hit.end_s > after
            assert before is None or hit.start_s < before


def test_edge_cases_empty_index_no_match_and_k_above_matches() -> None:
    rng = np.random.default_rng(1)
    index = VectorIndex(DIM)
    query = rng.standard_normal(DIM).astype(np.float32)
    assert index.search(query, 5) == []
    metas, vectors = _corpus(rng, 30)
    index.add_many(metas, vectors)
    assert index.search(query, 5, cameras={"nobody"}) == []
    assert index.search(query, 5, after_s=T0 + 10_000) == []
    assert index.search(query, 5, before_s=T0 - 1) == []
    only_front = [m for m in metas if m.camera == "front"]
    hits = index.search(query, 1000, cameras={"front"})
    assert sorted(h.chunk_id for h in hits) == sorted(m.chunk_id for m in only_front)
    # Windows are half-open: one ending where a chunk starts, or starting where it ends, excludes it.
    first = metas[0]
    just_after = index.search(query, 1000, cameras={first.camera}, after_s=first.end_s)
    assert first.chunk_id not in {h.chunk_id for h in just_after}
    just_before = index.search(query, 1000, cameras={first.camera}, before_s=first.start_s)
    assert first.chunk_id not in {h.chunk_id for h in just_before}
    inside = index.search(
        query, 1000, cameras={first.camera}, after_s=first.end_s - 1e-3, before_s=first.start_s + 1e-3
    )
    assert first.chunk_id in {h.chunk_id for h in inside}


def test_add_is_idempotent_and_removal_keeps_agreement() -> None:
    rng = np.random.default_rng(3)
    metas, vectors = _corpus(rng, 300)
    index = VectorIndex(DIM)
    index.add_many(metas, vectors)
    assert index.add_many(metas[:50], vectors[:50]) == 0
    assert not index.add(metas[0], vectors[0])
    assert len(index) == 300

    gone = {m.chunk_id for m in metas[::3]}
    assert index.remove([*sorted(gone), 12345]) == len(gone)
    cutoff = T0 + 1800
    old_front = {m.chunk_id for m in metas if m.camera == "front" and m.start_s < cutoff} - gone
    assert index.remove_before("front", cutoff) == len(old_front)
    keep = [i for i, m in enumerate(metas) if m.chunk_id not in gone and m.chunk_id not in old_front]
    kept_metas, kept_vectors = [metas[i] for i in keep], vectors[keep]
    assert index.ids() == {m.chunk_id for m in kept_metas}
    for _ in range(40):
        query = rng.standard_normal(DIM).astype(np.float32)
        cameras, after, before = _random_filters(rng)
        hits = index.search(query, 10, cameras=cameras, after_s=after, before_s=before)
        _assert_same(
            hits, _brute(kept_metas, kept_vectors, query, 10, cameras=cameras, after_s=after, before_s=before)
        )
    # Appends after retention (rows beyond the shard's start offset) are found too.
    late = _meta("front", T0 + 5000, T0 + 5008)
    late_vec = rng.standard_normal(DIM).astype(np.float32)
    index.add(late, late_vec)
    assert index.search(late_vec, 1, cameras={"front"}, after_s=T0 + 4999)[0].chunk_id == late.chunk_id


def test_bad_input_is_refused_without_change() -> None:
    index = VectorIndex(DIM)
    meta = _meta("front", T0, T0 + 8)
    with pytest.raises(ValueError, match=r"shape \[M, 24\]"):
        index.add(meta, np.zeros(DIM + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index.add(meta, np.full(DIM, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="cannot be used in a Redis key"):
        index.add(ChunkMeta("a{b}", 1, T0, T0 + 1, 1, 1, 1, "x"), np.zeros(DIM, dtype=np.float32))
    assert len(index) == 0
    with pytest.raises(ValueError, match=r"query must have shape \[24\]"):
        index.search(np.zeros((1, DIM), dtype=np.float32), 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(np.zeros(DIM, dtype=np.float32), 0)


def test_save_load_round_trip_leaves_no_temp_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    metas, vectors = _corpus(rng, 200)
    index = VectorIndex(DIM)
    index.add_many(metas, vectors)
    index.remove_before("yard", T0 + 900)
    path = tmp_path / "index.npz"
    index.save(path)
    index.save(path)  # overwriting an existing file
    assert [p.name for p in tmp_path.iterdir()] == ["index.npz"]
    loaded = VectorIndex.load(path, DIM)
    assert loaded.ids() == index.ids()
    for camera in CAMERAS:
        assert loaded.ids(camera) == index.ids(camera)
    for _ in range(20):
        query = rng.standard_normal(DIM).astype(np.float32)
        cameras, after, before = _random_filters(rng)
        expected = index.search(query, 7, cameras, after, before)
        assert loaded.search(query, 7, cameras, after, before) == expected
    with pytest.raises(ValueError, match="dim 24, expected 32"):
        VectorIndex.load(path, 32)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an index")
    with pytest.raises(ValueError, match="not a readable vigil index"):
        VectorIndex.load(garbage, DIM)


def test_failed_save_keeps_previous_file(tmp_path: Path) -> None:
    """A save that fails mid-write (file size limit, like a full disk) leaves the old file and no temp."""
    rng = np.random.default_rng(9)
    metas, vectors = _corpus(rng, 50)
    index = VectorIndex(DIM)
    index.add_many(metas, vectors)
    path = tmp_path / "index.npz"
    index.save(path)
    before = path.read_bytes()
    # A separate process, so the file size limit cannot disturb pytest's own files.
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        import numpy as np
        from memory.index import VectorIndex
        from memory.store import ChunkMeta
        index = VectorIndex.load({str(path)!r}, {DIM})
        rng = np.random.default_rng(0)
        metas = [ChunkMeta.create("front", {T0} + 10_000 + i * 8, {T0} + 10_008 + i * 8,
                                  n_frames=8, n_input_tokens=64, n_tokens=7, codec="x") for i in range(2000)]
        index.add_many(metas, rng.standard_normal((2000, {DIM})).astype(np.float32))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # make writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 4096}, resource.RLIM_INFINITY))
        try:
            index.save({str(path)!r})
        except OSError as exc:
            print("save failed:", exc.errno)
            sys.exit(3)
        sys.exit(0)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["index.npz"]
    assert VectorIndex.load(path, DIM).ids() == index.ids()

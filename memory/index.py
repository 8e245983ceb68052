"""VectorIndex: exact retrieval over chunk vectors with camera and time filters, and an
approximate index for searches over all memory.

Design: one shard per camera, its vectors kept in start-time order in one contiguous float32
matrix. A camera + time filter then selects a contiguous row slice (two binary searches on the
start times), and only that slice is scored, exactly, with FAISS's brute-force inner-product
kernel (``faiss.knn``, the kernel behind ``IndexFlatIP``). Cost grows with the rows inside the
filter, not with the size of the index, and results equal a brute-force scan. Unfiltered search
scans every shard and merges.

Why not a FAISS index object: ``IndexHNSW*`` cannot remove vectors (retention), and with a
camera + time filter its recall collapses (bench/search_latency.py: recall@10 0.04 for a 1-hour
window at 100k); IVF needs training and is approximate. ``IndexFlatIP`` with an
``IDSelectorRange`` filters as fast as this class (same benchmark), but only because the ids
are laid out camera by camera in time order, which is the layout this class keeps up through
out-of-order adds and retention; with chunk ids as FAISS ids a window is no longer one range.
Keeping the rows ourselves also makes retention cheap: dropping the oldest rows of a shard moves
a start offset.

Concurrency: mutations build new arrays or write rows past the visible end, never rows a reader
can see, so search and save take views under a short lock and do the heavy work outside it
(call them from worker threads; they release the GIL inside FAISS and numpy).

Whole-memory search (no camera, no time filter) scans every vector: about 235 ms at 1M chunks
(docs/storage.md, Benchmark). Past ``APPROX_MIN_VECTORS`` it goes to an approximate index instead,
an inverted file (FAISS ``IndexIVFFlat``, inner product) chosen over HNSW by measurement
(bench/search_latency.py; docs/storage.md): IVF builds 1M vectors in about a minute where HNSW took
273 s for 100k on the same 2-core machine, and IVF removes ids (``remove_ids`` with a hash-table direct map), so
consolidation, budgets and retention take vectors out at once instead of leaving tombstones.
It is kept in step with every add and removal under its own lock, not saved: it is rebuilt from
the exact shards (themselves caught up from Redis) by ``refresh_approximate``, which the daemon's
maintenance runs at start and then retrains when the memory grew or shrank by
``APPROX_RETRAIN_FACTOR``. Filtered searches always take the exact path.

The index is derived from Redis (memory/store.py): ``catch_up`` makes it agree with the store,
``follow`` adds what other processes stored since (the store's ``added`` log) and drops what
they consolidated or deleted, ``save`` writes it
atomically (temp file, fsync, ``os.replace``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import threading
import zipfile
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from memory.keys import check_camera

if TYPE_CHECKING:
    from memory.store import ChunkMeta, MemoryStore

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Shards start with room for this many rows. When full they grow by half their live rows: appends
# stay amortised O(1), and a bulk load (catch-up of a whole camera) allocates no more than it needs.
INITIAL_CAPACITY = 256
GROWTH_SHARE = 0.5
# Retention advances a shard's start offset; the dead rows are reclaimed once they make up more
# than this share of the shard, so memory is bounded without a copy on every retention pass.
COMPACT_DEAD_SHARE = 0.5
# Below this many vectors a whole-memory search scans them all exactly: at 768-d on one core about
# 4 ms p50 at 10-20k and 29 ms at 100k (docs/storage.md, Benchmark), so about 15 ms here, and an
# IVF index over few vectors needs most of its lists probed to find the top 10 anyway.
APPROX_MIN_VECTORS = 50_000
# IVF lists: 4 sqrt(N). Finer lists find more of the top 10 per vector scanned (measured at 250k:
# 2000 lists reach recall@10 0.90 scanning 8k vectors where 500 lists scan 32k for the same);
# capped because k-means time grows with the lists.
APPROX_LISTS_PER_SQRT_N = 4
APPROX_MIN_LISTS = 16
APPROX_MAX_LISTS = 4096
# Training points per list: FAISS warns below 39 (and lists are capped so that there are 40).
APPROX_TRAIN_PER_LIST = 40
# k-means iterations: FAISS's default 25 takes minutes at 4096 lists on a small CPU; 10 is close.
APPROX_TRAIN_ITERATIONS = 10
# Lists probed per search: the recall/latency point measured at 1M (docs/storage.md, Benchmark).
APPROX_NPROBE = 128
# The lists were trained on the memory of their time; once it has grown or shrunk by this factor,
# or as many vectors as it was trained on were added or removed since (retention turned the memory
# over, and what the camera sees now may differ), the lists are retrained (the whole index rebuilt)
# so that they stay balanced.
APPROX_RETRAIN_FACTOR = 2.0
# The training sample is drawn with this seed: the same memory gives the same index.
APPROX_SEED = 0


@dataclass(frozen=True, slots=True)
class IndexHit:
    """One search result."""

    camera: str
    chunk_id: int
    start_s: float
    end_s: float
    score: float  # inner product with the query (cosine for L2-normalised vectors)


@dataclass(frozen=True, slots=True)
class _View:
    """Read-only snapshot of a shard's live rows."""

    vectors: np.ndarray  # [K, D] float32
    starts: np.ndarray  # [K] float64
    ends: np.ndarray  # [K] float64
    ids: np.ndarray  # [K] int64
    max_span_s: float


class _Shard:
    """One camera's rows, sorted by start time; rows [head, n) of the arrays are live."""

    def __init__(self, dim: int, capacity: int = INITIAL_CAPACITY) -> None:
        self.vectors = np.empty((capacity, dim), dtype=np.float32)  # [cap, D]
        self.starts = np.empty(capacity, dtype=np.float64)  # [cap]
        self.ends = np.empty(capacity, dtype=np.float64)  # [cap]
        self.ids = np.empty(capacity, dtype=np.int64)  # [cap]
        self.head = 0
        self.n = 0
        self.max_span_s = 0.0

    def __len__(self) -> int:
        return self.n - self.head

    def view(self) -> _View:
        sl = slice(self.head, self.n)
        return _View(self.vectors[sl], self.starts[sl], self.ends[sl], self.ids[sl], self.max_span_s)

    def _replace(
        self, vectors: np.ndarray, starts: np.ndarray, ends: np.ndarray, ids: np.ndarray, spare: int = 0
    ) -> None:
        """Install fresh arrays holding these rows, with room for ``spare`` more plus growth headroom.

        Fresh arrays, never writes into the old ones: views handed out earlier stay valid.
        """
        count = len(ids)
        cap = max(INITIAL_CAPACITY, count + spare + int(GROWTH_SHARE * count))
        self.vectors = np.empty((cap, vectors.shape[1]), dtype=np.float32)
        self.starts = np.empty(cap, dtype=np.float64)
        self.ends = np.empty(cap, dtype=np.float64)
        self.ids = np.empty(cap, dtype=np.int64)
        self.vectors[:count] = vectors
        self.starts[:count] = starts
        self.ends[:count] = ends
        self.ids[:count] = ids
        self.head, self.n = 0, count

    def add(self, vectors: np.ndarray, starts: np.ndarray, ends: np.ndarray, ids: np.ndarray) -> None:
        """Add rows (vectors [M, D]; starts, ends, ids [M]); rows must be new."""
        if len(ids) == 0:
            return
        self.max_span_s = max(self.max_span_s, float(np.max(ends - starts)))
        in_order = bool(np.all(np.diff(starts) >= 0)) and (self.n == self.head or starts[0] >= self.starts[self.n - 1])
        if not in_order:
            # Out-of-order arrivals (catch-up, late retries) are rare: merge and re-sort once.
            live = self.view()
            all_starts = np.concatenate([live.starts, starts])
            order = np.argsort(all_starts, kind="stable")
            self._replace(
                np.concatenate([live.vectors, vectors])[order],
                all_starts[order],
                np.concatenate([live.ends, ends])[order],
                np.concatenate([live.ids, ids])[order],
            )
            return
        count = len(ids)
        if self.n + count > len(self.ids):
            live = self.view()
            self._replace(live.vectors, live.starts, live.ends, live.ids, spare=count)
        # Rows past n are invisible to existing views, so readers are not disturbed.
        end = self.n + count
        self.vectors[self.n : end] = vectors
        self.starts[self.n : end] = starts
        self.ends[self.n : end] = ends
        self.ids[self.n : end] = ids
        self.n = end

    def drop_before(self, cutoff_s: float) -> np.ndarray:
        """Drop rows that start before ``cutoff_s``; return their ids."""
        live = self.view()
        k = int(np.searchsorted(live.starts, cutoff_s, side="left"))
        dropped = live.ids[:k].copy()
        self.head += k
        if self.head > COMPACT_DEAD_SHARE * self.n:
            live = self.view()
            self._replace(live.vectors, live.starts, live.ends, live.ids)
        return dropped

    def remove(self, ids: np.ndarray) -> int:
        live = self.view()
        keep = ~np.isin(live.ids, ids)
        removed = int(len(keep) - keep.sum())
        if removed:
            self._replace(live.vectors[keep], live.starts[keep], live.ends[keep], live.ids[keep])
        return removed


def _slice_search(
    view: _View, query: np.ndarray, k: int, after_s: float | None, before_s: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of one shard overlapping [after_s, before_s): (scores [k'], row indices [k'])."""
    starts = view.starts
    hi = len(starts) if before_s is None else int(np.searchsorted(starts, before_s, side="left"))
    if after_s is None:
        lo_full = 0
        extra = np.empty(0, dtype=np.int64)
    else:
        # Rows starting at or after after_s overlap for sure (end_s > start_s); rows that start
        # up to max_span_s earlier overlap only if they end after after_s.
        lo_full = min(hi, int(np.searchsorted(starts, after_s, side="left")))
        lo_any = int(np.searchsorted(starts, after_s - view.max_span_s, side="left"))
        lo_any = min(lo_any, lo_full)
        extra = lo_any + np.flatnonzero(view.ends[lo_any:lo_full] > after_s)
    scores_parts: list[np.ndarray] = []
    rows_parts: list[np.ndarray] = []
    n_main = hi - lo_full
    if n_main > 0:
        dist, lab = faiss.knn(query, view.vectors[lo_full:hi], min(k, n_main), faiss.METRIC_INNER_PRODUCT)
        scores_parts.append(dist[0])  # [k']
        rows_parts.append(lab[0] + lo_full)
    if len(extra):
        scores_parts.append(view.vectors[extra] @ query[0])  # [E]
        rows_parts.append(extra)
    if not scores_parts:
        return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)
    return np.concatenate(scores_parts), np.concatenate(rows_parts)


class _Approximate:
    """An IVF index (inner product) over chunk ids; not thread-safe: VectorIndex locks around it."""

    def __init__(self, index: faiss.IndexIVFFlat, trained_n: int) -> None:
        self.index = index
        self.trained_n = trained_n
        self.nlist = int(index.nlist)
        self.changes = 0  # vectors added or removed since training

    @classmethod
    def build(cls, dim: int, views: list[_View]) -> _Approximate:
        """Train on a seeded sample of the views' vectors, then add them all (shard by shard, no copy)."""
        n = sum(len(v.ids) for v in views)
        nlist = round(APPROX_LISTS_PER_SQRT_N * math.sqrt(n))
        nlist = int(max(APPROX_MIN_LISTS, min(APPROX_MAX_LISTS, nlist, n // APPROX_TRAIN_PER_LIST)))
        rng = np.random.default_rng(APPROX_SEED)
        sample_n = min(n, nlist * APPROX_TRAIN_PER_LIST)
        picks = np.sort(rng.choice(n, size=sample_n, replace=False))  # [S] positions over all views
        offsets = np.cumsum([0] + [len(v.ids) for v in views])
        parts = []
        for i, view in enumerate(views):
            local = picks[(picks >= offsets[i]) & (picks < offsets[i + 1])] - offsets[i]
            parts.append(view.vectors[local])
        sample = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)  # [S, D]
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = APPROX_SEED
        index.cp.niter = APPROX_TRAIN_ITERATIONS
        index.train(sample)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove_ids without a scan of every list
        approx = cls(index, n)  # the faiss wrapper keeps ``quantizer`` alive as the index's reference
        for view in views:
            index.add_with_ids(np.ascontiguousarray(view.vectors), np.ascontiguousarray(view.ids))
        return approx

    def apply(self, kind: str, vectors: np.ndarray | None, ids: np.ndarray) -> None:
        self.changes += len(ids)
        if kind == "add" and vectors is not None and len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids))
        elif kind == "remove" and len(ids):
            # With a hash-table direct map FAISS removes an IDSelectorArray only (no list scan).
            gone = np.ascontiguousarray(ids, dtype=np.int64)
            self.index.remove_ids(faiss.IDSelectorArray(len(gone), faiss.swig_ptr(gone)))

    def search(self, query: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of ``query`` [1, D] probing ``nprobe`` lists: (scores [k'], ids [k']), missing slots dropped."""
        scores, ids = self.index.search(query, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        keep = ids[0] >= 0
        return scores[0][keep], ids[0][keep]


class VectorIndex:
    """Chunk vectors of all cameras; exact inner-product search with camera and time filters."""

    def __init__(self, dim: int, approx_min_vectors: int = APPROX_MIN_VECTORS) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self._shards: dict[str, _Shard] = {}
        self._camera_of: dict[int, str] = {}
        self._span_of: dict[int, tuple[float, float]] = {}  # (start_s, end_s): hits of the approximate index
        self._lock = threading.Lock()
        self.approx_min_vectors = approx_min_vectors
        self.approx_nprobe = APPROX_NPROBE  # lists probed per approximate search (benchmarks vary it)
        self._approx: _Approximate | None = None  # guarded by _approx_lock
        self._approx_lock = threading.Lock()  # held for approximate searches and changes; taken after _lock
        self._building: list[tuple[str, np.ndarray, np.ndarray]] | None = None  # changes during a rebuild

    def __len__(self) -> int:
        return len(self._camera_of)

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self._camera_of

    def cameras(self) -> list[str]:
        with self._lock:
            return sorted(name for name, shard in self._shards.items() if len(shard))

    def ids(self, camera: str | None = None) -> set[int]:
        """Chunk ids in the index (of one camera, or all)."""
        with self._lock:
            if camera is None:
                return set(self._camera_of)
            shard = self._shards.get(camera)
            return set() if shard is None else {int(i) for i in shard.view().ids}

    # ------------------------------------------------------------------ mutation

    def _check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape [M, {self.dim}], got {tuple(vecs.shape)}")
        if not np.isfinite(vecs).all():
            raise ValueError("vectors contain NaN or infinity")
        return vecs

    def add(self, meta: ChunkMeta, vector: np.ndarray) -> bool:
        """Add one chunk's vector [D]; False if its id is already indexed (idempotent)."""
        return self.add_many([meta], np.asarray(vector, dtype=np.float32).reshape(1, -1)) == 1

    def add_many(self, metas: list[ChunkMeta], vectors: np.ndarray) -> int:
        """Add chunks (vectors [M, D], one row per meta); ids already indexed are skipped.

        Returns the number added.
        """
        vecs = self._check_vectors(vectors)  # [M, D]
        if len(metas) != len(vecs):
            raise ValueError(f"{len(metas)} metas for {len(vecs)} vectors")
        for meta in metas:
            check_camera(meta.camera)
            if not (math.isfinite(meta.start_s) and math.isfinite(meta.end_s) and meta.end_s > meta.start_s):
                raise ValueError(f"chunk {meta.camera}/{meta.chunk_id}: need finite start_s < end_s")
        added = 0
        with self._lock:
            by_camera: dict[str, list[int]] = {}
            seen: set[int] = set()
            for row, meta in enumerate(metas):
                if meta.chunk_id in self._camera_of or meta.chunk_id in seen:
                    continue
                seen.add(meta.chunk_id)
                by_camera.setdefault(meta.camera, []).append(row)
            for camera, rows in by_camera.items():
                shard = self._shards.get(camera)
                if shard is None:
                    shard = self._shards[camera] = _Shard(self.dim)
                starts = np.array([metas[r].start_s for r in rows], dtype=np.float64)
                order = np.argsort(starts, kind="stable")
                picked = np.asarray(rows, dtype=np.int64)[order]
                ms = [metas[r] for r in picked]
                # A bulk load of one camera in time order (catch-up) needs no gather copy.
                whole = len(picked) == len(vecs) and bool(np.all(picked == np.arange(len(vecs))))
                rows_vecs = vecs if whole else vecs[picked]  # [M', D]
                new_ids = np.array([m.chunk_id for m in ms], dtype=np.int64)  # [M']
                shard.add(rows_vecs, starts[order], np.array([m.end_s for m in ms], dtype=np.float64), new_ids)
                for m in ms:
                    self._camera_of[m.chunk_id] = camera
                    self._span_of[m.chunk_id] = (m.start_s, m.end_s)
                added += len(rows)
                self._approx_change("add", rows_vecs, new_ids)
        return added

    def remove(self, chunk_ids: list[int] | np.ndarray) -> int:
        """Remove chunks by id (unknown ids are ignored); returns the number removed."""
        removed = 0
        with self._lock:
            by_camera: dict[str, list[int]] = {}
            for chunk_id in (int(i) for i in chunk_ids):
                camera = self._camera_of.pop(chunk_id, None)
                if camera is not None:
                    self._span_of.pop(chunk_id, None)
                    by_camera.setdefault(camera, []).append(chunk_id)
            for camera, ids in by_camera.items():
                gone = np.asarray(ids, dtype=np.int64)
                removed += self._shards[camera].remove(gone)
                self._approx_change("remove", None, gone)
        return removed

    def remove_before(self, camera: str, cutoff_s: float) -> int:
        """Drop chunks of ``camera`` that start before ``cutoff_s`` (retention); returns the count."""
        with self._lock:
            shard = self._shards.get(camera)
            if shard is None:
                return 0
            dropped = shard.drop_before(cutoff_s)
            for chunk_id in dropped:
                self._camera_of.pop(int(chunk_id), None)
                self._span_of.pop(int(chunk_id), None)
            if len(dropped):
                self._approx_change("remove", None, dropped)
        return len(dropped)

    # ------------------------------------------------------------------ approximate index

    def _approx_change(self, kind: str, vectors: np.ndarray | None, ids: np.ndarray) -> None:
        """Apply an add ([M, D] vectors) or a removal to the approximate index; caller holds _lock.

        While a rebuild runs, the change is also recorded and replayed on the new index.
        """
        if self._building is not None:
            # Copies: the caller's arrays may change before the replay.
            kept = np.empty((0, self.dim), np.float32) if vectors is None else vectors.copy()
            self._building.append((kind, kept, ids.copy()))
        with self._approx_lock:
            if self._approx is not None:
                self._approx.apply(kind, vectors, ids)

    @property
    def approximate(self) -> bool:
        """Whether whole-memory searches use the approximate index now."""
        return self._approx is not None and len(self) >= self.approx_min_vectors

    def refresh_approximate(self) -> bool:
        """Build the approximate index when it is needed and missing or out of balance; True when built.

        Blocking (k-means and the list assignment: seconds at 1M): call it from a worker thread.
        Adds and removals go on meanwhile; they are recorded and replayed on the new index before it
        is put in place. Below ``approx_min_vectors`` the index is dropped (exact search is fast).
        """
        with self._lock:
            n = len(self)
            if n < self.approx_min_vectors:
                with self._approx_lock:
                    self._approx = None
                return False
            current = self._approx
            if self._building is not None:
                return False  # another thread is building
            if (
                current is not None
                and current.trained_n / APPROX_RETRAIN_FACTOR <= n <= current.trained_n * APPROX_RETRAIN_FACTOR
                and current.changes < current.trained_n
            ):
                return False
            views = [shard.view() for shard in self._shards.values() if len(shard)]
            self._building = []
        try:
            built = _Approximate.build(self.dim, views)
        except BaseException:
            with self._lock:
                self._building = None
            raise
        with self._lock:
            for kind, vectors, ids in self._building or []:
                built.apply(kind, vectors, ids)
            built.changes = 0  # the replay brings it to now; it is as fresh as a new training
            self._building = None
            with self._approx_lock:
                self._approx = built
        logger.info("approximate index built: %d vectors in %d lists", built.trained_n, built.nlist)
        return True

    # ------------------------------------------------------------------ search

    def search(
        self,
        query: np.ndarray,
        k: int,
        cameras: set[str] | None = None,
        after_s: float | None = None,
        before_s: float | None = None,
        *,
        exact: bool = False,
    ) -> list[IndexHit]:
        """The ``k`` chunks with the highest inner product with ``query`` [D], best first.

        Only chunks of ``cameras`` (None: all) overlapping [after_s, before_s) are considered
        (``start_s < before_s`` and ``end_s > after_s``; None: unbounded). Fewer than ``k`` hits
        come back when fewer chunks match. Ties are broken by chunk id.

        Without any filter, an index of at least ``approx_min_vectors`` chunks answers from the
        approximate index (recall@10 measured in docs/storage.md) unless ``exact``; every other
        search is exact.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)  # [1, D]
        if q.shape[1] != self.dim or np.ndim(query) != 1:
            raise ValueError(f"query must have shape [{self.dim}], got {tuple(np.shape(query))}")
        if not np.isfinite(q).all():
            raise ValueError("query contains NaN or infinity")
        if not exact and cameras is None and after_s is None and before_s is None and self.approximate:
            hits = self._search_approximate(q, k)
            if hits is not None:
                return hits
        with self._lock:
            names = self._shards.keys() if cameras is None else [c for c in cameras if c in self._shards]
            views = [(name, self._shards[name].view()) for name in sorted(names)]
        candidates: list[tuple[float, int, str, int]] = []  # (score, chunk id, camera, row)
        for name, view in views:
            scores, rows = _slice_search(view, q, k, after_s, before_s)
            candidates.extend((float(s), int(view.ids[r]), name, int(r)) for s, r in zip(scores, rows, strict=True))
        candidates.sort(key=lambda c: (-c[0], c[1]))
        by_name = dict(views)
        return [
            IndexHit(name, chunk_id, float(by_name[name].starts[r]), float(by_name[name].ends[r]), score)
            for score, chunk_id, name, r in candidates[:k]
        ]

    def _search_approximate(self, q: np.ndarray, k: int) -> list[IndexHit] | None:
        """Top-k over all memory from the approximate index; None when it has fewer than k answers."""
        with self._approx_lock:
            if self._approx is None:
                return None
            scores, ids = self._approx.search(q, k, self.approx_nprobe)
        with self._lock:
            found = [
                (float(s), int(i), self._camera_of[int(i)], self._span_of[int(i)])
                for s, i in zip(scores, ids, strict=True)
                if int(i) in self._camera_of  # removed between the two locks
            ]
            wanted = min(k, len(self._camera_of))
        if len(found) < wanted:
            return None  # too few vectors in the probed lists: the exact scan answers
        found.sort(key=lambda c: (-c[0], c[1]))
        return [IndexHit(camera, chunk_id, span[0], span[1], score) for score, chunk_id, camera, span in found]

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> None:
        """Write the index to ``path`` atomically: a crash mid-save leaves the previous file."""
        path = Path(path)
        with self._lock:
            views = {name: shard.view() for name, shard in self._shards.items() if len(shard)}
        names = sorted(views)
        arrays: dict[str, np.ndarray] = {
            "format": np.array([FORMAT_VERSION, self.dim], dtype=np.int64),
            "cameras": np.array(names, dtype=np.str_),
            "max_span_s": np.array([views[n].max_span_s for n in names], dtype=np.float64),
        }
        for i, name in enumerate(names):
            view = views[name]
            arrays[f"vectors_{i}"] = view.vectors
            arrays[f"starts_{i}"] = view.starts
            arrays[f"ends_{i}"] = view.ends
            arrays[f"ids_{i}"] = view.ids
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, allow_pickle=False, **arrays)  # type: ignore[arg-type]
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        # The rename is durable only once the directory entry is on disk.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        logger.debug("saved index (%d chunks) to %s", sum(len(v.ids) for v in views.values()), path)

    @classmethod
    def load(cls, path: str | Path, dim: int) -> VectorIndex:
        """Read an index written by ``save``.

        FileNotFoundError if there is none; ValueError if the file is not an index of this format
        or its ``dim`` differs.
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except FileNotFoundError:
            raise
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not a readable vigil index ({exc})") from exc
        try:
            version, file_dim = (int(v) for v in arrays["format"])
            names = [str(n) for n in arrays["cameras"]]
            shards = [
                (arrays[f"vectors_{i}"], arrays[f"starts_{i}"], arrays[f"ends_{i}"], arrays[f"ids_{i}"])
                for i in range(len(names))
            ]
            spans = arrays["max_span_s"]
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable vigil index (missing or bad field {exc})") from exc
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: index format {version}, this vigil reads {FORMAT_VERSION}")
        if file_dim != dim:
            raise ValueError(f"{path}: index has dim {file_dim}, expected {dim} (embedder changed?)")
        index = cls(dim)
        for name, (vectors, starts, ends, ids), span in zip(names, shards, spans, strict=True):
            shard = _Shard(dim)
            shard._replace(vectors, starts, ends, ids)
            shard.max_span_s = float(span)
            index._shards[name] = shard
            index._camera_of.update((int(chunk_id), name) for chunk_id in ids)
            index._span_of.update(
                (int(chunk_id), (float(a), float(b))) for chunk_id, a, b in zip(ids, starts, ends, strict=True)
            )
        return index

    @classmethod
    def load_or_new(cls, path: str | Path, dim: int) -> VectorIndex:
        """``load``, or an empty index when the file is missing or unusable (catch_up refills it)."""
        try:
            index = cls.load(path, dim)
        except FileNotFoundError:
            logger.info("no index at %s: starting empty, it will be rebuilt from Redis", path)
            return cls(dim)
        except ValueError as exc:
            logger.warning("ignoring index file (%s): it will be rebuilt from Redis", exc)
            return cls(dim)
        logger.info("loaded index of %d chunks from %s", len(index), path)
        return index

    # ------------------------------------------------------------------ agreement with Redis

    async def catch_up(self, store: MemoryStore) -> tuple[int, int]:
        """Make the index hold exactly the chunks the store holds; returns (added, removed).

        Adds what Redis has and the index lacks (vectors read from Redis) and drops what Redis no
        longer has (retention, or chunks indexed whose write never reached Redis). An id absent
        from the timeline snapshot is re-checked in Redis before removal, so chunks written while
        catch-up runs survive. Vectors of another dimension are skipped and logged.
        """
        added = removed = 0
        store_cameras = set(await store.cameras())
        for camera in sorted(store_cameras):
            ids, _ = await store.timeline(camera)
            in_redis = {int(i) for i in ids}
            in_index = self.ids(camera)
            missing = sorted(in_redis - in_index)
            if missing:
                added += await self._add_stored(store, camera, missing)
            extra = sorted(in_index - in_redis)
            if extra:
                still_there = {m.chunk_id for m, _ in await store.get_vectors(camera, extra)}
                removed += self.remove([i for i in extra if i not in still_there])
        for camera in set(self.cameras()) - store_cameras:
            removed += self.remove(sorted(self.ids(camera)))
        if added or removed:
            logger.info("index caught up with Redis: %d chunks added, %d removed", added, removed)
        return added, removed

    async def follow(self, store: MemoryStore, cursors: MutableMapping[str, str]) -> int:
        """Add the chunks logged in the store's ``added`` streams after ``cursors``; returns how many.

        ``cursors`` (camera → stream id, from ``MemoryStore.added_cursors``) is advanced in place.
        Chunks already indexed (the daemon's own) are skipped without a read; a chunk whose hash
        is gone by now (retention) is skipped. When a camera's log was trimmed past its cursor,
        the entries in between are unknown: a full ``catch_up`` covers them instead.
        """
        added = 0
        while True:
            reads = await store.read_added(cursors)
            gaps = [r.camera for r in reads if r.gap]
            if gaps:
                logger.warning(
                    "index fell behind the added log of %s: catching up from Redis", ", ".join(sorted(gaps))
                )
                # After the reads: the catch-up's snapshot covers every entry up to the new cursors.
                caught, _ = await self.catch_up(store)
                added += caught
            for read in reads:
                missing = [] if read.gap else sorted({i for i in read.chunk_ids if i not in self})
                if missing:
                    added += await self._add_stored(store, read.camera, missing)
                if read.removed and not read.gap:
                    # Consolidated or deleted by another process (vigil memory compact).
                    self.remove(read.removed)
                cursors[read.camera] = read.cursor
            if not any(r.more for r in reads):
                return added

    async def _add_stored(self, store: MemoryStore, camera: str, chunk_ids: list[int]) -> int:
        """Add chunks of ``camera`` with the vectors stored in Redis; wrong-sized vectors are logged."""
        rows = await store.get_vectors(camera, chunk_ids)
        good = [(m, v) for m, v in rows if v.shape == (self.dim,)]
        if len(good) < len(rows):
            logger.warning(
                "index %s: skipped %d vectors whose dim is not %d", camera, len(rows) - len(good), self.dim
            )
        if not good:
            return 0
        return self.add_many([m for m, _ in good], np.stack([v for _, v in good]))

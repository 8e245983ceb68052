"""Retrieval latency of VectorIndex against FAISS's own filtered search, measured in the same run.

    .venv/bin/python -m bench.search_latency [--sizes 10000,100000,1000000] [--queries 200] [--hnsw-max 100000]
    .venv/bin/python -m bench.search_latency --chunks 1000000 --corpus scenes --json OUT.json

Synthetic corpus: ``--cameras`` cameras, chunks spread evenly over ``--days`` days per camera,
768-d vectors of low rank (a 64-d latent projected up, plus a little noise, L2-normalised), so
that neighbours have structure as with real SigLIP embeddings. Single-query latency (k=10) is
reported as p50/p99 for: camera + 1-hour window, camera + 1-day window, camera only, unfiltered.
Each filtered case is compared with FAISS doing the same filtering itself, on the same vectors:

* ``IndexFlatIP`` + ``SearchParameters(sel=IDSelectorRange)``: ids are laid out camera by camera
  in time order, so a camera + time window is one id range, FAISS's cheapest selector; exact.
* ``IndexHNSWFlat`` (M 32, efConstruction 40, efSearch 64) + ``SearchParametersHNSW(sel=...)``:
  the same filter inside the graph search; approximate, so its recall@10 against the exact
  filtered answer is printed too. Built only up to ``--hnsw-max`` vectors (its build dominates
  the run time on a small CPU).

"vs ours" divides each FAISS p50 by VectorIndex's p50 for the same case (above 1: FAISS slower).

Whole-memory search (issue 10): VectorIndex's approximate index (IVF, memory/index.py) is built on
the same vectors and measured against VectorIndex's exact scan of the same queries in the same
run: p50/p99 of the shipped setting, recall@10 against the exact top 10, the build time, and a
sweep of lists probed. ``--json OUT`` writes ``{"unfiltered": {"chunks", "p50_ms", "p99_ms",
"recall_at_10", ...}}`` for the last size.

``--corpus``: ``lowrank`` (default) draws every chunk from one 64-d Gaussian, which has no
clusters at all: the hardest case for an inverted file (a worst case, not footage). ``scenes``
gives each camera a new scene about every hour (``SCENE_S``), chunks of one scene scattered around
its centre as frames of one fixed view are, and queries near a random scene: closer to camera
memory, where a view stays the same for hours.
The indexes are built one after the other to keep memory near one copy of the vectors (about
3 GB at 1M × 768).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from memory.index import VectorIndex
from memory.store import ChunkMeta, chunk_id_for

T0 = 1_700_000_000.0
SECONDS_PER_DAY = 86_400.0
LATENT_DIM = 64  # rank of the synthetic embedding space
NOISE = 0.05  # isotropic noise added to the low-rank part, relative to unit-scale latents
K = 10
SCENE_S = 3600.0  # scenes corpus: a camera's view changes about every hour
# Chunks around their scene's centre, relative to the spread of centres (``--scene-spread``): 0.5
# puts a chunk at cosine about 0.9 to its scene's mean in the latent space, as consecutive frames
# of a fixed view are assumed to be (not measured on real SigLIP memory); 1.0 is a harder case.
SCENE_SPREAD = 0.5
QUERY_SPREAD = 1.0  # queries around a random scene's centre
NPROBE_SWEEP = (16, 32, 64, 128, 256)


def _scene_centres(seed: int, camera: int, n_scenes: int) -> np.ndarray:
    """Latent centres [S, L] of one camera's scenes (scenes corpus)."""
    return np.random.default_rng((seed, camera, 1)).standard_normal((n_scenes, LATENT_DIM), dtype=np.float32)


def _camera_vectors(
    seed: int,
    camera: int,
    n: int,
    basis: np.ndarray,
    *,
    corpus: str = "lowrank",
    step_s: float = 1.0,
    spread: float = SCENE_SPREAD,
) -> np.ndarray:
    """Vectors [n, D] of one camera, reproducible so the baseline gets the same data."""
    rng = np.random.default_rng((seed, camera))
    latent = rng.standard_normal((n, LATENT_DIM), dtype=np.float32)
    if corpus == "scenes":
        scene = (np.arange(n) * step_s // SCENE_S).astype(np.int64)  # [n] scene of each chunk
        latent *= spread
        latent += _scene_centres(seed, camera, int(scene[-1]) + 1)[scene]
    vectors = latent @ basis  # [n, D]
    vectors += NOISE * rng.standard_normal(vectors.shape, dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def _vectors(args: argparse.Namespace, camera: int, n: int, basis: np.ndarray, step_s: float) -> np.ndarray:
    """``_camera_vectors`` of the corpus the arguments choose."""
    return _camera_vectors(
        args.seed, camera, n, basis, corpus=args.corpus, step_s=step_s, spread=args.scene_spread
    )


def _queries(
    seed: int, n: int, basis: np.ndarray, *, corpus: str = "lowrank", cameras: int = 1, n_scenes: int = 1
) -> np.ndarray:
    rng = np.random.default_rng((seed, 10_000))
    latent = rng.standard_normal((n, LATENT_DIM), dtype=np.float32)
    if corpus == "scenes":
        latent *= QUERY_SPREAD
        for i in range(n):
            cam, scene = int(rng.integers(cameras)), int(rng.integers(n_scenes))
            latent[i] += _scene_centres(seed, cam, scene + 1)[scene]
    q = latent @ basis  # [n, D]
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _percentiles(fn: Callable[[int], object], n: int) -> tuple[float, float]:
    fn(0)  # warm-up
    times = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times[i] = time.perf_counter() - t
    p50, p99 = np.percentile(times, [50, 99]) * 1e3
    return float(p50), float(p99)


def _search_ours(
    index: VectorIndex,
    queries: np.ndarray,
    cases: dict[str, tuple[np.ndarray, np.ndarray | None, float]],
    n: int,
    n_slow: int,
) -> dict[str, tuple[float, float]]:
    """p50/p99 per case; a case is (camera per query or empty, window start per query or None, length)."""
    results = {}
    for name, (cams, starts, length_s) in cases.items():

        def one(
            i: int, cams: np.ndarray = cams, starts: np.ndarray | None = starts, length_s: float = length_s
        ) -> None:
            cameras = {str(cams[i])} if len(cams) else None
            after = None if starts is None else float(starts[i])
            before = None if starts is None else float(starts[i]) + length_s
            index.search(queries[i], K, cameras=cameras, after_s=after, before_s=before)

        results[name] = _percentiles(one, n if starts is not None else min(n, n_slow))
    return results


def _build_ours(args: argparse.Namespace, basis: np.ndarray, per_cam: int, step_s: float) -> VectorIndex:
    index = VectorIndex(args.dim)
    chunk_s = min(8.0, step_s)
    for c in range(args.cameras):
        starts = T0 + np.arange(per_cam) * step_s
        metas = [
            ChunkMeta.create(
                f"cam{c:02d}", float(s), float(s) + chunk_s, n_frames=8, n_input_tokens=0, n_tokens=0, codec="b"
            )
            for s in starts
        ]
        index.add_many(metas, _vectors(args, c, per_cam, basis, step_s))
    return index


def _build_flat(
    args: argparse.Namespace, basis: np.ndarray, per_cam: int, step_s: float
) -> tuple[faiss.Index, list[int]]:
    flat = faiss.IndexFlatIP(args.dim)
    ids: list[int] = []
    for c in range(args.cameras):
        flat.add(_vectors(args, c, per_cam, basis, step_s))
        ids.extend(chunk_id_for(f"cam{c:02d}", float(s)) for s in T0 + np.arange(per_cam) * step_s)
    return flat, ids


def _bench_approximate(index: VectorIndex, queries: np.ndarray) -> dict[str, object]:
    """Build the approximate index, then p50/p99 and recall@10 of whole-memory search against the
    exact scan of the same queries (VectorIndex's own, forced with ``exact=True``)."""
    index.approx_min_vectors = min(index.approx_min_vectors, len(index))  # measured even below the threshold
    t = time.perf_counter()
    index.refresh_approximate()
    build_s = time.perf_counter() - t
    n = len(queries)
    exact_ids = [[h.chunk_id for h in index.search(queries[i], K, exact=True)] for i in range(n)]
    exact_p50, exact_p99 = _percentiles(lambda i: index.search(queries[i], K, exact=True), min(n, 50))

    def recall() -> float:
        found = [{h.chunk_id for h in index.search(queries[i], K)} for i in range(n)]
        return float(np.mean([len(f & set(e)) / K for f, e in zip(found, exact_ids, strict=True)]))

    shipped = index.approx_nprobe
    sweep = {}
    for nprobe in NPROBE_SWEEP:
        index.approx_nprobe = nprobe
        sweep[nprobe] = (*_percentiles(lambda i: index.search(queries[i], K), n), recall())
    index.approx_nprobe = shipped
    p50, p99 = _percentiles(lambda i: index.search(queries[i], K), n)
    approx = index._approx
    return {
        "chunks": len(index),
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "recall_at_10": round(recall(), 4),
        "exact_p50_ms": round(exact_p50, 3),
        "exact_p99_ms": round(exact_p99, 3),
        "build_s": round(build_s, 1),
        "nlist": approx.nlist if approx is not None else None,
        "nprobe": shipped,
        "queries": n,
        "sweep": {
            str(k): {"p50_ms": round(a, 3), "p99_ms": round(b, 3), "recall_at_10": round(r, 4)}
            for k, (a, b, r) in sweep.items()
        },
    }


def bench_size(total: int, args: argparse.Namespace) -> dict[str, object]:
    span_s = args.days * SECONDS_PER_DAY
    per_cam = total // args.cameras
    step_s = span_s / per_cam
    basis = np.random.default_rng(args.seed).standard_normal((LATENT_DIM, args.dim), dtype=np.float32)
    n_scenes = int(span_s // SCENE_S) + 1
    queries = _queries(args.seed, args.queries, basis, corpus=args.corpus, cameras=args.cameras, n_scenes=n_scenes)
    rng = np.random.default_rng(args.seed + 1)
    q_cams = np.array([f"cam{c:02d}" for c in rng.integers(args.cameras, size=args.queries)])
    none = np.array([], dtype=str)
    cases = {
        "camera + 1 h": (q_cams, T0 + rng.uniform(0, span_s - 3600, size=args.queries), 3600.0),
        "camera + 1 day": (q_cams, T0 + rng.uniform(0, span_s - SECONDS_PER_DAY, size=args.queries), SECONDS_PER_DAY),
        "camera only": (q_cams, None, 0.0),
        "unfiltered": (none, None, 0.0),
    }

    t = time.perf_counter()
    index = _build_ours(args, basis, per_cam, step_s)
    build_s = time.perf_counter() - t
    n = len(index)
    results = _search_ours(index, queries, cases, args.queries, args.slow_queries)
    ours_top = [[h.chunk_id for h in index.search(queries[i], K)] for i in range(5)]
    approx = _bench_approximate(index, queries)
    del index  # one copy of the vectors at a time
    gc.collect()

    t = time.perf_counter()
    flat, ids = _build_flat(args, basis, per_cam, step_s)
    flat_build_s = time.perf_counter() - t
    n_flat = min(args.queries, args.slow_queries)
    faiss_results: dict[str, dict[str, tuple[float, float]]] = {"IndexFlatIP + IDSelectorRange": {}}
    ranges = {name: _id_ranges(case, per_cam, step_s, args.queries) for name, case in cases.items()}
    for name, rng_ in ranges.items():
        faiss_results["IndexFlatIP + IDSelectorRange"][name] = _percentiles(
            lambda i, r=rng_: _faiss_search(flat, queries[i], r[i], faiss.SearchParameters), n_flat
        )
    exact = {
        name: [_faiss_search(flat, queries[i], r[i], faiss.SearchParameters) for i in range(n_flat)]
        for name, r in ranges.items()
    }
    plain = _percentiles(lambda i: flat.search(queries[i : i + 1], K), n_flat)  # no selector at all
    # Sanity: unfiltered results equal the flat index's (both are exact).
    for i, ours in enumerate(ours_top):
        _, labels = flat.search(queries[i : i + 1], K)
        assert ours == [ids[j] for j in labels[0]], f"query {i}: VectorIndex and IndexFlatIP disagree"
    hnsw_build_s = None
    recall: dict[str, float] = {}
    if total <= args.hnsw_max:
        t = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(args.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        for c in range(args.cameras):
            hnsw.add(_vectors(args, c, per_cam, basis, step_s))
        hnsw_build_s = time.perf_counter() - t
        faiss_results["IndexHNSWFlat + selector"] = {}
        for name, rng_ in ranges.items():
            faiss_results["IndexHNSWFlat + selector"][name] = _percentiles(
                lambda i, r=rng_: _faiss_search(hnsw, queries[i], r[i], _hnsw_params), n_flat
            )
            found = [_faiss_search(hnsw, queries[i], rng_[i], _hnsw_params) for i in range(n_flat)]
            recall[name] = float(
                np.mean(
                    [
                        len(set(a) & set(b) - {-1}) / max(1, len(set(b) - {-1}))
                        for a, b in zip(found, exact[name], strict=True)
                    ]
                )
            )
        del hnsw
    flat.reset()  # frees its vectors before the next size

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{n:,} chunks ({args.cameras} cameras, {args.days:g} days, dim {args.dim}); load average {load}")
    hnsw_text = "not built (above --hnsw-max)" if hnsw_build_s is None else f"{hnsw_build_s:.1f} s"
    print(f"build: VectorIndex {build_s:.1f} s, IndexFlatIP {flat_build_s:.1f} s, IndexHNSWFlat {hnsw_text}")
    print(f"IndexFlatIP, unfiltered, no selector: p50 {plain[0]:.3f} ms, p99 {plain[1]:.3f} ms")
    header = f"{'search (k=10)':<16}{'VectorIndex p50/p99 ms':>24}"
    for label in faiss_results:
        header += f"{label + ' p50/p99 ms':>44}{'vs ours':>9}"
    if recall:
        header += f"{'HNSW recall@10':>16}"
    print(header)
    for name, (p50, p99) in results.items():
        line = f"{name:<16}{f'{p50:.3f} / {p99:.3f}':>24}"
        for per_case in faiss_results.values():
            f50, f99 = per_case[name]
            line += f"{f'{f50:.3f} / {f99:.3f}':>44}{f50 / p50:>8.2f}x"
        if recall:
            line += f"{recall[name]:>16.3f}"
        print(line)
    print(
        f"whole memory, approximate (IVF, {approx['nlist']} lists, {approx['nprobe']} probed; built in "
        f"{approx['build_s']} s): p50 {approx['p50_ms']:.3f} ms, p99 {approx['p99_ms']:.3f} ms, recall@10 "
        f"{approx['recall_at_10']:.3f} against VectorIndex's exact scan of the same {approx['queries']} queries "
        f"(exact: p50 {approx['exact_p50_ms']:.3f} ms, p99 {approx['exact_p99_ms']:.3f} ms; "
        f"{approx['exact_p50_ms'] / approx['p50_ms']:.1f}x the approximate p50)"
    )
    sweep = approx["sweep"]
    assert isinstance(sweep, dict)
    print(
        "  lists probed:  "
        + "   ".join(
            f"{k}: {v['p50_ms']:.2f}/{v['p99_ms']:.2f} ms r@10 {v['recall_at_10']:.3f}" for k, v in sweep.items()
        )
    )
    return approx


def _id_ranges(
    case: tuple[np.ndarray, np.ndarray | None, float], per_cam: int, step_s: float, n_queries: int
) -> list[tuple[int, int]]:
    """Per query, the [lo, hi) ids of the case's camera + window (ids: camera-major, time order).

    The rows VectorIndex's filter admits: start < before and end > after (end = start + chunk_s).
    """
    cams, starts, length_s = case
    if not len(cams):
        return [(0, per_cam * 10**6)] * n_queries  # unfiltered: every id
    rel_starts = np.arange(per_cam) * step_s  # [per_cam], as _build_ours lays them out
    rel_ends = rel_starts + min(8.0, step_s)
    out = []
    for i in range(n_queries):
        cam = int(str(cams[i])[3:])
        lo, hi = 0, per_cam
        if starts is not None:
            after, before = float(starts[i]) - T0, float(starts[i]) - T0 + length_s
            lo = int(np.searchsorted(rel_ends, after, side="right"))
            hi = int(np.searchsorted(rel_starts, before, side="left"))
        out.append((cam * per_cam + lo, cam * per_cam + hi))
    return out


HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 64


def _hnsw_params(sel: faiss.IDSelector) -> faiss.SearchParametersHNSW:
    params = faiss.SearchParametersHNSW(sel=sel)
    params.efSearch = HNSW_EF_SEARCH
    return params


def _faiss_search(
    index: faiss.Index, query: np.ndarray, id_range: tuple[int, int], make_params: Callable[..., object]
) -> list[int]:
    """FAISS's own filtered search: top-K ids inside [lo, hi)."""
    selector = faiss.IDSelectorRange(*id_range)
    _, labels = index.search(query[None, :], K, params=make_params(sel=selector))
    return [int(j) for j in labels[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated corpus sizes")
    parser.add_argument("--chunks", type=int, help="one corpus size (instead of --sizes)")
    parser.add_argument("--corpus", choices=("lowrank", "scenes"), default="lowrank", help="synthetic vectors")
    parser.add_argument(
        "--scene-spread", type=float, default=SCENE_SPREAD, help="scenes corpus: chunk spread around a scene"
    )
    parser.add_argument("--json", metavar="OUT", help="write the whole-memory figures of the last size here")
    parser.add_argument("--cameras", type=int, default=16)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=200, help="queries per time-filtered case")
    parser.add_argument(
        "--slow-queries",
        type=int,
        default=50,
        help="queries for the cases that scan whole cameras or everything (camera only, unfiltered, "
        "IndexFlatIP); at 1M they take 0.1-0.3 s each",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="largest size at which HNSW is built")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="FAISS OpenMP threads (0: FAISS default). A single query gains nothing from more, and "
        "on a busy CPU OpenMP spin-waiting makes it several times slower.",
    )
    args = parser.parse_args()
    if args.threads > 0:
        faiss.omp_set_num_threads(args.threads)
    print(
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads, "
        f"{args.queries} queries per time-filtered case, "
        f"{args.slow_queries} per unfiltered or camera-only case"
    )
    print(f"corpus: {args.corpus}" + (f", scene spread {args.scene_spread}" if args.corpus == "scenes" else ""))
    sizes = [args.chunks] if args.chunks else [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        approx = bench_size(size, args)
    if args.json:
        body = {"unfiltered": approx, "corpus": args.corpus, "scene_spread": args.scene_spread}
        Path(args.json).write_text(json.dumps(body, indent=2) + "\n")


if __name__ == "__main__":
    main()

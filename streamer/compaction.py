"""Compaction of old memory: consolidation tiers and size budgets (issue 10).

For each camera the ``Compactor`` finds runs of ``merge`` neighbouring chunks that are all older
than a tier's ``after`` and still one tier below it, merges each run into one coarser chunk
(memory/consolidate.py, in a worker thread) and swaps it in atomically
(``MemoryStore.swap_chunks``). Then size budgets: while a camera (``max_bytes_per_camera``) or all
cameras together (``max_bytes``) hold more bytes than allowed, the oldest runs are consolidated
regardless of age, tier by tier, and when no run is left the oldest chunks are deleted.

Runs never cross an outage or a gap in the footage (``MAX_MERGE_GAP_S``): the edges of what was
not seen stay at full resolution. A run cut short by such an edge stays as it is.

It runs from the daemon's maintenance loop (streamer/maintenance.py) and from ``vigil memory
compact``; ``vigil memory stats`` reports chunks and bytes per camera and tier from a scan, and
recounts the store's usage counters (what ``vigil status`` and the metrics show) where they differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import redis.exceptions

from memory.codec import CodecError, Precision, decode_chunk, encode_chunk
from memory.consolidate import consolidate, merge_vectors
from memory.outage import Outage
from memory.store import MAX_CONSOLIDATED_SPAN_S, REDIS_AWAY_ERRORS, CameraUsage, ChunkMeta, MemoryStore
from streamer.redact import redact_text
from streamer.resources import IndexFile, redis_client
from streamer.settings import Settings, TierSettings, load_settings

logger = logging.getLogger(__name__)

# Neighbouring chunks further apart than this are not merged: the gap is footage vigil did not
# see (the camera was down, or a recording ended), and merging across it would blur its edges.
# Chunks of one stream follow each other within a frame period (about 1 s at the default rate);
# 30 s leaves room for slow sampling (sample_fps down to 1/30) without bridging a real outage.
MAX_MERGE_GAP_S = 30.0
COMPACTION_INTERVAL_S = 600.0  # tiers are days apart; every 10 minutes is plenty
_PRECISIONS: tuple[Precision, ...] = ("fp16", "int8")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Tier:
    """One consolidation tier: chunks older than ``after_s`` merged ``merge`` to one."""

    after_s: float
    merge: int
    keep_ratio: float

    @classmethod
    def from_settings(cls, tier: TierSettings) -> Tier:
        return cls(tier.after, tier.merge, tier.keep_ratio)


@dataclass(slots=True)
class CompactionReport:
    """What one compaction pass did."""

    merged: int = 0  # consolidated chunks written
    absorbed: int = 0  # chunks they replaced
    deleted: int = 0  # chunks deleted by size budgets
    skipped: int = 0  # runs not merged (a member vanished, a payload did not decode)


@dataclass(slots=True)
class _Entry:
    meta: ChunkMeta
    size: int  # stored bytes


@dataclass(slots=True)
class _Camera:
    """One camera's chunks in start order, kept current as the pass changes them."""

    name: str
    tiers: list[Tier]
    entries: list[_Entry]
    outages: list[Outage] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)


def _crosses_outage(outages: Sequence[Outage], a_s: float, b_s: float) -> bool:
    """Whether an outage overlaps [a_s, b_s] (an open outage reaches to now)."""
    return any(o.start_s <= b_s and (o.end_s is None or o.end_s >= a_s) for o in outages)


def find_runs(
    metas: Sequence[ChunkMeta],
    level: int,
    merge: int,
    *,
    before_s: float | None,
    outages: Sequence[Outage] = (),
    max_gap_s: float = MAX_MERGE_GAP_S,
) -> list[list[int]]:
    """Runs of ``merge`` consecutive chunks of tier ``level - 1`` to consolidate into tier ``level``.

    Args:
        metas: one camera's chunks in start order (every tier).
        level: the tier the runs become (>= 1).
        merge: chunks per run.
        before_s: only chunks ending at or before this time (None: any age, for budgets).
        outages: the camera's outages; no run spans one.
        max_gap_s: no run spans a gap between neighbours longer than this.

    Returns:
        Runs as lists of positions in ``metas``, oldest first, disjoint.
    """
    runs: list[list[int]] = []
    current: list[int] = []
    for pos, meta in enumerate(metas):
        eligible = meta.tier == level - 1 and (before_s is None or meta.end_s <= before_s)
        if not eligible:
            current = []
            continue
        if current:
            prev = metas[current[-1]]
            too_long = meta.end_s - metas[current[0]].start_s > MAX_CONSOLIDATED_SPAN_S
            if meta.start_s - prev.end_s > max_gap_s or too_long or _crosses_outage(outages, prev.end_s, meta.start_s):
                current = []
        current.append(pos)
        if len(current) == merge:
            runs.append(current)
            current = []
    return runs


def _precision(codec: str) -> Precision | None:
    name = codec.partition("/")[0]
    return next((p for p in _PRECISIONS if p == name), None)


def _consolidate_payloads(
    payloads: list[bytes], vectors: np.ndarray, durations: np.ndarray, keep_ratio: float, precision: Precision
) -> tuple[bytes, np.ndarray, int]:
    """Decode, merge and encode (blocking: run it in a thread). Returns (payload, vector [D], tokens)."""
    merged = consolidate([decode_chunk(p) for p in payloads], keep_ratio)
    return encode_chunk(merged.chunk, precision), merge_vectors(vectors, durations), merged.chunk.n_tokens


class Compactor:
    """``await compactor.run_once(now_s)``: tiers, then size budgets, for every camera with memory."""

    def __init__(
        self,
        store: MemoryStore,
        index: IndexFile | None,
        tiers_for: Callable[[str], Sequence[TierSettings]],
        *,
        max_bytes_per_camera: int | None,
        max_bytes: int | None,
    ) -> None:
        self._store = store
        self._index = index
        self._tiers_for = tiers_for
        self._max_bytes_per_camera = max_bytes_per_camera
        self._max_bytes = max_bytes

    async def _load(self, camera: str) -> _Camera:
        sizes = await self._store.chunk_sizes(camera)
        tiers = [Tier.from_settings(t) for t in self._tiers_for(camera)]
        return _Camera(camera, tiers, [_Entry(m, s) for m, s in sizes], await self._store.outages([camera]))

    async def run_once(self, now_s: float) -> CompactionReport:
        """One pass over every camera in the store. Redis errors propagate to the caller."""
        report = CompactionReport()
        cameras = [await self._load(name) for name in await self._store.cameras()]
        for cam in cameras:
            for level, tier in enumerate(cam.tiers, start=1):
                metas = [e.meta for e in cam.entries]
                runs = find_runs(metas, level, tier.merge, before_s=now_s - tier.after_s, outages=cam.outages)
                for run in runs:
                    await self._merge(cam, [metas[p] for p in run], level, tier.keep_ratio, report)
            if self._max_bytes_per_camera is not None:
                await self._enforce([cam], self._max_bytes_per_camera, report)
        if self._max_bytes is not None:
            await self._enforce(cameras, self._max_bytes, report)
        if report.merged or report.deleted:
            logger.info(
                "compaction: %d chunks consolidated into %d, %d deleted for size budgets, %d runs skipped",
                report.absorbed,
                report.merged,
                report.deleted,
                report.skipped,
            )
        return report

    async def _merge(
        self, cam: _Camera, members: list[ChunkMeta], level: int, keep_ratio: float, report: CompactionReport
    ) -> int:
        """Consolidate ``members`` into tier ``level``; returns the bytes it freed (0 when not merged)."""
        ids = [m.chunk_id for m in members]
        stored = await self._store.get_chunks([(cam.name, i) for i in ids])
        vectors = await self._store.get_vectors(cam.name, ids)
        precision = _precision(members[0].codec)
        if len(stored) != len(ids) or len(vectors) != len(ids) or precision is None:
            report.skipped += 1
            return 0
        durations = np.array([m.end_s - m.start_s for m in members], dtype=np.float64)  # [K]
        try:
            payload, vector, n_tokens = await asyncio.to_thread(
                _consolidate_payloads,
                [p for _, p in stored],
                np.stack([v for _, v in vectors]),
                durations,
                keep_ratio,
                precision,
            )
        except (CodecError, ValueError) as exc:
            # Damaged or mismatched members (another encoder): they stay as they are.
            logger.warning("camera %s: run from %.0f not consolidated: %s", cam.name, members[0].start_s, exc)
            report.skipped += 1
            return 0
        merged = ChunkMeta.create(
            cam.name,
            members[0].start_s,
            max(m.end_s for m in members),
            n_frames=sum(m.n_frames for m in members),
            n_input_tokens=sum(m.n_input_tokens for m in members),
            n_tokens=n_tokens,
            codec=members[0].codec,
            tier=level,
            members=[(m.start_s, m.end_s) for m in members],
        )
        result = await self._store.swap_chunks(merged, payload, vector, ids)
        if result == "refused":
            report.skipped += 1
            return 0
        if self._index is not None:
            self._index.index.remove(ids)
            self._index.index.add(merged, vector)
            self._index.dirty = True
        gone = set(ids)
        kept = [e for e in cam.entries if e.meta.chunk_id not in gone]
        freed = sum(e.size for e in cam.entries if e.meta.chunk_id in gone)
        entry = _Entry(merged, len(merged.to_json()) + len(payload) + vector.nbytes)
        kept.append(entry)
        kept.sort(key=lambda e: (e.meta.start_s, e.meta.tier))
        cam.entries = kept
        report.merged += 1
        report.absorbed += len(ids)
        return freed - entry.size

    async def _enforce(self, cameras: list[_Camera], limit: int, report: CompactionReport) -> None:
        """Consolidate the oldest runs, tier by tier, then delete the oldest chunks, until under ``limit``."""
        levels = max((len(c.tiers) for c in cameras), default=0)
        total = sum(c.size for c in cameras)
        for level in range(1, levels + 1):
            if total <= limit:
                return
            candidates: list[tuple[float, _Camera, list[ChunkMeta], float]] = []
            for cam in cameras:
                if len(cam.tiers) < level:
                    continue
                tier = cam.tiers[level - 1]
                metas = [e.meta for e in cam.entries]
                for run in find_runs(metas, level, tier.merge, before_s=None, outages=cam.outages):
                    candidates.append((metas[run[0]].start_s, cam, [metas[p] for p in run], tier.keep_ratio))
            for _, cam, members, keep_ratio in sorted(candidates, key=lambda c: c[0]):
                if total <= limit:
                    return
                total -= await self._merge(cam, members, level, keep_ratio, report)
            total = sum(c.size for c in cameras)  # exact again before the next tier
        over = total - limit
        if over <= 0:
            return
        oldest = sorted(((e.meta.start_s, cam, e) for cam in cameras for e in cam.entries), key=lambda t: t[0])
        doomed: dict[str, list[int]] = {}
        for _, cam, entry in oldest:
            if over <= 0:
                break
            doomed.setdefault(cam.name, []).append(entry.meta.chunk_id)
            over -= entry.size
        for cam in cameras:
            ids = doomed.get(cam.name)
            if not ids:
                continue
            report.deleted += await self._store.delete_chunks(cam.name, ids)
            gone = set(ids)
            cam.entries = [e for e in cam.entries if e.meta.chunk_id not in gone]
            if self._index is not None:
                self._index.index.remove(ids)
                self._index.dirty = True
            logger.info("size budget: deleted the %d oldest chunks of camera %s", len(ids), cam.name)


UsageTable = dict[str, dict[str, dict[str, int]]]  # camera -> tier ("0", "1", ..., "total") -> chunks, bytes


async def scan_usage(store: MemoryStore) -> dict[str, CameraUsage]:
    """Every camera's usage counted from a scan of its chunks (the truth the counters must equal)."""
    return {camera: CameraUsage.from_sizes(camera, await store.chunk_sizes(camera)) for camera in await store.cameras()}


async def memory_stats(store: MemoryStore) -> UsageTable:
    """Per camera and tier ("0" as ingested), chunks and stored bytes from a scan; plus each camera's "total"."""
    return {camera: usage.rows() for camera, usage in (await scan_usage(store)).items()}


async def checked_stats(store: MemoryStore) -> tuple[UsageTable, list[str]]:
    """``memory_stats``, and the cameras whose usage counters differed from the scan (recounted).

    A write between the scan and the counter read also differs; the recount is safe either way
    (``MemoryStore.rebuild_usage`` retries when writes interfere).
    """
    scanned = await scan_usage(store)
    counted = await store.usage(list(scanned))
    differed = [
        camera
        for camera, usage in scanned.items()
        if not counted[camera].complete or counted[camera].tiers != usage.tiers
    ]
    for camera in differed:
        await store.rebuild_usage(camera)
    return {camera: usage.rows() for camera, usage in scanned.items()}, differed


def compactor_for(settings: Settings, store: MemoryStore, index: IndexFile | None) -> Compactor:
    """The Compactor the configuration describes."""
    return Compactor(
        store,
        index,
        settings.tiers_for,
        max_bytes_per_camera=settings.memory.max_bytes_per_camera,
        max_bytes=settings.memory.max_bytes,
    )


def _format_stats(stats: Mapping[str, Mapping[str, Mapping[str, int]]]) -> str:
    lines = [f"{'camera':<24} {'tier':>5} {'chunks':>10} {'bytes':>14}"]
    for camera, rows in stats.items():
        for tier, row in rows.items():
            lines.append(f"{camera:<24} {tier:>5} {row['chunks']:>10} {row['bytes']:>14}")
    return "\n".join(lines) if stats else "no memory stored"


async def _with_store(settings: Settings, work: Callable[[MemoryStore], Awaitable[_T]]) -> _T:
    client = redis_client(settings)
    try:
        return await work(MemoryStore(client, key_prefix=settings.redis.key_prefix))
    finally:
        await client.aclose()


def cli_memory(args: argparse.Namespace) -> int:
    """``vigil memory stats [--json]`` and ``vigil memory compact``."""
    settings = load_settings(args.config)
    try:
        if args.memory_command == "stats":
            stats, differed = asyncio.run(_with_store(settings, checked_stats))
            for camera in differed:
                print(
                    f"usage counters of camera {camera} differed from the scan (or were incomplete): recounted",
                    file=sys.stderr,
                )
            print(json.dumps(stats, indent=2) if args.json else _format_stats(stats))
            return 0
        # A running daemon's index follows through the added log (removed ids), so no index here.
        report = asyncio.run(
            _with_store(settings, lambda store: compactor_for(settings, store, None).run_once(time.time()))
        )
        print(
            f"consolidated {report.absorbed} chunks into {report.merged}, deleted {report.deleted}, "
            f"skipped {report.skipped} runs"
        )
        return 0
    except REDIS_AWAY_ERRORS as exc:
        print(f"Redis unavailable: {type(exc).__name__}: {redact_text(str(exc))}", file=sys.stderr)
        return 1
    except redis.exceptions.RedisError as exc:
        print(f"Redis refused: {type(exc).__name__}: {redact_text(str(exc))}", file=sys.stderr)
        return 1

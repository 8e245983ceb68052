"""Compaction (streamer/compaction.py) on real Redis: tiers shrink old memory, budgets hold, CLI."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import redis.asyncio as redis
import yaml

from memory.codec import decode_chunk, encode_chunk
from memory.index import VectorIndex
from memory.outage import Outage
from memory.store import ChunkMeta, MemoryStore
from streamer.cli import main
from streamer.compaction import Compactor, find_runs, memory_stats
from streamer.maintenance import Maintenance
from streamer.resources import IndexFile
from streamer.settings import Settings
from tests.test_consolidate import CHUNK_S, camera_chunks

DIM = 16
NOW = 1_765_000_000.0
DAY = 86400.0
CODEC = "int8/v1"


async def _write_footage(store: MemoryStore, camera: str, start_s: float, n: int, seed: int) -> list[ChunkMeta]:
    """``n`` consecutive chunks made by the real compressor, re-timed to start at ``start_s``."""
    metas = []
    rng = np.random.default_rng(seed)
    for i, chunk in enumerate(camera_chunks(n, seed=seed)):
        offset = start_s + i * CHUNK_S - float(chunk.t_first.min())
        chunk.t_first += offset
        chunk.t_last += offset
        first, last = float(chunk.t_first.min()), float(chunk.t_last.max())
        meta = ChunkMeta.create(
            camera, first, last, n_frames=8, n_input_tokens=chunk.n_input, n_tokens=chunk.n_tokens, codec=CODEC
        )
        vec = rng.standard_normal(DIM).astype(np.float32)
        assert await store.put_chunk(meta, encode_chunk(chunk, "int8"), vec / np.linalg.norm(vec))
        metas.append(meta)
    return metas


def _settings(**memory: object) -> Settings:
    return Settings.model_validate({"memory": memory})


async def test_tiers_shrink_old_memory_and_keep_recent_and_outage_edges(redis_client, prefix, tmp_path) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    await _write_footage(store, "gate", NOW - 8 * DAY, 64, seed=1)  # a week old: tier 1, then tier 2
    await _write_footage(store, "gate", NOW - 2 * DAY, 16, seed=2)  # two days old: tier 1
    recent = await _write_footage(store, "gate", NOW - 600.0, 8, seed=3)  # ten minutes old: as ingested
    # Three days old, but an outage in the middle: no run of 8 crosses it.
    around = await _write_footage(store, "gate", NOW - 3 * DAY, 10, seed=4)
    await store.put_outage(Outage("gate", around[4].end_s, around[5].start_s, "camera unreachable"))
    before = await memory_stats(store)
    assert before["gate"]["total"]["chunks"] == 98

    index = IndexFile(VectorIndex(DIM), tmp_path / "index.npz")
    await index.index.catch_up(store)
    settings = _settings()
    compactor = Compactor(store, index, settings.tiers_for, max_bytes_per_camera=None, max_bytes=None)
    report = await compactor.run_once(NOW)
    assert report.skipped == 0
    stats = await memory_stats(store)
    gate = stats["gate"]
    assert gate["2"]["chunks"] == 1  # 64 -> 8 -> 1
    assert gate["1"]["chunks"] == 2  # 16 -> 2
    assert gate["0"]["chunks"] == 8 + 10  # recent and the outage's neighbours untouched
    assert gate["total"]["bytes"] < before["gate"]["total"]["bytes"] / 2
    # The in-process index follows the swaps exactly.
    timeline, _ = await store.timeline("gate")
    assert index.index.ids("gate") == set(timeline.tolist())
    assert index.dirty
    assert {m.chunk_id for m in recent} <= set(timeline.tolist())
    # The tier-2 chunk decodes and still holds every encoder token's count of its 64 members.
    oldest = (await store.chunks_in_range("gate", NOW - 9 * DAY, NOW - 7 * DAY))[0]
    assert oldest.tier == 2
    assert len(oldest.members) == 8
    ((_, payload),) = await store.get_chunks([("gate", oldest.chunk_id)])
    merged = decode_chunk(payload)
    member_counts = sum(int(c.count.sum()) for c in camera_chunks(64, seed=1))
    assert int(merged.count.sum()) == member_counts
    # A second pass has nothing left to do.
    again = await compactor.run_once(NOW)
    assert (again.merged, again.deleted) == (0, 0)


async def test_camera_budget_consolidates_then_deletes_oldest(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    await _write_footage(store, "yard", NOW - 3600.0, 32, seed=5)  # an hour old: no tier applies by age
    sizes = [s for _, s in await store.chunk_sizes("yard")]
    total = sum(sizes)
    # A budget a consolidation alone can meet: the oldest run is merged, nothing deleted.
    mild = Compactor(store, None, _settings().tiers_for, max_bytes_per_camera=total - sizes[0], max_bytes=None)
    report = await mild.run_once(NOW)
    assert report.merged >= 1
    assert report.deleted == 0
    stats = (await memory_stats(store))["yard"]
    assert stats["total"]["bytes"] <= total - sizes[0]
    # A budget below what every tier can reach: the oldest chunks are deleted, the newest stay.
    limit = 3 * max(sizes)
    tight = Compactor(store, None, _settings().tiers_for, max_bytes_per_camera=limit, max_bytes=None)
    report = await tight.run_once(NOW)
    assert report.deleted > 0
    left = await store.chunk_sizes("yard")
    assert sum(s for _, s in left) <= limit
    newest = max(m.start_s for m, _ in left)
    assert newest == pytest.approx(NOW - 3600.0 + 31 * CHUNK_S)


async def test_total_budget_over_cameras_deletes_the_oldest_first(redis_client, prefix) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    await _write_footage(store, "north", NOW - 7200.0, 8, seed=6)
    await _write_footage(store, "south", NOW - 3600.0, 8, seed=7)
    sizes = {m.chunk_id: s for cam in ("north", "south") for m, s in await store.chunk_sizes(cam)}
    limit = sum(sizes.values()) // 4
    no_tiers = _settings(tiers=[]).tiers_for
    report = await Compactor(store, None, no_tiers, max_bytes_per_camera=None, max_bytes=limit).run_once(NOW)
    assert report.merged == 0
    stats = await memory_stats(store)
    total = sum(rows["total"]["bytes"] for rows in stats.values())
    assert total <= limit
    assert "north" not in stats or stats["north"]["total"]["chunks"] == 0  # the older camera went first
    assert stats["south"]["total"]["chunks"] >= 1


def test_runs_stop_at_gaps_and_outages_and_respect_the_tier() -> None:
    def meta(start: float, tier: int = 0) -> ChunkMeta:
        members = [(start, start + 8.0)] if tier else []
        return ChunkMeta.create(
            "c", start, start + 8.0, n_frames=8, n_input_tokens=1, n_tokens=1, codec=CODEC, tier=tier, members=members
        )

    metas = [meta(i * 8.0) for i in range(4)] + [meta(1000.0 + i * 8.0) for i in range(4)]
    assert find_runs(metas, 1, 4, before_s=None) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert find_runs(metas, 1, 5, before_s=None) == []  # the gap at 32..1000 s splits them
    assert find_runs(metas, 1, 2, before_s=20.0) == [[0, 1]]  # only chunks ended by then
    assert find_runs(metas, 2, 2, before_s=None) == []  # tier 2 merges tier-1 chunks only
    outage = Outage("c", 15.9, 16.1, "x")
    assert find_runs(metas[:4], 1, 4, before_s=None, outages=[outage]) == []
    assert find_runs(metas[:4], 1, 2, before_s=None, outages=[outage]) == [[0, 1], [2, 3]]


def test_cli_stats_and_compact(redis_url, prefix, tmp_path, capsys) -> None:
    async def write() -> None:
        client = redis.Redis.from_url(redis_url)
        try:
            await _write_footage(MemoryStore(client, key_prefix=prefix), "door", NOW - 10 * DAY, 16, seed=8)
        finally:
            await client.aclose()

    asyncio.run(write())  # the CLI runs its own event loop, so this test has none
    cfg = tmp_path / "vigil.yaml"
    cfg.write_text(yaml.safe_dump({"redis": {"url": redis_url, "key_prefix": prefix}, "data_dir": str(tmp_path)}))
    assert main(["memory", "stats", "--json", "-c", str(cfg)]) == 0
    before = json.loads(capsys.readouterr().out)
    assert before["door"]["0"]["chunks"] == 16
    assert main(["memory", "compact", "-c", str(cfg)]) == 0
    assert "consolidated 16 chunks into 2" in capsys.readouterr().out
    assert main(["memory", "stats", "-c", str(cfg)]) == 0
    table = capsys.readouterr().out
    assert "door" in table
    assert main(["memory", "stats", "--json", "-c", str(cfg)]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["door"]["1"]["chunks"] == 2
    assert "0" not in after["door"]
    assert after["door"]["total"]["bytes"] < before["door"]["total"]["bytes"]


async def test_maintenance_runs_the_compactor(redis_client, prefix, tmp_path) -> None:
    store = MemoryStore(redis_client, key_prefix=prefix)
    await _write_footage(store, "lane", NOW - 2 * DAY, 8, seed=9)
    index = IndexFile(VectorIndex(DIM), tmp_path / "index.npz")
    compactor = Compactor(store, index, _settings().tiers_for, max_bytes_per_camera=None, max_bytes=None)
    maintenance = Maintenance(store, index, {"lane": 30.0}, compactor=compactor)
    await maintenance.compact(NOW)
    assert (await memory_stats(store))["lane"]["1"]["chunks"] == 1


def test_cli_without_redis_fails_with_a_message(tmp_path, capsys) -> None:
    cfg = tmp_path / "vigil.yaml"
    cfg.write_text(yaml.safe_dump({"redis": {"url": "redis://user:hunter2@127.0.0.1:1/0"}, "data_dir": str(tmp_path)}))
    assert main(["memory", "stats", "-c", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "Redis unavailable" in err
    assert "hunter2" not in err

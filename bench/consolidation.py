"""Consolidation cost and size at LLaVA-OV-0.5B shapes (issue 10, tier 1 and tier 2 of the defaults).

Members are made by the real compressor (memory/compress.py, default config) from synthetic tokens
at the real shapes: a 14 x 14 grid, C = 896, 8 frames per chunk, a static background with 30% of
the cells changing per frame (a busy scene, so chunks keep their full 4% budget). Sizes are the
int8 codec's bytes (memory/codec.py). Timing is wall clock on this machine, one thread.

    .venv/bin/python bench/consolidation.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory.codec import encode_chunk
from memory.compress import CompressorState, compress_chunk
from memory.consolidate import consolidate
from memory.types import CompressedChunk

GRID = (14, 14)
C = 896
FRAMES = 8
MERGE = 8
KEEP = 0.125
CHANGE = 0.3
REPEATS = 5


def members(k: int, seed: int) -> list[CompressedChunk]:
    gen = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    background = torch.randn(n, C, generator=gen)  # [N, C]
    state: CompressorState | None = None
    out: list[CompressedChunk] = []
    for i in range(k):
        tokens = background.expand(FRAMES, n, C).clone()  # [T, N, C]
        changed = torch.rand(FRAMES, n, generator=gen) < CHANGE
        tokens[changed] = torch.randn(int(changed.sum()), C, generator=gen)
        t0 = 1.7e9 + i * FRAMES + torch.arange(FRAMES, dtype=torch.float64)
        chunk, state = compress_chunk(
            tokens, tokens.mean(1), t0, t0 + 1.0, torch.ones(FRAMES, dtype=torch.int64), grid=GRID, state=state
        )
        out.append(chunk)
    return out


def timed(fn):
    best = float("inf")
    for _ in range(REPEATS):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return result, best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tier0 = members(MERGE * MERGE, seed=0)
    groups = [tier0[i : i + MERGE] for i in range(0, len(tier0), MERGE)]
    tier1 = []
    t1_s = []
    for g in groups:
        merged, s = timed(lambda g=g: consolidate(g, KEEP))
        tier1.append(merged.chunk)
        t1_s.append(s)
    tier2, t2_s = timed(lambda: consolidate(tier1, KEEP))
    size = lambda chunks: sum(len(encode_chunk(c, "int8")) for c in chunks)  # noqa: E731
    report = {
        "shapes": {"grid": GRID, "C": C, "frames_per_chunk": FRAMES, "merge": MERGE, "keep_ratio": KEEP},
        "tokens": {
            "tier0_per_chunk": sum(c.n_tokens for c in tier0) / len(tier0),
            "tier1_per_chunk": sum(c.n_tokens for c in tier1) / len(tier1),
            "tier2_per_chunk": tier2.chunk.n_tokens,
        },
        "bytes_int8": {
            "64_tier0_chunks": size(tier0),
            "8_tier1_chunks": size(tier1),
            "1_tier2_chunk": size([tier2.chunk]),
        },
        "consolidate_ms": {"tier1_best_median": sorted(t1_s)[len(t1_s) // 2] * 1e3, "tier2_best": t2_s * 1e3},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

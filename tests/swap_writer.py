"""Writer process for tests/test_store_swap.py: consolidates groups of chunks until killed.

For each group g (8 chunks of camera ``swap``, written first by the test), it swaps the members for
their merge with MemoryStore.swap_chunks and prints ``swapped g``. The test kills it with SIGKILL
at an arbitrary point and checks that every group holds either its members or its merge.

    .venv/bin/python tests/swap_writer.py REDIS_URL PREFIX GROUPS
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import numpy as np
import redis.asyncio as redis

# Run as a script from the repository root: make the project importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory.store import ChunkMeta, MemoryStore

CAMERA = "swap"
T0 = 1_700_000_000.0
CHUNK_S = 8.0
MERGE = 8
DIM = 16
# Large payloads make each swap take a while in Redis, so a kill can land while one is in flight.
PAYLOAD_BYTES = 256 * 1024


def member_metas(group: int) -> list[ChunkMeta]:
    start = T0 + group * MERGE * CHUNK_S
    return [
        ChunkMeta.create(
            CAMERA,
            start + i * CHUNK_S,
            start + (i + 1) * CHUNK_S,
            n_frames=8,
            n_input_tokens=512,
            n_tokens=20,
            codec="t/1",
        )
        for i in range(MERGE)
    ]


def merged_meta(group: int) -> ChunkMeta:
    members = member_metas(group)
    return ChunkMeta.create(
        CAMERA,
        members[0].start_s,
        members[-1].end_s,
        n_frames=64,
        n_input_tokens=4096,
        n_tokens=20,
        codec="t/1",
        tier=1,
        members=[(m.start_s, m.end_s) for m in members],
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("prefix")
    parser.add_argument("groups", type=int)
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    store = MemoryStore(client, key_prefix=args.prefix)
    vec = np.ones(DIM, dtype=np.float32)
    try:
        for g in range(args.groups):
            merged = merged_meta(g)
            await store.swap_chunks(merged, b"m" * PAYLOAD_BYTES, vec, [m.chunk_id for m in member_metas(g)])
            print(f"swapped {g}", flush=True)
    finally:
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())

"""Writer process for tests/test_crash_recovery.py: writes chunks like the pipeline does until killed.

Each chunk goes to Redis first (the truth), then to the index; the index is saved atomically every
``--save-every`` chunks. After each chunk it prints ``written N`` so the test knows how far it got.

    .venv/bin/python tests/crash_writer.py REDIS_URL PREFIX INDEX_PATH [--dim 256] [--save-every 4]
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

from memory.index import VectorIndex
from memory.store import ChunkMeta, MemoryStore

T0 = 1_700_000_000.0
CHUNK_S = 8.0
CAMERAS = ("north", "south")
# The index starts with this many chunks so that each save writes a file of about 0.5 MB: a kill
# then has a fair chance of landing in the middle of a save.
PRELOAD_CHUNKS = 500


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("prefix")
    parser.add_argument("index_path", type=Path)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--save-every", type=int, default=4)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    client = redis.Redis.from_url(args.redis_url)
    store = MemoryStore(client, key_prefix=args.prefix)
    index = VectorIndex(args.dim)
    n = 0
    try:
        while True:
            camera = CAMERAS[n % len(CAMERAS)]
            start = T0 + (n // len(CAMERAS)) * CHUNK_S
            meta = ChunkMeta.create(
                camera, start, start + CHUNK_S, n_frames=8, n_input_tokens=64, n_tokens=6, codec="t"
            )
            vector = rng.standard_normal(args.dim).astype(np.float32)
            await store.put_chunk(meta, rng.bytes(256), vector)
            index.add(meta, vector)
            n += 1
            if n == PRELOAD_CHUNKS or (n > PRELOAD_CHUNKS and n % args.save_every == 0):
                await asyncio.to_thread(index.save, args.index_path)
            if n >= PRELOAD_CHUNKS:
                print(f"written {n}", flush=True)
    finally:
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())

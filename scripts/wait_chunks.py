"""Wait until a camera has N chunks in vigil's memory (used by scripts/demo.sh).

Usage: python scripts/wait_chunks.py -c CONFIG --camera NAME --chunks N --timeout S
Exits 0 once the chunks are in Redis, 1 on timeout (printing how many there were).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from memory.store import MemoryStore
from streamer.resources import redis_client
from streamer.settings import load_settings

POLL_S = 1.0


async def wait(config: str, camera: str, chunks: int, timeout_s: float) -> int:
    settings = load_settings(config)
    client = redis_client(settings)
    store = MemoryStore(client, key_prefix=settings.redis.key_prefix)
    deadline = time.monotonic() + timeout_s
    have = 0
    try:
        while time.monotonic() < deadline:
            have = len(await store.chunks_in_range(camera, None, None))
            if have >= chunks:
                print(f"{camera}: {have} chunks in memory", flush=True)
                return 0
            await asyncio.sleep(POLL_S)
    finally:
        await client.aclose()
    print(f"{camera}: only {have} of {chunks} chunks after {timeout_s:.0f} s", file=sys.stderr)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--camera", required=True)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    return asyncio.run(wait(args.config, args.camera, args.chunks, args.timeout))


if __name__ == "__main__":
    sys.exit(main())

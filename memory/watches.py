"""The watches added at runtime, kept in Redis so that they survive restarts (I/O only).

One hash, ``P:watches`` (memory/keys.py): field = watch name, value = the watch's fields as JSON.
The store neither knows nor checks the schema (memory/ imports nothing of ours): the daemon
validates what it reads back like any other input (streamer/watch_service.py), so a stored
watch that a newer vigil or a changed config refuses is reported, not trusted.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from memory.keys import RedisKeys

# A stored watch is a few hundred bytes; anything far larger is not ours and is not parsed.
MAX_STORED_BYTES = 64 * 1024


class WatchStore:
    """``put`` / ``remove`` / ``load`` of runtime watches under one key prefix."""

    def __init__(self, redis: aioredis.Redis, *, key_prefix: str) -> None:
        self._redis = redis
        self._key = RedisKeys(key_prefix).watches()

    async def put(self, name: str, fields: dict[str, Any]) -> None:
        """Store (or replace) one watch's fields."""
        await self._redis.hset(self._key, name, json.dumps(fields, separators=(",", ":"), sort_keys=True))

    async def remove(self, name: str) -> bool:
        """Forget one watch; True when it was stored."""
        return bool(await self._redis.hdel(self._key, name))

    async def load(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Every stored watch: (name → fields, name → why it could not be read)."""
        raw = await self._redis.hgetall(self._key)
        found: dict[str, dict[str, Any]] = {}
        bad: dict[str, str] = {}
        for key, value in sorted(raw.items()):
            name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
            if len(value) > MAX_STORED_BYTES:
                bad[name] = f"{len(value)} bytes, more than a watch can be"
                continue
            try:
                fields = json.loads(value)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                bad[name] = f"not JSON: {exc}"
                continue
            if not isinstance(fields, dict):
                bad[name] = "not a JSON object"
                continue
            found[name] = fields
        return found, bad

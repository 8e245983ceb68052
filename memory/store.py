"""MemoryStore: chunk payloads, metadata, retrieval vectors and outages in Redis.

Redis is the source of truth; the FAISS index (memory/index.py) is derived from it and can always
be rebuilt, which is why the retrieval vector is stored here too. The store is I/O only: payloads
are opaque bytes (encoded by memory/codec.py before they reach us) and vectors are copied as
float32 bytes.

Per camera (key names in memory/keys.py, all under the camera's hash tag):

* a hash per chunk with its metadata, payload and vector;
* a sorted set ``timeline`` (member = chunk id, score = start time in ms) that answers time-range
  and "latest" queries and drives retention. A sorted set rather than a Stream because chunks can
  arrive out of order (retries after an outage, re-imports) and a retried write must be a no-op:
  ``ZADD`` of an existing member is idempotent, while ``XADD`` refuses ids below the stream top.
* a hash of outage records;
* a capped stream ``added`` with an entry per chunk write (id and start time): a running daemon
  reads it (``read_added``) so that its index follows chunks other processes store
  (``vigil import``) without a restart. Capped at ``ADDED_LOG_LEN`` entries; a reader that fell
  further behind is told so (``AddedRead.gap``) and rebuilds from the timeline instead.

A chunk's hash, its timeline entry and its ``added`` entry are written in one MULTI/EXEC (and
hash and timeline entry deleted in one); the keys share a slot, so this also holds in Redis
Cluster.

Writes that fail because Redis is away are kept in a bounded buffer and retried by
``run_retry_loop``; when the buffer is full the oldest write is dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import redis.exceptions as redis_errors

from memory.aio import wait_set
from memory.keys import RedisKeys, check_camera
from memory.outage import Outage

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

logger = logging.getLogger(__name__)

MS_PER_S = 1000.0
# Chunk ids are FAISS labels, which are signed int64; 63 bits keep them non-negative.
CHUNK_ID_MASK = (1 << 63) - 1
# Longest span a chunk may cover. The camera config caps chunk_s at 120 s; the margin leaves room
# for the last frame's duration and imports with coarse sampling. Time-range queries look this far
# back for chunks that started before the window but reach into it.
MAX_CHUNK_SPAN_S = 300.0
# Longest span of a consolidated chunk (tier > 0): a day, far above the shipped tiers' 8 x 8
# chunks (about 9 minutes at chunk_s 8), so only an absurd configuration meets it. Time-range
# queries look back as far as the longest chunk a camera holds (its ``max_span`` key).
MAX_CONSOLIDATED_SPAN_S = 86400.0
# Highest consolidation tier (the settings allow 8 tiers).
MAX_TIER = 8
# Ids fetched or deleted per round trip: keeps each Redis command short so other clients
# (the question path) are not stalled behind a bulk scan or a large retention pass.
BATCH_IDS = 1000
# Entries kept in each camera's ``added`` stream. A follower polls every second or so; this lets it
# fall about 10,000 chunks (hours of a fast import) behind before it needs a full catch-up. An
# entry is about 100 bytes, so a camera's log stays near 1 MB.
ADDED_LOG_LEN = 10_000
# The id before every stream entry: a cursor that has read nothing yet.
STREAM_START = "0-0"
# How often the retry loop tries buffered writes while Redis is away.
RETRY_INTERVAL_S = 1.0
# At shutdown, buffered writes get this long to reach Redis before they are reported lost.
SHUTDOWN_FLUSH_S = 5.0

# Errors that mean "Redis is unreachable or cannot take writes right now": the write is buffered
# and retried. Any other error is a bug or bad input and propagates.
REDIS_AWAY_ERRORS: tuple[type[Exception], ...] = (
    redis_errors.ConnectionError,  # includes refused connections, BusyLoadingError, auth failures
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a replica during failover
    redis_errors.OutOfMemoryError,  # maxmemory reached: retention will free space
    redis_errors.ExecAbortError,  # a MULTI refused for the same reasons
    redis_errors.MasterDownError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
)

# Usage counters (``P:{C}:usage``, memory/keys.py) change in the same script as the chunks they
# count: a Lua script runs atomically in Redis (no other command runs between its steps, and it is
# persisted and replicated whole), so the counters cannot drift from the chunks, whatever kills a
# client. A chunk's bytes are what ``chunk_sizes`` counts: meta + payload + vec. Its tier comes from
# its stored metadata (cjson ships with Redis's Lua). A hash without ``meta`` is not a chunk
# (``chunk_sizes`` skips it too) and is not counted.
_USAGE_LUA = """
local function usage_of(key)
  local meta = redis.call('HGET', key, 'meta')
  if not meta then return nil, 0 end
  local bytes = string.len(meta) + redis.call('HSTRLEN', key, 'payload') + redis.call('HSTRLEN', key, 'vec')
  local ok, decoded = pcall(cjson.decode, meta)
  local tier = 0
  if ok and type(decoded) == 'table' and tonumber(decoded['tier']) then tier = tonumber(decoded['tier']) end
  return tier, bytes
end
local function count(usage, tier, bytes, chunks)
  redis.call('HINCRBY', usage, 'bytes:' .. tier, bytes)
  redis.call('HINCRBY', usage, 'chunks:' .. tier, chunks)
end
local function uncount(usage, key)
  local tier, bytes = usage_of(key)
  if tier then count(usage, tier, -bytes, -1) end
end
"""

# Write one chunk (a rewrite of the same id replaces it and its count).
# KEYS: chunk hash, timeline, added, usage. ARGV: id, start ms, meta, payload, vec, added log
# length, tier. A camera's first chunk marks its counters complete (nothing before it to count);
# counters of a camera that had memory before they existed stay incomplete until rebuilt.
_PUT_LUA = _USAGE_LUA + """
if redis.call('EXISTS', KEYS[4]) == 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[4], 'complete', '1')
end
uncount(KEYS[4], KEYS[1])
redis.call('HSET', KEYS[1], 'meta', ARGV[3], 'payload', ARGV[4], 'vec', ARGV[5])
count(KEYS[4], ARGV[7], string.len(ARGV[3]) + string.len(ARGV[4]) + string.len(ARGV[5]), 1)
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[6], '*', 'chunk', ARGV[1], 'start_ms', ARGV[2])
return 1
"""

# Delete chunks (size budgets, retention). KEYS: timeline, added, usage, then one hash per chunk.
# ARGV: added log length, '1' to log the removal in ``added`` (budgets) or '0' (retention, which
# followers apply by age), then the ids. Returns how many hashes existed.
_DELETE_LUA = _USAGE_LUA + """
local n = 0
for i = 4, #KEYS do
  uncount(KEYS[3], KEYS[i])
  n = n + redis.call('UNLINK', KEYS[i])
end
local removed = {}
for i = 3, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  removed[#removed + 1] = ARGV[i]
end
if ARGV[2] == '1' then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[1], '*', 'chunk', '', 'removed', table.concat(removed, ','))
end
return n
"""

# Replace a run of member chunks by their consolidation in one step, all or nothing (a client
# killed at any point leaves either every member or the merge, never both or neither).
# KEYS: timeline, added, max_span, usage, merged chunk hash, then one hash per member.
# ARGV: merged id, start ms, meta, payload, vec, added log length, span ms, tier, then the member ids.
# Returns 1 swapped, 0 already swapped (the merge exists: members left by nothing are removed),
# -1 refused (a member is gone, e.g. retention took it: the merge would bring it back).
_SWAP_LUA = _USAGE_LUA + """
local merged = KEYS[5]
if redis.call('EXISTS', merged) == 1 then
  for i = 6, #KEYS do
    uncount(KEYS[4], KEYS[i])
    redis.call('UNLINK', KEYS[i])
  end
  for i = 9, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
  return 0
end
for i = 6, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return -1 end
end
redis.call('HSET', merged, 'meta', ARGV[3], 'payload', ARGV[4], 'vec', ARGV[5])
count(KEYS[4], ARGV[8], string.len(ARGV[3]) + string.len(ARGV[4]) + string.len(ARGV[5]), 1)
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local removed = {}
for i = 6, #KEYS do
  uncount(KEYS[4], KEYS[i])
  redis.call('UNLINK', KEYS[i])
end
for i = 9, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  removed[#removed + 1] = ARGV[i]
end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[6], '*', 'chunk', ARGV[1], 'start_ms', ARGV[2],
  'removed', table.concat(removed, ','))
local span = tonumber(ARGV[7])
local old = tonumber(redis.call('GET', KEYS[3]) or '0')
if span > old then redis.call('SET', KEYS[3], ARGV[7]) end
return 1
"""
# How often a counter rebuild is tried again when writes keep changing the counters mid-scan.
USAGE_REBUILD_TRIES = 5
SwapResult = Literal["swapped", "already", "refused"]
_SWAP_RESULTS: dict[int, SwapResult] = {1: "swapped", 0: "already", -1: "refused"}


def chunk_id_for(camera: str, start_s: float, tier: int = 0) -> int:
    """Deterministic non-negative 63-bit id of the chunk of ``camera`` starting at ``start_s``.

    Derived from the camera and the start time in whole ms, so a retried or repeated write of the
    same chunk lands on the same keys without a Redis round trip to allocate an id. A consolidated
    chunk (``tier`` > 0) starts where its first member starts, so the tier is part of its id; a
    retried consolidation of the same members lands on the same id (memory/consolidate.py).
    """
    _check_time("start_s", start_s)
    if not isinstance(tier, int) or not 0 <= tier <= MAX_TIER:
        raise ValueError(f"tier must be an integer in [0, {MAX_TIER}], got {tier!r}")
    start_ms = round(start_s * MS_PER_S)
    key = f"{camera}\x00{start_ms}" if tier == 0 else f"{camera}\x00{start_ms}\x00tier{tier}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & CHUNK_ID_MASK


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    """What is known about a stored chunk without decoding its payload."""

    camera: str
    chunk_id: int  # chunk_id_for(camera, start_s)
    start_s: float  # UTC epoch seconds of the first frame
    end_s: float  # UTC epoch seconds of the end of the span the chunk covers
    n_frames: int  # frames in the chunk
    n_input_tokens: int  # visual tokens the encoder produced
    n_tokens: int  # tokens kept after compression
    codec: str  # codec name and version of the payload, e.g. "fp16/v1"
    tier: int = 0  # consolidation tier: 0 as ingested, k after k consolidations (memory/consolidate.py)
    members: tuple[tuple[float, float], ...] = ()  # (start_s, end_s) of each merged member, in time order

    @classmethod
    def create(
        cls,
        camera: str,
        start_s: float,
        end_s: float,
        *,
        n_frames: int,
        n_input_tokens: int,
        n_tokens: int,
        codec: str,
        tier: int = 0,
        members: Sequence[tuple[float, float]] = (),
    ) -> ChunkMeta:
        """A ChunkMeta whose id is derived with chunk_id_for."""
        return cls(
            camera,
            chunk_id_for(camera, start_s, tier),
            start_s,
            end_s,
            n_frames,
            n_input_tokens,
            n_tokens,
            codec,
            tier,
            tuple((float(a), float(b)) for a, b in members),
        )

    def to_json(self) -> str:
        fields = asdict(self)
        if self.tier == 0 and not self.members:
            # Ingested chunks keep the JSON they had before tiers existed.
            del fields["tier"], fields["members"]
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ChunkMeta:
        fields = json.loads(text)
        fields["members"] = tuple((float(a), float(b)) for a, b in fields.get("members", ()))
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class AddedRead:
    """What one camera's ``added`` stream held after a cursor (``MemoryStore.read_added``)."""

    camera: str
    chunk_ids: list[int]  # in write order; a chunk written twice appears twice
    cursor: str  # id of the last entry read (the old cursor when none was new)
    more: bool  # the read stopped at its count: entries after ``cursor`` may be waiting
    gap: bool  # entries after the old cursor were trimmed before they were read
    removed: list[int] = field(default_factory=list)  # ids a consolidation replaced or a budget deleted


def _stream_id(value: str | bytes) -> tuple[int, int]:
    """A stream entry id ``"<ms>-<seq>"`` → (ms, seq), for ordering."""
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class TierUsage:
    """Chunks and stored bytes (meta + payload + vector, as ``chunk_sizes`` counts) of one tier."""

    chunks: int
    bytes: int


@dataclass(frozen=True, slots=True)
class CameraUsage:
    """One camera's memory per consolidation tier (0: as ingested)."""

    camera: str
    tiers: dict[int, TierUsage]  # tier -> usage, tiers in ascending order, empty tiers left out
    complete: bool = True  # False: counters started after the camera had memory (``rebuild_usage``)

    @property
    def total(self) -> TierUsage:
        return TierUsage(sum(t.chunks for t in self.tiers.values()), sum(t.bytes for t in self.tiers.values()))

    def rows(self) -> dict[str, dict[str, int]]:
        """JSON rows (``vigil memory stats``, the status): tier ("0" as ingested) -> chunks and bytes, then "total"."""
        rows = {str(tier): {"chunks": t.chunks, "bytes": t.bytes} for tier, t in self.tiers.items()}
        total = self.total
        return {**rows, "total": {"chunks": total.chunks, "bytes": total.bytes}}

    @classmethod
    def from_sizes(cls, camera: str, sizes: Iterable[tuple[ChunkMeta, int]]) -> CameraUsage:
        """Usage from a scan (``MemoryStore.chunk_sizes``)."""
        chunks: dict[int, int] = {}
        nbytes: dict[int, int] = {}
        for meta, size in sizes:
            chunks[meta.tier] = chunks.get(meta.tier, 0) + 1
            nbytes[meta.tier] = nbytes.get(meta.tier, 0) + size
        return cls(camera, {tier: TierUsage(chunks[tier], nbytes[tier]) for tier in sorted(chunks)})

    @classmethod
    def from_hash(cls, camera: str, fields: Mapping[bytes | str, bytes | str]) -> CameraUsage:
        """Usage from the camera's ``usage`` hash (fields ``chunks:<tier>``, ``bytes:<tier>``, ``complete``)."""
        chunks: dict[int, int] = {}
        nbytes: dict[int, int] = {}
        complete = False
        for raw_name, raw_value in fields.items():
            name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
            value = int(raw_value)
            if name == "complete":
                complete = value == 1
                continue
            kind, _, tier = name.partition(":")
            if tier.isdigit() and kind in ("chunks", "bytes"):
                (chunks if kind == "chunks" else nbytes)[int(tier)] = value
        tiers = {
            tier: TierUsage(chunks.get(tier, 0), nbytes.get(tier, 0))
            for tier in sorted(set(chunks) | set(nbytes))
            if chunks.get(tier, 0) or nbytes.get(tier, 0)
        }
        return cls(camera, tiers, complete)


@dataclass(slots=True)
class StoreStats:
    """Counters since the store was created."""

    written: int = 0  # writes that reached Redis (direct or retried)
    buffered: int = 0  # writes that went to the retry buffer
    dropped: int = 0  # buffered writes lost because the buffer was full
    retried: int = 0  # buffered writes that later reached Redis


@dataclass(frozen=True, slots=True)
class _PendingChunk:
    meta: ChunkMeta
    payload: bytes
    vector: bytes  # float32 [D]


@dataclass(frozen=True, slots=True)
class _PendingOutage:
    record: Outage


_Pending = _PendingChunk | _PendingOutage


def _check_time(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of UTC epoch seconds, got {value!r}")


def _check_chunk(meta: ChunkMeta, payload: bytes, vector: np.ndarray) -> np.ndarray:
    """Validate one chunk write; return the vector as contiguous float32 [D]."""
    check_camera(meta.camera)
    _check_time("start_s", meta.start_s)
    _check_time("end_s", meta.end_s)
    max_span_s = MAX_CHUNK_SPAN_S if meta.tier == 0 else MAX_CONSOLIDATED_SPAN_S
    if not meta.start_s < meta.end_s <= meta.start_s + max_span_s:
        raise ValueError(
            f"chunk of {meta.camera!r} spans {meta.start_s!r}..{meta.end_s!r}: end_s must be after start_s "
            f"and at most {max_span_s:g} s later"
        )
    expected_id = chunk_id_for(meta.camera, meta.start_s, meta.tier)
    if meta.chunk_id != expected_id:
        raise ValueError(
            f"chunk_id {meta.chunk_id} is not chunk_id_for({meta.camera!r}, {meta.start_s!r}, {meta.tier}) = "
            f"{expected_id}"
        )
    if meta.tier > 0:
        spans = meta.members
        if not spans:
            raise ValueError(f"consolidated chunk {meta.chunk_id} (tier {meta.tier}) lists no members")
        # Neighbouring chunks may overlap by wall-clock jitter, so only the starts must be ordered.
        ordered = all(a < b for a, b in spans) and all(a1 <= a2 for (a1, _), (a2, _) in itertools.pairwise(spans))
        if not ordered or spans[0][0] != meta.start_s or max(b for _, b in spans) != meta.end_s:
            raise ValueError(
                f"members of consolidated chunk {meta.chunk_id} must be spans in start order covering "
                "start_s to end_s"
            )
    elif meta.members:
        raise ValueError("an ingested chunk (tier 0) has no members")
    for name in ("n_frames", "n_input_tokens", "n_tokens"):
        if getattr(meta, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(meta, name)}")
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"payload must be bytes (encode it with memory.codec first), got {type(payload).__name__}")
    vec = np.ascontiguousarray(vector, dtype=np.float32)  # [D]
    if vec.ndim != 1 or vec.size == 0:
        raise ValueError(f"vector must have shape [D], got {tuple(np.shape(vector))}")
    if not np.isfinite(vec).all():
        raise ValueError("vector contains NaN or infinity")
    return vec


def _ms(value_s: float) -> int:
    return round(value_s * MS_PER_S)


def _complete(rows: list[Any]) -> list[tuple[Any, Any]]:
    """HMGET rows of two fields where the key exists and both fields are present."""
    return [(a, b) for a, b in (row or (None, None) for row in rows) if a is not None and b is not None]


async def _execute_reads(pipe: Pipeline) -> list[Any]:
    """Run a pipeline of reads; a key Redis cannot read (WRONGTYPE) reads as None and is logged.

    One damaged key must not fail a whole question or catch-up.
    """
    rows = await pipe.execute(raise_on_error=False)
    bad = [row for row in rows if isinstance(row, redis_errors.ResponseError)]
    if bad:
        logger.warning("%d unreadable keys skipped (first: %s)", len(bad), bad[0])
    return [None if isinstance(row, redis_errors.ResponseError) else row for row in rows]


class MemoryStore:
    """Chunks, vectors and outages of every camera in one Redis (or Redis Cluster)."""

    def __init__(
        self, redis: Redis, *, key_prefix: str, buffer_chunks: int = 512, added_log_len: int = ADDED_LOG_LEN
    ) -> None:
        if buffer_chunks < 1:
            raise ValueError(f"buffer_chunks must be >= 1, got {buffer_chunks}")
        if added_log_len < 1:
            raise ValueError(f"added_log_len must be >= 1, got {added_log_len}")
        self._redis = redis
        self.keys = RedisKeys(key_prefix)
        self._buffer_max = buffer_chunks
        self._added_log_len = added_log_len
        self._pending: deque[_Pending] = deque()
        self._flush_lock = asyncio.Lock()
        self._away = False
        self._dropped_this_outage = 0
        self.stats = StoreStats()

    @property
    def pending(self) -> int:
        """Writes waiting in the retry buffer."""
        return len(self._pending)

    # ------------------------------------------------------------------ writes

    async def put_chunk(self, meta: ChunkMeta, payload: bytes, vector: np.ndarray) -> bool:
        """Store one chunk; True when it reached Redis, False when it was buffered for retry.

        ``vector`` is the chunk's retrieval embedding, shape [D]. Invalid input raises ValueError
        or TypeError before anything is written or buffered.
        """
        vec = _check_chunk(meta, payload, vector)  # [D] float32
        return await self._put(_PendingChunk(meta, bytes(payload), vec.tobytes()))

    async def put_outage(self, record: Outage) -> bool:
        """Store or update (same camera and start) an outage; False when buffered for retry."""
        check_camera(record.camera)
        _check_time("start_s", record.start_s)
        if record.end_s is not None:
            _check_time("end_s", record.end_s)
            if record.end_s < record.start_s:
                raise ValueError(f"outage end_s {record.end_s!r} is before start_s {record.start_s!r}")
        return await self._put(_PendingOutage(record))

    async def _put(self, item: _Pending) -> bool:
        # While writes are waiting, Redis is known to be away: queue behind them instead of paying
        # a connection timeout per write. The retry loop notices when Redis is back.
        if self._pending:
            self._buffer(item)
            return False
        try:
            await self._write(item)
        except REDIS_AWAY_ERRORS as exc:
            self._went_away(exc)
            self._buffer(item)
            return False
        self.stats.written += 1
        return True

    async def _write(self, item: _Pending) -> None:
        if isinstance(item, _PendingChunk):
            meta = item.meta
            await self._redis.sadd(self.keys.cameras(), meta.camera)
            camera = meta.camera
            # One script (_PUT_LUA): hash, timeline, added entry and usage counters together. The
            # added log is trimmed exactly: one entry out per entry in, so the bound a reader's gap
            # check relies on is the one configured.
            await self._redis.eval(
                _PUT_LUA,
                4,
                self.keys.chunk(camera, meta.chunk_id),
                self.keys.timeline(camera),
                self.keys.added(camera),
                self.keys.usage(camera),
                str(meta.chunk_id),
                _ms(meta.start_s),
                meta.to_json(),
                item.payload,
                item.vector,
                self._added_log_len,
                meta.tier,
            )
        else:
            rec = item.record
            await self._redis.sadd(self.keys.cameras(), rec.camera)
            await self._redis.hset(self.keys.outages(rec.camera), str(_ms(rec.start_s)), rec.to_json())

    def _went_away(self, exc: Exception) -> None:
        if not self._away:
            self._away = True
            logger.warning(
                "Redis unavailable (%s: %s); buffering up to %d writes",
                type(exc).__name__,
                exc,
                self._buffer_max,
            )

    def _buffer(self, item: _Pending) -> None:
        self._pending.append(item)
        self.stats.buffered += 1
        self._trim()

    def _trim(self) -> None:
        while len(self._pending) > self._buffer_max:
            lost = self._pending.popleft()
            self.stats.dropped += 1
            if self._dropped_this_outage == 0:
                logger.warning("Redis write buffer full (%d): dropping the oldest writes", self._buffer_max)
            self._dropped_this_outage += 1
            if isinstance(lost, _PendingChunk):
                logger.debug("dropped chunk %s/%d", lost.meta.camera, lost.meta.chunk_id)

    async def flush_pending(self) -> int:
        """Try the buffered writes oldest first; return how many reached Redis.

        Stops at the first write that fails because Redis is still away.
        """
        written = 0
        async with self._flush_lock:
            while self._pending:
                # Taken out before the await so a concurrent overflow cannot drop it mid-write.
                item = self._pending.popleft()
                try:
                    await self._write(item)
                except REDIS_AWAY_ERRORS:
                    self._pending.appendleft(item)
                    self._trim()
                    break
                except redis_errors.RedisError as exc:
                    # Redis is up but refuses this one write (e.g. WRONGTYPE): retrying cannot
                    # help and must not block the writes behind it or stop the retry loop.
                    self.stats.dropped += 1
                    logger.error("dropping a buffered write that Redis refuses: %s: %s", type(exc).__name__, exc)
                    continue
                except BaseException:
                    # Cancelled (shutdown deadline) or a bug: keep the write; rewriting is idempotent.
                    self._pending.appendleft(item)
                    raise
                written += 1
                self.stats.written += 1
                self.stats.retried += 1
            if not self._pending and self._away:
                self._away = False
                logger.info(
                    "Redis available again: %d buffered writes stored, %d dropped during the outage",
                    written,
                    self._dropped_this_outage,
                )
                self._dropped_this_outage = 0
        return written

    async def run_retry_loop(self, stop: asyncio.Event, interval_s: float = RETRY_INTERVAL_S) -> None:
        """Retry buffered writes every ``interval_s`` until ``stop``; then one last bounded try."""
        while not stop.is_set():
            await wait_set(stop, interval_s)
            if self._pending:
                await self.flush_pending()
        if self._pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_FLUSH_S):
                    await self.flush_pending()
        if self._pending:
            logger.error("%d buffered Redis writes lost at shutdown (Redis unavailable)", len(self._pending))

    # ------------------------------------------------------------------ reads

    async def cameras(self) -> list[str]:
        """Names of cameras with stored chunks or outages, sorted."""
        names = await self._redis.smembers(self.keys.cameras())
        return sorted(n.decode() if isinstance(n, bytes) else n for n in names)

    async def added_cursors(self) -> dict[str, str]:
        """Per camera with memory, the id of the newest ``added`` entry (``STREAM_START``: none).

        Taken before a catch-up, these let ``read_added`` return every chunk written since, so
        nothing written while the catch-up runs is missed (re-reading one is harmless).
        """
        cameras = await self.cameras()
        if not cameras:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for camera in cameras:
                pipe.xrevrange(self.keys.added(camera), count=1)
            rows = await _execute_reads(pipe)
        return {
            camera: (row[0][0].decode() if isinstance(row[0][0], bytes) else row[0][0]) if row else STREAM_START
            for camera, row in zip(cameras, rows, strict=True)
        }

    async def read_added(self, cursors: Mapping[str, str], count: int = BATCH_IDS) -> list[AddedRead]:
        """Chunk writes logged after each camera's cursor, at most ``count`` per camera.

        Every camera with memory is read; one missing from ``cursors`` (new since they were taken)
        from the start of its log. One read per camera in a pipeline rather than a multi-key
        XREAD, which Redis Cluster refuses across slots.
        """
        cameras = await self.cameras()
        if not cameras:
            return []
        starts = {camera: cursors.get(camera, STREAM_START) for camera in cameras}
        async with self._redis.pipeline(transaction=False) as pipe:
            for camera in cameras:
                pipe.xread({self.keys.added(camera): starts[camera]}, count=count)
            rows = await _execute_reads(pipe)
        entries: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = {}
        for camera, row in zip(cameras, rows, strict=True):
            # XREAD answers [[key, [(id, fields), ...]]], or nothing when no entry is new.
            entries[camera] = list(row[0][1]) if row else []
        fresh = [camera for camera in cameras if entries[camera]]
        gaps = await self._added_gaps(fresh, starts) if fresh else {}
        reads: list[AddedRead] = []
        for camera in cameras:
            got = entries[camera]
            ids: list[int] = []
            removed: list[int] = []
            for _, fields in got:
                gone = [part for part in fields.get(b"removed", b"").split(b",") if part]
                if gone and all(part.isdigit() for part in gone):
                    removed.extend(int(part) for part in gone)
                raw = fields.get(b"chunk")
                if raw == b"" and gone:
                    continue  # a deletion only (size budget)
                if raw is None or not raw.isdigit():
                    logger.warning("camera %s: added log entry without a chunk id skipped", camera)
                    continue
                ids.append(int(raw))
            cursor = got[-1][0].decode() if got else starts[camera]
            reads.append(AddedRead(camera, ids, cursor, len(got) >= count, gaps.get(camera, False), removed))
        return reads

    async def _added_gaps(self, cameras: list[str], starts: Mapping[str, str]) -> dict[str, bool]:
        """Whether entries after each camera's cursor were trimmed away before they were read."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for camera in cameras:
                pipe.xinfo_stream(self.keys.added(camera))
            rows = await _execute_reads(pipe)
        gaps: dict[str, bool] = {}
        for camera, info in zip(cameras, rows, strict=True):
            first = info.get("first-entry") if info else None
            if not first:
                continue
            cursor = _stream_id(starts[camera])
            if cursor == (0, 0):
                # Read from the start: a gap when anything was ever trimmed (Redis >= 7.0 counts
                # entries added; older ones only tell that the log is at its cap).
                added = info.get("entries-added")
                length = int(info.get("length", 0))
                gaps[camera] = int(added) > length if added is not None else length >= self._added_log_len
            else:
                # Trimming (unlike XDEL) leaves no record of what it removed; the oldest entry
                # left being newer than the last one read is the sign. It errs towards a
                # catch-up: when exactly the cursor's own entry went, nothing was lost.
                gaps[camera] = _stream_id(first[0]) > cursor
        return gaps

    async def get_chunks(self, refs: Sequence[tuple[str, int]]) -> list[tuple[ChunkMeta, bytes]]:
        """Metadata and payload of each (camera, chunk_id), in the given order; missing ones skipped."""
        if not refs:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for camera, chunk_id in refs:
                pipe.hmget(self.keys.chunk(camera, chunk_id), ["meta", "payload"])
            rows = await _execute_reads(pipe)
        return [(ChunkMeta.from_json(meta), payload) for meta, payload in _complete(rows)]

    async def get_vectors(self, camera: str, chunk_ids: Sequence[int]) -> list[tuple[ChunkMeta, np.ndarray]]:
        """Metadata and float32 vector [D] of chunks of one camera; missing ones skipped."""
        out: list[tuple[ChunkMeta, np.ndarray]] = []
        for start in range(0, len(chunk_ids), BATCH_IDS):
            async with self._redis.pipeline(transaction=False) as pipe:
                for chunk_id in chunk_ids[start : start + BATCH_IDS]:
                    pipe.hmget(self.keys.chunk(camera, chunk_id), ["meta", "vec"])
                rows = await _execute_reads(pipe)
            out.extend(
                (ChunkMeta.from_json(meta), np.frombuffer(vec, dtype=np.float32)) for meta, vec in _complete(rows)
            )
        return out

    async def _metas(self, camera: str, chunk_ids: Iterable[bytes | str | int]) -> list[ChunkMeta]:
        ids = list(chunk_ids)
        metas: list[ChunkMeta] = []
        for start in range(0, len(ids), BATCH_IDS):
            async with self._redis.pipeline(transaction=False) as pipe:
                for chunk_id in ids[start : start + BATCH_IDS]:
                    raw = chunk_id.decode() if isinstance(chunk_id, bytes) else chunk_id
                    pipe.hget(self.keys.chunk(camera, int(raw)), "meta")
                rows = await _execute_reads(pipe)
            metas.extend(ChunkMeta.from_json(row) for row in rows if row is not None)
        return metas

    async def timeline(self, camera: str) -> tuple[np.ndarray, np.ndarray]:
        """All chunk ids of ``camera`` in start order: (ids [K] int64, start_s [K] float64)."""
        key = self.keys.timeline(check_camera(camera))
        ids: list[int] = []
        starts: list[float] = []
        offset = 0
        while True:
            page: list[tuple[bytes, float]] = await self._redis.zrange(
                key, offset, offset + BATCH_IDS - 1, withscores=True
            )
            ids.extend(int(member) for member, _ in page)
            starts.extend(score / MS_PER_S for _, score in page)
            if len(page) < BATCH_IDS:
                break
            offset += BATCH_IDS
        return np.asarray(ids, dtype=np.int64), np.asarray(starts, dtype=np.float64)

    async def chunks_in_range(
        self, camera: str, after_s: float | None, before_s: float | None, limit: int | None = None
    ) -> list[ChunkMeta]:
        """Chunks of ``camera`` overlapping [after_s, before_s) in start order (None: unbounded).

        A chunk overlaps when ``start_s < before_s`` and ``end_s > after_s``. ``limit`` keeps the
        earliest ones.
        """
        key = self.keys.timeline(check_camera(camera))
        low: float | str = "-inf" if after_s is None else _ms(after_s - await self._max_span_s(camera))
        high: float | str = "+inf" if before_s is None else f"({_ms(before_s)}"
        ids = await self._redis.zrangebyscore(key, low, high)
        metas: list[ChunkMeta] = []
        for start in range(0, len(ids), BATCH_IDS):
            for meta in await self._metas(camera, ids[start : start + BATCH_IDS]):
                if after_s is not None and meta.end_s <= after_s:
                    continue
                if before_s is not None and meta.start_s >= before_s:
                    continue
                metas.append(meta)
                if limit is not None and len(metas) >= limit:
                    return metas
        return metas

    async def latest_chunks(self, camera: str, n: int) -> list[ChunkMeta]:
        """The ``n`` most recent chunks of ``camera``, oldest first."""
        if n <= 0:
            return []
        ids = await self._redis.zrange(self.keys.timeline(check_camera(camera)), -n, -1)
        return await self._metas(camera, ids)

    async def outages(
        self,
        cameras: Iterable[str] | None = None,
        after_s: float | None = None,
        before_s: float | None = None,
    ) -> list[Outage]:
        """Outages overlapping [after_s, before_s) of ``cameras`` (None: all), ordered by start."""
        names = await self.cameras() if cameras is None else [check_camera(c) for c in cameras]
        records: list[Outage] = []
        for camera in names:
            raw: dict[Any, Any] = await self._redis.hgetall(self.keys.outages(camera))
            for value in raw.values():
                rec = Outage.from_json(value)
                if before_s is not None and rec.start_s >= before_s:
                    continue
                if after_s is not None and rec.end_s is not None and rec.end_s <= after_s:
                    continue
                records.append(rec)
        return sorted(records, key=lambda r: (r.start_s, r.camera))

    async def _max_span_s(self, camera: str) -> float:
        """How far before a window a chunk overlapping it may start: the longest chunk of ``camera``."""
        raw = await self._redis.get(self.keys.max_span(camera))
        return max(MAX_CHUNK_SPAN_S, int(raw) / MS_PER_S) if raw is not None and raw.isdigit() else MAX_CHUNK_SPAN_S

    # ------------------------------------------------------------------ consolidation and budgets

    async def swap_chunks(
        self, meta: ChunkMeta, payload: bytes, vector: np.ndarray, member_ids: Sequence[int]
    ) -> SwapResult:
        """Replace the chunks ``member_ids`` of ``meta.camera`` by their consolidation, atomically.

        One Lua script (``_SWAP_LUA``): the merge is written, indexed in the timeline and logged in
        the ``added`` stream with the removed ids, the members deleted and the usage counters
        moved, all or nothing.
        Idempotent: a retry after the swap returns "already"; a member already gone returns
        "refused" and writes nothing. Unlike ``put_chunk`` it is not buffered while Redis is away
        (REDIS_AWAY_ERRORS propagate): the members stay, at full resolution, for the next round.
        """
        vec = _check_chunk(meta, payload, vector)  # [D] float32
        if meta.tier < 1:
            raise ValueError("a consolidation must have tier >= 1")
        ids = [int(i) for i in member_ids]
        if not ids or len(set(ids)) != len(ids) or meta.chunk_id in ids:
            raise ValueError("member_ids must be distinct chunk ids other than the merge's own")
        camera = meta.camera
        keys = [
            self.keys.timeline(camera),
            self.keys.added(camera),
            self.keys.max_span(camera),
            self.keys.usage(camera),
            self.keys.chunk(camera, meta.chunk_id),
            *(self.keys.chunk(camera, i) for i in ids),
        ]
        args: list[str | int | bytes] = [
            str(meta.chunk_id),
            _ms(meta.start_s),
            meta.to_json(),
            bytes(payload),
            vec.tobytes(),
            self._added_log_len,
            _ms(meta.end_s - meta.start_s),
            meta.tier,
            *(str(i) for i in ids),
        ]
        result = await self._redis.eval(_SWAP_LUA, len(keys), *keys, *args)
        return _SWAP_RESULTS[int(result)]

    async def delete_chunks(self, camera: str, chunk_ids: Sequence[int]) -> int:
        """Delete chunks of ``camera`` (size budgets); logged in ``added`` so followers drop them too.

        Hashes, timeline entries, the log entry and the usage counters change in one script per
        batch (``_DELETE_LUA``). Returns how many existed.
        """
        check_camera(camera)
        deleted = 0
        ids = [int(i) for i in chunk_ids]
        for start in range(0, len(ids), BATCH_IDS):
            deleted += await self._delete(camera, ids[start : start + BATCH_IDS], log=True)
        return deleted

    async def _delete(self, camera: str, ids: Sequence[int | bytes], *, log: bool) -> int:
        """One batch of ``_DELETE_LUA``: delete these chunks and their counts; True ``log``: in ``added``."""
        members = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
        keys = [
            self.keys.timeline(camera),
            self.keys.added(camera),
            self.keys.usage(camera),
            *(self.keys.chunk(camera, int(i)) for i in members),
        ]
        result = await self._redis.eval(
            _DELETE_LUA, len(keys), *keys, self._added_log_len, "1" if log else "0", *members
        )
        return int(result)

    async def chunk_sizes(self, camera: str) -> list[tuple[ChunkMeta, int]]:
        """Every chunk of ``camera`` in start order with its stored bytes (payload + vector + metadata).

        Redis's own per-key overhead (tens of bytes) is not counted: the figure is what vigil
        writes, so budgets are comparable across Redis versions and encodings.
        """
        ids, _ = await self.timeline(camera)
        out: list[tuple[ChunkMeta, int]] = []
        for start in range(0, len(ids), BATCH_IDS):
            async with self._redis.pipeline(transaction=False) as pipe:
                for chunk_id in ids[start : start + BATCH_IDS]:
                    chunk_key = self.keys.chunk(camera, int(chunk_id))
                    pipe.hget(chunk_key, "meta")
                    pipe.hstrlen(chunk_key, "payload")
                    pipe.hstrlen(chunk_key, "vec")
                rows = await _execute_reads(pipe)
            for meta, payload_len, vec_len in zip(rows[0::3], rows[1::3], rows[2::3], strict=True):
                if meta is not None:
                    out.append((ChunkMeta.from_json(meta), len(meta) + int(payload_len or 0) + int(vec_len or 0)))
        return out

    async def usage(self, cameras: Iterable[str] | None = None) -> dict[str, CameraUsage]:
        """Each camera's chunks and bytes per tier from its usage counters: one read per camera.

        Cheap enough for every status publication. A camera whose counters are missing or
        incomplete (memory from before the counters existed) has ``complete`` False until
        ``rebuild_usage`` runs.
        """
        names = await self.cameras() if cameras is None else [check_camera(c) for c in cameras]
        if not names:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for camera in names:
                pipe.hgetall(self.keys.usage(camera))
            rows = await _execute_reads(pipe)
        return {camera: CameraUsage.from_hash(camera, row or {}) for camera, row in zip(names, rows, strict=True)}

    async def rebuild_usage(self, camera: str) -> CameraUsage | None:
        """Recount ``camera``'s usage from a scan (``chunk_sizes``) and store it as complete.

        The counters key is WATCHed over the scan: every chunk write, swap and deletion changes it,
        so a write during the scan aborts the store and the scan runs again (up to
        ``USAGE_REBUILD_TRIES`` times). Returns the stored usage, or None when writes kept
        interfering (the counters stay incomplete; the next start tries again).
        """
        key = self.keys.usage(check_camera(camera))
        for _ in range(USAGE_REBUILD_TRIES):
            async with self._redis.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                scanned = CameraUsage.from_sizes(camera, await self.chunk_sizes(camera))
                fields: dict[str, int] = {"complete": 1}
                for tier, row in scanned.tiers.items():
                    fields[f"chunks:{tier}"] = row.chunks
                    fields[f"bytes:{tier}"] = row.bytes
                pipe.multi()
                pipe.delete(key)
                pipe.hset(key, mapping=fields)
                try:
                    await pipe.execute()
                except redis_errors.WatchError:
                    continue
            return scanned
        logger.warning("usage counters of camera %s not rebuilt: writes kept changing them mid-scan", camera)
        return None

    async def ensure_usage(self) -> list[str]:
        """Rebuild the counters of every camera whose counters are incomplete; returns those cameras."""
        rebuilt = [camera for camera, usage in (await self.usage()).items() if not usage.complete]
        for camera in rebuilt:
            got = await self.rebuild_usage(camera)
            if got is not None:
                logger.info(
                    "usage counters of camera %s rebuilt from a scan: %d chunks, %d bytes",
                    camera,
                    got.total.chunks,
                    got.total.bytes,
                )
        return rebuilt

    # ------------------------------------------------------------------ retention

    async def apply_retention(self, camera: str, max_age_s: float, now_s: float) -> int:
        """Delete chunks of ``camera`` that started more than ``max_age_s`` before ``now_s``.

        Also deletes outages that ended before that cutoff. Returns the number of chunks deleted.
        Each batch deletes chunk hashes, timeline entries and their usage counts in one script, so
        an interrupted pass leaves no timeline entry without its chunk, or counters that disagree.
        """
        key = self.keys.timeline(check_camera(camera))
        cutoff_s = now_s - max_age_s
        deleted = 0
        while True:
            ids = await self._redis.zrangebyscore(key, "-inf", f"({_ms(cutoff_s)}", start=0, num=BATCH_IDS)
            if not ids:
                break
            await self._delete(camera, ids, log=False)
            deleted += len(ids)
        outage_key = self.keys.outages(camera)
        stale = [
            field
            for field, value in (await self._redis.hgetall(outage_key)).items()
            if (end_s := Outage.from_json(value).end_s) is not None and end_s < cutoff_s
        ]
        if stale:
            await self._redis.hdel(outage_key, *stale)
        if deleted or stale:
            logger.info(
                "retention %s: deleted %d chunks and %d outages older than %.0f s",
                camera,
                deleted,
                len(stale),
                max_age_s,
            )
        return deleted

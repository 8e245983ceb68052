"""Prometheus metrics and health over HTTP: ``/metrics`` and ``/healthz`` (docs/metrics.md).

Counters are not counted twice: a custom collector reads, at scrape time, the counters the daemon
already keeps (camera workers, ``IngestService``, ``MemoryStore``, ``MqttApi``). Only durations,
which nothing else keeps as distributions, are observed into histograms where the work happens
(the ingest timing hook, the wrapped answer callable). The registry belongs to the daemon, never
the process-wide default: two daemons in one test process do not share numbers.

Names follow the Prometheus conventions: one ``vigil_`` prefix, base units in the name
(``_seconds``), ``_total`` on counters; labels are camera and watch names (and the memory tier)
only, never question text.

The HTTP side is a minimal HTTP/1.1 responder on the event loop (GET and HEAD of two paths), so a
scrape reads the counters on the loop thread that changes them. Requests are hostile: a line or
header block over the limits, or one that does not arrive in time, closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from memory.aio import wait_set

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from memory.store import CameraUsage, MemoryStore
    from retrieval.answer import Answer, Question
    from streamer.camera import CameraStatus
    from streamer.ingest import IngestService
    from streamer.settings import MetricsSettings
    from streamer.watch_service import WatchCounts

log = logging.getLogger(__name__)

# Encoding a chunk takes from tens of ms (tiny models) to tens of seconds (real shapes on a CPU).
ENCODE_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COMPRESS_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Answers: a second or two on a GPU, up to generation_timeout_s (90 s by default) on a CPU.
# A chunk's checks (all its camera's watches, one model call): tens of ms (tiny models) to seconds.
WATCH_CHECK_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUESTION_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0)
REQUEST_TIMEOUT_S = 5.0  # a client has this long to send its request line and headers
MAX_LINE_BYTES = 8192  # longest request or header line
MAX_HEADER_LINES = 64
BIND_RETRY_S = 30.0  # a port in use is logged and tried again this often; the daemon goes on
# MqttApi counters → help text; each becomes vigil_mqtt_<name>_total.
MQTT_COUNTERS = {
    "requests": "Question requests received.",
    "answered": "Questions answered.",
    "errors": "Error replies sent.",
    "unanswerable": "Requests without a reply address (dropped).",
    "bad_reply_topic": "Requests whose reply address was refused.",
    "rate_limited": "Requests refused by the per-client rate limit.",
    "errors_dropped": "Error replies dropped because too many were pending.",
    "replies_failed": "Replies that could not be published.",
    "replies_queued": "Replies queued for after a reconnect.",
    "outbox_dropped": "Queued replies dropped because the outbox was full.",
    "inbox_dropped": "Incoming messages dropped because the inbox was full.",
    "connects": "Connections made to the broker.",
    "watch_sets": "Watch changes received (add, change, remove).",
    "watch_sets_dropped": "Watch changes refused because too many were pending.",
}


class CameraSource(Protocol):
    """The part of ``CameraWorker`` the collector reads."""

    name: str

    def status(self) -> CameraStatus: ...

    def frame_totals(self) -> tuple[int, int]: ...


class MqttSource(Protocol):
    """The part of ``MqttApi`` the collector reads."""

    counters: dict[str, int]

    @property
    def connected(self) -> bool: ...


class WatchSource(Protocol):
    """The part of ``WatchService`` the collector reads: (watch, camera) → counters."""

    def counts(self) -> dict[tuple[str, str], WatchCounts]: ...


class DaemonCollector(Collector):
    """Reads the daemon's own counters at scrape time (no second count to drift from the first)."""

    def __init__(
        self,
        *,
        workers: Sequence[CameraSource],
        ingest: IngestService,
        store: MemoryStore,
        api: MqttSource,
        healthy: Callable[[], bool],
        watches: WatchSource | None = None,
        usage: Callable[[], Mapping[str, CameraUsage] | None] = lambda: None,
    ) -> None:
        self._watches = watches
        self._workers = workers
        self._ingest = ingest
        self._store = store
        self._api = api
        self._healthy = healthy
        self._usage = usage  # the store's usage counters as last read (a scrape does no Redis I/O)

    def collect(self) -> Iterable[Metric]:
        yield from self._cameras()
        yield from self._chunks()
        if self._watches is not None:
            yield from self._watch_counts(self._watches)
        yield from self._memory()
        store = self._store
        yield GaugeMetricFamily(
            "vigil_redis_pending_writes", "Writes waiting in the retry buffer while Redis is away.", store.pending
        )
        yield CounterMetricFamily("vigil_redis_writes", "Writes that reached Redis.", store.stats.written)
        yield CounterMetricFamily(
            "vigil_redis_writes_dropped", "Buffered writes lost because the buffer was full.", store.stats.dropped
        )
        yield GaugeMetricFamily(
            "vigil_encoder_queue_chunks", "Chunks waiting for the batch encoder.", self._ingest.stats.encoding_chunks
        )
        counters = self._api.counters
        for name, text in MQTT_COUNTERS.items():
            yield CounterMetricFamily(f"vigil_mqtt_{name}", text, counters.get(name, 0))
        yield GaugeMetricFamily("vigil_mqtt_connected", "1 while connected to the broker.", int(self._api.connected))
        yield GaugeMetricFamily("vigil_healthy", "1 when the status health is ok, 0 when degraded.", self._healthy())

    def _cameras(self) -> Iterable[Metric]:
        decoded = CounterMetricFamily("vigil_camera_frames_decoded", "Frames decoded.", labels=["camera"])
        sampled = CounterMetricFamily("vigil_camera_frames_sampled", "Frames sampled for memory.", labels=["camera"])
        dropped = CounterMetricFamily(
            "vigil_camera_frames_dropped", "Sampled frames dropped because ingest fell behind.", labels=["camera"]
        )
        reconnects = CounterMetricFamily("vigil_camera_reconnects", "Reconnects of the source.", labels=["camera"])
        up = GaugeMetricFamily("vigil_camera_connected", "1 while the source is connected.", labels=["camera"])
        age = GaugeMetricFamily(
            "vigil_camera_last_frame_age_seconds", "Seconds since the last decoded frame.", labels=["camera"]
        )
        for worker in self._workers:
            status = worker.status()
            n_decoded, n_sampled = worker.frame_totals()
            decoded.add_metric([worker.name], n_decoded)
            sampled.add_metric([worker.name], n_sampled)
            dropped.add_metric([worker.name], status.frames_dropped)
            reconnects.add_metric([worker.name], status.reconnects)
            up.add_metric([worker.name], int(status.state == "connected"))
            if status.last_frame_age_s is not None:
                age.add_metric([worker.name], status.last_frame_age_s)
        yield from (decoded, sampled, dropped, reconnects, up, age)

    def _chunks(self) -> Iterable[Metric]:
        stored = CounterMetricFamily("vigil_chunks_stored", "Chunks stored (or buffered for Redis).", labels=["camera"])
        failed = CounterMetricFamily("vigil_chunks_failed", "Chunks that could not be stored.", labels=["camera"])
        frames = CounterMetricFamily("vigil_chunk_frames", "Sampled frames in stored chunks.", labels=["camera"])
        for camera, counts in self._ingest.camera_counts().items():
            stored.add_metric([camera], counts.chunks)
            failed.add_metric([camera], counts.failed_chunks)
            frames.add_metric([camera], counts.frames)
        yield from (stored, failed, frames)


    @staticmethod
    def _watch_counts(watches: WatchSource) -> Iterable[Metric]:
        labels = ["watch", "camera"]
        checks = CounterMetricFamily("vigil_watch_checks", "Chunks checked against a watch.", labels=labels)
        dropped = CounterMetricFamily(
            "vigil_watch_checks_dropped", "Checks dropped because the check queue was full.", labels=labels
        )
        events = CounterMetricFamily("vigil_watch_events", "Events a watch raised.", labels=labels)
        for (watch, camera), counts in sorted(watches.counts().items()):
            checks.add_metric([watch, camera], counts.checks)
            dropped.add_metric([watch, camera], counts.dropped)
            events.add_metric([watch, camera], counts.events)
        yield from (checks, dropped, events)

    def _memory(self) -> Iterable[Metric]:
        nbytes = GaugeMetricFamily(
            "vigil_memory_bytes",
            "Bytes of memory stored (metadata, payload and vector) per consolidation tier.",
            labels=["camera", "tier"],
        )
        chunks = GaugeMetricFamily(
            "vigil_memory_chunks", "Chunks stored per consolidation tier.", labels=["camera", "tier"]
        )
        for camera, usage in (self._usage() or {}).items():
            if not usage.complete:  # not yet recounted: no number rather than one too small
                continue
            for tier, row in usage.tiers.items():
                nbytes.add_metric([camera, str(tier)], row.bytes)
                chunks.add_metric([camera, str(tier)], row.chunks)
        yield from (nbytes, chunks)


AnswerFn = Callable[["Question", Callable[[str], Awaitable[None]] | None], Awaitable["Answer"]]


class Metrics:
    """The daemon's registry: the collector above plus the duration histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.encode_seconds = Histogram(
            "vigil_encode_seconds",
            "Time a chunk spent in the batch encoder (waiting for its batch included).",
            ["camera"],
            buckets=ENCODE_BUCKETS_S,
            registry=self.registry,
        )
        self.compress_seconds = Histogram(
            "vigil_compress_seconds",
            "Time to compress and serialise a chunk's tokens.",
            ["camera"],
            buckets=COMPRESS_BUCKETS_S,
            registry=self.registry,
        )
        self.question_seconds = Histogram(
            "vigil_question_seconds",
            "Time from a question to its complete answer.",
            buckets=QUESTION_BUCKETS_S,
            registry=self.registry,
        )
        self.first_token_seconds = Histogram(
            "vigil_question_first_token_seconds",
            "Time from a question to the first generated token of its answer.",
            buckets=QUESTION_BUCKETS_S,
            registry=self.registry,
        )

        self.watch_check_seconds = Histogram(
            "vigil_watch_check_seconds",
            "Time to check a chunk against every watch of its camera (one model call).",
            ["camera"],
            buckets=WATCH_CHECK_BUCKETS_S,
            registry=self.registry,
        )

    def collect_from(self, collector: Collector) -> None:
        self.registry.register(collector)

    def on_timing(self, stage: str, camera: str, seconds: float) -> None:
        """``IngestService``'s timing hook."""
        if stage == "encode":
            self.encode_seconds.labels(camera).observe(seconds)
        elif stage == "compress":
            self.compress_seconds.labels(camera).observe(seconds)

    def on_watch_check(self, camera: str, seconds: float) -> None:
        """``WatchService``'s timing hook."""
        self.watch_check_seconds.labels(camera).observe(seconds)

    def timed(self, answer: AnswerFn) -> AnswerFn:
        """``answer`` that records each answer's latency and time to first token."""

        async def timed_answer(question: Question, on_delta: Callable[[str], Awaitable[None]] | None) -> Answer:
            result = await answer(question, on_delta)
            if "total" in result.timing_ms:
                self.question_seconds.observe(result.timing_ms["total"] / 1000.0)
            if "first_token" in result.timing_ms:
                self.first_token_seconds.observe(result.timing_ms["first_token"] / 1000.0)
            return result

        return timed_answer

    def exposition(self) -> bytes:
        """The text format of every metric now."""
        return generate_latest(self.registry)


class MetricsServer:
    """``/metrics`` and ``/healthz`` until the stop event; ``health`` gives the status JSON body."""

    def __init__(self, settings: MetricsSettings, metrics: Metrics, health: Callable[[], dict[str, Any]]) -> None:
        self._settings = settings
        self._metrics = metrics
        self._health = health
        self.port: int | None = None  # the bound port once listening

    async def run(self, stop: asyncio.Event) -> None:
        host, port = self._settings.host, self._settings.port
        while not stop.is_set():
            try:
                server = await asyncio.start_server(self._handle, host, port, limit=MAX_LINE_BYTES)
            except OSError as exc:  # the port is taken or the address is not ours: metrics wait, memory goes on
                log.error("metrics: cannot listen on %s:%d (%s); trying again in %.0f s", host, port, exc, BIND_RETRY_S)
                await wait_set(stop, BIND_RETRY_S)
                continue
            self.port = server.sockets[0].getsockname()[1]
            log.info("metrics on http://%s:%d/metrics and /healthz", host, self.port)
            async with server:
                while not await wait_set(stop, 1.0):
                    pass
            return

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                line = await reader.readline()
                for _ in range(MAX_HEADER_LINES):
                    header = await reader.readline()
                    if header in (b"\r\n", b"\n", b""):
                        break
                else:
                    raise ValueError("too many header lines")
            status, content_type, body, head = self._route(line)
            writer.write(
                (
                    f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode("ascii")
                + (b"" if head else body)
            )
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError) as exc:  # ValueError: a line over the limit
            log.debug("metrics: request dropped (%s)", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _route(self, line: bytes) -> tuple[str, str, bytes, bool]:
        """Request line → (status, content type, body, whether HEAD)."""
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", "text/plain", b"bad request\n", False
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET or HEAD only\n", False
        head = method == "HEAD"
        if target == "/metrics":
            # Text format 0.0.4, which every Prometheus reads (Debian 12's 2.42 included); every
            # name here is a classic one, so the output is the same as in format 1.0.0.
            return "200 OK", CONTENT_TYPE_PLAIN_0_0_4, self._metrics.exposition(), head
        if target == "/healthz":
            return "200 OK", "application/json", json.dumps(self._health()).encode(), head
        return "404 Not Found", "text/plain", b"/metrics or /healthz\n", head

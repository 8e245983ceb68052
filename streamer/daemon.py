"""``vigil serve``: cameras → ingest → memory, and the question service, in one TaskGroup.

Lifecycle (uvicorn-style):

* start-up: the resources (models, Redis, index, encoder: streamer/resources.py), then the tasks.
  Fresh camera states (``connecting``) and the daemon status are handed to the MQTT API before its
  task starts, so the first thing a (re)started daemon publishes replaces what a crashed run left
  retained. ``READY=1`` goes to systemd once the resources are up and the first broker attempt is
  done or ``BROKER_READY_WAIT_S`` passed: a broker that is down delays nothing (cameras record,
  chunks are stored) and the ``STATUS=`` text says it is unreachable until it connects.
* serve, until the first SIGTERM/SIGINT.
* staged shutdown: stop the cameras (each flushes its partial chunk), store every chunk already
  sampled, publish the final states, then stop the background tasks and the API (``offline``);
  the resources close last and save the index. Exit 0. A second signal exits at once (130).

Every long-lived task returns on its stop event. An unexpected exception in any task ends the
TaskGroup: the other tasks are cancelled, the resources still close (the index is saved) and the
exception propagates, so the process exits non-zero and systemd restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import time
from collections.abc import Coroutine, Mapping
from enum import Enum
from typing import Any
from zoneinfo import ZoneInfo

import redis.exceptions
import transformers

from memory.aio import wait_set
from memory.events import EventStore
from memory.store import MemoryStore
from memory.watches import WatchStore
from retrieval.answer import FRESH_WITHIN_S, Answerer, exact_prompt_length, text_token_counter
from retrieval.search import Retriever
from streamer.camera import CameraStatus, CameraWorker
from streamer.compaction import compactor_for
from streamer.frames import Chunk
from streamer.health import Health, UsageReader, assess, status_payload
from streamer.ingest import IngestService
from streamer.maintenance import Maintenance
from streamer.metrics import DaemonCollector, Metrics, MetricsServer
from streamer.mqtt_api import MqttApi
from streamer.notify import Notifier
from streamer.redact import redact_url
from streamer.resources import open_resources
from streamer.settings import Settings, load_settings
from streamer.timefmt import iso_time
from streamer.watch_service import WatchService
from streamer.watches import watched_cameras
from vlm.models import ModelNotFoundError

logger = logging.getLogger(__name__)

CHUNK_QUEUE_SIZE = 4  # chunks waiting per camera; when full the camera's frame queue absorbs (and counts) drops
STATUS_INTERVAL_S = 10.0  # camera states and the status are re-published this often (rates and ages move)
HEALTH_CHECK_S = 1.0  # how often health and the broker connection are looked at; changes go out at once
# READY=1 waits this long for the first broker connection, so that a normal start reports a
# connected broker; a broker that is down must not hold readiness (cameras record without it).
BROKER_READY_WAIT_S = 3.0
FINAL_PUBLISH_S = 5.0  # the last camera states and status at a clean stop
EXIT_FORCED = 130


def camera_state_payload(status: CameraStatus, *, now_s: float, tz: ZoneInfo) -> dict[str, Any]:
    """CameraStatus → JSON-ready dict for the retained state topic, stamped with its publication time."""
    payload = dataclasses.asdict(status)
    body = {key: (value.value if isinstance(value, Enum) else value) for key, value in payload.items()}
    body["published_at"] = iso_time(now_s, tz)
    return body


async def _feed(queue: asyncio.Queue[Chunk | None], ingest: IngestService) -> None:
    """Store a camera's chunks in order until the end-of-stream marker (None)."""
    while (chunk := await queue.get()) is not None:
        await ingest.ingest(chunk)


class StatusReporter:
    """Camera states and the daemon's health and counters, on MQTT (retained) and for systemd."""

    def __init__(
        self,
        api: MqttApi,
        *,
        ingest: IngestService,
        store: MemoryStore,
        workers: list[CameraWorker],
        notifier: Notifier,
        tz: ZoneInfo,
        broker: str,
        watches: WatchService | None = None,
    ) -> None:
        self._watches = watches
        self._api = api
        self._ingest = ingest
        self._store = store
        self._workers = workers  # filled by the caller after construction (workers report through us)
        self._notifier = notifier
        self._tz = tz
        self._broker = broker
        self._health = Health("ok", None)
        self._said: str | None = None  # the last STATUS= text sent
        self.usage = UsageReader(store)  # memory per camera and tier, read before each status

    def health(self) -> Health:
        return assess(self._ingest.failing(), self._store.pending, self._store.stats.dropped)

    def systemd_status(self) -> str:
        """The ``STATUS=`` text: what is served, the broker's state and the health."""
        broker = "MQTT connected" if self._api.connected else f"MQTT broker {self._broker} unreachable, retrying"
        text = f"serving {len(self._workers)} camera(s); {broker}"
        if self._health.reason:
            text += f"; degraded: {self._health.reason}"
        return text

    async def publish_camera(self, status: CameraStatus) -> None:
        payload = camera_state_payload(status, now_s=time.time(), tz=self._tz)
        await self._api.publish_camera_state(status.camera, payload)

    async def publish(self) -> None:
        """Every camera's state and the status, now."""
        for worker in self._workers:
            await self.publish_camera(worker.status())
        await self.publish_status()

    def status_body(self) -> dict[str, Any]:
        """The JSON of ``{prefix}/status`` (and of ``/healthz``), with the health as last assessed."""
        s = self._ingest.stats
        body = status_payload(
            self._health,
            s,
            self._store.stats,
            self._store.pending,
            now_s=time.time(),
            tz=self._tz,
            memory=self.usage.latest,
        )
        if self._watches is not None:
            body["watches"] = self._watches.status()
        return body

    async def publish_status(self) -> None:
        await self.usage.refresh()
        await self._api.publish_status(self.status_body())

    def notify_systemd(self, *, ready: bool = False) -> None:
        text = self.systemd_status()
        if ready:
            self._notifier.ready(text)
        elif text != self._said:
            self._notifier.status(text)
        self._said = text

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: re-publish every STATUS_INTERVAL_S; publish a health change at once."""
        last_published = time.monotonic()
        while not stop.is_set():
            await wait_set(stop, HEALTH_CHECK_S)
            health = self.health()
            # A change of what is wrong, not of its numbers (pending writes grow every second).
            changed = health.causes != self._health.causes
            if changed:
                if health.reason:
                    logger.warning("health degraded: %s", health.reason)
                else:
                    logger.info("health ok again")
            self._health = health
            if self._said is not None:  # READY was sent: keep systemctl status current
                self.notify_systemd()
            if changed or time.monotonic() - last_published >= STATUS_INTERVAL_S:
                last_published = time.monotonic()
                await self.publish()


async def _announce_ready(api_ready: asyncio.Event, stop: asyncio.Event, reporter: StatusReporter) -> None:
    """READY=1 after the first broker connection, or BROKER_READY_WAIT_S, or stop; whichever is first."""
    waits = [asyncio.ensure_future(api_ready.wait()), asyncio.ensure_future(stop.wait())]
    try:
        await asyncio.wait(waits, timeout=BROKER_READY_WAIT_S, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    reporter.notify_systemd(ready=True)
    logger.info("ready: %s", reporter.systemd_status())


def _report_failure(task: asyncio.Task[None]) -> None:
    """Done callback of every daemon task: an exception is logged with the task's name."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.critical("task %s failed: the daemon stops", task.get_name(), exc_info=exc)


async def run_daemon(settings: Settings, stop: asyncio.Event, *, notifier: Notifier | None = None) -> None:
    """Run until ``stop`` is set, then shut down in stages. Raises on unexpected failures."""
    notifier = notifier or Notifier()
    notifier.status("loading models and memory")
    tz = settings.tz
    async with contextlib.AsyncExitStack() as stack:
        res = await stack.enter_async_context(open_resources(settings))
        if stop.is_set():
            logger.info("stop requested during start-up: not serving")
            return
        retrieval = settings.retrieval
        retriever = Retriever(
            res.embedder,
            res.store,
            res.index.index,
            top_k=retrieval.top_k,
            recent_chunks=retrieval.recent_chunks,
            max_chunks=retrieval.max_prompt_chunks,
        )
        answerer = Answerer(
            res.vlm,
            retriever,
            tz=tz,
            max_new_tokens=settings.models.max_new_tokens,
            generation_timeout_s=settings.models.generation_timeout_s,
            # A healthy camera's newest chunk is up to a chunk (plus encoding) old.
            fresh_within_s=max([FRESH_WITHIN_S, *(3 * cam.chunk_s for cam in settings.cameras.values())]),
            max_prompt_tokens=settings.answer.max_prompt_tokens,
            count_text=text_token_counter(res.vlm),
            prompt_length=functools.partial(exact_prompt_length, res.vlm),
        )
        stack.callback(answerer.close)
        metrics = Metrics()
        ingest = IngestService(
            encoder=res.encoder,
            store=res.store,
            index=res.index,
            compression=settings.compression,
            on_timing=metrics.on_timing,
        )
        stack.callback(ingest.log_summary)
        events = EventStore(res.redis, key_prefix=settings.redis.key_prefix)
        maintenance = Maintenance(
            res.store,
            res.index,
            {name: cam.retention_days for name, cam in settings.cameras.items()},
            compactor=compactor_for(settings, res.store, res.index),
            events=events,
        )
        configured = set(settings.cameras)

        def known_cameras() -> list[str]:
            # A camera that exists only through `vigil import` can be named in questions too.
            return sorted(configured | set(res.index.index.cameras()))

        api = MqttApi(
            settings.mqtt,
            tz=tz,
            cameras=known_cameras,
            answer=metrics.timed(answerer.answer),
            events=events,
            discovery=settings.discovery,
            # Home Assistant gets one binary_sensor and one event entity per watch in force.
            watches=lambda: {
                name: watched_cameras(w.settings, list(settings.cameras)) for name, w in watches.watches.items()
            },
        )
        watches = WatchService(
            vlm=res.vlm,
            events=events,
            store=WatchStore(res.redis, key_prefix=settings.redis.key_prefix),
            publisher=api,
            topics=api.topics,
            tz=tz,
            cameras=sorted(settings.cameras),
            on_check_seconds=metrics.on_watch_check,
        )
        stack.callback(watches.close)

        async def announce_watches(_: Mapping[str, object]) -> None:
            await api.publish_discovery()

        # Before the API connects: the watches' retained topics go out with the first connection.
        await watches.load(settings.watches)
        watches.on_change(announce_watches)
        api.serve_watches(watches)
        ingest.on_stored = watches.submit

        cameras = {name: cam for name, cam in settings.cameras.items() if cam.enabled}
        queues: dict[str, asyncio.Queue[Chunk | None]] = {
            name: asyncio.Queue(maxsize=CHUNK_QUEUE_SIZE) for name in cameras
        }
        workers: list[CameraWorker] = []
        broker = f"{settings.mqtt.host}:{settings.mqtt.port}"
        reporter = StatusReporter(
            api,
            ingest=ingest,
            store=res.store,
            workers=workers,
            notifier=notifier,
            tz=tz,
            broker=broker,
            watches=watches,
        )
        for name, cam in cameras.items():
            workers.append(
                CameraWorker(
                    name,
                    cam,
                    tz=tz,
                    on_chunk=queues[name].put,
                    on_outage=ingest.record_outage,
                    on_state=reporter.publish_camera,
                )
            )
        metrics.collect_from(
            DaemonCollector(
                workers=workers,
                ingest=ingest,
                store=res.store,
                api=api,
                healthy=lambda: reporter.health().state == "ok",
                watches=watches,
                usage=lambda: reporter.usage.latest,
            )
        )
        # Before the API connects: these replace, first thing, what a crashed run left retained.
        for worker in workers:
            await reporter.publish_camera(dataclasses.replace(worker.status(), state="connecting"))
        await reporter.publish_status()

        api_stop, api_ready = asyncio.Event(), asyncio.Event()
        cameras_stop, background_stop, watches_stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            names: list[str] = []

            def spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
                task = tg.create_task(coro, name=name)
                task.add_done_callback(_report_failure)
                names.append(name)
                return task

            spawn(api.run(api_stop, api_ready), "mqtt")
            spawn(notifier.run_watchdog(background_stop), "watchdog")
            spawn(maintenance.run(background_stop), "maintenance")
            spawn(res.store.run_retry_loop(background_stop), "store:retry")
            spawn(res.index.follow(res.store, background_stop), "index:follow")
            camera_tasks = [spawn(w.run(cameras_stop), f"camera:{w.name}") for w in workers]
            feed_tasks = [spawn(_feed(queues[name], ingest), f"ingest:{name}") for name in cameras]
            spawn(reporter.run(background_stop), "status")
            watch_task = spawn(watches.run(watches_stop), "watches")
            if settings.metrics.enabled:
                server = MetricsServer(settings.metrics, metrics, reporter.status_body)
                spawn(server.run(background_stop), "metrics")
            logger.info("tasks: %s", ", ".join(names))
            await _announce_ready(api_ready, stop, reporter)

            await stop.wait()
            logger.info("stopping: cameras first, then storing the chunks already sampled")
            notifier.stopping("storing sampled chunks")
            cameras_stop.set()
            await asyncio.gather(*camera_tasks)
            for queue in queues.values():
                await queue.put(None)
            await asyncio.gather(*feed_tasks)
            watches_stop.set()
            await watch_task  # ongoing events end ("end" on MQTT) while the API is still up
            # The final states ("stopped") stay retained for `vigil status`; bounded, because a
            # broker connection that died unnoticed would hold each publish for its timeout.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FINAL_PUBLISH_S):
                    await reporter.publish()
            background_stop.set()
            api_stop.set()
    logger.info("stopped")


async def serve(settings: Settings) -> int:
    """The entry point's event loop: signal handlers, run_daemon, exit code."""
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal(name: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            logger.info("%s received: shutting down (send it again to exit at once)", name)
            stop.set()
        else:
            logger.warning("%s received again: exiting without finishing", name)
            os._exit(EXIT_FORCED)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        await run_daemon(settings, stop)
    except ModelNotFoundError as exc:
        logger.error("%s", exc)
        return 1
    except redis.exceptions.ConnectionError as exc:
        logger.error("Redis at %s is unreachable (%s): start it, or fix redis.url", redact_url(settings.redis.url), exc)
        return 1
    return 0


def configured_secrets(settings: Settings) -> list[str]:
    """The passwords in ``settings``, for the log formatter to mask wherever they might appear."""
    return [s.get_secret_value() for s in (settings.mqtt.password, settings.redis.password) if s is not None]


def cli_serve(args: argparse.Namespace) -> int:
    from streamer.cli import setup_logging  # noqa: PLC0415 - cli imports this module lazily

    settings = load_settings(args.config)
    setup_logging(settings.log_level, secrets=configured_secrets(settings))
    # Progress bars while loading weights are for terminals, not for the journal.
    transformers.utils.logging.disable_progress_bar()
    return asyncio.run(serve(settings))

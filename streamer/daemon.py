"""``vigil serve``: cameras → encoder → compressor → store, and the question service, in one TaskGroup.

Lifecycle (uvicorn-style): start-up (models, Redis, index, then cameras and the MQTT API) → serve
→ staged shutdown on the first SIGTERM/SIGINT: stop the cameras (each flushes its partial chunk),
store every chunk already sampled, save the index, publish ``offline``, exit 0. A second signal
exits at once. An unexpected error in any task ends the process non-zero so systemd restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any

import redis.exceptions
import transformers

from retrieval.answer import Answerer
from streamer.camera import CameraStatus, CameraWorker
from streamer.frames import Chunk
from streamer.mqtt_api import MqttApi
from streamer.notify import Notifier
from streamer.pipeline import Pipeline, open_pipeline
from streamer.settings import Settings, load_settings
from vlm.models import ModelNotFoundError

logger = logging.getLogger(__name__)

CHUNK_QUEUE_SIZE = 4  # chunks waiting per camera; when full the camera's frame queue absorbs (and counts) drops
STATUS_INTERVAL_S = 10.0  # camera states are re-published this often (fps and last-frame age keep moving)
EXIT_FORCED = 130


def status_payload(status: CameraStatus) -> dict[str, Any]:
    """CameraStatus → JSON-ready dict for the retained state topic."""
    payload = dataclasses.asdict(status)
    return {key: (value.value if isinstance(value, Enum) else value) for key, value in payload.items()}


async def _feed(queue: asyncio.Queue[Chunk | None], pipeline: Pipeline) -> None:
    """Store a camera's chunks in order until the end-of-stream marker (None)."""
    while (chunk := await queue.get()) is not None:
        await pipeline.ingest(chunk)


async def _publish_states(
    workers: list[CameraWorker], publish: Callable[[CameraStatus], Awaitable[None]], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        for worker in workers:
            await publish(worker.status())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=STATUS_INTERVAL_S)


async def _announce_ready(api_ready: asyncio.Event, notifier: Notifier, cameras: int) -> None:
    """READY=1 once the broker is connected too (models, Redis and the index came first)."""
    await api_ready.wait()
    notifier.ready(f"serving {cameras} camera(s)")
    logger.info("ready: %d camera(s), question service on MQTT", cameras)


async def run_daemon(settings: Settings, stop: asyncio.Event, *, notifier: Notifier | None = None) -> None:
    """Run until ``stop`` is set, then shut down in stages. Raises on unexpected failures."""
    notifier = notifier or Notifier()
    notifier.status("loading models and memory")
    async with contextlib.AsyncExitStack() as stack:
        pipeline = await stack.enter_async_context(open_pipeline(settings))
        answerer = Answerer(
            pipeline.vlm,
            pipeline.embedder,
            pipeline.store,
            pipeline.index,
            tz=settings.tz,
            top_k=settings.retrieval.top_k,
            recent_chunks=settings.retrieval.recent_chunks,
            max_prompt_chunks=settings.retrieval.max_prompt_chunks,
            max_new_tokens=settings.models.max_new_tokens,
            generation_timeout_s=settings.models.generation_timeout_s,
        )
        stack.callback(answerer.close)
        cameras = {name: cam for name, cam in settings.cameras.items() if cam.enabled}
        api = MqttApi(settings.mqtt, tz=settings.tz, cameras=list(settings.cameras), answer=answerer.answer)

        async def publish(status: CameraStatus) -> None:
            await api.publish_camera_state(status.camera, status_payload(status))

        api_stop, api_ready = asyncio.Event(), asyncio.Event()
        cameras_stop, background_stop = asyncio.Event(), asyncio.Event()
        retention_days = {name: cam.retention_days for name, cam in settings.cameras.items()}
        async with asyncio.TaskGroup() as tg:
            tg.create_task(api.run(api_stop, api_ready), name="mqtt")
            tg.create_task(_announce_ready(api_ready, notifier, len(cameras)), name="ready")
            tg.create_task(notifier.run_watchdog(background_stop), name="watchdog")
            tg.create_task(pipeline.run_maintenance(background_stop, retention_days), name="maintenance")

            workers: list[CameraWorker] = []
            camera_tasks: list[asyncio.Task[None]] = []
            feed_tasks: list[asyncio.Task[None]] = []
            queues: list[asyncio.Queue[Chunk | None]] = []
            for name, cam in cameras.items():
                queue: asyncio.Queue[Chunk | None] = asyncio.Queue(maxsize=CHUNK_QUEUE_SIZE)
                worker = CameraWorker(
                    name, cam, tz=settings.tz, on_chunk=queue.put, on_outage=pipeline.record_outage, on_state=publish
                )
                workers.append(worker)
                queues.append(queue)
                camera_tasks.append(tg.create_task(worker.run(cameras_stop), name=f"camera:{name}"))
                feed_tasks.append(tg.create_task(_feed(queue, pipeline), name=f"ingest:{name}"))
            tg.create_task(_publish_states(workers, publish, background_stop), name="camera-states")

            await stop.wait()
            logger.info("stopping: cameras first, then storing the chunks already sampled")
            notifier.stopping("storing sampled chunks")
            cameras_stop.set()
            await asyncio.gather(*camera_tasks)
            for queue in queues:
                await queue.put(None)
            await asyncio.gather(*feed_tasks)
            for worker in workers:  # the final state ("stopped") stays retained for `vigil status`
                await publish(worker.status())
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
        logger.error("Redis at %s is unreachable (%s): start it, or fix redis.url", settings.redis.url, exc)
        return 1
    return 0


def cli_serve(args: argparse.Namespace) -> int:
    from streamer.cli import setup_logging  # noqa: PLC0415 - cli imports this module lazily

    settings = load_settings(args.config)
    setup_logging(settings.log_level)
    # Progress bars while loading weights are for terminals, not for the journal.
    transformers.utils.logging.disable_progress_bar()
    return asyncio.run(serve(settings))

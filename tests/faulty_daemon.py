"""``vigil serve`` in which one daemon task hits an unexpected exception (tests/test_lifecycle.py).

Usage: python tests/faulty_daemon.py TASK CONFIG

Nothing in vigil knows about this: a method of a real object that TASK calls is replaced by one
that raises ``RuntimeError`` (a bug, not an error vigil expects). Most faults are armed once the
daemon sent READY=1, so every task is running when it fires; a fault on a call that only happens
at start-up (the broker connection, the first retention pass) fires at once. The line
``FAULT <task>`` goes to stdout when it fires.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
import time
from collections.abc import Callable
from typing import Any

from memory.index import VectorIndex
from memory.store import MemoryStore
from streamer.cli import main
from streamer.frames import ChunkBuilder
from streamer.ingest import IngestService
from streamer.metrics import MetricsServer
from streamer.mqtt_api import MqttApi
from streamer.notify import Notifier
from streamer.watch_service import WatchService

# task name (camera "lot") → (class, method, armed at READY)
FAULTS: dict[str, tuple[type, str, bool]] = {
    "mqtt": (MqttApi, "_on_connect", False),  # the broker connection is set up
    "watchdog": (Notifier, "watchdog", True),  # a WATCHDOG=1 ping
    "maintenance": (MemoryStore, "apply_retention", False),  # retention runs first thing
    "store:retry": (MemoryStore, "run_retry_loop", True),
    "index:follow": (VectorIndex, "follow", True),  # a look for chunks other processes stored
    "camera:lot": (ChunkBuilder, "add", True),  # a sampled frame joins its chunk
    "ingest:lot": (IngestService, "_compress", True),  # a chunk is compressed (on a worker thread)
    "status": (IngestService, "failing", True),  # health is assessed
    "metrics": (MetricsServer, "run", True),  # /metrics and /healthz are served
    "watches": (WatchService, "run", True),  # the check loop (the lifecycle config has no watches)
}



def _fault(
    task: str, real: Callable[..., Any], when_armed: bool, armed: asyncio.Event, fired: list[float]
) -> Callable[..., Any]:
    """``real`` that raises: at once, or (``when_armed``) on the first call after READY; a
    coroutine method that was already called (a task's loop) raises once READY is sent."""

    def fire() -> None:
        fired.append(time.time())
        print(f"FAULT {task}", flush=True)
        raise RuntimeError(f"injected fault in {task}")

    if inspect.iscoroutinefunction(real):

        @functools.wraps(real)
        async def async_faulty(*args: Any, **kwargs: Any) -> Any:
            if when_armed:
                await armed.wait()
            fire()

        return async_faulty

    @functools.wraps(real)
    def faulty(*args: Any, **kwargs: Any) -> Any:
        if armed.is_set() or not when_armed:
            fire()
        return real(*args, **kwargs)

    return faulty


def inject(task: str, patch: Callable[[Any, str, Any], None] = setattr) -> list[float]:
    """Install the fault of ``task`` with ``patch`` (``setattr``, or pytest's ``monkeypatch.setattr``);
    returns the list that receives the time the fault fired."""
    owner, name, when_armed = FAULTS[task]
    armed = asyncio.Event()
    fired: list[float] = []
    real_ready = Notifier.ready

    def ready(self: Notifier, status: str | None = None) -> bool:
        sent = real_ready(self, status)
        armed.set()
        return sent

    patch(Notifier, "ready", ready)
    patch(owner, name, _fault(task, getattr(owner, name), when_armed, armed, fired))
    return fired


if __name__ == "__main__":
    inject(sys.argv[1])
    sys.exit(main(["serve", "-c", sys.argv[2]]))

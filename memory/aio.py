"""Small asyncio helpers shared by every long-lived task."""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passed; True when it is set.

    Every loop of a long-lived task waits here, so this is where a cancellation cannot be lost:

    * ``asyncio.wait_for(event.wait(), t)`` is not used: on Python 3.11 it can swallow a
      cancellation that arrives while the inner wait completes (python/cpython#86296).
    * A cancellation already requested but swallowed by code the task called is raised here.
      Seen: the daemon's ``index:follow`` task, cancelled by its TaskGroup during the Redis reads
      of ``VectorIndex.follow`` (redis-py 8.1.0), came back with ``cancelling() == 1`` and looped
      on forever, so a failed daemon hung instead of exiting.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True

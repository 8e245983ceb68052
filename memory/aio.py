"""Small asyncio helpers shared by every long-lived task."""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passed; True when it is set.

    ``asyncio.wait_for(event.wait(), t)`` is not used: on Python 3.11 it can swallow a
    cancellation that arrives while the inner wait completes (python/cpython#86296), so a task
    whose sibling failed in the same instant kept looping inside a cancelled TaskGroup and the
    daemon hung instead of exiting. ``asyncio.timeout`` does not lose it.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True

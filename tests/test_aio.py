"""memory/aio.py: waiting on a stop event never loses a cancellation."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from memory.aio import wait_set


async def test_a_cancellation_in_the_same_step_as_the_event_is_not_lost() -> None:
    # The event is set and the task cancelled before the waiter runs again: with
    # asyncio.wait_for on Python 3.11 the waiter returned normally (python/cpython#86296), so a
    # task of a failed TaskGroup kept running and the daemon hung.
    event = asyncio.Event()
    task = asyncio.create_task(wait_set(event, 10.0))
    await asyncio.sleep(0)
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_it_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    event.set()
    assert await wait_set(event, 10.0) is True


async def test_a_cancellation_that_the_loop_body_swallowed_ends_the_loop_at_its_next_wait() -> None:
    stop = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while not stop.is_set() and rounds < 100:  # bounded, so that a lost cancellation fails the test
            rounds += 1
            # What library code in the loop body did (see memory/aio.py):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10 if rounds == 1 else 0)
            await wait_set(stop, 0.01)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task
    assert rounds == 1

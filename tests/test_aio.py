"""cancel_and_wait: a background task that swallows its cancellation still ends, or the
wait ends at its bound (tollway/aio.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

import pytest

from tollway.aio import cancel_and_wait


async def test_a_loop_whose_wait_for_swallows_the_cancel_still_ends() -> None:
    """The shape of the fleet rate limits' ticker: a loop awaiting NATS through
    ``asyncio.wait_for``, cancelled in the turn its reply arrives. On Python 3.11 wait_for
    returns the reply and the loop goes on; a second cancellation ends it."""
    replies: list[asyncio.Future[int]] = []
    rounds = 0

    async def ticker() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            reply: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            replies.append(reply)
            await asyncio.wait_for(reply, timeout=30)
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    replies[-1].set_result(1)  # the reply and the cancellation in the same turn
    task.cancel()
    done, _ = await asyncio.wait((task,), timeout=0.3)
    # The bug this guards against, as this Python has it (or not).
    assert bool(done) is (sys.version_info >= (3, 12))
    if not done:
        assert rounds > 1  # it went round again
        replies[-1].set_result(1)
    assert await cancel_and_wait(task, within=5)
    assert task.cancelled()


async def test_a_cancellation_swallowed_once_is_sent_again() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.02)
    task.cancel()
    done, _ = await asyncio.wait((task,), timeout=0.3)
    assert not done  # cancelled once and awaited, it would never end
    assert await cancel_and_wait(task, within=5)
    assert task.done() and swallowed == 1


async def test_a_task_that_never_ends_is_left_behind_after_the_bound(
        caplog: pytest.LogCaptureFixture) -> None:
    stop = False

    async def deaf() -> None:
        while not stop:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.01)

    task = asyncio.create_task(deaf())
    await asyncio.sleep(0.02)  # running (a task cancelled before its first step just ends)
    with caplog.at_level(logging.WARNING, logger="tollway"):
        assert not await cancel_and_wait([task], within=0.2, what="the deaf task")
    assert not task.done()
    assert "the deaf task did not stop within 0 s" in caplog.text
    stop = True
    await task


async def test_nothing_to_stop_and_tasks_already_done() -> None:
    assert await cancel_and_wait(None)
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    assert await cancel_and_wait([done])
    assert done.done() and not done.cancelled()

"""Stopping background tasks for sure.

On Python 3.11, ``asyncio.wait_for`` returns the awaited result instead of raising when a
cancellation arrives in the same turn as that result (gh-86296, fixed in 3.12), and nats-py
makes every request through it. A task cancelled while it waits on NATS may then go on, and
a loop such as a heartbeat ticker never ends: ``task.cancel(); await task`` hangs for good.
:func:`cancel_and_wait` cancels again until the task ends, within a bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("tollway")

RECANCEL_S = 0.05  # how long a cancellation is given before it is sent again
WITHIN_S = 10.0


async def cancel_and_wait(tasks: asyncio.Future[Any] | Iterable[asyncio.Future[Any] | None]
                          | None, *, within: float = WITHIN_S, what: str = "a task") -> bool:
    """Cancel the task(s) and wait until they end, cancelling again each :data:`RECANCEL_S`
    while one runs on (a cancellation it swallowed). True when all ended; after ``within``
    seconds, False and a warning naming ``what`` (the tasks are left cancelled). Their
    results and errors are not raised; a cancellation of the caller is. None (a task not
    started) is skipped."""
    if tasks is None:
        return True
    every = {tasks} if isinstance(tasks, asyncio.Future) else {t for t in tasks if t is not None}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    pending = every
    while True:
        pending = {t for t in pending if not t.done()}
        if not pending:
            for t in every:  # an error it ended with is retrieved (not logged at collection)
                if not t.cancelled():
                    t.exception()
            return True
        left = deadline - loop.time()
        if left <= 0:
            log.warning("%s did not stop within %.0f s of being cancelled; left behind",
                        what, within)
            return False
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=min(RECANCEL_S, left))

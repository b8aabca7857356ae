"""A stream's upstream reply, owned by one ``async with`` block.

The connection under a streamed reply holds one of the provider's pool
slots. It goes back to the pool (:meth:`StreamReply.release`) only when the
body was read to its end, and is dropped (:meth:`StreamReply.abort`) on
every other way out of the block: an upstream error, the client leaving, a
cancelled task, a bug in the relay. The block's exit is the one place where
either happens, so no path can forget it, and a dropped connection tells the
provider to stop generating.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

from tollway.providers.http import StreamReply

log = logging.getLogger("tollway.pipeline")


class HeldStream:
    """A reply being read; ``ended`` once its body was read to the end."""

    __slots__ = ("ended", "reply")

    def __init__(self, reply: StreamReply) -> None:
        self.reply = reply
        self.ended = False

    async def next(self) -> bytes | None:
        """What arrived of the body since the last call; None at its end."""
        data = await self.reply.next()
        if data is None:
            self.ended = True
        return data

    async def read(self) -> bytes:
        """The whole remaining body (an error reply)."""
        data = await self.reply.read()
        self.ended = True
        return data

    def close(self) -> None:
        if self.ended:
            try:
                self.reply.release()
                return
            except Exception:  # a client's bug must not cost the slot: drop it instead
                log.exception("releasing an upstream reply failed")
        self.reply.abort()


@asynccontextmanager
async def holding(opening: Awaitable[StreamReply]) -> AsyncIterator[HeldStream]:
    """The reply ``opening`` gives, released or aborted when the block ends."""
    # No await between the reply arriving and ``try``: a cancellation cannot land there.
    held = HeldStream(await opening)
    try:
        yield held
    finally:
        held.close()

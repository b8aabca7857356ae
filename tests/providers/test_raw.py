"""What only the own client promises, beyond the protocol suite."""

from __future__ import annotations

import pytest
from yarl import URL

from tollway.errors import UpstreamError
from tollway.providers.http import Timeouts
from tollway.providers.http.raw import RawHttpClient
from tollway.testing.scripted import Request, ScriptedUpstream, ok


async def test_a_whole_reply_past_the_cap_is_an_upstream_error_and_the_pool_goes_on() -> None:
    big, small = b"b" * (3 << 20), b'{"small":true}'

    def answer(req: Request) -> list[bytes | float]:
        return [ok(big if req.body == b"big" else small)]

    with ScriptedUpstream(answer) as up:
        client = RawHttpClient("up", Timeouts(2, 2, 10), 4, max_reply_bytes=2 << 20)
        try:
            with pytest.raises(UpstreamError, match="larger than 2 MiB"):
                await client.request("POST", URL(up.url()), b"big", {})
            for _ in range(5):  # every slot came back
                assert (await client.request("POST", URL(up.url()), b"s", {})).body == small
            # A stream of the same size is not capped: it is read in bounded pieces.
            async with await client.stream("POST", URL(up.url()), b"big", {}) as stream:
                assert len(b"".join([c async for c in stream.chunks()])) == len(big)
        finally:
            await client.aclose()

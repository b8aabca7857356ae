"""A client that leaves mid-stream: the upstream request is dropped, the tokens still count."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from support import HANG_S, ListRecorder, auth, chat_body
from tollway.testing.upstream import FakeUpstream
from tollway.tokens import count_tokens

CHAT = "/api/ai/v1/chat/completions"


def established_to(port: int) -> int:
    """Open TCP connections to 127.0.0.1:port, from /proc (state 01 = ESTABLISHED)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def test_client_disconnect_cancels_upstream_and_counts_streamed_tokens(
    client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder
) -> None:
    upstream.chunk_delay_s = 0.05
    upstream.reply_words = 60  # a 3 s stream if nobody stops it
    received: list[str] = []
    reading_upstream = 0
    with client.stream("POST", CHAT, json=chat_body("go", stream=True), headers=auth()) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    received.append(delta["content"])
            if len(received) == 2 and not reading_upstream:
                reading_upstream = established_to(upstream.port)
            if len(received) >= 4:
                break  # leaving the loop drops the connection (the body is unread)
    assert reading_upstream >= 1  # the gateway was streaming from upstream
    (rec,) = recorder.wait(1, timeout=HANG_S)
    assert rec.client_cancelled is True and rec.stream is True
    assert rec.outcome == "completed" and rec.status == 200
    streamed = count_tokens("".join(received))
    full = count_tokens(" ".join(["x"] * 60))
    assert streamed <= rec.completion_tokens < full
    # Billed for what was relayed, at the model's prices (0.15 and 0.60 USD per Mtok).
    assert rec.prompt_tokens > 0
    assert rec.actual_cost_nanousd == rec.prompt_tokens * 150 + rec.completion_tokens * 600
    # The provider saw the gateway hang up in the middle of its stream, not at its end
    # (how soon, against the 1 s bar, is measured by benchmarks/faults.py).
    (aborted,) = upstream.wait_for_aborted(1)
    assert 4 <= aborted.events_sent < aborted.events_total
    deadline = time.monotonic() + 2
    while established_to(upstream.port) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert established_to(upstream.port) == 0  # and no connection to it is left open
    # The gateway still serves afterwards.
    upstream.chunk_delay_s = 0.0
    assert client.post(CHAT, json=chat_body(), headers=auth()).status_code == 200

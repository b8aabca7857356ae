"""A gateway killed with SIGKILL under load loses no call event and stores none twice.

``tollway serve`` as operators run it, with its embedded nats-server on a data
folder, serves about 40 calls a second (plain and streamed) from the fake
upstream; it is killed with SIGKILL mid-load and restarted on the same folder,
a few times. Every call whose client got the whole answer (a 200 with its body,
or a stream through ``[DONE]``) must have its call event in the stream, once,
and the usage view must count each call once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import ACME_KEY, ADMIN_KEY, UPSTREAM_KEY, auth, chat_body, serving_port
from tollway.auth import hash_key
from tollway.events.broker import connect, read_runtime_file
from tollway.events.schema import CallEvent
from tollway.testing.upstream import FakeUpstream

from .helpers import read_stream

CHAT = "/api/ai/v1/chat/completions"
RATE = 40  # calls a second
KILLS = 3
LOAD_S = 1.2  # of load before each kill


def _config(tmp_path: Path, base_url: str) -> Path:
    cfg = tmp_path / "tollway.toml"
    cfg.write_text(textwrap.dedent(f"""
        [server]
        builtin_models = false
        builtin_providers = false
        admin_key_env = "TOLLWAY_ADMIN_KEY"
        [nats]
        url = "embedded"
        data_dir = "{tmp_path / 'data'}"
        [[providers]]
        name = "fake"
        base_url = "{base_url}"
        api_key_env = "FAKE_API_KEY"
        [[models]]
        id = "gpt-4o-mini"
        provider = "fake"
        input_usd_per_mtok = 0.15
        output_usd_per_mtok = 0.60
        [[tenants]]
        id = "acme"
        tier = "standard"
        daily_usd = 1000.0
        key_sha256 = ["{hash_key(ACME_KEY)}"]
        [tenants.limits]
        per_minute = 100000
        per_hour = 1000000
        per_day = 10000000
        expensive_per_hour = 100000
    """))
    return cfg


class Gateway:
    """``tollway serve`` processes, one at a time, on one config and data folder."""

    def __init__(self, cfg: Path) -> None:
        self.cmd = [sys.executable, "-m", "tollway.cli", "serve", "--config", str(cfg),
                    "--port", "0"]
        self.env = {**os.environ, "TOLLWAY_ADMIN_KEY": ADMIN_KEY, "FAKE_API_KEY": UPSTREAM_KEY}
        self.proc: subprocess.Popen[str] | None = None
        self.drained: asyncio.Future[None] | None = None
        self.url = ""

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        port = serving_port(self.proc)
        assert port, "serve did not start (a server left by the killed one in the way?)"
        self.url = f"http://127.0.0.1:{port}"
        stderr = self.proc.stderr
        assert stderr is not None

        def drain() -> None:  # the rest of its log, so the pipe never fills up
            with stderr:
                stderr.read()

        self.drained = asyncio.get_running_loop().run_in_executor(None, drain)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown, no flush, no goodbye
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _call(client: httpx.AsyncClient, url: str, stream: bool,
                answered: list[str]) -> None:
    """One call; its request id joins ``answered`` only when the whole answer arrived."""
    rid = f"crash-{uuid.uuid4().hex}"
    headers = {**auth(), "X-Request-ID": rid}
    body = chat_body(stream=stream)
    try:
        if not stream:
            r = await client.post(url + CHAT, json=body, headers=headers)
            if r.status_code == 200 and r.json()["choices"]:
                answered.append(r.headers["x-request-id"])
            return
        async with client.stream("POST", url + CHAT, json=body, headers=headers) as r:
            lines = [line async for line in r.aiter_lines() if line]
            if r.status_code == 200 and lines and lines[-1] == "data: [DONE]":
                answered.append(r.headers["x-request-id"])
    except (httpx.HTTPError, ValueError, KeyError):
        pass  # cut by the kill: not answered, so nothing is owed


async def _load(client: httpx.AsyncClient, url: str, seconds: float,
                answered: list[str], calls: set[asyncio.Task[None]]) -> None:
    """``RATE`` calls a second, every other one streamed, for ``seconds``."""
    n = int(seconds * RATE)
    for i in range(n):
        calls.add(asyncio.create_task(_call(client, url, i % 2 == 1, answered)))
        await asyncio.sleep(1 / RATE)


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    # Replies take a while and streams trickle, so calls are always in flight at a kill.
    with FakeUpstream(latency_s=0.02, chunk_delay_s=0.005, api_key=UPSTREAM_KEY,
                      record=False) as up:
        yield up


@pytest.mark.timeout(120)
async def test_sigkill_under_load_loses_no_answered_call_and_doubles_none(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    gw = Gateway(_config(tmp_path, upstream.base_url))
    answered: list[str] = []
    calls: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    try:
        async with httpx.AsyncClient(timeout=10, limits=limits) as client:
            for _ in range(KILLS):
                gw.start()
                await _load(client, gw.url, LOAD_S, answered, calls)
                gw.kill()  # mid-load: calls are in flight, events queued and in batches
                await asyncio.gather(*calls, gw.drained)
                calls.clear()
            gw.start()  # on the same folder, after the last kill: sends what is owed
            await _load(client, gw.url, 0.5, answered, calls)
            await asyncio.gather(*calls)
            assert len(answered) > KILLS * LOAD_S * RATE / 2, "the load was served"
            events = await _events_once_all_landed(tmp_path / "data", set(answered))
            usage = await _usage_once_caught_up(client, gw.url, len(events))
    finally:
        gw.stop()
        if gw.drained is not None:
            await gw.drained
    by_request = Counter(e.request_id for e in events)
    missing = set(answered) - set(by_request)
    assert not missing, f"{len(missing)} answered calls have no call event"
    assert max(by_request.values()) == 1, "a call event stored twice"
    assert len({e.event_id for e in events}) == len(events)
    assert usage == len(events), "the usage view counts each call once"


async def _events_once_all_landed(data: Path, answered: set[str],
                                  within_s: float = 20.0) -> list[CallEvent]:
    """The stream's call events, once every answered call's has arrived (or the time is
    up: the assertions then say what is missing)."""
    url = read_runtime_file(data)
    assert url, "the gateway's embedded nats-server is running"
    nc = await connect(url)
    try:
        deadline = time.monotonic() + within_s
        while True:
            events = [e for _, _, e in await read_stream(nc, "tollway.call.>")
                      if isinstance(e, CallEvent)]
            if answered <= {e.request_id for e in events} or time.monotonic() > deadline:
                return events
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def _usage_once_caught_up(client: httpx.AsyncClient, url: str, n: int,
                                within_s: float = 20.0) -> int:
    """Requests in the usage view, once it has folded ``n`` (or the time is up)."""
    deadline = time.monotonic() + within_s
    while True:
        r = await client.get(url + "/api/ai/usage", headers=auth())
        assert r.status_code == 200, r.text
        requests = int(r.json()["total"]["requests"])
        if requests >= n or time.monotonic() > deadline:
            return requests
        await asyncio.sleep(0.2)

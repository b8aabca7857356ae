"""Fleet-wide rate limits across real ``tollway serve`` processes on one nats-server.

Four gateway processes (four ``tollway serve``, or two ``tollway serve --workers 2``),
one tenant limit: calls spread over them are admitted as one limit would admit them.
Real time runs here, so a bucket refills while the calls are made: every bound allows
the limit plus what refilled between the first call sent and the last answer (limit /
60 per second for ``per_minute``).
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleet_rig import CHAT, write_config
from fleet_rig import Fleet as Workers
from support import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    INITECH_KEY,
    UPSTREAM_KEY,
    auth,
    chat_body,
    eventually,
    serving_port,
)
from tollway.auth import hash_key
from tollway.events.broker import EmbeddedNats
from tollway.testing.upstream import FakeUpstream

PROCESSES = 4


def _config(path: Path, nats_url: str, upstream: str) -> Path:
    tenants = ""
    for tenant, key, per_minute in (("acme", ACME_KEY, 60), ("globex", GLOBEX_KEY, 600),
                                    ("initech", INITECH_KEY, 60)):
        tenants += textwrap.dedent(f"""
            [[tenants]]
            id = "{tenant}"
            tier = "standard"
            daily_usd = 1000.0
            key_sha256 = ["{hash_key(key)}"]
            [tenants.limits]
            per_minute = {per_minute}
            per_hour = 1000000
            per_day = 10000000
            expensive_per_hour = 100000
        """)
    cfg = path / "tollway.toml"
    cfg.write_text(textwrap.dedent(f"""
        [server]
        builtin_models = false
        builtin_providers = false
        admin_key_env = "TOLLWAY_ADMIN_KEY"
        [nats]
        url = "{nats_url}"
        data_dir = "{path / 'data'}"
        [events]
        heartbeat_s = 0.25
        [[providers]]
        name = "fake"
        base_url = "{upstream}"
        api_key_env = "FAKE_API_KEY"
        [[models]]
        id = "gpt-4o-mini"
        provider = "fake"
        input_usd_per_mtok = 0.15
        output_usd_per_mtok = 0.60
    """) + tenants)
    return cfg


class Fleet:
    """``tollway serve`` processes on one config (each its own data folder)."""

    def __init__(self, tmp: Path, nats_url: str, upstream: str) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.urls: list[str] = []
        env = {**os.environ, "TOLLWAY_ADMIN_KEY": ADMIN_KEY, "FAKE_API_KEY": UPSTREAM_KEY}
        for i in range(PROCESSES):
            folder = tmp / f"gw{i}"
            folder.mkdir()
            cfg = _config(folder, nats_url, upstream)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "tollway.cli", "serve", "--config", str(cfg),
                 "--port", "0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True))
        self.logs: list[list[str]] = []
        for proc in self.procs:
            port = serving_port(proc, timeout=60)
            assert port, "serve did not start"
            self.urls.append(f"http://127.0.0.1:{port}")
            # The rest of its log is kept (the pipe never fills up), for a failure to show.
            lines: list[str] = []
            self.logs.append(lines)
            threading.Thread(target=_drain, args=(proc, lines), daemon=True).start()

    def stop(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is None:
                proc.terminate()
            else:  # it ended early: what it said last goes to the test's captured output
                print(f"process {i} ended with {proc.returncode}:", *self.logs[i][-20:],
                      sep="\n")
            # Its warnings and errors too, which a failed test's report then shows.
            print(*(f"process {i}: {line}" for line in self.logs[i]
                    if '"level":"warning"' in line or '"level":"error"' in line), sep="\n")
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _drain(proc: subprocess.Popen[str], lines: list[str]) -> None:
    assert proc.stderr is not None
    with proc.stderr as stderr:
        for line in stderr:
            lines.append(line.rstrip())


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(latency_s=0.0) as up:
        yield up


@pytest.fixture
def fleet(nats_server: EmbeddedNats, tmp_path: Path, upstream: FakeUpstream) -> Iterator[Fleet]:
    f = Fleet(tmp_path, nats_server.url, upstream.base_url)
    try:
        yield f
    finally:
        f.stop()


def _client() -> httpx.AsyncClient:
    """A client that opens a connection for every call: reusing them raced both ways.

    - Kept idle past the gateways' keep-alive timeout (5 s, while a process polled ready
      early waits for the others), a connection can be closed by the server just as a
      request goes out on it.
    - With a shorter keep-alive expiry, httpcore's pool (1.0.9) can close a connection it
      has handed to a request that has not started on it yet: the connection is still
      idle, and another request's pass finds it expired (the race of encode/httpcore#1110,
      there through the surplus keep-alive path). The request fails with ReadError from
      anyio's ClosedResourceError, a close on the client's own side: seen in 1 of 50 runs
      of this module under load; CI's ReadErrors here had no cause on record.

    A new connection is never idle before its request starts, so neither can happen."""
    return httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=0))


async def _until_all_see_each_other(client: httpx.AsyncClient, fleet: Fleet) -> None:
    """Every process ready, and long enough for heartbeats to go round (3 periods)."""
    for url in fleet.urls:
        async with asyncio.timeout(60):
            while (await client.get(f"{url}/api/ai/ready")).status_code != 200:
                await asyncio.sleep(0.05)
    await asyncio.sleep(3 * 0.25)


async def _spread(client: httpx.AsyncClient, fleet: Fleet, key: str, calls: int,
                  concurrency: int = 16) -> list[httpx.Response]:
    """``calls`` calls round robin over the processes, ``concurrency`` at a time. A call
    that gets no answer fails the test with the process it went to and whether that one
    still runs; the calls still out are cancelled, so none outlives the test."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> httpx.Response:
        n = i % len(fleet.urls)
        async with gate:
            try:
                return await client.post(f"{fleet.urls[n]}/api/ai/v1/chat/completions",
                                         json=chat_body(), headers=auth(key))
            except httpx.TransportError as exc:
                code = fleet.procs[n].poll()
                # The cause chain (httpx, httpcore, anyio) ends at the OS's error: the
                # contexts beside it are what the libraries were handling at the time.
                root: BaseException = exc
                while (below := root.__cause__) is not None:
                    root = below
                said = [line for line in fleet.logs[n] if '"tollway.access"' not in line]
                raise AssertionError(f"call {i} to process {n} got no answer: {root!r}; the "
                                     f"process {'runs' if code is None else f'ended: {code}'}"
                                     "; its last lines but access lines:\n"
                                     + "\n".join(said[-15:])) from exc

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(i)) for i in range(calls)]
    return [t.result() for t in tasks]


def _check_refusals(answers: list[httpx.Response]) -> None:
    for r in answers:
        assert r.status_code in (200, 429), r.text
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            assert int(r.headers["retry-after"]) >= 1
        assert "x-ratelimit-limit-requests" in r.headers
        assert "x-ratelimit-remaining-requests" in r.headers


async def test_four_processes_serve_one_limit(fleet: Fleet) -> None:
    async with _client() as client:
        await _until_all_see_each_other(client, fleet)
        # 60 a minute: 1,000 calls over four processes.
        started = time.monotonic()
        answers = await _spread(client, fleet, ACME_KEY, 1000)
        elapsed = time.monotonic() - started
        ok = sum(r.status_code == 200 for r in answers)
        _check_refusals(answers)
        assert 60 <= ok <= 60 + math.floor(elapsed * 60 / 60), (ok, elapsed)
        assert {r.headers["x-ratelimit-limit-requests"] for r in answers} == {"60"}
        # 600 a minute, on the same fleet: nothing beyond. Some may go unserved: an
        # allotment another process held unused goes back less what the bucket refilled
        # meanwhile, at most limit x rate_allotment_s / period each (README, Fleet-wide
        # rate limits: under-use); seen once in CI, 596 served. On a machine busy with
        # other work, calls that lose three rounds of contention for the bucket are refused
        # too (README: contention), and slow give-backs hold more unused: seen 548 served
        # while two other test suites ran. The bound below catches a fleet that serves far
        # too little; the benchmark (fleet.py, a quiet machine) measures how close it gets.
        started = time.monotonic()
        answers = await _spread(client, fleet, GLOBEX_KEY, 1000)
        elapsed = time.monotonic() - started
        ok = sum(r.status_code == 200 for r in answers)
        _check_refusals(answers)
        assert 0.8 * 600 <= ok <= 600 + math.floor(elapsed * 600 / 60), (ok, elapsed)


async def test_nats_stopped_the_fleet_never_exceeds_the_limit(
        fleet: Fleet, nats_server: EmbeddedNats) -> None:
    async with _client() as client:
        await _until_all_see_each_other(client, fleet)
        started = time.monotonic()
        before = await _spread(client, fleet, INITECH_KEY, 20, concurrency=4)
        assert all(r.status_code == 200 for r in before)
        nats_server.stop()
        for url in fleet.urls:  # every process has seen NATS go
            async with asyncio.timeout(60):
                while (await client.get(f"{url}/api/ai/ready")).status_code == 200:
                    await asyncio.sleep(0.05)
        during = await _spread(client, fleet, INITECH_KEY, 400)
        elapsed = time.monotonic() - started
        _check_refusals(during)
        served = 20 + sum(r.status_code == 200 for r in during)
        # Each process kept to its quarter of what the fleet had left.
        assert served <= 60 + math.floor(elapsed * 60 / 60), (served, elapsed)
        assert served > 20, "every process still serves its share"
        # NATS back: every process writes what its share served to the fleet's bucket and
        # takes allotments again; the fleet still serves one limit.
        nats_server.start()
        for url in fleet.urls:
            async with asyncio.timeout(60):
                while not await _sharing(client, url):
                    await asyncio.sleep(0.05)
        after = await _spread(client, fleet, INITECH_KEY, 400)
        elapsed = time.monotonic() - started
        _check_refusals(after)
        served += sum(r.status_code == 200 for r in after)
        assert served <= 60 + math.floor(elapsed * 60 / 60), (served, elapsed)


async def _sharing(client: httpx.AsyncClient, url: str) -> bool:
    """Whether the process takes allotments from the fleet's bucket (not its share)."""
    text = (await client.get(f"{url}/api/ai/metrics")).text
    return "tollway_ratelimit_shares 0.0" in text.splitlines()


SHARED = "rate limits: shared across the fleet"


async def test_two_instances_of_two_workers_serve_one_limit(
        tmp_path: Path, nats_server: EmbeddedNats, upstream: FakeUpstream) -> None:
    # The acceptance fleet: 2 instances x 2 workers, 4 processes, tenant at 60 a minute.
    fleets: list[Workers] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            fleets.append(Workers(write_config(tmp_path / name, upstream.base_url,
                                               nats=nats_server.url, per_minute=60)).start())

        def sharing(fleet: Workers) -> set[int]:
            return {r["worker"] for r in list(fleet.lines)
                    if str(r.get("msg", "")).startswith(SHARED)}

        # Every worker takes allotments from the fleet's bucket (until then it would
        # enforce a share of what it last saw: nothing yet, so the whole limit).
        assert eventually(lambda: all(sharing(f) == {1, 2} for f in fleets)), \
            [sharing(f) for f in fleets]
        # A new connection for every call, so the kernel hands them to both workers.
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            gate = asyncio.Semaphore(64)

            async def one(i: int) -> httpx.Response:
                async with gate:
                    return await client.post(fleets[i % 2].url + CHAT, json=chat_body(),
                                             headers=auth(ACME_KEY))

            started = time.monotonic()
            async with asyncio.TaskGroup() as group:  # a failed call cancels the rest
                tasks = [group.create_task(one(i)) for i in range(1000)]
            answers = [t.result() for t in tasks]
            elapsed = time.monotonic() - started
    finally:
        for fleet in fleets:
            fleet.stop()
    _check_refusals(answers)
    ok = sum(r.status_code == 200 for r in answers)
    print(f"2 x 2 workers, 60/min: {ok} of 1,000 served in {elapsed:.1f} s")
    # A token bucket from full: the limit, plus 1 a second refilled while the calls ran.
    assert 60 <= ok <= 60 + math.floor(elapsed * 60 / 60), (ok, elapsed)
    assert {r.headers["x-ratelimit-limit-requests"] for r in answers} == {"60"}
    # All four processes took part: each worker of each instance answered calls.
    for fleet in fleets:
        assert {r.get("worker") for r in fleet.logged("request")
                if r.get("path") == CHAT} == {1, 2}

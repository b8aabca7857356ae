"""``tollway serve --workers N``: real processes on one port, the parent's embedded NATS.

Each test runs the command as operators do, against the fake upstream, and
reads what the processes say on stderr (JSON lines, each worker's carrying its
number) and what the stream holds once they are gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from events.helpers import read_stream
from fleet_rig import CHAT, Fleet, alive, instance_of, write_config
from support import HANG_S, UPSTREAM_KEY, auth, chat_body, eventually
from tollway.config import default_config
from tollway.events.broker import EmbeddedNats, connect
from tollway.events.schema import CallEvent
from tollway.testing.upstream import FakeUpstream
from tollway.workers import MIN_BACKOFF_S, NATS_BOOT_S, Supervisor, worker_count


async def _stream_events(data: Path) -> list[CallEvent]:
    """The call events in the stream a stopped fleet left in ``data``."""
    with EmbeddedNats(data) as srv:
        nc = await connect(srv.url)
        try:
            return [e for _, _, e in await read_stream(nc, "tollway.call.>")
                    if isinstance(e, CallEvent)]
        finally:
            await nc.close()


def _fresh_client() -> httpx.Client:
    # No keep-alive: every call is a new connection, which any worker may accept.
    return httpx.Client(timeout=HANG_S, limits=httpx.Limits(max_keepalive_connections=0))


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY, record=False) as up:
        yield up


def test_workers_auto_is_one_per_core_and_n_is_checked() -> None:
    assert worker_count("auto") == len(os.sched_getaffinity(0))
    assert worker_count("3") == 3
    assert worker_count(2) == 2
    for bad in ("0", "many", 0):
        with pytest.raises(Exception, match="workers"):
            worker_count(bad)


def test_a_bad_workers_value_is_a_config_error(tmp_path: Path, upstream: FakeUpstream) -> None:
    cfg = write_config(tmp_path, upstream.base_url)
    r = subprocess.run([sys.executable, "-m", "tollway.cli", "serve", "--config", str(cfg),
                        "--port", "0", "--workers", "zero"], capture_output=True, text=True,
                       env={**os.environ, "FAKE_API_KEY": UPSTREAM_KEY}, timeout=HANG_S)
    assert r.returncode == 2
    assert "workers must be a number or 'auto'" in r.stderr


async def test_two_workers_share_one_port_and_each_answered_call_has_one_event(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    fleet = Fleet(write_config(tmp_path, upstream.base_url)).start()
    answered: list[str] = []
    try:
        assert len(set(fleet.pids)) == 2
        assert fleet.proc is not None and fleet.proc.pid not in fleet.pids, "no parent"

        def both_answered() -> bool:
            with _fresh_client() as c:
                for _ in range(10):
                    r = c.post(fleet.url + CHAT, headers=auth(), json=chat_body())
                    assert r.status_code == 200, r.text
                    answered.append(r.headers["x-request-id"])
            workers = {r.get("worker") for r in fleet.logged("request", status=200)}
            return workers == {1, 2}

        assert eventually(both_answered), "both workers answer calls on the one port"

        def scraped() -> dict[str, float]:  # calls counted per worker, by one scrape
            with _fresh_client() as c:
                text = c.get(fleet.url + "/api/ai/metrics").text
            by_worker: Counter[str] = Counter()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "tollway_requests_total":
                        by_worker[sample.labels["worker"]] += sample.value
            return by_worker

        # Any worker's scrape shows both (the other's as of its last share).
        assert eventually(lambda: scraped() == Counter(
            str(r["worker"]) for r in fleet.logged("request", status=200)
            if r["path"] == CHAT))
        # Each worker's lines carry its number, and it names itself once serving.
        for wid, pid in ((1, fleet.pids[0]), (2, fleet.pids[1])):
            assert fleet.first("worker serving", worker=wid, pid=pid)
        assert len(fleet.logged("embedded nats-server ready")) == 1, "one nats-server"
    finally:
        fleet.signal(signal.SIGTERM)
        assert fleet.wait() == 0
    events = await _stream_events(tmp_path / "data")
    by_request = Counter(e.request_id for e in events)
    assert set(by_request) == set(answered), "every answered call has its event, no other"
    assert set(by_request.values()) == {1}, "and exactly one"
    assert {e.instance for e in events} == {instance_of(p) for p in fleet.pids}
    outboxes = sorted(p.name for p in (tmp_path / "data" / "outbox").glob("events-*.log"))
    assert outboxes == ["events-0.log", "events-1.log"], "an outbox file each"


def test_a_killed_worker_is_restarted_and_the_port_keeps_serving(tmp_path: Path) -> None:
    answered: list[str] = []
    stop = threading.Event()

    def load() -> None:  # calls always in flight, each on a new connection
        with _fresh_client() as c:
            while not stop.is_set():
                rid = f"kill-{uuid.uuid4().hex}"
                try:
                    r = c.post(fleet.url + CHAT, json=chat_body(),
                               headers={**auth(), "X-Request-ID": rid})
                except httpx.HTTPError:
                    continue  # on the killed worker: not answered, nothing owed
                if r.status_code == 200 and r.json()["choices"]:
                    answered.append(rid)

    with FakeUpstream(api_key=UPSTREAM_KEY, latency_s=0.02, record=False) as up:
        fleet = Fleet(write_config(tmp_path, up.base_url)).start()
        threads = [threading.Thread(target=load) for _ in range(4)]
        try:
            for t in threads:
                t.start()
            assert eventually(lambda: len(answered) > 20)
            first, other = fleet.pids
            os.kill(first, signal.SIGKILL)  # mid-load
            # New connections go to the live worker: calls go on.
            with _fresh_client() as c:
                for _ in range(20):
                    r = c.post(fleet.url + CHAT, headers=auth(), json=chat_body())
                    assert r.status_code == 200
                    answered.append(r.headers["x-request-id"])
            exited = eventually(lambda: fleet.first("worker exited; starting another",
                                                    pid=first))
            assert exited and exited["worker"] == 1 and exited["status"] == "SIGKILL"
            second = eventually(lambda: [r["pid"] for r in fleet.logged("worker serving",
                                                                        worker=1)
                                         if r["pid"] != first])
            assert second, "worker 1 started again"
            assert alive(other), "the other worker was left alone"
            # A crash loop backs off: the next quick crash waits twice as long.
            os.kill(second[0], signal.SIGKILL)
            again = eventually(lambda: fleet.first("worker exited; starting another",
                                                   pid=second[0]))
            assert again and again["restart_in_s"] == 2 * exited["restart_in_s"] > 0
            third = eventually(lambda: [r["pid"] for r in fleet.logged("worker serving",
                                                                       worker=1)
                                        if r["pid"] not in (first, second[0])])
            assert third

            def served_by() -> set[Any]:
                return {x.get("worker") for x in fleet.logged("request", status=200)
                        if x.get("ts", 0) > again["ts"]}

            assert eventually(lambda: served_by() == {1, 2}), "the restarted worker serves"
        finally:
            stop.set()
            for t in threads:
                t.join(HANG_S)
            fleet.stop()
    assert not any(alive(p) for p in fleet.worker_pids())
    # What the killed workers had answered reached the stream through their successors
    # (each takes over the outbox file a dead one held), once.
    events = asyncio.run(_stream_events(tmp_path / "data"))
    by_request = Counter(e.request_id for e in events)
    assert not set(answered) - set(by_request), "an answered call has no event"
    assert max(by_request.values()) == 1, "a call event stored twice"


async def test_sigterm_drains_in_flight_calls_and_streams_then_stops(
        tmp_path: Path) -> None:
    gate = threading.Event()
    with FakeUpstream(api_key=UPSTREAM_KEY, chunk_delay_s=0.02, reply_words=40) as up:
        up.release = gate  # every reply waits for the test
        fleet = Fleet(write_config(tmp_path, up.base_url)).start()
        try:
            async with httpx.AsyncClient(base_url=fleet.url, timeout=HANG_S) as client:
                plain_id, stream_id = f"drain-{uuid.uuid4().hex}", f"drain-{uuid.uuid4().hex}"

                async def plain() -> httpx.Response:
                    return await client.post(CHAT, json=chat_body(), headers={
                        **auth(), "X-Request-ID": plain_id})

                async def streamed() -> tuple[int, list[str]]:
                    async with client.stream("POST", CHAT, json=chat_body(stream=True),
                                             headers={**auth(), "X-Request-ID": stream_id}
                                             ) as r:
                        return r.status_code, [x async for x in r.aiter_lines() if x]

                calls = asyncio.gather(plain(), streamed())
                await asyncio.to_thread(up.wait_for_requests, 2, HANG_S)
                fleet.signal(signal.SIGTERM)
                # Both workers are draining before the upstream answers.
                assert await asyncio.to_thread(eventually, lambda: len(
                    fleet.logged("Shutting down")) == 2)
                gate.set()
                done, (status, lines) = await calls
        finally:
            code = await asyncio.to_thread(fleet.wait)
    assert code == 0
    assert done.status_code == 200 and done.json()["choices"][0]["message"]["content"]
    assert status == 200 and lines[-1] == "data: [DONE]" and len(lines) > 40
    assert fleet.first("workers stopped")
    assert not any(alive(p) for p in fleet.worker_pids())
    # The parent stopped its nats-server only after the workers had flushed their events.
    events = await _stream_events(tmp_path / "data")
    assert Counter(e.request_id for e in events) == {plain_id: 1, stream_id: 1}
    assert all(e.outcome == "completed" for e in events)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{fleet.port}/api/ai/health")


def test_a_call_past_the_drain_deadline_is_cut_with_a_503(tmp_path: Path) -> None:
    gate = threading.Event()
    with FakeUpstream(api_key=UPSTREAM_KEY) as up:
        up.release = gate  # never set before the fleet is gone: the call outlasts the drain
        fleet = Fleet(write_config(tmp_path, up.base_url, drain_timeout_s=0.5)).start()
        result: list[Any] = []

        def call() -> None:
            try:
                with _fresh_client() as c:
                    result.append(c.post(fleet.url + CHAT, headers=auth(), json=chat_body()))
            except httpx.HTTPError as exc:
                result.append(exc)

        t = threading.Thread(target=call)
        try:
            t.start()
            up.wait_for_requests(1, HANG_S)
            fleet.signal(signal.SIGTERM)
            assert fleet.wait() == 0
        finally:
            gate.set()
            fleet.stop()
            t.join(HANG_S)
    assert fleet.logged("Cancel 1 running task(s), timeout graceful shutdown exceeded")
    assert not any(alive(p) for p in fleet.worker_pids())
    # Cut at the deadline: a 503 to retry elsewhere (not a 500), and a failed event.
    [r] = result
    assert isinstance(r, httpx.Response) and r.status_code == 503, r
    assert r.json()["error"]["code"] == "shutting_down" and r.headers["retry-after"] == "1"
    [event] = asyncio.run(_stream_events(tmp_path / "data"))
    assert (event.request_id, event.outcome, event.status) == (
        r.headers["x-request-id"], "failed", 503)


def test_a_second_fleet_on_the_same_data_folder_says_why_it_cannot_start(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    cfg = write_config(tmp_path, upstream.base_url)
    fleet = Fleet(cfg).start()
    try:
        r = subprocess.run([sys.executable, "-m", "tollway.cli", "serve", "--config", str(cfg),
                            "--port", "0", "--workers", "2"], capture_output=True, text=True,
                           env={**os.environ, "FAKE_API_KEY": UPSTREAM_KEY}, timeout=HANG_S)
        assert r.returncode == 1
        [line] = [json.loads(x) for x in r.stderr.splitlines()
                  if "cannot start the embedded nats-server" in x]
        assert "is in use by another tollway process" in line["msg"]
        assert "Traceback" not in r.stderr
        with _fresh_client() as c:
            assert c.post(fleet.url + CHAT, headers=auth(), json=chat_body()).status_code == 200
    finally:
        fleet.stop()


def test_a_killed_parent_leaves_no_worker_nor_nats_server_behind(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    fleet = Fleet(write_config(tmp_path, upstream.base_url)).start()
    ready = fleet.first("embedded nats-server ready")
    assert ready is not None
    children = [*fleet.pids, int(ready["pid"])]
    assert all(alive(p) for p in children)
    try:
        fleet.signal(signal.SIGKILL)  # no drain, no goodbye: the kernel tells the children
        assert fleet.wait() == -signal.SIGKILL
        assert eventually(lambda: not any(alive(p) for p in children)), "orphans left"
    finally:
        fleet.stop()
    # The next fleet starts on the same folder (the store's lock went with the server).
    again = Fleet(write_config(tmp_path, upstream.base_url)).start()
    try:
        with _fresh_client() as c:
            assert c.post(again.url + CHAT, headers=auth(), json=chat_body()).status_code == 200
    finally:
        again.stop()


async def test_ctrl_c_in_a_terminal_drains_in_order(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the whole foreground group: the workers and the
    nats-server each lead their own, so the parent alone decides the order (workers
    drain, then the server stops), and the held call's event is in the stream, not
    left in an outbox for the next start."""
    gate = threading.Event()
    with FakeUpstream(api_key=UPSTREAM_KEY) as up:
        up.release = gate
        fleet = Fleet(write_config(tmp_path, up.base_url), terminal=True).start()
        try:
            async with httpx.AsyncClient(base_url=fleet.url, timeout=HANG_S) as client:
                call = asyncio.ensure_future(client.post(CHAT, json=chat_body(),
                                                         headers=auth()))
                await asyncio.to_thread(up.wait_for_requests, 1, HANG_S)
                fleet.ctrl_c()
                assert await asyncio.to_thread(eventually, lambda: len(
                    fleet.logged("Shutting down")) == 2)
                gate.set()
                r = await call
        finally:
            gate.set()
            code = await asyncio.to_thread(fleet.wait)
            fleet.stop()
    assert code == 0 and r.status_code == 200
    [event] = await _stream_events(tmp_path / "data")
    assert event.request_id == r.headers["x-request-id"] and event.outcome == "completed"


def test_server_workers_and_drain_timeout_in_the_config() -> None:
    from tollway.config import ConfigError, parse_config

    def server(**kw: Any) -> Any:
        return parse_config({"server": kw}, source="<test>", env={}).server

    assert (server().workers, server().drain_timeout_s) == (1, 30.0)
    assert server(workers="auto").workers == "auto"
    assert worker_count(server(workers=3, drain_timeout_s=2.5).workers) == 3
    for bad in ({"workers": 0}, {"workers": "many"}, {"drain_timeout_s": 0}):
        with pytest.raises(ConfigError):
            server(**bad)


def test_the_embedded_nats_server_restarts_with_a_back_off_and_never_stalls_the_parent(
        tmp_path: Path) -> None:
    # The parent's loop also reaps and restarts workers and sees signals: starting the
    # nats-server again must not hold it (before, each 50 ms tick blocked up to 15 s in
    # start(), and a server that would not start was retried on every tick).
    config = default_config()
    config.nats.url = "embedded"
    config.nats.data_dir = str(tmp_path / "data")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sup = Supervisor(config, sock, 0)  # no workers: the parent's handling of NATS only
    sup._start_nats()
    emb = sup.embedded
    assert emb is not None
    try:
        hang = tmp_path / "never-ready"  # a server that starts and never serves
        hang.write_text("#!/bin/sh\nexec sleep 600\n")
        hang.chmod(0o755)
        emb.binary = str(hang)
        emb.kill()
        t = emb_down = time.monotonic()
        sup._tick(t)  # found down: it ran less than STABLE_S, so after a back-off
        assert not emb.running
        sup._tick(t + MIN_BACKOFF_S / 2)
        assert not emb.running
        t = emb_down + MIN_BACKOFF_S
        sup._tick(t)  # started, and the tick returns while it boots
        assert emb.running and sup._nats_booting == t
        sup._tick(t + 1)
        assert emb.running and sup._nats_booting == t
        t += NATS_BOOT_S
        sup._tick(t)  # not ready in time: stopped, and the next try waits twice as long
        assert not emb.running
        sup._tick(t + MIN_BACKOFF_S)
        assert not emb.running
        emb.binary = None  # the real server again
        t += 2 * MIN_BACKOFF_S
        sup._tick(t)
        assert emb.running
        assert eventually(lambda: (sup._tick(t + 1), sup._nats_booting is None)[1])
        assert emb.ready() and emb.url == sup.nats_url  # the workers' URL still
    finally:
        sup._close()

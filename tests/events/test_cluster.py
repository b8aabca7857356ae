"""A 3-node JetStream cluster: two gateways given the three URLs and ``[events] replicas =
3`` keep serving when the stream's leader is killed under load, and every call's event is
in the stream exactly once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from pathlib import Path

import httpx
import nats.errors
from nats.aio.client import Client as NatsClient

from fleet import GatewayProcess, NatsCluster, fleet_config
from support import HANG_S, auth, chat_body, unlimited_acme
from tollway.events.broker import connect, ensure_stream, stream_config
from tollway.events.schema import STREAM, decode
from tollway.testing.upstream import FakeUpstream

RATE = 40  # calls per second, over both gateways
BEFORE_S, AFTER_S = 3.0, 7.0  # load before and after the leader is killed


async def _until(check: object, what: str, timeout: float = HANG_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await check():  # type: ignore[operator]
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


async def _cluster_up(folder: Path) -> tuple[NatsCluster, NatsClient]:
    """A cluster whose JetStream has a meta leader, and a client of it.

    Three fresh nodes bootstrapping at once sometimes never elect one (nats-server 2.10.25
    in CI: every node up and routed, "JetStream cluster no metadata leader" for 60 s).
    That is nats-server's start, not what this test is about: such an attempt is stopped,
    its node logs' last lines are printed, and a new cluster is started on new ports and
    stores, up to three times."""
    for attempt in range(3):
        cluster = NatsCluster(folder / f"cluster{attempt}").start()
        nc: NatsClient | None = None
        try:
            nc = client = await connect(cluster.urls)
            await _until(client.jetstream().account_info, "the cluster's JetStream is up",
                         timeout=HANG_S / 3)
            return cluster, client
        except (AssertionError, OSError, nats.errors.Error) as exc:
            print(f"cluster attempt {attempt}: {exc}")
            for name in cluster.names:
                log = cluster.folder / name / "nats.log"
                print(f"{name}:", *log.read_text(errors="replace").splitlines()[-5:], sep="\n")
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
            cluster.stop()
    raise AssertionError("no JetStream cluster in three attempts")


async def _call_events(nc: NatsClient) -> collections.Counter[str]:
    """Call events in the stream, counted by request id."""
    js = nc.jetstream()
    sub = await js.pull_subscribe("tollway.call.>", stream=STREAM)
    counts: collections.Counter[str] = collections.Counter()
    try:
        while True:
            try:
                msgs = await sub.fetch(500, timeout=1)
            except nats.errors.TimeoutError:
                break
            for m in msgs:
                event = decode(m.data)
                if event is not None and event.request_id:
                    counts[event.request_id] += 1
            if not msgs:
                break
    finally:
        await sub.unsubscribe()
    return counts


async def test_killing_the_stream_leader_loses_and_doubles_no_event(tmp_path: Path) -> None:
    cluster, nc = await _cluster_up(tmp_path)
    gws: list[GatewayProcess] = []
    try:
        # The stream made ahead (as the gateways would make it), so that gateway A can be
        # given its leader's URL alone: A must then find the other nodes itself (they are
        # announced by the cluster) when that node is killed. B gets the three URLs.
        js = nc.jetstream()

        async def made() -> bool:
            await ensure_stream(js, stream_config(replicas=3))
            return True

        await _until(made, "the stream made")
        info = await js.stream_info(STREAM)
        assert info.config.num_replicas == 3
        assert info.cluster is not None and info.cluster.leader
        leader = info.cluster.leader
        with FakeUpstream(latency_s=0.0) as up:
            for name, urls in (("a", [cluster.url_of(leader)]), ("b", cluster.urls)):
                raw = fleet_config(up.base_url, urls, tmp_path / name / "data",
                                   events={"replicas": 3}, tenants=unlimited_acme())
                gws.append(GatewayProcess(name, tmp_path / name, raw))
            async with httpx.AsyncClient(timeout=HANG_S) as http:
                for gw in gws:
                    await asyncio.to_thread(gw.wait_serving)
                    await _until(lambda gw=gw: _ok(http.get(f"{gw.url}/api/ai/ready")),
                                 f"{gw.name} ready")
                # The gateways' checkpoint and probe-lease buckets are replicated too.
                for bucket in ("KV_tollway_checkpoints", "KV_tollway_breakers"):
                    assert (await js.stream_info(bucket)).config.num_replicas == 3

                results: dict[str, int] = {}

                async def call(rid: str, gw: GatewayProcess) -> None:
                    try:
                        r = await http.post(f"{gw.url}/api/ai/v1/chat/completions",
                                            json=chat_body(), headers={**auth(),
                                                                       "X-Request-ID": rid})
                        results[rid] = r.status_code
                    except httpx.HTTPError:
                        results[rid] = 0

                tasks: list[asyncio.Task[None]] = []
                ids = itertools.count()
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                killed = ""
                while (now := loop.time()) < t0 + BEFORE_S + AFTER_S:
                    if not killed and now >= t0 + BEFORE_S:
                        info = await nc.jetstream().stream_info(STREAM)
                        assert info.cluster is not None and info.cluster.leader
                        killed = info.cluster.leader
                        cluster.kill(killed)
                    i = next(ids)
                    tasks.append(asyncio.create_task(call(f"cl-{i}", gws[i % 2])))
                    await asyncio.sleep(max(0.0, t0 + (i + 1) / RATE - loop.time()))
                await asyncio.gather(*tasks)

            answered = [rid for rid, status in results.items() if status]
            failed = [rid for rid, status in results.items() if status != 200]
            assert len(results) >= RATE * (BEFORE_S + AFTER_S) * 0.9
            assert len(failed) < 0.01 * len(results), collections.Counter(results.values())

            # Every answered call's event reaches the stream once (from the outbox if its
            # publish was cut), read through a node that is still up.
            counts: collections.Counter[str] = collections.Counter()

            async def all_in() -> bool:
                counts.clear()
                counts.update(await _call_events(nc))
                return all(counts[rid] for rid in answered)

            await _until(all_in, "every call's event in the stream")
            mine = {rid: counts[rid] for rid in results}
            assert [rid for rid, n in mine.items() if n > 1] == [], "doubled"
            assert [rid for rid in answered if mine[rid] == 0] == [], "lost"
            assert sum(1 for rid in results if mine[rid]) == len(answered)
            info = await nc.jetstream().stream_info(STREAM)
            assert info.cluster is not None and info.cluster.leader != killed
            assert killed == leader, "the leader A was given"
            assert gws[0].lines("nats disconnected") and gws[0].lines("nats reconnected")
            for gw in gws:
                assert gw.proc.poll() is None, f"{gw.name} still serving"
    finally:
        for gw in gws:
            gw.stop()
        with contextlib.suppress(Exception):
            await nc.close()
        cluster.stop()


async def _ok(coro: object) -> bool:
    r = await coro  # type: ignore[misc]
    return bool(r.status_code == 200)

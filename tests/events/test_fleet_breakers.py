"""Breakers across the fleet: two ``tollway serve`` processes on one nats-server and one
fake upstream. A breaker opened in one opens in the other (from its ``breaker.changed``
event), and after the cool-down one probe reaches the upstream for the whole fleet."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgspec

from fleet import GatewayProcess, fleet_config
from support import ADMIN_KEY, HANG_S, auth, chat_body, eventually, unlimited_acme
from tollway.clock import SystemClock
from tollway.events.breakers import FleetBreakers, probe_key
from tollway.events.broker import EmbeddedNats, connect, ensure_stream, stream_config
from tollway.events.schema import BREAKER_CHANGED, BreakerChanged, decode, encode
from tollway.resilience import Breakers
from tollway.testing.upstream import FakeUpstream, Fault

RECOVERY_S = 3.0


def _raw(up: FakeUpstream, nats: EmbeddedNats, folder: Path) -> dict[str, Any]:
    return fleet_config(
        up.base_url, nats.url, folder / "data",
        providers=[{"name": "fake", "base_url": up.base_url, "api_key_env": "FAKE_API_KEY",
                    "first_byte_timeout_s": HANG_S, "total_timeout_s": HANG_S}],
        breaker={"failure_threshold": 3, "recovery_s": RECOVERY_S, "probe_lease_s": 30.0},
        tenants=unlimited_acme())


def _breaker(http: httpx.Client, gw: GatewayProcess) -> str:
    r = http.get(f"{gw.url}/api/ai/providers", headers=auth(ADMIN_KEY))
    return str(r.json()["data"][0]["breaker"]["state"])


def _chat(http: httpx.Client, gw: GatewayProcess) -> int:
    return http.post(f"{gw.url}/api/ai/v1/chat/completions", json=chat_body(),
                     headers=auth()).status_code


async def _breaker_events(url: str) -> list[BreakerChanged]:
    nc = await connect(url)
    try:
        sub = await nc.jetstream().pull_subscribe(f"{BREAKER_CHANGED}.>", stream="TOLLWAY")
        msgs = await sub.fetch(100, timeout=2)
        out = [decode(m.data) for m in msgs]
        return [e for e in out if isinstance(e, BreakerChanged)]
    finally:
        await nc.close()


def test_an_open_breaker_opens_the_fleets_and_one_probe_is_sent(
        nats_server: EmbeddedNats, tmp_path: Path) -> None:
    with FakeUpstream(latency_s=0.0) as up:
        a = GatewayProcess("a", tmp_path / "a", _raw(up, nats_server, tmp_path / "a"))
        b = GatewayProcess("b", tmp_path / "b", _raw(up, nats_server, tmp_path / "b"))
        gws = (a, b)
        try:
            with httpx.Client(timeout=HANG_S) as http:
                for gw in gws:
                    gw.wait_serving()
                    assert eventually(lambda gw=gw: http.get(
                        f"{gw.url}/api/ai/ready").status_code == 200)
                # Fail the provider through A until its breaker opens.
                up.add_fault(Fault(status=500, times=3))
                assert [_chat(http, a) for _ in range(3)] == [502, 502, 502]
                opened_a = eventually(lambda: a.lines("closed -> open", breaker_reason=
                                                      "failure_threshold"))
                assert opened_a, a.logs
                # B opens from A's event, without a call of its own failing.
                opened_b = eventually(lambda: b.lines("open from"))
                assert opened_b, b.logs
                assert _breaker(http, b) == "open"
                seen = len(up.requests)
                assert _chat(http, b) == 503
                assert len(up.requests) == seen == 3, "B refused without calling upstream"
                assert opened_b[0]["ts"] - opened_a[0]["ts"] < 1.0
                assert not b.lines("closed -> open", breaker_reason="failure_threshold")
                # After the cool-down: calls through both, while the probe's answer waits.
                up.release = threading.Event()
                statuses: list[Future[int]] = []
                with ThreadPoolExecutor(8) as pool:
                    def probe_sent() -> bool:
                        for gw in gws:
                            statuses.append(pool.submit(_chat, http, gw))
                        time.sleep(0.05)
                        return len(up.requests) > seen

                    assert eventually(probe_sent)
                    more = [pool.submit(_chat, http, gw) for gw in gws for _ in range(10)]
                    assert [f.result() for f in more] == [503] * 20
                    assert len(up.requests) == seen + 1, "one probe for the fleet"
                    up.release.set()
                    answered = [f.result() for f in statuses]
                assert answered.count(200) == 1 and answered.count(503) == len(answered) - 1
                # The probe's success closes every breaker of the fleet.
                assert eventually(lambda: all(_breaker(http, gw) == "closed" for gw in gws))
                assert [_chat(http, gw) for gw in gws] == [200, 200]
            assert len(up.requests) == seen + 3
            winners = [gw for gw in gws if gw.lines("sends the fleet's probe")]
            losers = [gw for gw in gws if gw.lines("another process sends the probe")]
            assert len(winners) == 1 and losers == [gw for gw in gws if gw not in winners]
            # No echo: the open and the close were published once each, by the process
            # where they happened; what the other applied (reason "peer") was not.
            events = asyncio.run(_breaker_events(nats_server.url))
            assert [(e.state, e.reason) for e in events if e.state != "half_open"] == [
                ("open", "failure_threshold"), ("closed", "probe_succeeded")]
            assert events[0].recovery_s == RECOVERY_S
            assert {e.instance for e in events if e.state == "closed"} == {
                e.instance for e in events if e.state == "half_open"}, "the prober closed it"
        finally:
            for gw in gws:
                gw.stop()


async def test_peer_events_apply_once_and_are_not_published_again(
        nats_server: EmbeddedNats) -> None:
    """In one process: two FleetBreakers on one NATS; what one applies from the other is
    reason "peer" (which the gateway never publishes), and its own events are skipped."""


    clock = SystemClock()
    mine = Breakers(["p"], clock)
    seen: list[tuple[str, str]] = []
    mine.hooks.append(lambda t, _f: seen.append((t.to_state, t.reason)))
    nc = await connect(nats_server.url)
    fleet = FleetBreakers(mine, "me", lease_s=5.0)
    try:
        await fleet.start(nc)
        opened = BreakerChanged(event_id="e1", occurred_at=time.time(), instance="other",
                                provider="p", previous="closed", state="open",
                                reason="failure_threshold", recovery_s=20.0)
        fleet.apply(opened)
        fleet.apply(msgspec.structs.replace(opened, event_id="e2", instance="me"))  # own
        fleet.apply(msgspec.structs.replace(opened, event_id="e3", provider="unknown"))
        assert seen == [("open", "peer")]
        assert 19.0 < mine["p"].retry_after() <= 20.0
        fleet.apply(msgspec.structs.replace(opened, event_id="e4", state="half_open",
                                            reason="recovery_elapsed"))
        assert mine.state("p") == "open"
        fleet.apply(msgspec.structs.replace(opened, event_id="e5", state="closed",
                                            reason="probe_succeeded"))
        assert mine.state("p") == "closed" and seen[-1] == ("closed", "peer")
        # An open whose cool-down is over by the time it arrives is old news.
        fleet.apply(msgspec.structs.replace(opened, event_id="e6",
                                            occurred_at=time.time() - 30))
        assert mine.state("p") == "closed" and fleet.applied == 2
        # The lease: one holder at a time.
        assert fleet.kv is not None
        assert await fleet.kv.create(probe_key("p"), b"x")
        assert probe_key("a.b") != probe_key("a_b") and "=" in probe_key("a.b")
        # A process that starts later finds the provider's last change in the stream.
        js = nc.jetstream()
        await ensure_stream(js, stream_config())
        await js.publish(opened.subject(), encode(msgspec.structs.replace(
            opened, event_id="e7", occurred_at=time.time())))
        late = Breakers(["p", "q"], clock)
        later = FleetBreakers(late, "late", lease_s=5.0)
        await later.start(nc)
        await later.stop()
        assert (late.state("p"), late.state("q")) == ("open", "closed")
    finally:
        await fleet.stop()
        await nc.close()

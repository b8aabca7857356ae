"""Fleet-wide rate limits on a real NATS: four gateways' limiters, one set of limits.

Each gateway here is a whole events service (its own connection, heartbeats,
subscription) in this process, on a clock the test moves: with time standing
still no bucket refills, so the bounds are exact numbers. The same limits
across real ``tollway serve`` processes: test_fleet_serve.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.js.api import KeyValueConfig
from prometheus_client import CollectorRegistry

from support import HANG_S
from tollway.config import EventsConfig, NatsConfig
from tollway.events.broker import EmbeddedNats, connect
from tollway.events.ratelimits import FleetDecision, FleetLimits, FleetState, worker_total
from tollway.events.service import EventsService
from tollway.ratelimit import Limits

T0 = 1_800_000_000.0
PER_MINUTE = Limits(per_minute=60, per_hour=100_000, per_day=1_000_000,
                    expensive_per_hour=5)


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


async def _until(check: object, timeout: float = HANG_S) -> bool:
    async with asyncio.timeout(timeout):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.02)
    return True


async def _fleet(url: str, tmp_path: Path, clock: Clock, n: int = 4,
                 limits: Limits = PER_MINUTE) -> list[EventsService]:
    out = []
    for i in range(n):
        svc = EventsService(NatsConfig(url=url, data_dir=str(tmp_path / f"gw{i}")),
                            EventsConfig(heartbeat_s=0.2), registry=CollectorRegistry(),
                            instance=f"gw{i}", clock=clock, limits_of=lambda name: limits)
        await svc.start()
        out.append(svc)
    limiters = [_limits(s) for s in out]

    def everyone_seen() -> bool:
        # A process beats when the clock passes its next beat: this clock stands still
        # unless moved, so it is moved here (before any call) until each process has seen
        # a beat of every other since it subscribed (the first ones may precede that).
        clock.t += 0.05
        return all(f.live() == n and not f.degraded for f in limiters)

    try:
        await _until(everyone_seen)
    except BaseException:
        for svc in out:
            await svc.stop()
        raise
    return out


def _limits(svc: EventsService) -> FleetLimits:
    assert svc.ratelimits is not None
    return svc.ratelimits


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def fleet(nats_server: EmbeddedNats, tmp_path: Path,
                clock: Clock) -> AsyncIterator[list[EventsService]]:
    services = await _fleet(nats_server.url, tmp_path, clock)
    yield services
    for svc in services:
        await svc.stop()


async def _call(f: FleetLimits, tenant: str = "acme", expensive: bool = False,
                tokens: int = 0) -> FleetDecision:
    answer = f.try_take(tenant, expensive, tokens, True)
    if answer is None:
        answer = await f.take(tenant, expensive, tokens, True)
    return answer


async def _spread(services: list[EventsService], calls: int, **kw: object
                  ) -> list[FleetDecision]:
    """``calls`` calls at once, round robin over the processes."""
    limiters = [_limits(s) for s in services]
    return await asyncio.gather(*(_call(limiters[i % len(limiters)], **kw)  # type: ignore[arg-type]
                                  for i in range(calls)))


async def _bucket(svc: EventsService, tenant: str = "acme") -> FleetState:
    f = _limits(svc)
    assert f.kv is not None
    entry = await f.kv.get(f"limits.{tenant}")
    assert entry.value is not None
    return msgspec.msgpack.decode(entry.value, type=FleetState)


async def test_four_processes_admit_exactly_the_limit(fleet: list[EventsService],
                                                     clock: Clock) -> None:
    answers = await _spread(fleet, 1000)
    allowed = [a for a in answers if a.allowed]
    assert len(allowed) == 60  # time stands still: no refill, no overshoot, no under-use
    assert all(_limits(s).summary()["held"]["acme"][0] == 0 for s in fleet)
    refused = [a for a in answers if not a.allowed]
    assert all(a.denied_by == ("per_minute",) and 0 < a.retry_after <= 1.0 for a in refused)
    # Whatever this process last saw of the others' takes, a refusal never shows room.
    assert {dict(a.headers)[b"x-ratelimit-remaining-requests"] for a in refused} == {b"0"}
    assert dict(allowed[0].headers)[b"x-ratelimit-limit-requests"] == b"60"
    state = await _bucket(fleet[0])
    assert state.used[0] == 60
    # Ten seconds later the bucket has refilled ten requests: the fleet admits ten more.
    clock.t += 10
    answers = await _spread(fleet, 200)
    assert sum(a.allowed for a in answers) == 10


async def test_expensive_and_token_tiers_are_fleet_wide(nats_server: EmbeddedNats,
                                                        tmp_path: Path, clock: Clock) -> None:
    limits = Limits(per_minute=1000, per_hour=100_000, per_day=1_000_000,
                    expensive_per_hour=7, tokens_per_minute=10_000)
    services = await _fleet(nats_server.url, tmp_path, clock, n=3, limits=limits)
    try:
        answers = await _spread(services, 60, expensive=True)
        assert sum(a.allowed for a in answers) == 7
        answers = await _spread(services, 60, tokens=700)
        assert sum(a.allowed for a in answers) == 10_000 // 700
        denied = [a for a in answers if not a.allowed]
        assert denied and all(a.denied_by == ("tokens_per_minute",) for a in denied)
        assert all(int(dict(a.headers)[b"x-ratelimit-remaining-tokens"]) < 700 for a in denied)
    finally:
        for svc in services:
            await svc.stop()


async def test_unused_allotments_go_back_to_the_bucket(fleet: list[EventsService],
                                                      clock: Clock) -> None:
    # A high limit: a first call takes an allotment of many calls ahead.
    big = Limits(per_minute=6000, per_hour=1_000_000, per_day=10_000_000,
                 expensive_per_hour=5)
    for svc in fleet:
        _limits(svc).limits_of = lambda name: big
    f = _limits(fleet[0])
    assert (await _call(f, "globex")).allowed
    held = f.summary()["held"]["globex"][0]
    assert held > 10
    assert (await _bucket(fleet[0], "globex")).used[0] == held + 1
    # Idle for longer than idle_s: the rest goes back; only the call itself stays used.
    clock.t += 0.001
    f.idle_s = 0.0
    f.tick()
    await _until(lambda: f.summary()["held"]["globex"][0] == 0)
    # (What the bucket refilled meanwhile, 0.1, is not given back: it counts as refilled.)
    assert (await _bucket(fleet[0], "globex")).used[0] == pytest.approx(1, abs=1e-4)
    # One count of the writes: the metric's.
    assert f.summary()["writes"] == fleet[0].metrics.registry.get_sample_value(
        "tollway_ratelimit_writes_total") >= 2


async def test_nats_down_shares_never_exceed_the_limit_and_reconcile(
        nats_server: EmbeddedNats, fleet: list[EventsService], clock: Clock) -> None:
    before = await _spread(fleet, 20)
    assert all(a.allowed for a in before)
    limiters = [_limits(s) for s in fleet]
    held = sum(f.summary()["held"]["acme"][0] for f in limiters)
    last = (await _bucket(fleet[0])).v
    await _until(lambda: all(f.snapshot("acme").v == last for f in limiters))
    nats_server.kill()
    await _until(lambda: all(f.degraded for f in limiters))
    assert fleet[0].metrics.registry.get_sample_value("tollway_ratelimit_shares") == 1
    # Each process: a quarter of the limit less a quarter of what the fleet had used
    # (the allotments held count as used: dropped, not served).
    outage = await _spread(fleet, 400)
    served_out = sum(a.allowed for a in outage)
    assert served_out == 4 * ((60 - 20 - held) // 4)
    refused = [a for a in outage if not a.allowed]
    assert all(a.retry_after > 0 and a.denied_by == ("per_minute",) for a in refused)
    # NATS back: each process adds what its share served to the fleet bucket, then the
    # fleet takes allotments again from what is left, and nothing more.
    nats_server.start()
    await _until(lambda: not any(f.degraded for f in limiters))
    assert fleet[0].metrics.registry.get_sample_value("tollway_ratelimit_shares") == 0
    assert fleet[0].metrics.registry.get_sample_value("tollway_ratelimit_writes_total")
    state = await _bucket(fleet[0])
    assert state.used[0] == pytest.approx(20 + held + served_out)
    after = await _spread(fleet, 400)
    # The allotments held when NATS went were dropped: that much under-use, no more.
    assert 20 + served_out + sum(a.allowed for a in after) == 60 - held


async def test_a_process_alone_on_nats_gets_the_whole_limit(nats_server: EmbeddedNats,
                                                            tmp_path: Path,
                                                            clock: Clock) -> None:
    services = await _fleet(nats_server.url, tmp_path, clock, n=1)
    try:
        answers = await _spread(services, 100)
        assert sum(a.allowed for a in answers) == 60
    finally:
        await services[0].stop()


async def test_off_when_not_asked_for(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    # Without a gateway's limits, or with shared_rate_limits = false, each gateway keeps
    # its own limiter (the guard's ``shared`` stays None).
    plain = EventsService(NatsConfig(url=nats_server.url, data_dir=str(tmp_path / "a")),
                          registry=CollectorRegistry())
    off = EventsService(NatsConfig(url=nats_server.url, data_dir=str(tmp_path / "b")),
                        EventsConfig(shared_rate_limits=False), registry=CollectorRegistry(),
                        limits_of=lambda name: PER_MINUTE)
    assert plain.ratelimits is None and off.ratelimits is None


async def test_a_tenant_first_seen_during_an_outage_gets_a_share(
        nats_server: EmbeddedNats, fleet: list[EventsService], clock: Clock) -> None:
    limiters = [_limits(s) for s in fleet]
    nats_server.kill()
    await _until(lambda: all(f.degraded for f in limiters))
    # Long after the last heartbeats: the processes still divide by the four they saw.
    clock.t += 60
    answers = await _spread(fleet, 400, tenant="globex")
    assert sum(a.allowed for a in answers) == 60


async def test_an_allotment_is_not_served_after_its_lifetime(fleet: list[EventsService],
                                                            clock: Clock) -> None:
    # Tokens taken ahead and served after the bucket has refilled would come on top of
    # the full bucket: an allotment is served within allotment_s of its take only, and
    # what goes back to the bucket is only what it has not refilled since.
    limiters = [_limits(s) for s in fleet]
    for f in limiters:
        f.idle_s = 1e9  # nothing given back for being idle: only the lifetime counts
    busy = limiters[0].tenant("acme", clock.t)
    busy.rate[0] = 100.0  # as if it had been serving 100 calls/s: it takes ahead
    assert (await _call(limiters[0])).allowed
    assert limiters[0].summary()["held"]["acme"][0] > 0  # taken ahead, unused
    clock.t += 60  # the fleet bucket is full again
    # The jump also ages every heartbeat past its lifetime: until the next beats, each
    # process counts itself alone, and one that took its shares then (its bucket writes
    # contended past their bound on a busy machine) would take the whole limit as its
    # share. The beats go round first, as they do when time passes.
    await _until(lambda: all(f.live() == len(fleet) for f in limiters))
    answers = await _spread(fleet, 1000)
    assert sum(a.allowed for a in answers) == 60, [f.summary() for f in limiters]


async def _stream_max_msg_size(url: str, bucket: str, size: int) -> None:
    """The KV bucket's stream refuses messages bigger than ``size`` (-1: none): every put
    fails at once, as the server answers; gets still work."""
    nc = await connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(f"KV_{bucket}")
        info.config.max_msg_size = size
        await js.update_stream(info.config)
    finally:
        await nc.close()


async def test_a_failed_first_attach_is_retried_while_nats_is_up(
        nats_server: EmbeddedNats, tmp_path: Path, clock: Clock) -> None:
    # The bucket exists but refuses writes (as a cluster's bucket does before it has a
    # leader): the first heartbeat fails, the processes keep their shares. Once the
    # bucket takes writes, they join the fleet without NATS ever dropping.
    nc = await connect(nats_server.url)
    await nc.jetstream().create_key_value(KeyValueConfig(bucket="tollway_ratelimits",
                                                         history=1, max_value_size=8))
    await nc.close()
    services = []
    try:
        for i in range(2):
            svc = EventsService(NatsConfig(url=nats_server.url,
                                           data_dir=str(tmp_path / f"gw{i}")),
                                EventsConfig(heartbeat_s=0.2), registry=CollectorRegistry(),
                                instance=f"gw{i}", clock=clock,
                                limits_of=lambda name: PER_MINUTE)
            await svc.start()
            services.append(svc)
        limiters = [_limits(s) for s in services]
        assert all(f.degraded and f.nc is not None and f.nc.is_connected for f in limiters)
        await _stream_max_msg_size(nats_server.url, "tollway_ratelimits", -1)
        await _until(lambda: all(f.live() == 2 and not f.degraded for f in limiters))
        answers = await _spread(services, 200)
        assert sum(a.allowed for a in answers) == 60
    finally:
        for svc in services:
            await svc.stop()


async def test_before_first_contact_a_worker_takes_its_share_of_the_workers(
        monkeypatch: pytest.MonkeyPatch, clock: Clock) -> None:
    # NATS not reached yet: a worker of ``tollway serve --workers 4`` admits a quarter of
    # the limit, not all of it (four workers alone would serve four times the limit).
    monkeypatch.setenv("TOLLWAY_WORKER_COUNT", "4")
    assert worker_total() == 4
    limiters = [FleetLimits(lambda name: PER_MINUTE, instance=f"w{i}", clock=clock,
                            expected=worker_total()) for i in range(4)]
    answers = [f.try_take("acme", False, 0, True) for f in limiters for _ in range(100)]
    assert all(a is not None for a in answers)
    assert sum(a.allowed for a in answers if a is not None) == 60
    monkeypatch.delenv("TOLLWAY_WORKER_COUNT")
    assert worker_total() == 1  # not a worker: alone until it sees the fleet


async def test_a_failing_bucket_is_not_a_refusal_the_shares_decide(
        nats_server: EmbeddedNats, fleet: list[EventsService], clock: Clock) -> None:
    # NATS is up but the bucket refuses every write (as when its stream has lost its
    # leader or quorum): calls under the limits are served through the shares, never
    # refused as if the tenant had used up its limits.
    limiters = [_limits(s) for s in fleet]
    await _stream_max_msg_size(nats_server.url, "tollway_ratelimits", 8)
    answers = await _spread(fleet, 40, tenant="globex")
    assert all(a.allowed for a in answers)
    assert all(f.degraded and f.nc is not None and f.nc.is_connected for f in limiters)
    # The shares hold: the fleet admits no more than the limit. (Each starts from its
    # part of what the bucket was last seen to hold: the refused writes were delivered to
    # the subscribers all the same, so somewhat less than 60 in all.)
    answers = await _spread(fleet, 200, tenant="globex")
    served = 40 + sum(a.allowed for a in answers)
    assert 40 < served <= 60
    refused = [a for a in answers if not a.allowed]
    assert all(a.denied_by == ("per_minute",) for a in refused)
    # The bucket takes writes again: back on it, what the shares served written back.
    await _stream_max_msg_size(nats_server.url, "tollway_ratelimits", -1)
    await _until(lambda: not any(f.degraded for f in limiters))
    assert (await _bucket(fleet[0], "globex")).used[0] == served
    answers = await _spread(fleet, 200, tenant="globex")
    assert served + sum(a.allowed for a in answers) <= 60


async def test_members_gone_for_three_heartbeats_are_forgotten(fleet: list[EventsService],
                                                               clock: Clock) -> None:
    # Every restarted worker is a new instance (host-pid): the old ones are dropped, not
    # kept (and counted over on every grant) for ever.
    f = _limits(fleet[0])
    f.members["gw-restarted-1"] = clock.t - 10 * f.heartbeat_s
    assert f.live() == 4
    f.tick(clock.t + 1e-3)
    assert "gw-restarted-1" not in f.members
    assert set(f.members) >= {"gw1", "gw2", "gw3"} and f.live() == 4

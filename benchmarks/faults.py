"""Faults: what the gateway does on a bad day, measured end to end (issue 11, point 6).

One ``tollway serve`` process per scenario, simulated upstreams in this
process (real HTTP servers, ``tollway.testing.upstream``), a real
nats-server where one is needed. Each scenario prints a table and goes into
``benchmarks/results/faults-<UTC timestamp>.json``:

- ``flaky``: two providers serve route ``auto``; the first answers 500, 503
  or 429 to a seeded 20 % of calls. ``--calls`` calls (2,000) at a fixed
  concurrency, three legs in the same sitting, interleaved in rounds: no
  faults (the baseline), the faults with the gateway as shipped (retries,
  breaker), and the faults with the breaker out of reach (retries and
  failover alone). Bar: >= 99.9 % end 200.
- ``hang``: the first provider accepts connections and never answers (a
  listening socket nobody reads). Each call's time to its answer against the
  bound ``attempts x first_byte_timeout_s`` (plus backoff), and when the
  breaker takes the provider out of the plan.
- ``nats``: ``--rate`` calls/s (100) open loop; NATS is killed for
  ``--outage`` seconds (30) and started again on the same port and store.
  During the outage a tenant limited to 5 calls a minute and a tenant whose
  daily budget holds about 3 calls are driven past their limits. Then every
  call event in the stream is counted by request id: lost, doubled.
- ``disk``: NATS down from the start, the outbox on a full disk: a 256 KiB
  tmpfs when this runs as root and may mount one, else a file size limit
  (RLIMIT_FSIZE) on the gateway process. Calls at ``--rate`` for 10 s; then
  NATS comes up on the port the gateway was given and what the outbox kept
  is sent.
- ``disconnect``: slow streams (a token every 50 ms) whose client reads a few
  chunks and leaves: how soon the provider sees its connection closed
  (bar: 1 s), and the call event of each (``client_cancelled``, billed tokens).

Latencies are quoted as medians and p99 and compared with the baseline leg
of the same run, not across days; the client (aiohttp, ``pip install -e
'.[bench]'``) and the simulated upstreams share this process, so where it
matters the gateway's own latency (its access log) is given too. Run from
the repository root:

    python benchmarks/faults.py                 # every scenario, about 2.5 minutes
    python benchmarks/faults.py --quick         # 500 calls, a 5 s outage
    python benchmarks/faults.py --only nats,disk
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from load import HOST, UPSTREAM_KEY, Proc, free_port, to_toml, wait_ready
from tollway.events.broker import EmbeddedNats, connect
from tollway.events.schema import CallEvent, decode
from tollway.testing.upstream import FakeUpstream, Fault

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = {  # tenant -> key (bench keys: never real ones)
    "bench": "tw-bench-faults-0123456789abcdef01234567",
    "limited": "tw-bench-faults-limited-0123456789abcdef",
    "budgeted": "tw-bench-faults-budgeted-0123456789abcd",
}
ADMIN_KEY = "tw-admin-bench-faults-0123456789abcdef"
CHAT = "/api/ai/v1/chat/completions"
PER_MINUTE = 5  # the "limited" tenant
MAX_TOKENS = 50
BUDGET_USD = 0.0004  # the "budgeted" tenant: about three 50-token replies on m-secondary
UNLIMITED = {"per_minute": 100_000_000, "per_hour": 1_000_000_000, "per_day": 1_000_000_000,
             "expensive_per_hour": 1_000_000_000}
DISK_BYTES = 256 << 10


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config(urls: dict[str, str], *, nats: dict[str, Any] | None = None,
           provider: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Providers named by ``urls`` (model ``m-<name>`` on each, route ``auto`` over them in
    order) and the three tenants."""
    cfg: dict[str, Any] = {
        "server": {"host": HOST, "admin_key_env": "FAULTS_ADMIN_KEY",
                   "builtin_providers": False, "builtin_models": False},
        "nats": nats or {"enabled": False},
        "providers": [{"name": n, "kind": "openai", "base_url": u, "api_key_env": "SIM_KEY",
                       **(provider or {})} for n, u in urls.items()],
        "models": [{"id": f"m-{n}", "provider": n, "upstream": "gpt-4o-mini",
                    "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0} for n in urls],
        "routes": [{"alias": "auto", "candidates": [f"m-{n}" for n in urls]}],
        "tiers": {"premium": {"max_call_usd": 10.0, "daily_usd": 1_000_000_000.0}},
        "tenants": [
            {"id": "bench", "tier": "premium", "key_sha256": [_sha(KEYS["bench"])],
             "limits": UNLIMITED},
            {"id": "limited", "tier": "premium", "key_sha256": [_sha(KEYS["limited"])],
             "limits": {**UNLIMITED, "per_minute": PER_MINUTE}},
            {"id": "budgeted", "tier": "low", "key_sha256": [_sha(KEYS["budgeted"])],
             "limits": UNLIMITED, "daily_usd": BUDGET_USD},
        ],
    }
    cfg.update(extra)
    return cfg


def start_gateway(workdir: Path, name: str, cfg: dict[str, Any],
                  fsize: int | None = None) -> tuple[Proc, str]:
    """``tollway serve`` on ``cfg``; ``fsize``: no file of it may grow past that many bytes."""
    (workdir / name).mkdir(exist_ok=True)
    port = free_port()
    cfg["server"]["port"] = port
    path = workdir / name / "tollway.toml"
    path.write_text(to_toml(cfg))
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "OPENROUTER_API_KEY", "LOCAL_OPENAI_URL",
                        "LOCAL_API_KEY")}
    env |= {"SIM_KEY": UPSTREAM_KEY, "FAULTS_ADMIN_KEY": ADMIN_KEY}
    limit = (f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize})); "
             if fsize else "")
    cmd = [sys.executable, "-c",
           f"import sys; {limit}from tollway.cli import main; sys.exit(main())",
           "serve", "--config", str(path), "--host", HOST, "--port", str(port)]
    log = workdir / name / "gateway.log"
    popen = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                             cwd=workdir / name)
    proc = Proc(f"gateway[{name}]", popen, log)
    base = f"http://{HOST}:{port}"
    wait_ready(proc, f"{base}/api/ai/health", {})
    return proc, base


@contextlib.contextmanager
def gateway(workdir: Path, name: str, cfg: dict[str, Any],
            fsize: int | None = None) -> Iterator[tuple[Proc, str]]:
    proc, base = start_gateway(workdir, name, cfg, fsize)
    try:
        yield proc, base
    finally:
        proc.stop()


@contextlib.contextmanager
def upstreams(*names: str, **kw: Any) -> Iterator[dict[str, FakeUpstream]]:
    ups = {n: FakeUpstream(n, api_key=UPSTREAM_KEY, record=False, **kw) for n in names}
    try:
        for up in ups.values():
            up.start()
        yield ups
    finally:
        for up in ups.values():
            up.stop()


# ---------------------------------------------------------------- calls


@dataclass
class Result:
    status: int
    latency_s: float
    request_id: str = ""
    provider: str = ""
    error: str = ""
    phase: str = ""
    cost_usd: float = 0.0


@dataclass
class Caller:
    base: str
    session: aiohttp.ClientSession
    results: list[Result] = field(default_factory=list)

    async def call(self, tenant: str = "bench", *, due: float | None = None,
                   phase: str = "", **body: Any) -> Result:
        """One chat call; latency from ``due`` (open loop: a stall is not hidden)."""
        start = time.monotonic() if due is None else due
        payload = {"model": "auto", "messages": [{"role": "user", "content": "one two three"}],
                   **body}
        try:
            async with self.session.post(
                    self.base + CHAT, json=payload,
                    headers={"authorization": f"Bearer {KEYS[tenant]}"}) as resp:
                text = await resp.text()
                code = ""
                if resp.status >= 400:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        code = json.loads(text)["error"]["code"] or ""
                res = Result(resp.status, time.monotonic() - start,
                             resp.headers.get("x-request-id", ""),
                             resp.headers.get("x-tollway-provider", ""), code, phase,
                             float(resp.headers.get("x-tollway-cost-usd") or 0))
        except (aiohttp.ClientError, TimeoutError) as exc:
            res = Result(0, time.monotonic() - start, error=type(exc).__name__, phase=phase)
        self.results.append(res)
        return res

    async def closed(self, n: int, concurrency: int) -> list[Result]:
        """``n`` calls, ``concurrency`` at a time."""
        it = iter(range(n))
        out: list[Result] = []

        async def worker() -> None:
            for _ in it:
                out.append(await self.call())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out

    async def paced(self, rate: float, seconds: float, phase: str) -> list[asyncio.Task[Result]]:
        """Calls due every 1/rate s for ``seconds``, each in its own task (not awaited)."""
        tasks = []
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(self.call(due=due, phase=phase)))
        return tasks


def session(limit: int = 256) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=60))


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def latency_ms(results: list[Result]) -> dict[str, float]:
    xs = [r.latency_s * 1000 for r in results]
    return {"p50_ms": round(statistics.median(xs), 2) if xs else float("nan"),
            "p99_ms": round(pct(xs, 0.99), 2)}


def served_ms(log: str) -> dict[str, float]:
    """The gateway's own latency of the chat calls in its access log (p50, p99): what the
    client measures includes this process's load too."""
    xs = []
    for line in log.splitlines():
        if '"path":"/api/ai/v1/chat/completions"' in line:
            with contextlib.suppress(ValueError, KeyError):
                xs.append(float(json.loads(line)["latency_ms"]))
    return {"gateway_p50_ms": round(statistics.median(xs), 2) if xs else float("nan"),
            "gateway_p99_ms": round(pct(xs, 0.99), 2)}


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


async def metrics(s: aiohttp.ClientSession, base: str) -> str:
    async with s.get(base + "/api/ai/metrics",
                     headers={"authorization": f"Bearer {ADMIN_KEY}"}) as r:
        text: str = await r.text()
        return text


async def call_events(url: str) -> list[CallEvent]:
    """Every call event in the stream."""
    nc = await connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("TOLLWAY")
        last, out = info.state.last_seq, []
        if not info.state.messages:
            return []
        sub = await js.pull_subscribe("tollway.call.>", stream="TOLLWAY")
        seen = 0
        while seen < last:
            try:
                msgs = await sub.fetch(1000, timeout=2)
            except TimeoutError:
                break
            for m in msgs:
                seen = m.metadata.sequence.stream
                e = decode(m.data)
                if isinstance(e, CallEvent):
                    out.append(e)
                await m.ack()
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


# ---------------------------------------------------------------- scenarios


FLAKY_LEGS: dict[str, tuple[bool, dict[str, Any]]] = {  # leg -> (faults on, config overlay)
    "baseline": (False, {}),
    "shipped": (True, {}),
    "no_breaker": (True, {"breaker": {"failure_threshold": 1_000_000_000}}),
}


async def flaky(workdir: Path, calls: int, concurrency: int, rounds: int) -> dict[str, Any]:
    """Three gateways, each on its own pair of upstreams, driven in turn: ``rounds`` rounds
    of ``calls / rounds`` calls per leg, the order rotated each round."""
    results: dict[str, list[Result]] = {leg: [] for leg in FLAKY_LEGS}
    round_p50: dict[str, list[float]] = {leg: [] for leg in FLAKY_LEGS}
    counters: dict[str, dict[str, int]] = {}
    with contextlib.ExitStack() as stack:
        bases: dict[str, str] = {}
        for leg, (fault, extra) in FLAKY_LEGS.items():
            ups = stack.enter_context(upstreams("primary", "secondary"))
            if fault:
                ups["primary"].add_fault(Fault(fraction=0.2, statuses=(500, 503, 429),
                                               times=None))
            urls = {n: u.base_url for n, u in ups.items()}
            _, bases[leg] = stack.enter_context(
                gateway(workdir, f"flaky-{leg}", config(urls, **extra)))
        async with session() as s:
            callers = {leg: Caller(base, s) for leg, base in bases.items()}
            for c in callers.values():
                await c.closed(50, concurrency)  # warm-up, not counted
                c.results.clear()
            legs = list(FLAKY_LEGS)
            for r in range(rounds):
                for leg in legs[r % len(legs):] + legs[:r % len(legs)]:
                    res = await callers[leg].closed(calls // rounds, concurrency)
                    results[leg] += res
                    round_p50[leg].append(latency_ms(res)["p50_ms"])
            for leg, base in bases.items():
                m = await metrics(s, base)
                counters[leg] = {"retries": int(metric(m, "tollway_retries_total")),
                                 "fallbacks": int(metric(m, "tollway_fallbacks_total"))}
    out: dict[str, Any] = {}
    for leg, res in results.items():
        ok = sum(r.status == 200 for r in res)
        ratios = [x / b for x, b in zip(round_p50[leg], round_p50["baseline"], strict=True)]
        out[leg] = {
            "calls": len(res), "ok": ok, "ok_share": ok / len(res),
            "statuses": dict(Counter(r.status for r in res)),
            "served_by": dict(Counter(r.provider for r in res if r.status == 200)),
            **latency_ms(res), "round_p50_ms": round_p50[leg],
            "p50_vs_baseline": round(statistics.median(ratios), 2), **counters[leg],
        }
    print(f"\n### flaky: first provider fails 20 % of calls (500/503/429), {len(res)} calls "
          f"per leg, concurrency {concurrency}, {rounds} interleaved rounds\n")
    print("| leg | 200 | share | served by | p50 ms | p99 ms | p50 vs baseline |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for name, leg_out in out.items():
        print(f"| {name} | {leg_out['ok']} | {leg_out['ok_share']:.2%} | "
              f"{', '.join(f'{k} {v}' for k, v in sorted(leg_out['served_by'].items()))} | "
              f"{leg_out['p50_ms']} | {leg_out['p99_ms']} | {leg_out['p50_vs_baseline']}x |")
    return {"legs": out, "bar_ok_share": 0.999,
            "met": all(leg_out["ok_share"] >= 0.999 for leg_out in out.values())}


async def hang(workdir: Path, n: int) -> dict[str, Any]:
    timeout, attempts = 1.0, 3
    silent = socket.socket()
    silent.bind((HOST, 0))
    silent.listen(256)
    try:
        with upstreams("secondary") as ups:
            urls = {"primary": f"http://{HOST}:{silent.getsockname()[1]}/v1",
                    "secondary": ups["secondary"].base_url}
            cfg = config(urls, provider={"first_byte_timeout_s": timeout},
                         retry={"attempts": attempts})
            with gateway(workdir, "hang", cfg) as (_, base):
                async with session() as s:
                    c = Caller(base, s)
                    res = [await c.call() for _ in range(n)]
                    m = await metrics(s, base)
    finally:
        silent.close()
    bound = attempts * timeout + (attempts - 1) * 8.0  # max_backoff_s caps each backoff
    slow = [r for r in res if r.latency_s >= timeout]
    out: dict[str, Any] = {
        "calls": n, "first_byte_timeout_s": timeout, "attempts": attempts,
        "statuses": dict(Counter(r.status for r in res)),
        "served_by": dict(Counter(r.provider for r in res)),
        "waited_for_the_hung_provider": len(slow),
        "latency_s": [round(r.latency_s, 3) for r in res],
        "slowest_s": round(max(r.latency_s for r in res), 3),
        "bound_s": bound,
        # The first call meets a closed breaker: every attempt waits its whole timeout.
        # Later ones may stop early, when a failure of theirs opens the breaker.
        "first_call_s": round(res[0].latency_s, 3),
        "never_before_timeout": res[0].latency_s >= attempts * timeout,
        "breaker_opened": metric(m, 'tollway_breaker_state{provider="primary"}') == 2.0,
    }
    out["met"] = (out["statuses"] == {200: n} and out["slowest_s"] <= bound
                  and out["never_before_timeout"])
    print(f"\n### hang: first provider accepts and never answers (first_byte_timeout_s "
          f"{timeout}, {attempts} attempts)\n")
    print("| calls | 200 | waited for it | their latency s | then (breaker open) p50 ms |")
    print("|---:|---:|---:|---|---:|")
    fast = [r for r in res if r.latency_s < timeout]
    print(f"| {n} | {out['statuses'].get(200, 0)} | {len(slow)} | "
          f"{', '.join(f'{r.latency_s:.2f}' for r in slow)} | "
          f"{latency_ms(fast)['p50_ms'] if fast else '-'} |")
    return out


async def drain_time(s: aiohttp.ClientSession, base: str, since: float) -> float | None:
    """Seconds from ``since`` until the outbox is empty (None: not within a minute)."""
    while time.monotonic() - since < 60:
        if metric(await metrics(s, base), "tollway_events_outbox_depth") == 0:
            return round(time.monotonic() - since, 2)
        await asyncio.sleep(0.1)
    return None


async def guards_during_outage(c: Caller) -> dict[str, Any]:
    limited = [await c.call("limited", phase="outage") for _ in range(PER_MINUTE + 3)]
    budgeted = [await c.call("budgeted", model="m-secondary", max_tokens=MAX_TOKENS,
                             phase="outage") for _ in range(8)]
    return {
        "rate_limited": [r.status if r.status == 200 else r.error for r in limited],
        "budgeted": [r.status if r.status == 200 else r.error for r in budgeted],
        "budgeted_spend_usd": round(sum(r.cost_usd for r in budgeted if r.status == 200), 9),
        "budget_usd": BUDGET_USD,
        "ok": ([r.status for r in limited] == [200] * PER_MINUTE + [429] * 3
               and all(r.error == "rate_limit_exceeded" for r in limited[PER_MINUTE:])
               and any(r.error == "insufficient_quota" for r in budgeted)
               and sum(r.cost_usd for r in budgeted) <= BUDGET_USD),
    }


async def nats_outage(workdir: Path, rate: float, outage: float) -> dict[str, Any]:
    srv = EmbeddedNats(workdir / "nats-outage")
    srv.start()
    try:
        with upstreams("primary", "secondary") as ups:
            urls = {n: u.base_url for n, u in ups.items()}
            ups["secondary"].reply_words = MAX_TOKENS  # a budgeted call costs its hold
            cfg = config(urls, nats={"url": srv.url, "data_dir": str(workdir / "gw-nats")})
            with gateway(workdir, "nats", cfg) as (_, base):
                async with session() as s:
                    c = Caller(base, s)
                    await asyncio.gather(*await c.paced(rate, 3, "warm-up"))
                    tasks = await c.paced(rate, 10, "before")
                    srv.kill()
                    killed = time.monotonic()
                    during = asyncio.create_task(c.paced(rate, outage, "outage"))
                    await asyncio.sleep(1.0)
                    guards = await guards_during_outage(c)
                    tasks += await during
                    srv.start()
                    back = time.monotonic()
                    drained = asyncio.create_task(drain_time(s, base, back))
                    tasks += await c.paced(rate, 10, "after")
                    await asyncio.gather(*tasks)
                    drained_s = await drained
                    expected = {r.request_id for r in c.results if r.request_id}
                    counts: Counter[str] = Counter()
                    for _ in range(30):  # the views may still be folding: poll the stream
                        counts = Counter(e.request_id for e in await call_events(srv.url))
                        if expected <= set(counts):
                            break
                        await asyncio.sleep(1)
    finally:
        srv.stop()
    res = c.results
    by_phase = {p: [r for r in res if r.phase == p and r.status == 200]
                for p in ("before", "outage", "after")}
    out: dict[str, Any] = {
        "rate": rate, "outage_s": round(back - killed, 1), "calls": len(res),
        "statuses": dict(Counter(r.status for r in res)),
        "five_xx": sum(r.status >= 500 or r.status == 0 for r in res),
        "latency_by_phase": {p: latency_ms(rs) for p, rs in by_phase.items()},
        "guards": guards,
        "events_expected": len(expected), "events_lost": len(expected - set(counts)),
        "events_doubled": sum(1 for k in expected if counts[k] > 1),
        "outbox_drained_after_s": drained_s,
    }
    before = out["latency_by_phase"]["before"]["p50_ms"]
    out["outage_p50_vs_before"] = round(out["latency_by_phase"]["outage"]["p50_ms"] / before, 2)
    out["met"] = (out["five_xx"] == 0 and guards["ok"] and out["events_lost"] == 0
                  and out["events_doubled"] == 0)
    print(f"\n### nats: NATS killed for {out['outage_s']} s under {rate:.0f} calls/s\n")
    print("| calls | 5xx | p50 ms before / during / after | guards refuse | events "
          "expected | lost | doubled | outbox drained after |")
    print("|---:|---:|---|---|---:|---:|---:|---:|")
    lat = out["latency_by_phase"]
    print(f"| {len(res)} | {out['five_xx']} | {lat['before']['p50_ms']} / "
          f"{lat['outage']['p50_ms']} / {lat['after']['p50_ms']} | "
          f"{'yes' if guards['ok'] else 'NO'} | {len(expected)} | {out['events_lost']} | "
          f"{out['events_doubled']} | {drained_s} s |")
    print(f"\nrate limit ({PER_MINUTE}/min): {guards['rate_limited']}; budget "
          f"({BUDGET_USD} USD): {guards['budgeted']}, spent {guards['budgeted_spend_usd']}")
    return out


def _tmpfs(path: Path, size: int) -> bool:
    """A ``size``-byte tmpfs at ``path`` when this process may mount one (root)."""
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, check=False)
    return done.returncode == 0


async def full_disk(workdir: Path, rate: float) -> dict[str, Any]:
    disk = workdir / "full-disk"  # the outbox only: the gateway's log is elsewhere
    mounted = _tmpfs(disk, DISK_BYTES)
    nats_port = free_port()
    srv = EmbeddedNats(workdir / "nats-disk", port=nats_port)
    try:
        with upstreams("primary") as ups:
            cfg = config({"primary": ups["primary"].base_url},
                         nats={"url": f"nats://{HOST}:{nats_port}", "data_dir": str(disk)})
            with gateway(workdir, "disk", cfg, None if mounted else DISK_BYTES) as (gw, base):
                async with session() as s:
                    c = Caller(base, s)
                    await asyncio.gather(*await c.paced(rate, 10, "full"))
                    await asyncio.sleep(1.0)
                    m = await metrics(s, base)
                    kept = metric(m, "tollway_events_outbox_depth")
                    queued = metric(m, "tollway_events_queue_depth")
                    spilled = metric(m, "tollway_events_spilled_total")
                    leases = metric(m, "tollway_budget_local_reservations_total")
                    dropped = metric(m, "tollway_events_dropped_total")
                    reasons = {ln.split('reason="')[1].split('"')[0]: float(ln.rsplit(" ", 1)[1])
                               for ln in m.splitlines()
                               if ln.startswith("tollway_events_dropped_total{")}
                    srv.start()  # NATS appears where the gateway looks for it
                    for _ in range(300):
                        if metric(await metrics(s, base), "tollway_events_outbox_depth") == 0:
                            break
                        await asyncio.sleep(0.1)
                    after = await c.call(phase="after")
                    alive = gw.popen.poll() is None
                landed = len(await call_events(srv.url))
            log = gw.log.read_text(errors="replace")
    finally:
        srv.stop()
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
    res = [r for r in c.results if r.phase == "full"]
    lines = [ln for ln in log.splitlines() if "outbox not writable" in ln]
    out: dict[str, Any] = {
        "disk": f"tmpfs {DISK_BYTES} bytes" if mounted else f"RLIMIT_FSIZE {DISK_BYTES} bytes",
        "calls": len(res), "statuses": dict(Counter(r.status for r in res)),
        **latency_ms(res), "events_kept": int(kept), "events_dropped": int(dropped),
        "dropped_by_reason": reasons, "events_queued": int(queued),
        "events_spilled": int(spilled), "local_leases": int(leases),
        **served_ms(log), "error_log_lines": len(lines),
        "first_error_line": lines[0][:300] if lines else "",
        "tracebacks": log.count("Traceback"), "served_after": after.status,
        "alive": alive, "call_events_landed_after_nats_came": landed,
    }
    out["met"] = (out["statuses"] == {200: len(res)} and dropped > 0 and bool(lines)
                  and alive and out["tracebacks"] == 0 and after.status == 200)
    print(f"\n### disk: the outbox on a full disk ({out['disk']}), NATS down, "
          f"{rate:.0f} calls/s for 10 s\n")
    print("| calls | 200 | p50 ms | events kept | dropped (counted) | error lines | "
          "tracebacks | call events landed once NATS came |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {len(res)} | {out['statuses'].get(200, 0)} | {out['p50_ms']} | {int(kept)} | "
          f"{int(dropped)} | {len(lines)} | {out['tracebacks']} | {landed} |")
    return out


async def disconnect(workdir: Path, n: int) -> dict[str, Any]:
    srv = EmbeddedNats(workdir / "nats-disconnect")
    srv.start()
    closes: list[float] = []
    ids: list[str] = []
    try:
        with upstreams("primary", chunk_delay_s=0.05, reply_words=200) as ups:
            up = ups["primary"]
            cfg = config({"primary": up.base_url},
                         nats={"url": srv.url, "data_dir": str(workdir / "gw-disconnect")})
            with gateway(workdir, "disconnect", cfg) as (_, base):
                for i in range(n):
                    payload = {"model": "auto", "stream": True, "messages": [
                        {"role": "user", "content": "tell me a long story"}]}
                    async with session(1) as s, s.post(
                            base + CHAT, json=payload,
                            headers={"authorization": f"Bearer {KEYS['bench']}"}) as resp:
                        ids.append(resp.headers.get("x-request-id", ""))
                        chunks = 0
                        async for line in resp.content:
                            if line.startswith(b"data: {"):
                                chunks += 1
                                if chunks >= 3:
                                    break
                        left = time.monotonic()
                        resp.close()  # drops the connection mid-stream
                    aborted = await asyncio.to_thread(up.wait_for_aborted, i + 1, 5.0)
                    closes.append(aborted[i].at - left if len(aborted) > i else float("inf"))
                for _ in range(50):
                    events = {e.request_id: e for e in await call_events(srv.url)}
                    if set(ids) <= set(events):
                        break
                    await asyncio.sleep(0.2)
    finally:
        srv.stop()
    billed = [e for rid, e in events.items() if rid in ids]
    out: dict[str, Any] = {
        "streams": n, "close_seen_after_s": {"p50": round(statistics.median(closes), 4),
                                             "max": round(max(closes), 4)},
        "bar_s": 1.0, "events": len(billed),
        "client_cancelled": sum(e.client_cancelled for e in billed),
        "billed_tokens_min": min((e.completion_tokens for e in billed), default=0),
        "billed_cost_min_nanousd": min((e.actual_cost_nanousd for e in billed), default=0),
    }
    out["met"] = (max(closes) <= 1.0 and len(billed) == n and out["client_cancelled"] == n
                  and out["billed_cost_min_nanousd"] > 0)
    print(f"\n### disconnect: {n} clients leave a slow stream after 3 chunks\n")
    print("| streams | provider saw the close after, p50 / max | call events | "
          "client_cancelled | fewest billed tokens |")
    print("|---:|---|---:|---:|---:|")
    print(f"| {n} | {out['close_seen_after_s']['p50'] * 1000:.1f} ms / "
          f"{out['close_seen_after_s']['max'] * 1000:.1f} ms | {len(billed)} | "
          f"{out['client_cancelled']} | {out['billed_tokens_min']} |")
    return out


async def amain(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    only = set(args.only.split(","))
    out: dict[str, Any] = {}
    if "flaky" in only:
        out["flaky"] = await flaky(workdir, args.calls, args.concurrency, args.rounds)
    if "hang" in only:
        out["hang"] = await hang(workdir, 12)
    if "nats" in only:
        out["nats"] = await nats_outage(workdir, args.rate, args.outage)
    if "disk" in only:
        out["disk"] = await full_disk(workdir, args.rate)
    if "disconnect" in only:
        out["disconnect"] = await disconnect(workdir, args.streams)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per leg of 'flaky'")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of 'flaky'")
    ap.add_argument("--rate", type=float, default=100.0, help="calls/s of 'nats' and 'disk'")
    ap.add_argument("--outage", type=float, default=30.0, help="seconds NATS stays down")
    ap.add_argument("--streams", type=int, default=30, help="streams of 'disconnect'")
    ap.add_argument("--only", default="flaky,hang,nats,disk,disconnect")
    ap.add_argument("--quick", action="store_true", help="500 calls, a 5 s outage, 10 streams")
    args = ap.parse_args()
    if args.quick:
        args.calls, args.outage, args.streams = 500, 5.0, 10
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="tollway-faults-") as d:
        scenarios = asyncio.run(amain(args, Path(d)))
    doc = {"benchmark": "faults", "utc": started.isoformat(timespec="seconds"),
           "python": platform.python_version(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "args": vars(args), "scenarios": scenarios}
    print("\n" + "\n".join(f"- {name}: {'met' if s.get('met') else 'NOT met'}"
                           for name, s in scenarios.items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"faults-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

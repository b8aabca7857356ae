"""Fleet-wide rate limits: the cost of a call's check, and what a fleet serves.

Two legs, each against a baseline measured in the same run:

1. ``micro``: the per-call work of the rate-limit guard, in one process:
   local = the Rust limiter's check + the ``x-ratelimit-*`` headers (events
   off, as today); fleet = ``FleetLimits.try_take`` consuming from an
   allotment it holds (taken from a real nats-server's KV bucket before the
   timing starts), headers included. Rounds alternate; medians; the ratio
   fleet / local.
2. ``overhead``: two ``tollway serve`` processes with events on, one with
   fleet-wide limits and one with per-process limits (``shared_rate_limits =
   false``): p50 at 500 calls/s and full-speed calls/s, rounds interleaved.
3. ``served``: N ``tollway serve`` processes on one nats-server, one tenant
   with ``per_minute = L``, calls round robin as fast as an httpx client at
   concurrency 32 sends them. A token bucket admits at most
   ``L + L / 60 x elapsed``; the table gives served / that bound (1.0 = the
   whole limit served, nothing over; above 1.0 would be overshoot).

    python benchmarks/fleet_limits.py [--leg micro|overhead|served|all] [--rounds 7]
                                      [--ops 200000] [--processes 1,2,4]
                                      [--limits 60,6000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tollway.events.broker import EmbeddedNats

HERE = Path(__file__).resolve().parent
ADMIN_KEY = "tw-bench-admin-0000"
KEY = "tw-bench-acme-0123456789"
UPSTREAM_KEY = "sk-bench-upstream"


# ---------------------------------------------------------------- micro


async def _micro(rounds: int, ops: int) -> dict[str, Any]:
    from tollway.events.broker import EmbeddedNats, connect
    from tollway.events.ratelimits import FleetLimits
    from tollway.guards import rate_limit_headers
    from tollway.ratelimit import Limits, RateLimiter

    tenants = [f"tenant-{i:03d}" for i in range(100)]
    big = Limits(per_minute=10**12, per_hour=10**13, per_day=10**14, expensive_per_hour=10)
    local = RateLimiter(big)
    with tempfile.TemporaryDirectory() as tmp:
        srv = EmbeddedNats(Path(tmp) / "nats")
        srv.start()
        nc = await connect(srv.url)
        fleet = FleetLimits(lambda name: big, instance="bench", allotment_s=3600.0)
        await fleet.attach(nc)
        while fleet.degraded:
            await asyncio.sleep(0.01)
        for t in tenants:  # one allotment each, before the clock starts
            assert (await fleet.take(t, False, 0, False)).allowed
        assert all(fleet.try_take(t, False, 0, False) is not None for t in tenants)

        def run_local() -> float:
            mono = time.monotonic
            check = local.check
            start = time.perf_counter_ns()
            for i in range(ops):
                d = check(tenants[i % 100], 1, expensive=False, tokens=0, now=mono())
                rate_limit_headers(d, False)
            return (time.perf_counter_ns() - start) / ops

        def run_fleet() -> float:
            take = fleet.try_take
            start = time.perf_counter_ns()
            for i in range(ops):
                take(tenants[i % 100], False, 0, False)
            return (time.perf_counter_ns() - start) / ops

        runs: list[dict[str, float]] = []
        for r in range(rounds):
            gc.collect()
            order = (run_local, run_fleet) if r % 2 == 0 else (run_fleet, run_local)
            got = {f.__name__: f() for f in order}
            runs.append({"local_ns": got["run_local"], "fleet_ns": got["run_fleet"]})
        await fleet.stop()
        await nc.close()
        srv.stop()
    local_ns = statistics.median(r["local_ns"] for r in runs)
    fleet_ns = statistics.median(r["fleet_ns"] for r in runs)
    return {"ops": ops, "rounds": runs, "local_ns": local_ns, "fleet_ns": fleet_ns,
            "ratio": fleet_ns / local_ns, "writes": fleet.writes}


# ---------------------------------------------------------------- served


def _oha() -> str:
    found = shutil.which("oha") or str(Path.home() / ".cargo/bin/oha")
    if not Path(found).exists():
        raise SystemExit("the served leg needs the `oha` load generator (cargo install oha)")
    return found


def _config(folder: Path, nats_url: str, upstream: str, per_minute: int,
            shared: bool = True) -> Path:
    from tollway.auth import hash_key

    cfg = folder / "tollway.toml"
    cfg.write_text(textwrap.dedent(f"""
        [server]
        builtin_models = false
        builtin_providers = false
        admin_key_env = "TOLLWAY_ADMIN_KEY"
        [nats]
        url = "{nats_url}"
        data_dir = "{folder / 'data'}"
        [events]
        shared_rate_limits = {str(shared).lower()}
        [[providers]]
        name = "fake"
        base_url = "{upstream}"
        api_key_env = "FAKE_API_KEY"
        [[models]]
        id = "gpt-4o-mini"
        provider = "fake"
        input_usd_per_mtok = 0.15
        output_usd_per_mtok = 0.60
        [[tenants]]
        id = "acme"
        tier = "standard"
        daily_usd = 100000.0
        key_sha256 = ["{hash_key(KEY)}"]
        [tenants.limits]
        per_minute = {per_minute}
        per_hour = 100000000
        per_day = 1000000000
        expensive_per_hour = 100000000
    """))
    return cfg


def _serving_port(proc: subprocess.Popen[str]) -> int:
    assert proc.stderr is not None
    for line in proc.stderr:
        record = json.loads(line)
        if record.get("msg") == "serving":
            return int(record["port"])
    raise SystemExit("tollway serve did not start")


def start_gateways(procs: list[subprocess.Popen[str]], tmp: Path, names: list[str],
                   nats_url: str, upstream: str, per_minute: int, env: dict[str, str]
                   ) -> list[str]:
    """``tollway serve`` processes (added to ``procs`` as they start, for the caller to
    stop) on one NATS, each in its own folder under ``tmp``: their base URLs."""
    for name in names:
        folder = tmp / name
        folder.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tollway.cli", "serve", "--config",
             str(_config(folder, nats_url, upstream, per_minute)), "--port", "0"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    urls = [f"http://127.0.0.1:{_serving_port(p)}" for p in procs]
    for p in procs:
        assert p.stderr is not None
        p.stderr.close()
    return urls


def _stop_all(gateways: list[subprocess.Popen[str]], upstream: subprocess.Popen[Any],
              nats: EmbeddedNats) -> None:
    """Stop the gateways (SIGTERM, then SIGKILL after 15 s), the upstream, then NATS."""
    for p in gateways:
        p.terminate()
    for p in gateways:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
    upstream.terminate()
    upstream.wait()
    nats.stop()


async def _served_once(n: int, per_minute: int, calls: int) -> dict[str, Any]:
    import httpx

    from tollway.events.broker import EmbeddedNats

    env = {**os.environ, "TOLLWAY_ADMIN_KEY": ADMIN_KEY, "FAKE_API_KEY": UPSTREAM_KEY}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        srv = EmbeddedNats(tmp / "nats")
        srv.start()
        up = subprocess.Popen([sys.executable, "-m", "tollway.testing.upstream", "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
        procs: list[subprocess.Popen[str]] = []
        try:
            assert up.stdout is not None
            upstream = up.stdout.readline().split()[-1]
            urls = start_gateways(procs, tmp, [f"gw{i}" for i in range(n)], srv.url, upstream,
                                  per_minute, env)
            async with httpx.AsyncClient(timeout=30) as client:
                for url in urls:
                    while (await client.get(f"{url}/api/ai/ready")).status_code != 200:
                        await asyncio.sleep(0.05)
            await asyncio.sleep(3.0)  # heartbeats go round
            body = json.dumps({"model": "gpt-4o-mini",
                               "messages": [{"role": "user", "content": "hello"}]})
            started = time.monotonic()
            runs = [await asyncio.create_subprocess_exec(
                _oha(), "--no-tui", "--output-format", "json", "-m", "POST",
                "-H", "content-type: application/json", "-H", f"authorization: Bearer {KEY}",
                "-d", body, "-c", "8", "-n", str(calls // n),
                f"{url}/api/ai/v1/chat/completions", stdout=asyncio.subprocess.PIPE)
                for url in urls]
            outs = [await r.communicate() for r in runs]
            elapsed = time.monotonic() - started
            codes: dict[str, int] = {}
            for out, _ in outs:
                for code, count in (json.loads(out).get("statusCodeDistribution") or {}).items():
                    codes[str(code)] = codes.get(str(code), 0) + int(count)
        finally:
            _stop_all(procs, up, srv)
    served = codes.get("200", 0)
    bound = per_minute + per_minute / 60 * elapsed
    return {"processes": n, "per_minute": per_minute, "calls": calls // n * n,
            "served": served, "refused": codes.get("429", 0),
            "other": sum(v for k, v in codes.items() if k not in ("200", "429")),
            "elapsed_s": elapsed,
            "bound": bound, "served_over_bound": served / bound}


# ---------------------------------------------------------------- overhead


def _oha_run(url: str, rate: int | None, seconds: float) -> dict[str, Any]:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    cmd = [_oha(), "--no-tui", "--output-format", "json", "-m", "POST",
           "-H", "content-type: application/json", "-H", f"authorization: Bearer {KEY}",
           "-d", body, "-c", "16"]
    if rate is None:
        cmd += ["-z", f"{seconds}s", "-w"]
    else:
        cmd += ["-q", str(rate), "--latency-correction", "-n", str(int(rate * seconds))]
    out = subprocess.run([*cmd, f"{url}/api/ai/v1/chat/completions"], capture_output=True,
                         text=True, timeout=seconds * 3 + 30, check=True)
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def _overhead(rounds: int, seconds: float) -> dict[str, Any]:
    """One gateway with fleet-wide limits and one with per-process limits (events on in
    both), side by side: p50 at 500 calls/s and full-speed calls/s, interleaved."""
    import httpx

    from tollway.events.broker import EmbeddedNats

    env = {**os.environ, "TOLLWAY_ADMIN_KEY": ADMIN_KEY, "FAKE_API_KEY": UPSTREAM_KEY}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        srv = EmbeddedNats(tmp / "nats")
        srv.start()
        up = subprocess.Popen([sys.executable, "-m", "tollway.testing.upstream", "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
        procs: dict[str, subprocess.Popen[str]] = {}
        try:
            assert up.stdout is not None
            upstream = up.stdout.readline().split()[-1]
            urls = {}
            for name, shared in (("fleet", True), ("local", False)):
                folder = tmp / name
                folder.mkdir()
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "tollway.cli", "serve", "--config",
                     str(_config(folder, srv.url, upstream, 10**9, shared)), "--port", "0"],
                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for name, p in procs.items():
                urls[name] = f"http://127.0.0.1:{_serving_port(p)}"
                assert p.stderr is not None
                p.stderr.close()
            with httpx.Client(timeout=30) as client:
                for url in urls.values():
                    while client.get(f"{url}/api/ai/ready").status_code != 200:
                        time.sleep(0.05)
            for url in urls.values():
                _oha_run(url, None, 2.0)  # warm up
            for r in range(rounds):
                order = ["fleet", "local"] if r % 2 == 0 else ["local", "fleet"]
                for name in order:
                    fixed = _oha_run(urls[name], 500, seconds)
                    full = _oha_run(urls[name], None, seconds)
                    runs.append({
                        "round": r, "variant": name,
                        "p50_ms_at_500": fixed["latencyPercentiles"]["p50"] * 1000,
                        "full_rps": full["summary"]["requestsPerSec"],
                        "status": {**fixed.get("statusCodeDistribution", {})}})
        finally:
            _stop_all(list(procs.values()), up, srv)
    out: dict[str, Any] = {"runs": runs}
    for name in ("fleet", "local"):
        mine = [x for x in runs if x["variant"] == name]
        out[name] = {"p50_ms_at_500": statistics.median(x["p50_ms_at_500"] for x in mine),
                     "full_rps": statistics.median(x["full_rps"] for x in mine)}
    out["p50_delta_ms"] = out["fleet"]["p50_ms_at_500"] - out["local"]["p50_ms_at_500"]
    return out


# ---------------------------------------------------------------- driver


def _report(result: dict[str, Any]) -> str:
    lines = []
    micro = result.get("micro")
    if micro:
        lines += ["| check (headers included) | ns/call |", "|---|---:|",
                  f"| local limiter (events off) | {micro['local_ns']:.0f} |",
                  f"| fleet allotment (common path) | {micro['fleet_ns']:.0f} |",
                  f"| ratio fleet / local | {micro['ratio']:.2f}x |", ""]
    over = result.get("overhead")
    if over:
        lines += ["| one process, events on | p50 ms at 500/s | full speed calls/s |",
                  "|---|---:|---:|",
                  f"| per-process limits | {over['local']['p50_ms_at_500']:.2f} | "
                  f"{over['local']['full_rps']:.0f} |",
                  f"| fleet-wide limits | {over['fleet']['p50_ms_at_500']:.2f} | "
                  f"{over['fleet']['full_rps']:.0f} |",
                  f"| difference | {over['p50_delta_ms']:+.2f} | |", ""]
    served = result.get("served")
    if served:
        lines += ["| processes | per_minute | calls | elapsed s | served | limit + refill "
                  "| served / bound |", "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['processes']} | {r['per_minute']} | {r['calls']} | "
                  f"{r['elapsed_s']:.1f} | {r['served']} | {r['bound']:.0f} | "
                  f"{r['served_over_bound']:.3f} |" for r in served]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leg", choices=("micro", "overhead", "served", "all"),
                        default="all")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--limits", default="60,6000")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load": os.getloadavg()},
        "args": vars(args),
    }
    if args.leg in ("micro", "all"):
        print("micro ...", flush=True)
        result["micro"] = asyncio.run(_micro(args.rounds, args.ops))
    if args.leg in ("overhead", "all"):
        print("overhead ...", flush=True)
        result["overhead"] = _overhead(args.rounds, args.seconds)
    if args.leg in ("served", "all"):
        result["served"] = []
        for limit in (int(x) for x in args.limits.split(",")):
            for n in (int(x) for x in args.processes.split(",")):
                calls = max(1000, 2 * limit)
                print(f"served: {n} process(es), {limit}/min, {calls} calls ...", flush=True)
                result["served"].append(asyncio.run(_served_once(n, limit, calls)))
    print()
    print(_report(result))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = HERE / "results" / f"fleet-limits-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()

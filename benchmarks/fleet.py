"""The fleet (issue 12): what N processes serve of one limit, what sharing it costs, what
workers add.

Four legs in one run, each against the issue's bar:

(a) ``served``: N ``tollway serve`` processes (1, 2, 4) on one nats-server, one tenant at
    ``per_minute = L`` (60, 6,000), ``max(1,000, 2 x L)`` calls at full speed (one ``oha``
    per process, 8 connections each): served against a token bucket's bound, the limit
    plus what refilled while the calls ran (``fleet_limits.py``'s served leg). Bar: 60 to
    63 served at 60/min, within 2 % of the bound at 6,000/min.
(b) ``overhead``: one ``tollway serve`` with fleet-wide limits and one with per-process
    limits (events on in both), p50 at 500 calls/s, rounds interleaved
    (``fleet_limits.py``'s overhead leg). Bar: at most +0.1 ms p50.
(c) ``workers``: ``tollway serve --workers 1`` and ``--workers 2``, events (embedded
    NATS) and guards on, ``oha`` at full speed on the port: calls/s, rounds interleaved,
    medians, and the ratio. Bar: 2 workers >= 1.4x one (oha and NATS share the 2 cores).
(d) ``prompt``: the ``--workers 1`` gateway of (c), in the same rounds, with
    ``load.py``'s body padded to ``--prompt-tokens`` (500 prompt tokens as the gateway
    counts them, about 2,600 bytes of English): calls/s. Bar: >= 3,000.

    python benchmarks/fleet.py                       # all legs, about 6 minutes
    python benchmarks/fleet.py --legs c --rounds 3 --seconds 4   # (c) and (d)
    python benchmarks/fleet.py --legs a --processes 4 --limits 6000

The gateways run on this interpreter (as ``fleet_limits.py`` and ``load.py`` start them),
on loopback only. Results go to ``benchmarks/results/fleet-<UTC>.json``; the tables and the
verdicts are printed as markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fleet_limits
from load import (
    MODEL,
    RESULTS,
    TENANT_KEY,
    VARIANTS,
    Leg,
    Proc,
    deep_merge,
    find_oha,
    make_bodies,
    parse_oha,
    process_cpu_s,
    processes,
    rotated,
    run_oha,
    start_gateway,
    start_upstream,
)

BAR_SERVED_60 = (60, 63)  # served at 60/min, 1,000 calls within seconds
BAR_SERVED_SHARE = 0.02  # at 6,000/min: within 2 % of the bound
BAR_P50_DELTA_MS = 0.1
BAR_WORKERS_RATIO = 1.4
BAR_PROMPT_RPS = 3000.0

# (c) and (d): load.py's ``events`` variant (embedded NATS; guards, metrics and access log
# on as shipped), run as ``[server] workers = N``.
VARIANTS["fleet-w1"] = deep_merge(VARIANTS["events"], {"server": {"workers": 1}})
VARIANTS["fleet-w2"] = deep_merge(VARIANTS["events"], {"server": {"workers": 2}})


# ---------------------------------------------------------------- (a) and (b)


def served_leg(processes_: list[int], limits: list[int]) -> list[dict[str, Any]]:
    rows = []
    for limit in limits:
        for n in processes_:
            calls = max(1000, 2 * limit)
            print(f"(a) served: {n} process(es), {limit}/min, {calls} calls ...",
                  file=sys.stderr, flush=True)
            rows.append(asyncio.run(fleet_limits._served_once(n, limit, calls)))
    return rows


# ---------------------------------------------------------------- (c) and (d)


def prompt_bytes_for(tokens: int) -> tuple[int, int]:
    """The smallest ``--prompt-bytes`` of load.py's body whose prompt counts at least
    ``tokens`` tokens (as the gateway counts them), and that count."""
    from tollway.pipeline.usage import count_prompt

    def count(n: int) -> int:
        return count_prompt(make_bodies(n)[0].encode(), MODEL)

    lo, hi = 0, 64
    while count(hi) < tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < tokens else (lo, mid)
    return hi, count(hi)


def _pids(gw: Proc, workers: int, timeout: float = 60.0) -> list[int]:
    """The processes that serve: the gateway itself, or the workers its parent names."""
    if workers == 1:
        return [gw.popen.pid]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in gw.log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("msg") == "serving" and "pids" in record:
                return [int(p) for p in record["pids"]]
        time.sleep(0.1)
    raise SystemExit(f"{gw.name}: no 'serving' line naming the workers:\n{gw.tail()}")


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy so far (Linux ``/proc/stat``: everything but idle
    and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int, name: str) -> list[int]:
    """Processes under ``pid`` whose command is ``name`` (the embedded nats-server)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                todo.append(child)
                try:
                    if Path(f"/proc/{child}/comm").read_text().strip() == name:
                        found.append(child)
                except OSError:
                    pass
    return found


def _cpu(pids: list[int]) -> float:
    return sum(sum(c) for c in map(process_cpu_s, pids) if c)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def workers_legs(oha: str, rounds: int, seconds: float, connections: int,
                 prompt_tokens: int) -> dict[str, Any]:
    """(c) ``--workers 1`` vs ``--workers 2`` and (d) ``--workers 1`` with prompts of
    ``prompt_tokens``, all at full speed, interleaved in the same rounds."""
    prompt_bytes, prompt_tokens = prompt_bytes_for(prompt_tokens)
    small, _ = make_bodies(0)
    big, _ = make_bodies(prompt_bytes)
    targets = {"workers-1": ("fleet-w1", small), "workers-2": ("fleet-w2", small),
               "workers-1-prompt": ("fleet-w1", big)}
    legs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tollway-fleet-") as tmp, processes() as procs:
        workdir = Path(tmp)
        upstream, upstream_base = start_upstream(workdir, 20)
        procs.append(upstream)
        gateways: dict[str, tuple[str, list[int], list[int]]] = {}
        for variant, workers in (("fleet-w1", 1), ("fleet-w2", 2)):
            gw, base = start_gateway(workdir, variant, upstream_base)
            procs.append(gw)
            gateways[variant] = (f"{base}/chat/completions", _pids(gw, workers),
                                 descendants(gw.popen.pid, "nats-server"))
        for variant, body in targets.values():  # warm-up, discarded
            run_oha(oha, gateways[variant][0], TENANT_KEY, body, rate=None, duration=2.0,
                    connections=connections)
        for r in range(rounds):
            for name in rotated(list(targets), r):
                variant, body = targets[name]
                url, pids, nats = gateways[variant]
                cpu0 = [process_cpu_s(p) for p in pids]
                others0 = (_cpu([upstream.popen.pid]), _cpu(nats), _children_cpu(),
                           machine_busy_s(), time.monotonic())
                doc = run_oha(oha, url, TENANT_KEY, body, rate=None, duration=seconds,
                              connections=connections)
                others1 = (_cpu([upstream.popen.pid]), _cpu(nats), _children_cpu(),
                           machine_busy_s(), time.monotonic())
                cpu1 = [process_cpu_s(p) for p in pids]
                leg = parse_oha(doc, Leg(r, "plain", "max", name))
                cpu = [round(sum(b) - sum(a), 2) if a and b else None
                       for a, b in zip(cpu0, cpu1, strict=True)]
                # Cores each part kept busy during the leg: the split of the machine.
                wall = others1[4] - others0[4]
                upstream_c, nats_c, oha_c, machine_c = (
                    round((b - a) / wall, 2) for a, b in zip(others0[:4], others1[:4],
                                                            strict=True))
                cores = {"gateway": round(sum(c or 0.0 for c in cpu) / wall, 2),
                         "upstream": upstream_c, "nats": nats_c, "oha": oha_c,
                         "machine": machine_c}
                legs.append({"round": r, "target": name, "rps": leg.rps, "p50_ms": leg.p50_ms,
                             "p99_ms": leg.p99_ms, "status": leg.status, "errors": leg.errors,
                             "cpu_s_per_process": cpu, "cores": cores})
                print(f"round {r + 1}/{rounds} {name:17} {leg.rps:7.0f} calls/s "
                      f"p50 {leg.p50_ms:5.2f} ms cpu s/process {cpu} cores {cores}",
                      file=sys.stderr, flush=True)
        for p in procs:
            if p.popen.poll() is not None:
                print(f"warning: {p.name} died during the run:\n{p.tail()}", file=sys.stderr)
    out: dict[str, Any] = {"legs": legs, "prompt_bytes": prompt_bytes,
                           "prompt_tokens": prompt_tokens,
                           "body_bytes": {"small": len(small), "prompt": len(big)},
                           "connections": connections}
    for name in targets:
        mine = [x for x in legs if x["target"] == name]
        out[name] = {
            "rps": statistics.median(x["rps"] for x in mine),
            "p50_ms": statistics.median(x["p50_ms"] for x in mine),
            "non_200": sum(n for x in mine for code, n in x["status"].items() if code != "200")
            + sum(sum(x["errors"].values()) for x in mine),
            "cores": {part: statistics.median(x["cores"][part] for x in mine)
                      for part in mine[0]["cores"]},
        }
    # The ratio of the medians, and the median of each round's ratio (same-round noise).
    out["ratio"] = out["workers-2"]["rps"] / out["workers-1"]["rps"]
    by_round = {(x["round"], x["target"]): x["rps"] for x in legs}
    out["ratio_by_round"] = statistics.median(
        by_round[(r, "workers-2")] / by_round[(r, "workers-1")] for r in range(rounds))
    return out


def ceiling(w: dict[str, Any]) -> float:
    """The most ``--workers 2`` can serve over ``--workers 1`` on this machine, from the
    CPU each call cost in the one-worker legs: the gateway's ``g`` and the rest's ``r``
    (upstream, NATS, oha). One worker serves at most ``1/g`` calls/s (one core), two at
    most ``2/g``, and neither more than ``cpus / (g + r)``, as every call also costs the
    rest: on 2 cores the ratio is at most ``2g / (g + r)``."""
    c, rps = w["workers-1"]["cores"], w["workers-1"]["rps"]
    gateway = c["gateway"] / rps
    rest = (c["upstream"] + c["nats"] + c["oha"]) / rps
    cpus = os.cpu_count() or 1
    one = min(1 / gateway, cpus / (gateway + rest))
    two = min(2 / gateway, cpus / (gateway + rest))
    return float(two / one)


# ---------------------------------------------------------------- report


def verdicts(result: dict[str, Any]) -> list[str]:
    out = []

    def line(ok: bool, text: str) -> None:
        out.append(f"{'PASS' if ok else 'FAIL'} {text}")

    for r in result.get("served", []):
        what = f"(a) {r['processes']} process(es) at {r['per_minute']}/min: {r['served']} served"
        if r["per_minute"] == 60:
            lo, hi = BAR_SERVED_60
            line(lo <= r["served"] <= hi and r["other"] == 0,
                 f"{what} in {r['elapsed_s']:.1f} s (bar {lo} to {hi})")
        else:
            off = r["served_over_bound"] - 1.0
            line(abs(off) <= BAR_SERVED_SHARE and r["other"] == 0,
                 f"{what}, bound {r['bound']:.0f}: {off * 100:+.1f} % "
                 f"(bar within {BAR_SERVED_SHARE * 100:.0f} %)")
    over = result.get("overhead")
    if over:
        line(over["p50_delta_ms"] <= BAR_P50_DELTA_MS,
             f"(b) fleet-wide limits p50 at 500 calls/s: {over['p50_delta_ms']:+.2f} ms "
             f"(bar +{BAR_P50_DELTA_MS} ms)")
    w = result.get("workers")
    if w:
        line(w["ratio"] >= BAR_WORKERS_RATIO,
             f"(c) --workers 2 / --workers 1 at full speed: {w['ratio']:.2f}x "
             f"({w['workers-2']['rps']:.0f} / {w['workers-1']['rps']:.0f} calls/s; "
             f"bar {BAR_WORKERS_RATIO}x; this machine's ceiling {ceiling(w):.2f}x)")
        d = w["workers-1-prompt"]
        line(d["rps"] >= BAR_PROMPT_RPS,
             f"(d) one process, events and guards, {w['prompt_tokens']}-token prompts: "
             f"{d['rps']:.0f} calls/s (bar {BAR_PROMPT_RPS:.0f})")
        if any(w[k]["non_200"] for k in ("workers-1", "workers-2", "workers-1-prompt")):
            out.append("NOTE (c)/(d): some calls were not answered 200 (see the JSON)")
    return out


def markdown(result: dict[str, Any]) -> str:
    parts = []
    if result.get("served"):
        parts.append("(a) served / bound\n\n" + fleet_limits._report({"served": result["served"]}))
    if result.get("overhead"):
        parts.append("(b) fleet-wide vs per-process limits\n\n"
                     + fleet_limits._report({"overhead": result["overhead"]}).rstrip())
    w = result.get("workers")
    if w:
        lines = ["(c), (d) full speed, events and guards on\n",
                 "| gateway | prompt | calls/s | p50 ms |", "|---|---|---:|---:|"]
        for name, label, prompt in (("workers-1", "`--workers 1`", "one line"),
                                    ("workers-2", "`--workers 2`", "one line"),
                                    ("workers-1-prompt", "`--workers 1`",
                                     f"{w['prompt_tokens']} tokens")):
            lines.append(f"| {label} | {prompt} | {w[name]['rps']:,.0f} | "
                         f"{w[name]['p50_ms']:.2f} |")
        lines.append(f"| ratio 2 / 1 worker(s) | | {w['ratio']:.2f}x "
                     f"(by round {w['ratio_by_round']:.2f}x) | |")
        lines += ["", "Cores kept busy during the legs (medians; the machine has "
                  f"{os.cpu_count()}):", "",
                  "| gateway | gateway | upstream | NATS | oha | whole machine |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name in ("workers-1", "workers-2", "workers-1-prompt"):
            c = w[name]["cores"]
            lines.append(f"| {name} | {c['gateway']:.2f} | {c['upstream']:.2f} | "
                         f"{c['nats']:.2f} | {c['oha']:.2f} | {c['machine']:.2f} |")
        lines += ["", f"What 2 workers can reach here: {ceiling(w):.2f}x one worker (see "
                  "``ceiling``)."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--legs", default="a,b,c,d", help="comma-separated, from a,b,c,d")
    parser.add_argument("--rounds", type=int, default=5, help="(b), (c), (d): interleaved rounds")
    parser.add_argument("--seconds", type=float, default=5.0, help="(b), (c), (d): per run")
    parser.add_argument("--processes", default="1,2,4", help="(a)")
    parser.add_argument("--limits", default="60,6000", help="(a): per_minute")
    parser.add_argument("--connections", type=int, default=32, help="(c), (d): oha's")
    parser.add_argument("--prompt-tokens", type=int, default=500, help="(d)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    legs = {x for x in args.legs.split(",") if x}
    if legs - set("abcd"):
        raise SystemExit(f"unknown leg(s) {sorted(legs - set('abcd'))}: a, b, c, d")
    oha = find_oha()
    started = datetime.now(UTC)
    load_avg = os.getloadavg()
    if load_avg[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: the machine is busy (load average {load_avg[0]:.2f}); "
              "figures will be noisy", file=sys.stderr)
    result: dict[str, Any] = {
        "benchmark": "fleet",
        "started_at": started.isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_avg_at_start": load_avg},
        "config": {k: v for k, v in vars(args).items() if k != "no_write"},
    }
    t0 = time.monotonic()
    if "a" in legs:
        result["served"] = served_leg([int(x) for x in args.processes.split(",")],
                                      [int(x) for x in args.limits.split(",")])
    if "b" in legs:
        print("(b) overhead ...", file=sys.stderr, flush=True)
        result["overhead"] = fleet_limits._overhead(args.rounds, args.seconds)
    if "c" in legs or "d" in legs:
        print("(c), (d) workers and prompts ...", file=sys.stderr, flush=True)
        result["workers"] = workers_legs(oha, args.rounds, args.seconds, args.connections,
                                         args.prompt_tokens)
    result["elapsed_s"] = time.monotonic() - t0
    result["load_avg_at_end"] = os.getloadavg()
    result["verdicts"] = verdicts(result)
    print(f"\nThe fleet, {os.cpu_count()} CPUs shared by the gateways, NATS, the upstream and "
          f"oha; load average {load_avg[0]:.2f} at the start; {result['elapsed_s']:.0f} s\n")
    print(markdown(result))
    print("\n" + "\n".join(result["verdicts"]))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"fleet-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

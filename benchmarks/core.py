"""The Rust core from Python against plain pure-Python implementations.

Four parts, each a ratio against a baseline measured in the same run:

1. limiter: ``RateLimiter.check`` against ``pure_python.RateLimiter.check``
   (same five tiers, same semantics, same 10,000 keys and mixed costs);
2. breaker: allow + record against ``pure_python.CircuitBreaker``, for the
   facade (``tollway.CircuitBreaker``, with a listener) and the raw core;
3. memory: RSS growth for 1,000,000 limiter keys, each in a fresh process;
4. tokens: ``benchmarks/core_tokens.py``'s ``run()`` (tollway against tiktoken).

Rounds alternate which side goes first; the table quotes medians.

    python benchmarks/core.py [--rounds 7] [--ops 100000] [--quick]
                              [--skip-memory] [--skip-tokens]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pure_python
import tollway

HERE = Path(__file__).resolve().parent
KEYS = 10_000
TOKENS_PER_MINUTE = 200_000
MEMORY_KEYS = 1_000_000
CHECK_BAR = 1 / 3  # issue 2: a check costs at most a third of pure Python
MEMORY_BAR_MB = 200.0

Op = tuple[str, int, bool, int]


def limiter_ops(n: int, seed: int = 7) -> list[Op]:
    rng = random.Random(seed)
    keys = [f"tenant-{i:05d}" for i in range(KEYS)]
    return [
        (rng.choice(keys), rng.choice((1, 1, 1, 2, 3)), rng.random() < 0.1, rng.randrange(2000))
        for _ in range(n)
    ]


def _time_checks(check: Callable[..., object], ops: list[Op], now: float | None) -> float:
    """Nanoseconds per call of ``check`` over ``ops`` (loop included)."""
    gc.collect()
    if now is None:
        start = time.perf_counter_ns()
        for key, cost, expensive, tokens in ops:
            check(key, cost, expensive=expensive, tokens=tokens)
    else:
        start = time.perf_counter_ns()
        for key, cost, expensive, tokens in ops:
            check(key, cost, expensive=expensive, tokens=tokens, now=now)
    return (time.perf_counter_ns() - start) / len(ops)


def _noop(key: str, cost: int, *, expensive: bool, tokens: int, now: float = 0.0) -> None:
    return None


def bench_limiter(rounds: int, n: int) -> dict[str, Any]:
    ops = limiter_ops(n)
    keys = sorted({op[0] for op in ops})
    runs: dict[str, list[float]] = {}

    def fresh() -> tuple[Callable[..., object], Callable[..., object]]:
        rust = tollway.RateLimiter(tollway.Limits(tokens_per_minute=TOKENS_PER_MINUTE))
        py = pure_python.RateLimiter({"tokens_per_minute": TOKENS_PER_MINUTE})
        for key in keys:  # time the steady state, not the first insert of each key
            rust.check(key, 0)
            py.check(key, 0)
        return rust.check, py.check

    for r in range(rounds):
        for mode, now in (("clock", None), ("now", 1e6)):
            rust, py = fresh()
            sides = [("rust", rust), ("python", py)]
            for side, check in sides if r % 2 == 0 else sides[::-1]:
                runs.setdefault(f"{side}/{mode}", []).append(_time_checks(check, ops, now))
        runs.setdefault("loop", []).append(_time_checks(_noop, ops, 0.0))

    out: dict[str, Any] = {"ops": n, "keys": len(keys), "runs_ns": runs}
    for mode in ("clock", "now"):
        rust, py = runs[f"rust/{mode}"], runs[f"python/{mode}"]
        out[mode] = {
            "rust_ns": statistics.median(rust),
            "python_ns": statistics.median(py),
            "ratio": statistics.median(a / b for a, b in zip(rust, py, strict=True)),
        }
    out["loop_ns"] = statistics.median(runs["loop"])
    return out


def _breaker_workload(n: int, seed: int = 11) -> list[bool]:
    # ~1.5% failures at 100 calls per simulated second: it opens, probes and
    # closes again many times, so every state is on the measured path.
    rng = random.Random(seed)
    return [rng.random() < 0.015 for _ in range(n)]


def _time_breaker(breaker: Any, failures: list[bool]) -> float:
    allow, success, failure = breaker.allow, breaker.record_success, breaker.record_failure
    gc.collect()
    now = 1000.0
    start = time.perf_counter_ns()
    for failed in failures:
        now += 0.01
        if allow(now):
            if failed:
                failure(now)
            else:
                success(now, 0.2)
    return (time.perf_counter_ns() - start) / len(failures)


def bench_breaker(rounds: int, n: int) -> dict[str, Any]:
    failures = _breaker_workload(n)
    runs: dict[str, list[float]] = {"facade": [], "core": [], "python": []}
    transitions = 0
    for r in range(rounds):
        seen: list[object] = []
        facade = tollway.CircuitBreaker("bench")
        facade.on_change(seen.append)
        sides = [
            ("facade", facade),
            ("core", tollway._core.CircuitBreaker()),
            ("python", pure_python.CircuitBreaker()),
        ]
        for side, breaker in sides if r % 2 == 0 else sides[::-1]:
            runs[side].append(_time_breaker(breaker, failures))
        transitions = len(seen)
    return {
        "ops": n,
        "transitions_per_run": transitions,
        "runs_ns": runs,
        **{f"{side}_ns": statistics.median(v) for side, v in runs.items()},
        "facade_ratio": statistics.median(
            a / b for a, b in zip(runs["facade"], runs["python"], strict=True)),
        "core_ratio": statistics.median(
            a / b for a, b in zip(runs["core"], runs["python"], strict=True)),
    }


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {here!r})

    def rss_kb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    import tollway, pure_python
    kind, keys, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    limiter = tollway.RateLimiter() if kind == "rust" else pure_python.RateLimiter()
    if keys == "short":
        key = "tenant-{{:07d}}".format
    else:
        key = lambda i: "{{:08x}}-0000-4000-8000-{{:012x}}".format(i, i)
    limiter.check(key(0), now=0.0)
    before = rss_kb()
    for i in range(1, n):
        limiter.check(key(i), now=0.0)
    after = rss_kb()
    assert len(limiter) == n, len(limiter)
    print(json.dumps({{"before_kb": before, "after_kb": after, "keys": len(limiter)}}))
""")


def bench_memory(n: int) -> dict[str, Any]:
    """RSS growth for ``n`` keys, each case in a fresh interpreter."""
    if not Path("/proc/self/status").exists():
        return {"skipped": "needs /proc (Linux)"}
    script = MEMORY_SCRIPT.format(here=str(HERE))
    out: dict[str, Any] = {"keys": n}
    cases = [("rust", "short"), ("rust", "uuid"), ("python", "short")]
    for kind, keys in cases:
        proc = subprocess.run([sys.executable, "-c", script, kind, keys, str(n)],
                              capture_output=True, text=True, check=True, timeout=600)
        result = json.loads(proc.stdout)
        grown_mb = (result["after_kb"] - result["before_kb"]) / 1024
        out[f"{kind}/{keys}"] = {**result, "grown_mb": round(grown_mb, 1),
                                 "bytes_per_key": round(grown_mb * 2**20 / n, 1)}
    return out


def bench_tokens(rounds: int) -> dict[str, Any]:
    try:
        import core_tokens  # another part of issue 2; imported lazily on purpose
    except ImportError as exc:
        return {"skipped": f"benchmarks/core_tokens.py unavailable: {exc}"}
    summary: dict[str, Any] = core_tokens.run(rounds=rounds)
    return summary


def _fmt_ns(ns: float) -> str:
    return f"{ns / 1000:.2f} µs" if ns >= 1000 else f"{ns:.0f} ns"


def report(result: dict[str, Any]) -> str:
    lines = ["| what | tollway (Rust) | pure Python | ratio |", "|---|---:|---:|---:|"]
    lim = result["limiter"]
    for mode, label in (("clock", "limiter check, now from the clock"),
                        ("now", "limiter check, now passed in")):
        m = lim[mode]
        lines.append(f"| {label} | {_fmt_ns(m['rust_ns'])} | {_fmt_ns(m['python_ns'])} "
                     f"| {m['ratio']:.2f} (1/{1 / m['ratio']:.1f}) |")
    br = result["breaker"]
    lines.append(f"| breaker allow + record, facade | {_fmt_ns(br['facade_ns'])} "
                 f"| {_fmt_ns(br['python_ns'])} | {br['facade_ratio']:.2f} "
                 f"(1/{1 / br['facade_ratio']:.1f}) |")
    lines.append(f"| breaker allow + record, raw core | {_fmt_ns(br['core_ns'])} "
                 f"| {_fmt_ns(br['python_ns'])} | {br['core_ratio']:.2f} "
                 f"(1/{1 / br['core_ratio']:.1f}) |")
    lines.append("")
    lines.append(f"Per-call times include the Python loop, about {_fmt_ns(lim['loop_ns'])} "
                 f"a call (a no-op function with the same arguments); "
                 f"{lim['keys']} keys, {lim['ops']} checks a run, "
                 f"{br['transitions_per_run']} breaker transitions a run.")
    mem = result.get("memory", {})
    if "keys" in mem:
        lines += ["", f"| RSS growth for {mem['keys']:,} limiter keys | MB | bytes/key |",
                  "|---|---:|---:|"]
        for case, label in (("rust/short", "Rust, 14-char keys (stored inline)"),
                            ("rust/uuid", "Rust, 36-char keys (heap)"),
                            ("python/short", "pure Python, 14-char keys")):
            lines.append(f"| {label} | {mem[case]['grown_mb']} | {mem[case]['bytes_per_key']} |")
    lines.append("")
    for check in result["acceptance"]:
        lines.append(f"{'PASS' if check['pass'] else 'FAIL'}: {check['bar']} ({check['got']})")
    return "\n".join(lines)


def acceptance(result: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    ratio = result["limiter"]["clock"]["ratio"]
    checks.append({"bar": "limiter check <= 1/3 of pure Python", "got": f"{ratio:.3f}",
                   "pass": ratio <= CHECK_BAR})
    mem = result.get("memory", {})
    if "rust/short" in mem:
        mb = mem["rust/short"]["grown_mb"]
        checks.append({"bar": f"1,000,000 limiter keys < {MEMORY_BAR_MB:.0f} MB",
                       "got": f"{mb} MB", "pass": mb < MEMORY_BAR_MB})
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 20,000 ops")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-tokens", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.ops = 3, 20_000

    result: dict[str, Any] = {
        "benchmark": "core",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "tollway": tollway.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "rounds": args.rounds,
    }
    print(f"limiter: {args.rounds} rounds of {args.ops} checks ...", flush=True)
    result["limiter"] = bench_limiter(args.rounds, args.ops)
    print("breaker ...", flush=True)
    result["breaker"] = bench_breaker(args.rounds, args.ops)
    if not args.skip_memory:
        print(f"memory: {MEMORY_KEYS:,} keys in fresh processes ...", flush=True)
        result["memory"] = bench_memory(MEMORY_KEYS)
    result["acceptance"] = acceptance(result)
    print()
    print(report(result))
    if not args.skip_tokens:
        print("\ntokens ...", flush=True)
        result["tokens"] = bench_tokens(args.rounds)
        if "skipped" in result["tokens"]:
            print(result["tokens"]["skipped"])
        else:
            import core_tokens
            print(core_tokens._table(result["tokens"]))

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = HERE / "results" / f"core-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()

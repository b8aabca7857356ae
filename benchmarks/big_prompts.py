"""Latency of small calls while another tenant sends 4 MB prompts: counting on or off the loop.

The gateway tokenizes a call's prompt before dispatch (the cost estimate of
the guards). A 4 MB prompt takes about half a second to count; counted on the
event loop, every other call in the process waits for it. Since issue 10 a
prompt of ``TOLLWAY_COUNT_THREAD_MIN_BYTES`` (32 KiB) or more is counted in a
worker thread while the Rust counter releases the GIL.

Two gateway processes run side by side on one simulated upstream: ``thread``
(as shipped) and ``onloop`` (the threshold set past any body, so everything
is counted on the loop: the baseline, in the same run). Each leg sends small
calls from tenant ``small`` at a fixed rate (open loop: latency is measured
from the time a call was due, so a stall is not hidden) for ``--duration``
seconds, with tenant ``big`` either idle (``quiet``) or sending 4 MB prompts
back to back (``big``). Rounds run every leg, rotating the order; the table
gives medians over rounds of each leg's p50 and p99.

First it measures, in this process, what decides the threshold: counting
time by prompt size, and a round trip through ``asyncio.to_thread``.

    python benchmarks/big_prompts.py                 # 3 rounds of 6 s legs, about 1.5 minutes
    python benchmarks/big_prompts.py --quick         # 1 round of 3 s legs

Results go to ``benchmarks/results/big-prompts-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from load import (
    BASE_CONFIG,
    HOST,
    TENANT_KEY,
    UPSTREAM_KEY,
    Proc,
    deep_merge,
    free_port,
    processes,
    rotated,
    start_upstream,
    to_toml,
    wait_ready,
)
from tollway.pipeline.prompt import THREAD_MIN_BYTES
from tollway.pipeline.usage import count_prompt

RESULTS = Path(__file__).resolve().parent / "results"
BIG_KEY = "tw-bench-big-0123456789abcdef0123456789"
MODEL = "gpt-4o-mini"
# Prompt text: words drawn from a fixed list with a fixed seed. A repeated sentence would
# count several times faster than prose (the tokenizer meets the same pieces over and over).
_VOCABULARY = ("the a of to and in is it that for on with as was at by an be this from or have "
          "gateway counts every token prompt before calls provider budget tenant request reply "
          "latency stream event loop thread worker policy guard route model upstream cost "
          "Lorem ipsum dolor sit amet, consectetur adipiscing elit; 2026-12-02 42 3.14 "
          "über naïve café déjà vu résumé 中文 日本語")
_WORDS = _VOCABULARY.split()
# What each gateway process gets in its environment: the baseline counts everything on the loop.
VARIANTS: dict[str, dict[str, str]] = {
    "thread": {},
    "onloop": {"TOLLWAY_COUNT_THREAD_MIN_BYTES": str(1 << 40)},
}


def chat_body(prompt_bytes: int) -> bytes:
    content = "Name three uses of a reverse proxy in one line each."
    if prompt_bytes > len(content):
        rng = random.Random(prompt_bytes)
        content = " ".join(rng.choices(_WORDS, k=prompt_bytes // 5))
        content = content.encode()[:prompt_bytes].decode(errors="ignore")
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}]},
                      ensure_ascii=False).encode()


# ---------------------------------------------------------------- the threshold


def threshold_figures() -> dict[str, Any]:
    """Counting time by body size (median of repeats) and the to_thread round trip."""
    sizes = [1 << 10, 8 << 10, 32 << 10, 256 << 10, 1 << 20, 4 << 20]
    count_us: dict[str, float] = {}
    count_prompt(chat_body(100), MODEL)  # loads the encoding
    for size in sizes:
        body = chat_body(size)
        runs = []
        for _ in range(max(3, min(50, (256 << 10) // size))):
            t = time.perf_counter()
            count_prompt(body, MODEL)
            runs.append(time.perf_counter() - t)
        count_us[str(size)] = statistics.median(runs) * 1e6

    async def hand_off() -> float:
        runs = []
        for _ in range(500):
            t = time.perf_counter()
            await asyncio.to_thread(int)
            runs.append(time.perf_counter() - t)
        return statistics.median(runs) * 1e6

    return {"count_us_by_body_bytes": count_us, "to_thread_round_trip_us": asyncio.run(hand_off())}


# ---------------------------------------------------------------- gateways


def start_gateway(workdir: Path, name: str, upstream: str) -> tuple[Proc, str]:
    cfg = deep_merge(BASE_CONFIG, {"server": {"max_body_bytes": 8 << 20, "access_log": False}})
    cfg["providers"][0]["base_url"] = upstream
    small = cfg["tenants"][0]
    big_hash = hashlib.sha256(BIG_KEY.encode()).hexdigest()
    cfg["tenants"] = [dict(small, id="small"), dict(small, id="big", key_sha256=[big_hash])]
    port = free_port()
    cfg["server"]["port"] = port
    (workdir / name).mkdir()
    path = workdir / name / "tollway.toml"
    path.write_text(to_toml(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_COUNT_")}
    env |= {"SIM_API_KEY": UPSTREAM_KEY, "TOLLWAY_BENCH_ADMIN_KEY": "unused-admin-key-0000"}
    env |= VARIANTS[name]
    cmd = [sys.executable, "-c", "import sys; from tollway.cli import main; sys.exit(main())",
           "serve", "--config", str(path), "--host", HOST, "--port", str(port)]
    log = workdir / name / "gateway.log"
    popen = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                             cwd=workdir / name)
    proc = Proc(f"gateway[{name}]", popen, log)
    wait_ready(proc, f"http://{HOST}:{port}/api/ai/health", {})
    return proc, f"http://{HOST}:{port}/api/ai/v1/chat/completions"


# ---------------------------------------------------------------- one leg


async def leg(url: str, rate: float, duration: float, big: bytes | None,
              big_senders: int) -> dict[str, Any]:
    small = chat_body(0)
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    big_done: list[int] = []
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(due: float) -> None:
            try:
                async with session.post(url, data=small, headers=headers | {
                        "authorization": f"Bearer {TENANT_KEY}"}) as resp:
                    await resp.read()
                    status = resp.status
            except aiohttp.ClientError as exc:
                status = 0
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            if status == 200:
                latencies.append(time.perf_counter() - due)
            elif status:
                errors[str(status)] = errors.get(str(status), 0) + 1

        async def sender() -> None:
            assert big is not None
            while not stop.is_set():
                async with session.post(url, data=big, headers=headers | {
                        "authorization": f"Bearer {BIG_KEY}"}) as resp:
                    await resp.read()
                    big_done.append(resp.status)

        senders = [asyncio.create_task(sender()) for _ in range(big_senders if big else 0)]
        if senders:
            await asyncio.sleep(1.0)  # the big tenant is under way before we measure
        start = time.perf_counter()
        n = int(rate * duration)
        calls = []
        for i in range(n):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            calls.append(asyncio.create_task(one(due)))
        await asyncio.gather(*calls)
        stop.set()
        await asyncio.gather(*senders)
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return {
        "calls": n, "ok": len(ms), "errors": errors,
        "p50_ms": statistics.median(ms) if ms else float("nan"),
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))] if ms else float("nan"),
        "max_ms": ms[-1] if ms else float("nan"),
        "big_calls": len(big_done), "big_non_200": sum(1 for s in big_done if s != 200),
    }


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per leg")
    parser.add_argument("--rate", type=float, default=50.0, help="small calls per second")
    parser.add_argument("--big-bytes", type=int, default=4_000_000)
    parser.add_argument("--big-senders", type=int, default=1, help="4 MB calls in flight")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s legs")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 3.0

    print("measuring the threshold ...", flush=True)
    figures = threshold_figures()
    big = chat_body(args.big_bytes)
    legs: list[dict[str, Any]] = []
    order = [f"{v}/{load}" for v in VARIANTS for load in ("quiet", "big")]
    with tempfile.TemporaryDirectory(prefix="tollway-big-prompts-") as tmp, processes() as procs:
        workdir = Path(tmp)
        up, upstream = start_upstream(workdir, reply_words=20)
        procs.append(up)
        urls = {}
        for name in VARIANTS:
            proc, urls[name] = start_gateway(workdir, name, upstream)
            procs.append(proc)
        print("warming up ...", flush=True)
        for url in urls.values():  # first calls load the encoding, open connections
            asyncio.run(leg(url, args.rate, 1.0, big, 1))
        for rnd in range(args.rounds):
            for item in rotated(order, rnd):
                name, load = item.split("/")
                print(f"round {rnd + 1}/{args.rounds}: {item} ...", flush=True)
                result = asyncio.run(leg(urls[name], args.rate, args.duration,
                                         big if load == "big" else None, args.big_senders))
                legs.append({"round": rnd, "variant": name, "load": load, **result})

    summary: dict[str, dict[str, float]] = {}
    for item in order:
        name, load = item.split("/")
        sel = [x for x in legs if x["variant"] == name and x["load"] == load]
        summary[item] = {
            "p50_ms": statistics.median(x["p50_ms"] for x in sel),
            "p99_ms": statistics.median(x["p99_ms"] for x in sel),
            "max_ms": statistics.median(x["max_ms"] for x in sel),
            "errors": sum(sum(x["errors"].values()) for x in sel),
            "big_calls_per_leg": statistics.median(x["big_calls"] for x in sel),
        }
    table = markdown(figures, summary, args)
    print(table)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out = RESULTS / f"big-prompts-{stamp}.json"
        out.write_text(json.dumps({
            "benchmark": "big_prompts", "at": stamp, "argv": sys.argv[1:],
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "platform": platform.platform(), "load_avg": os.getloadavg()},
            "args": vars(args), "thread_min_bytes": THREAD_MIN_BYTES,
            "threshold": figures, "legs": legs, "summary": summary,
        }, indent=2) + "\n")
        print(f"wrote {out}")


def markdown(figures: dict[str, Any], summary: dict[str, dict[str, float]],
             args: argparse.Namespace) -> str:
    lines = ["| body bytes | count on the loop, us |", "|---:|---:|"]
    for size, us in figures["count_us_by_body_bytes"].items():
        lines.append(f"| {int(size):,} | {us:,.0f} |")
    lines.append(f"\nto_thread round trip: {figures['to_thread_round_trip_us']:.0f} us\n")
    lines += [f"small calls at {args.rate:g}/s, medians over {args.rounds} rounds of "
              f"{args.duration:g} s:\n",
              "| counting | other tenant | p50 ms | p99 ms | max ms | errors "
              "| 4 MB calls per leg |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for item, row in summary.items():
        name, load = item.split("/")
        other = "idle" if load == "quiet" else f"{args.big_bytes / 1e6:g} MB prompts"
        lines.append(f"| {name} | {other} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
                     f"| {row['max_ms']:.1f} | {row['errors']:.0f} "
                     f"| {row['big_calls_per_leg']:.0f} |")
    base, new = summary["onloop/big"], summary["thread/big"]
    lines.append(f"\nwith 4 MB prompts, p99 thread / on-loop: "
                 f"{new['p99_ms'] / base['p99_ms']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

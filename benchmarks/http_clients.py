"""Which async HTTP client should the gateway use to call providers? Measure, don't guess.

Starts the simulated upstream (``python -m tollway.testing.upstream``) in its own
process, then runs each candidate client in a fresh process of its own (uvloop,
as the gateway runs) at a fixed concurrency, non-streaming and streaming, in
interleaved rounds (A, B, C, A, B, C, ...) so that background noise hits every
client alike. For each run it measures requests/s and the client process's CPU
time per request (the number that matters for a gateway: every microsecond the
client spends is one the gateway cannot spend on other requests). It prints the
medians and their ratio to aiohttp's, and writes every run to
``benchmarks/results/http-clients-<UTC timestamp>.json``.

Candidates: ``own``, tollway's own client (``tollway.providers.http.raw``, the
default, as the gateway calls it), and two maintained clients used the leanest
way each allows: ``aiohttp`` (a session, no decompression) and ``pyreqwest``
(Rust's reqwest and hyper under a tokio runtime, HTTP/1.1; ``pip install
'tollway[bench]'``). ``process_time`` counts every thread of the worker, so
reqwest's runtime threads are included. The own client stays the default only
while it is at least 1.3x cheaper in CPU per request than the best of the others
(see the README, "Why the gateway has its own HTTP client").

    python benchmarks/http_clients.py                 # 5 rounds, ~1-2 minutes
    python benchmarks/http_clients.py --rounds 3 --requests 1500 --stream-requests 600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CLIENTS = ("own", "aiohttp", "pyreqwest")
MODES = ("plain", "stream")
BASELINE = "own"

CHAT = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say something short about load balancers, please."},
        ],
    }
).encode()
CHAT_STREAM = json.dumps(
    {**json.loads(CHAT), "stream": True, "stream_options": {"include_usage": True}}
).encode()
HEADERS = {"authorization": "Bearer sk-bench", "content-type": "application/json"}

Requester = Callable[[bytes], Awaitable[int]]  # sends one request, returns bytes received


# ---------------------------------------------------------------- the candidates


async def _aiohttp(base: str, concurrency: int, stream: bool) -> tuple[Requester, Any]:
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, ttl_dns_cache=None),
        headers=HEADERS,
        auto_decompress=False,
    )
    url = f"{base}/chat/completions"

    async def plain(body: bytes) -> int:
        async with session.post(url, data=body) as r:
            return len(await r.read())

    async def streamed(body: bytes) -> int:
        n = 0
        async with session.post(url, data=body) as r:
            async for chunk in r.content.iter_any():
                n += len(chunk)
        return n

    return (streamed if stream else plain), session.close


async def _pyreqwest(base: str, concurrency: int, stream: bool) -> tuple[Requester, Any]:
    from pyreqwest.client import ClientBuilder

    client = (ClientBuilder().max_connections(concurrency).default_headers(HEADERS)
              .gzip(False).http1_only().build())
    url = f"{base}/chat/completions"

    async def plain(body: bytes) -> int:
        resp = await client.post(url).body_bytes(body).build().send()
        return len(await resp.bytes())

    async def streamed(body: bytes) -> int:
        n = 0
        async with client.post(url).body_bytes(body).build_streamed() as resp:
            while (chunk := await resp.body_reader.read_chunk()) is not None:
                n += len(chunk)
        return n

    return (streamed if stream else plain), client.close


async def _own(base: str, concurrency: int, stream: bool) -> tuple[Requester, Any]:
    from yarl import URL

    from tollway.providers.http import Timeouts, make_client

    client = make_client("raw", "bench", Timeouts(5, 30, 60), concurrency)
    await client.start()
    url = URL(f"{base}/chat/completions")

    async def plain(body: bytes) -> int:
        return len((await client.request("POST", url, body, HEADERS)).body)

    async def streamed(body: bytes) -> int:
        n = 0
        reply = await client.stream("POST", url, body, HEADERS)
        async for chunk in reply.chunks():
            n += len(chunk)
        reply.release()
        return n

    return (streamed if stream else plain), client.aclose


FACTORIES = {"own": _own, "aiohttp": _aiohttp, "pyreqwest": _pyreqwest}


# ---------------------------------------------------------------- one run (child process)


async def _worker(
    client: str, base: str, mode: str, requests: int, concurrency: int
) -> dict[str, Any]:
    stream = mode == "stream"
    send, close = await FACTORIES[client](base, concurrency, stream)
    body = CHAT_STREAM if stream else CHAT
    # Warm-up: open the connections and let the library reach its steady state.
    await asyncio.gather(*(send(body) for _ in range(concurrency * 4)))
    latencies: list[float] = []
    left = requests
    received = 0

    async def loop() -> None:
        nonlocal left, received
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            received += await send(body)
            latencies.append(time.perf_counter() - t0)

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await close()
    latencies.sort()
    return {
        "client": client,
        "mode": mode,
        "requests": len(latencies),
        "concurrency": concurrency,
        "wall_s": wall,
        "cpu_s": cpu,
        "rps": len(latencies) / wall,
        "cpu_us_per_request": cpu / len(latencies) * 1e6,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "bytes_per_request": received / len(latencies),
    }


def _run_worker(args: argparse.Namespace) -> None:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        result = runner.run(
            _worker(args.worker, args.base_url, args.mode, args.requests, args.concurrency)
        )
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- the driver


def start_upstream(reply_words: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tollway.testing.upstream",
            "--port",
            "0",
            "--reply-words",
            str(reply_words),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"the simulated upstream did not start: {line!r}")
    return proc, line.split()[-1]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("aiohttp", "pyreqwest", "httptools", "uvloop"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            out[name] = "missing"
    return out


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=4000, help="per run, non-streaming")
    parser.add_argument("--stream-requests", type=int, default=1500, help="per run, streaming")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--reply-words", type=int, default=20, help="stream length, in words")
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--no-write", action="store_true", help="do not write the JSON result")
    parser.add_argument("--worker", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _run_worker(args)
        return

    clients = [c for c in args.clients.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    started = datetime.now(UTC)
    upstream, base = start_upstream(args.reply_words)
    runs: list[dict[str, Any]] = []
    try:
        for rnd in range(args.rounds):
            for mode in modes:
                n = args.requests if mode == "plain" else args.stream_requests
                for client in clients:
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--worker",
                            client,
                            "--mode",
                            mode,
                            "--base-url",
                            base,
                            "--requests",
                            str(n),
                            "--concurrency",
                            str(args.concurrency),
                        ],
                        capture_output=True,
                        text=True,
                        timeout=300,
                        check=False,
                    )
                    if out.returncode != 0:
                        raise SystemExit(f"{client}/{mode} failed:\n{out.stderr}")
                    run = json.loads(out.stdout.strip().splitlines()[-1]) | {"round": rnd}
                    runs.append(run)
                    print(
                        f"round {rnd + 1}/{args.rounds} {mode:6} {client:8} "
                        f"{run['rps']:8.0f} req/s {run['cpu_us_per_request']:7.0f} us CPU/req",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        upstream.terminate()
        upstream.wait(10)

    summary: dict[str, dict[str, dict[str, float]]] = {}
    for mode in modes:
        summary[mode] = {}
        for client in clients:
            sel = [r for r in runs if r["client"] == client and r["mode"] == mode]
            summary[mode][client] = {
                "rps": _median(sel, "rps"),
                "cpu_us_per_request": _median(sel, "cpu_us_per_request"),
                "p50_ms": _median(sel, "p50_ms"),
                "p99_ms": _median(sel, "p99_ms"),
            }
        base_row = summary[mode].get(BASELINE)
        for row in summary[mode].values():
            if base_row:
                row["cpu_vs_own"] = row["cpu_us_per_request"] / base_row["cpu_us_per_request"]

    print(
        f"\nHTTP clients against the simulated upstream, concurrency {args.concurrency}, "
        f"median of {args.rounds} interleaved rounds ({os.cpu_count()} CPUs)\n"
    )
    print("| mode | client | req/s | CPU us/req | p50 ms | p99 ms | CPU vs own |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode, rows in summary.items():
        for client, row in rows.items():
            print(
                f"| {mode} | {client} | {row['rps']:.0f} | {row['cpu_us_per_request']:.0f} "
                f"| {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
                f"| {row.get('cpu_vs_own', float('nan')):.2f}x |"
            )

    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"http-clients-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        doc = {
            "benchmark": "http_clients",
            "started_at": started.isoformat(),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "load_avg_at_start": os.getloadavg(),
            },
            "versions": _versions(),
            "config": {
                k: v
                for k, v in vars(args).items()
                if k not in ("worker", "mode", "base_url", "no_write")
            },
            "baseline": BASELINE,
            "summary": summary,
            "runs": runs,
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(
            f"\nwrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}"
        )


if __name__ == "__main__":
    main()

"""What ``tollway.GuardMiddleware`` costs a host app's route: guarded vs bare, at 500 calls/s.

Starts one host Starlette app in its own process (uvicorn with uvloop and httptools, as
``tollway serve`` runs) with two routes answering the same small JSON: ``/bare``, and
``/guarded`` behind the middleware (rate limits, the daily budget with an explicit cost,
one call event per request; with ``--events``, the default, on the embedded nats-server,
as a deployment runs it). ``oha`` drives each route at a fixed rate (500/s, latency
corrected), the two interleaved in every round with the order rotated; the result is the
median over rounds of (guarded - bare) p50, and of the server's CPU time per request.

    python benchmarks/middleware.py                  # 3 rounds of 4 s legs, ~40 s
    python benchmarks/middleware.py --rounds 5 --duration 6 --no-events

The bare route sits behind the middleware too, outside its ``paths`` (one prefix check):
the routes share one process, one socket and one moment. A third route, ``/floor``, sits
behind a pure ASGI middleware that only wraps ``send`` and adds a header, the least any
guard in front of a route does: its added p50 is the floor of what a middleware costs at
this pace. Results go to ``benchmarks/results/middleware-<UTC timestamp>.json``.

A second reading is taken inside the server: an outer ASGI wrapper (in front of every
route alike) times each request from its arrival to its response's last bytes, and
``GET /timings`` hands the leg's times over. Its median difference between two routes is
the middleware's own time with the client, the kernel and the load generator left out:
about half as noisy from round to round as the p50s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import (
    HOST,
    RESULTS,
    Leg,
    Proc,
    find_oha,
    free_port,
    parse_oha,
    process_cpu_s,
    run_oha,
    wait_ready,
)

KEY = "tw-bench-middleware-0123456789"
RATE = 500
TARGETS = ["bare", "floor", "guarded"]
BAR_MS = 0.1  # issue 19: at most +0.1 ms p50 over the bare route at 500 calls/s
BIG = 10**12


def config(data_dir: str, events: bool) -> Any:
    from tollway.config import parse_config

    raw = {
        "server": {"builtin_providers": False, "builtin_models": False},
        "nats": {"url": "embedded", "data_dir": data_dir} if events else {"enabled": False},
        "tenants": [{"id": "bench", "tier": "premium", "daily_usd": 1e9, "limits": {
            "per_minute": BIG, "per_hour": BIG, "per_day": BIG, "expensive_per_hour": BIG}}],
    }
    return parse_config(raw, source="<bench>", env={})


class Floor:
    """The least a guard does: a prefix check, a ``send`` wrapped, a header added."""

    def __init__(self, app: Any, path: str) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.path):
            await self.app(scope, receive, send)
            return

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-floor", b"1")]
            await send(message)

        await self.app(scope, receive, sending)


class Timed:
    """Every request's time from its arrival to its last bytes, by path; ``GET /timings``
    answers those taken since the last ask (JSON: path -> seconds) and forgets them."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.times: dict[str, list[float]] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/timings":
            body = json.dumps(self.times).encode()
            self.times = {}
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        t0 = time.perf_counter()
        times = self.times.setdefault(path, [])

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                times.append(time.perf_counter() - t0)
            await send(message)

        await self.app(scope, receive, sending)


def taken(base: str) -> dict[str, list[float]]:
    """The server's times since the last ask (:class:`Timed`)."""
    with urllib.request.urlopen(f"{base}/timings", timeout=10) as reply:
        doc: dict[str, list[float]] = json.loads(reply.read())
    return doc


def serve(port: int, data_dir: str, events: bool) -> None:
    """The host app (run in the child process)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    import tollway
    from tollway.config import ServerConfig
    from tollway.server import uvicorn_config

    gw = tollway.Gateway(config(data_dir, events), env={})
    auth = f"Bearer {KEY}".encode()

    def tenant(scope: Any) -> str | None:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return "bench" if value == auth else None
        return None

    async def answer(request: Request) -> Response:
        await request.body()
        return Response(b'{"ok":true}', media_type="application/json")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        async with gw:
            yield

    app = Starlette(
        routes=[Route("/bare", answer, methods=["GET", "POST"]),
                Route("/floor", answer, methods=["POST"]),
                Route("/guarded", answer, methods=["POST"])],
        middleware=[Middleware(tollway.GuardMiddleware, gateway=gw, tenant=tenant,
                               cost=lambda scope: 0.0001, paths=["/guarded"]),
                    Middleware(Floor, path="/floor")],
        lifespan=lifespan)
    uvicorn.Server(uvicorn_config(Timed(app), ServerConfig(), host=HOST, port=port,
                                  log_level="warning")).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per leg")
    parser.add_argument("--events", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "DATA_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1], args.events)
        return
    oha = find_oha()
    legs: list[Leg] = []
    server_ms: dict[tuple[int, str], float] = {}  # (round, route) -> median in the server
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        log = Path(tmp) / "host.log"
        cmd = [sys.executable, __file__, "--serve", str(port), str(Path(tmp) / "data"),
               "--events" if args.events else "--no-events"]
        proc = Proc("host", subprocess.Popen(cmd, stdout=log.open("wb"),
                                             stderr=subprocess.STDOUT), log)
        try:
            base = f"http://{HOST}:{port}"
            wait_ready(proc, f"{base}/bare", {})
            for target in TARGETS:  # warm up every path
                run_oha(oha, f"{base}/{target}", KEY, "{}", rate=RATE, duration=1.0,
                        connections=16)
            taken(base)
            for rnd in range(args.rounds):
                order = TARGETS[rnd % 3:] + TARGETS[:rnd % 3]  # each first in turn
                if rnd // 3 % 2:
                    order.reverse()  # and each after each of the others
                for target in order:
                    before = process_cpu_s(proc.popen.pid)
                    doc = run_oha(oha, f"{base}/{target}", KEY, "{}", rate=RATE,
                                  duration=args.duration, connections=16)
                    after = process_cpu_s(proc.popen.pid)
                    leg = parse_oha(doc, Leg(rnd, "plain", str(RATE), target))
                    if before and after and leg.requests:
                        leg.server_cpu_us = (sum(after) - sum(before)) / leg.requests * 1e6
                    legs.append(leg)
                    server_ms[(rnd, target)] = 1e3 * statistics.median(
                        taken(base)[f"/{target}"])
        finally:
            proc.stop()
    by = {(leg.round, leg.target): leg for leg in legs}
    p50 = [by[(r, "guarded")].p50_ms - by[(r, "bare")].p50_ms for r in range(args.rounds)]
    floor = [by[(r, "floor")].p50_ms - by[(r, "bare")].p50_ms for r in range(args.rounds)]
    cpu = [by[(r, "guarded")].server_cpu_us - by[(r, "bare")].server_cpu_us
           for r in range(args.rounds)]
    floor_cpu = [by[(r, "floor")].server_cpu_us - by[(r, "bare")].server_cpu_us
                 for r in range(args.rounds)]
    server = [1e3 * (server_ms[(r, "guarded")] - server_ms[(r, "bare")])
              for r in range(args.rounds)]
    floor_server = [1e3 * (server_ms[(r, "floor")] - server_ms[(r, "bare")])
                    for r in range(args.rounds)]
    summary = {
        "rate": RATE, "events": args.events, "rounds": args.rounds, "duration_s": args.duration,
        "bare_p50_ms": statistics.median(by[(r, "bare")].p50_ms for r in range(args.rounds)),
        "guarded_p50_ms": statistics.median(by[(r, "guarded")].p50_ms
                                            for r in range(args.rounds)),
        "floor_p50_ms": statistics.median(by[(r, "floor")].p50_ms for r in range(args.rounds)),
        "added_p50_ms": statistics.median(p50),
        "floor_added_p50_ms": statistics.median(floor),
        "added_server_us": statistics.median(server),
        "floor_added_server_us": statistics.median(floor_server),
        "added_server_us_by_round": [round(x, 1) for x in server],
        "added_cpu_us_per_request": statistics.median(cpu),
        "floor_added_cpu_us_per_request": statistics.median(floor_cpu),
        "bar_p50_ms": BAR_MS,
        "non_2xx": sum(n for leg in legs for s, n in leg.status.items() if not s.startswith("2")),
    }
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"middleware-{stamp}.json"
    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "when": stamp, "summary": summary, "legs": [leg.__dict__ for leg in legs]},
        indent=2) + "\n")
    print(f"| route | p50 ms (median of {args.rounds} rounds at {RATE}/s) |")
    print("|---|---:|")
    print(f"| bare | {summary['bare_p50_ms']:.3f} |")
    print(f"| floor (a pass-through middleware) | {summary['floor_p50_ms']:.3f} |")
    print(f"| guarded | {summary['guarded_p50_ms']:.3f} |")
    print(f"\nthe floor adds {summary['floor_added_p50_ms']:+.3f} ms p50, "
          f"{summary['floor_added_cpu_us_per_request']:+.1f} us of server CPU a request")
    print(f"in the server, arrival to last bytes: the floor adds "
          f"{summary['floor_added_server_us']:+.1f} us, the guard "
          f"{summary['added_server_us']:+.1f} us (by round: "
          f"{summary['added_server_us_by_round']})")
    print(f"added p50: {summary['added_p50_ms']:+.3f} ms (bar {BAR_MS} ms), added server CPU: "
          f"{summary['added_cpu_us_per_request']:+.1f} us/request; non-2xx: "
          f"{summary['non_2xx']}; events {'on' if args.events else 'off'}; {out.name}")


if __name__ == "__main__":
    main()

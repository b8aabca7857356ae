"""What ``tollway.GuardMiddleware`` costs a host app's route: guarded vs bare, at 500 calls/s.

Starts one host Starlette app in its own process (uvicorn with uvloop and httptools, as
``tollway serve`` runs) with routes answering the same small JSON: ``/bare``; ``/guarded``
behind the middleware as it comes (rate limits, the daily budget with an explicit cost,
one call event per request written right after the response's last bytes; with
``--events``, the default, on the embedded nats-server and the fleet's shared limits and
budget, as a deployment runs it); and ``/strict``, the same with
``event_before_last_bytes=True``. ``oha`` drives each route at a fixed rate (500/s,
latency corrected), interleaved in every round with the order rotated; the result is the
median over rounds of (route - bare) p50, and of the server's CPU time per request.

    python benchmarks/middleware.py                  # 4 rounds of 4 s legs, ~75 s
    python benchmarks/middleware.py --rounds 8 --no-events
    python benchmarks/middleware.py --no-pin         # oha shares the server's CPUs

The bare route sits behind the middleware too, outside its ``paths`` (one prefix check):
the routes share one process, one socket and one moment. ``/floor`` sits behind a pure
ASGI middleware that only wraps ``send`` and adds a header, the least any guard in front
of a route does: its added p50 is the floor of what a middleware costs at this pace.
Results go to ``benchmarks/results/middleware-<UTC timestamp>.json``.

Pinning (the default with 2 CPUs or more): ``oha`` runs on one CPU, the server and the
nats-server it starts on the others. Sharing the CPUs, ``oha`` often waits for the
server's CPU to read an answer, so work the server does right after a response's last
bytes (the guard's record) still shows in the p50; pinned, the reading is what a client
on a CPU of its own sees, with the server and NATS still sharing theirs.

A second reading is taken inside the server: an outer ASGI wrapper (in front of every
route alike) times each request from its arrival to its response's last bytes, and
``GET /timings`` hands the leg's times over. Its median difference between two routes is
the middleware's own time with the client, the kernel and the load generator left out:
about half as noisy from round to round as the p50s.
"""

from __future__ import annotations

import argparse
import json
import os
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
TARGETS = ["bare", "floor", "guarded", "strict"]
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


def cores(pin: bool) -> tuple[set[int], set[int]] | None:
    """(the load generator's CPUs, the server's) when pinning: ``oha`` on the first CPU this
    process may use, the server (and the nats-server it starts) on the rest. None: no pinning
    (asked not to, fewer than 2 CPUs, or no ``sched_setaffinity``)."""
    if not pin or not hasattr(os, "sched_setaffinity"):
        return None
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return None
    return {usable[0]}, set(usable[1:])


def serve(port: int, data_dir: str, events: bool, pin: bool) -> None:
    """The host app (run in the child process)."""
    split = cores(pin)
    if split is not None:
        os.sched_setaffinity(0, split[1])  # before the embedded nats-server starts: it inherits
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
                Route("/guarded", answer, methods=["POST"]),
                Route("/strict", answer, methods=["POST"])],
        middleware=[Middleware(tollway.GuardMiddleware, gateway=gw, tenant=tenant,
                               cost=lambda scope: 0.0001, paths=["/guarded"]),
                    Middleware(tollway.GuardMiddleware, gateway=gw, tenant=tenant,
                               cost=lambda scope: 0.0001, paths=["/strict"],
                               event_before_last_bytes=True),
                    Middleware(Floor, path="/floor")],
        lifespan=lifespan)
    uvicorn.Server(uvicorn_config(Timed(app), ServerConfig(), host=HOST, port=port,
                                  log_level="warning")).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="each route first once in 4")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per leg")
    parser.add_argument("--events", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="oha on one CPU, the server and its nats-server on the others "
                        "(default, with 2 CPUs or more)")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "DATA_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1], args.events, args.pin)
        return
    oha = find_oha()
    split = cores(args.pin)
    legs: list[Leg] = []
    server_ms: dict[tuple[int, str], float] = {}  # (round, route) -> median in the server
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        log = Path(tmp) / "host.log"
        cmd = [sys.executable, __file__, "--serve", str(port), str(Path(tmp) / "data"),
               "--events" if args.events else "--no-events", "--pin" if split else "--no-pin"]
        proc = Proc("host", subprocess.Popen(cmd, stdout=log.open("wb"),
                                             stderr=subprocess.STDOUT), log)
        if split is not None:
            os.sched_setaffinity(0, split[0])  # this process, and the oha runs it starts
        try:
            base = f"http://{HOST}:{port}"
            wait_ready(proc, f"{base}/bare", {})
            for target in TARGETS:  # warm up every path
                run_oha(oha, f"{base}/{target}", KEY, "{}", rate=RATE, duration=1.0,
                        connections=16)
            taken(base)
            for rnd in range(args.rounds):
                n = len(TARGETS)
                order = TARGETS[rnd % n:] + TARGETS[:rnd % n]  # each first in turn
                if rnd // n % 2:
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
                    leg.server_p50_ms = server_ms[(rnd, target)]
        finally:
            proc.stop()
    by = {(leg.round, leg.target): leg for leg in legs}
    rounds = range(args.rounds)

    def added(target: str) -> dict[str, Any]:
        """The route's medians over rounds of (route - bare) in that round."""
        server = [1e3 * (server_ms[(r, target)] - server_ms[(r, "bare")]) for r in rounds]
        return {
            "p50_ms": statistics.median(by[(r, target)].p50_ms for r in rounds),
            "added_p50_ms": statistics.median(by[(r, target)].p50_ms - by[(r, "bare")].p50_ms
                                              for r in rounds),
            "added_server_us": statistics.median(server),
            "added_server_us_by_round": [round(x, 1) for x in server],
            "added_cpu_us_per_request": statistics.median(
                by[(r, target)].server_cpu_us - by[(r, "bare")].server_cpu_us for r in rounds),
        }

    guarded, floor, strict = added("guarded"), added("floor"), added("strict")
    summary = {
        "rate": RATE, "events": args.events, "pinned": split is not None,
        "rounds": args.rounds, "duration_s": args.duration,
        "bare_p50_ms": statistics.median(by[(r, "bare")].p50_ms for r in rounds),
        "guarded_p50_ms": guarded["p50_ms"],
        "floor_p50_ms": floor["p50_ms"],
        "strict_p50_ms": strict["p50_ms"],
        **{key: value for key, value in guarded.items() if key != "p50_ms"},
        **{f"floor_{key}": value for key, value in floor.items() if key != "p50_ms"},
        **{f"strict_{key}": value for key, value in strict.items() if key != "p50_ms"},
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
    print(f"| strict (the event before the last bytes) | {summary['strict_p50_ms']:.3f} |")
    print(f"\nthe floor adds {summary['floor_added_p50_ms']:+.3f} ms p50, "
          f"{summary['floor_added_cpu_us_per_request']:+.1f} us of server CPU a request")
    print(f"in the server, arrival to last bytes: the floor adds "
          f"{summary['floor_added_server_us']:+.1f} us, the guard "
          f"{summary['added_server_us']:+.1f} us (by round: "
          f"{summary['added_server_us_by_round']}), strict "
          f"{summary['strict_added_server_us']:+.1f} us")
    print(f"strict adds {summary['strict_added_p50_ms']:+.3f} ms p50, "
          f"{summary['strict_added_cpu_us_per_request']:+.1f} us of server CPU a request")
    print(f"added p50: {summary['added_p50_ms']:+.3f} ms (bar {BAR_MS} ms), added server CPU: "
          f"{summary['added_cpu_us_per_request']:+.1f} us/request; non-2xx: "
          f"{summary['non_2xx']}; events {'on' if args.events else 'off'}; "
          f"{'pinned' if split else 'not pinned'}; {out.name}")


if __name__ == "__main__":
    main()

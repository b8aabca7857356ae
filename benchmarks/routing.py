"""Routing that learns from shadow evidence (issue 17): cost and agreement with the primary
for three ways of routing one workload, over time.

The workload: ``--calls`` chat calls across four tasks (classify, extract, summarize,
chat), each with its own prompt, replayed through a gateway (in this process, on a
real uvicorn server) to the simulated upstream (``tollway.testing.upstream``), where
three models differ in price (the gateway's config) and quality per task (the
upstream's ``Replies.quality``: the share of prompts a model answers as the primary
does). Modes, each on a fresh gateway:

- ``primary``: every call to the primary model ``big`` (the baseline);
- ``static``: task routes an operator would write from the price list ([policy]
  task_routes: classify and extract to ``small``, summarize to ``mid``, chat to ``big``);
- ``learning``: ``auto`` with ``[[shadow]]`` candidates ``mid`` and ``small`` and
  ``[learn]``: per task, the cheapest candidate whose shadow evidence qualifies.

Half-way, ``small``'s quality on classify drops (``--drop-to``): the learning gateway
must stop serving it classify calls within 200 calls.

Figures: cost (live calls, and the shadow spend on top for learning) and its cut
against ``primary``; agreement of each served answer with the primary's answer to
the same prompt (exact for classify and extract, word similarity >= 0.8 for the
others: ``tollway.learn.evidence``); both per window of ``--window`` calls.

    python benchmarks/routing.py              # 4,000 calls a mode, about a minute
    python benchmarks/routing.py --calls 1000 --no-write

Bars: learning cuts cost >= 25 % against primary (shadow spend included) with >= 95 %
agreement, and backs off within 200 calls of the drop.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from tollway.app import create_app
from tollway.auth import hash_key
from tollway.config import parse_config
from tollway.server import uvicorn_config
from tollway.shadow.agreement import score
from tollway.testing.upstream import FakeUpstream

RESULTS = Path(__file__).resolve().parent / "results"
KEY = "tw-bench-routing-0001"
UPSTREAM_KEY = "sk-bench-routing"
ADMIN_KEY = "tw-bench-admin-0001"
TASKS = ("classify", "extract", "summarize", "chat")
EXACT = {"classify", "extract"}
SIMILARITY = 0.8
BAR_CUT = 0.25
BAR_AGREE = 0.95
BAR_BACKOFF = 200

# USD per million tokens (input, output): a frontier model, a mid one, a small one.
PRICES = {"big": (2.50, 10.00), "mid": (0.40, 1.60), "small": (0.10, 0.40)}
# Share of prompts each model answers as the primary does, per task.
QUALITY = {
    "big-model": {t: 1.0 for t in TASKS},
    "mid-model": {"classify": 0.995, "extract": 0.995, "summarize": 0.99, "chat": 0.93},
    "small-model": {"classify": 0.995, "extract": 0.99, "summarize": 0.80, "chat": 0.60},
}
STATIC_ROUTES = {"classify": "small", "extract": "small", "summarize": "mid", "chat": "big"}
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "  # noqa: SIM905
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()


def config(mode: str, base_url: str, seed: int, fraction: float) -> dict[str, Any]:
    limits = {"per_minute": 10**9, "per_hour": 10**9, "per_day": 10**9,
              "expensive_per_hour": 10**9}
    raw: dict[str, Any] = {
        "server": {"builtin_providers": False, "builtin_models": False,
                   "admin_key_env": "BENCH_ADMIN_KEY", "access_log": False,
                   "log_level": "warning"},
        "nats": {"enabled": False},
        "providers": [{"name": "sim", "base_url": base_url, "api_key_env": "BENCH_UP_KEY"}],
        "models": [{"id": m, "provider": "sim", "upstream": f"{m}-model",
                    "input_usd_per_mtok": i, "output_usd_per_mtok": o}
                   for m, (i, o) in PRICES.items()],
        "routes": [{"alias": "auto", "candidates": ["big"]}],
        "tiers": {"premium": {"max_call_usd": 1.0, "daily_usd": 10_000.0}},
        "tenants": [{"id": "bench", "tier": "premium", "key_sha256": [hash_key(KEY)],
                     "limits": limits}],
        "retry": {"attempts": 1},
    }
    if mode == "static":
        raw["policy"] = {"task_routes": STATIC_ROUTES}
    if mode == "learning":
        raw["shadow"] = [{"route": "auto", "candidates": ["mid", "small"], "fraction": fraction,
                          "daily_usd": 10_000.0, "max_in_flight": 64, "seed": seed}]
        raw["learn"] = {"enabled": True, "min_samples": 40, "window": 40, "recent": 10,
                        "min_agreement": 0.95, "hysteresis": 0.1, "verify_fraction": 0.3}
    return raw


class Gateway:
    """uvicorn serving the app in a thread (as ``tollway serve`` runs it)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, parse_config(
            {}, source="<bench>", env={}).server))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Gateway:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def workload(calls: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(calls):
        task = TASKS[rng.randrange(len(TASKS))]
        n = rng.randint(1, 4) if task in EXACT else rng.randint(20, 40)
        out.append((task, f"{i} " + " ".join(rng.choice(WORDS) for _ in range(n))))
    return out


def body(mode: str, task: str, prompt: str) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": "big" if mode == "primary" else "auto", "temperature": 0,
        "messages": [{"role": "system", "content": f"task: {task}"},
                     {"role": "user", "content": prompt}]}
    if task == "extract":
        b["response_format"] = {"type": "json_object"}
    return b


def agrees(task: str, reference: str, served: str) -> bool:
    s = score(reference, served).value
    return s >= 1.0 if task in EXACT else s >= SIMILARITY


def run(mode: str, work: list[tuple[str, str]], args: argparse.Namespace,
        reference: dict[int, str]) -> dict[str, Any]:
    env = {"BENCH_ADMIN_KEY": ADMIN_KEY, "BENCH_UP_KEY": UPSTREAM_KEY}
    with FakeUpstream(api_key=UPSTREAM_KEY, record=False,
                      models=[f"{m}-model" for m in PRICES]) as up:
        up.replies.quality = json.loads(json.dumps(QUALITY))
        cfg = parse_config(config(mode, up.base_url, args.seed, args.fraction),
                           source="<bench>", env=env)
        drop_at = len(work) // 2
        rows: list[dict[str, Any]] = []
        with Gateway(create_app(cfg, env=env)) as gw, httpx.Client(
                base_url=gw.url, timeout=60,
                headers={"authorization": f"Bearer {KEY}"}) as client:
            t0 = time.perf_counter()
            for i, (task, prompt) in enumerate(work):
                if i == drop_at:
                    up.replies.quality["small-model"]["classify"] = args.drop_to
                r = client.post("/api/ai/v1/chat/completions", json=body(mode, task, prompt),
                                headers={"x-tollway-task": task})
                r.raise_for_status()
                text = r.json()["choices"][0]["message"]["content"]
                if mode == "primary":
                    reference[i] = text
                rows.append({"i": i, "task": task, "model": r.headers["x-tollway-model"],
                             "cost": float(r.headers["x-tollway-cost-usd"]),
                             "agree": agrees(task, reference[i], text)})
            elapsed = time.perf_counter() - t0
            shadow = {"spend_usd": 0.0, "decisions": []}
            if mode == "learning":
                svc = gw.app.state.gateway.shadow
                deadline = time.monotonic() + 30
                while svc.runner.tasks and time.monotonic() < deadline:
                    time.sleep(0.05)
                report = client.get("/api/ai/shadow",
                                    headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
                shadow["spend_usd"] = sum(r["shadow_spend_usd"] for r in report["data"])
                shadow["shadow_rows"] = report["data"]
                shadow["decisions"] = report["learning"]["decisions"]
    return {"mode": mode, "rows": rows, "elapsed_s": elapsed, "drop_at": drop_at, **shadow}


def summarize(res: dict[str, Any], base_cost: float, window: int) -> dict[str, Any]:
    rows = res["rows"]
    live = sum(r["cost"] for r in rows)
    total = live + res.get("spend_usd", 0.0)
    windows = []
    for start in range(0, len(rows), window):
        part = rows[start:start + window]
        served: dict[str, int] = {}
        for r in part:
            served[r["model"]] = served.get(r["model"], 0) + 1
        windows.append({"from": start, "calls": len(part),
                        "cost_usd": sum(r["cost"] for r in part),
                        "agreement": sum(r["agree"] for r in part) / len(part),
                        "served": dict(sorted(served.items()))})
    out: dict[str, Any] = {
        "mode": res["mode"], "calls": len(rows), "live_cost_usd": live,
        "shadow_spend_usd": res.get("spend_usd", 0.0), "cost_usd": total,
        "cost_cut": 1 - total / base_cost if base_cost else None,
        "agreement": sum(r["agree"] for r in rows) / len(rows),
        "calls_per_s": len(rows) / res["elapsed_s"], "windows": windows}
    per_task = {}
    for t in TASKS:
        part = [r for r in rows if r["task"] == t]
        per_task[t] = {"calls": len(part), "agreement": sum(r["agree"] for r in part) / len(part),
                       "cost_usd": sum(r["cost"] for r in part)}
    out["per_task"] = per_task
    if res["mode"] == "learning":
        drop = res["drop_at"]
        after = [r for r in rows[drop:]]
        served_small = [r["i"] for r in after if r["task"] == "classify"
                        and r["model"] == "small"]
        last = max(served_small) if served_small else None
        out["drop_at_call"] = drop
        out["last_small_classify_call_after_drop"] = last
        out["backoff_calls"] = (last - drop + 1) if last is not None else 0
        out["decisions"] = [{k: d[k] for k in ("action", "task", "previous", "model",
                                               "samples", "agreement_rate")}
                            for d in res["decisions"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--fraction", type=float, default=0.2, help="shadow sample fraction")
    ap.add_argument("--drop-to", type=float, default=0.6,
                    help="small's classify quality after the drop")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    started = datetime.now(UTC)
    work = workload(args.calls, args.seed)
    reference: dict[int, str] = {}
    results = {}
    for mode in ("primary", "static", "learning"):
        print(f"{mode} ...", file=sys.stderr, flush=True)
        results[mode] = run(mode, work, args, reference)
    base = sum(r["cost"] for r in results["primary"]["rows"])
    summary = {m: summarize(res, base, args.window) for m, res in results.items()}
    learn = summary["learning"]
    print("| mode | cost USD | shadow USD | cut vs primary | agreement |")
    print("|---|---:|---:|---:|---:|")
    for m, s in summary.items():
        print(f"| {m} | {s['cost_usd']:.4f} | {s['shadow_spend_usd']:.4f} | "
              f"{s['cost_cut']:.1%} | {s['agreement']:.2%} |")
    print("\nlearning, per window of", args.window, "calls:")
    print("| from | cost USD | agreement | served |")
    print("|---:|---:|---:|---|")
    for w in learn["windows"]:
        print(f"| {w['from']} | {w['cost_usd']:.4f} | {w['agreement']:.2%} | {w['served']} |")
    print("\ndecisions:")
    for d in learn["decisions"]:
        print(f"  {d['action']:>8} {d['task']}: {d['previous'] or 'primary'} -> "
              f"{d['model'] or 'primary'} ({d['samples']} samples, "
              f"{d['agreement_rate']:.1%})")
    verdicts = [
        f"{'PASS' if learn['cost_cut'] >= BAR_CUT else 'FAIL'} learning cuts cost "
        f"{learn['cost_cut']:.1%} against always-primary, shadow spend included "
        f"(bar {BAR_CUT:.0%})",
        f"{'PASS' if learn['agreement'] >= BAR_AGREE else 'FAIL'} served answers agree with "
        f"the primary's {learn['agreement']:.2%} of the time (bar {BAR_AGREE:.0%})",
        f"{'PASS' if learn['backoff_calls'] <= BAR_BACKOFF else 'FAIL'} after small's "
        f"classify quality drops at call {learn['drop_at_call']}, it serves its last "
        f"classify call {learn['backoff_calls']} calls later (bar {BAR_BACKOFF})",
    ]
    print()
    print("\n".join(verdicts))
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"routing-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        path.write_text(json.dumps({
            "benchmark": "routing", "started_at": started.isoformat(),
            "load_avg_at_start": os.getloadavg(), "args": vars(args), "prices": PRICES,
            "quality": QUALITY, "static_routes": STATIC_ROUTES, "summary": summary,
            "verdicts": verdicts}, indent=2))
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""The response cache (issue 17): what a hit costs against a gateway answering from memory.

One ``tollway serve`` on a nats-server, the simulated upstream (zero latency: it
answers from memory) in its own process. Two bodies, the same prompt:

- ``upstream``: model ``gpt-4o-mini``, not cached: the gateway's whole path to an
  upstream that answers at once (the baseline);
- ``hit``: route ``cached`` (``[cache] routes = ["cached"]``, temperature 0), primed by
  one call: every call after it is a cache hit.

oha at ``--rate`` calls/s, ``--rounds`` interleaved rounds; p50 of each and the
difference. Bar: a hit adds at most 0.5 ms p50.

    python benchmarks/cache.py                 # about 40 s
    python benchmarks/cache.py --rounds 2 --seconds 3

Results go to ``benchmarks/results/cache-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from load import RESULTS, Leg, find_oha, parse_oha, run_oha

BAR_P50_DELTA_MS = 0.5
KEY = "tw-bench-cache-0001"
UPSTREAM_KEY = "sk-bench-cache"


def _config(folder: Path, nats_url: str, upstream: str) -> Path:
    from tollway.auth import hash_key

    cfg = folder / "tollway.toml"
    cfg.write_text(textwrap.dedent(f"""
        [server]
        builtin_models = false
        builtin_providers = false
        access_log = false
        [nats]
        url = "{nats_url}"
        data_dir = "{folder / 'data'}"
        [cache]
        routes = ["cached"]
        [[providers]]
        name = "fake"
        base_url = "{upstream}"
        api_key_env = "FAKE_API_KEY"
        [[models]]
        id = "gpt-4o-mini"
        provider = "fake"
        input_usd_per_mtok = 0.15
        output_usd_per_mtok = 0.60
        [[routes]]
        alias = "cached"
        candidates = ["gpt-4o-mini"]
        [[tenants]]
        id = "acme"
        tier = "premium"
        daily_usd = 100000.0
        key_sha256 = ["{hash_key(KEY)}"]
        [tenants.limits]
        per_minute = 1000000000
        per_hour = 1000000000
        per_day = 1000000000
        expensive_per_hour = 1000000000
    """))
    return cfg


def _serving_port(proc: subprocess.Popen[str]) -> int:
    assert proc.stderr is not None
    for line in proc.stderr:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("msg") == "serving":
            return int(record["port"])
    raise SystemExit("tollway serve did not start")


def body(model: str) -> str:
    return json.dumps({"model": model, "temperature": 0, "max_tokens": 64,
                       "messages": [{"role": "user", "content": "what does a cache hit cost"}]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from tollway.events.broker import EmbeddedNats

    started = datetime.now(UTC)
    env = {**os.environ, "FAKE_API_KEY": UPSTREAM_KEY}
    result: dict[str, Any] = {"benchmark": "cache", "started_at": started.isoformat(),
                              "load_avg_at_start": os.getloadavg(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        nats = EmbeddedNats(tmp / "nats")
        nats.start()
        up = subprocess.Popen([sys.executable, "-m", "tollway.testing.upstream", "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
        gw: subprocess.Popen[str] | None = None
        try:
            assert up.stdout is not None
            upstream = up.stdout.readline().split()[-1]
            (tmp / "gw").mkdir()
            gw = subprocess.Popen(
                [sys.executable, "-m", "tollway.cli", "serve", "--config",
                 str(_config(tmp / "gw", nats.url, upstream)), "--port", "0"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            url = f"http://127.0.0.1:{_serving_port(gw)}"
            assert gw.stderr is not None
            gw.stderr.close()
            auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
            with httpx.Client(timeout=30) as c:
                while c.get(f"{url}/api/ai/ready").status_code != 200:
                    time.sleep(0.05)
                primed = c.post(f"{url}/api/ai/v1/chat/completions", content=body("cached"),
                                headers=auth)
                again = c.post(f"{url}/api/ai/v1/chat/completions", content=body("cached"),
                               headers=auth)
                if again.headers.get("x-tollway-cache") != "hit":
                    raise SystemExit(f"no hit: {primed.headers} {again.headers}")
            oha = find_oha()
            chat = f"{url}/api/ai/v1/chat/completions"
            bodies = {"upstream": body("gpt-4o-mini"), "hit": body("cached")}
            for b in bodies.values():  # warm-up
                run_oha(oha, chat, KEY, b, rate=args.rate, duration=1.0, connections=16)
            p50: dict[str, list[float]] = {name: [] for name in bodies}
            p99: dict[str, list[float]] = {name: [] for name in bodies}
            for r in range(args.rounds):
                for name in (list(bodies) if r % 2 == 0 else list(reversed(bodies))):
                    leg = parse_oha(run_oha(oha, chat, KEY, bodies[name], rate=args.rate,
                                            duration=args.seconds, connections=16),
                                    Leg(r, "plain", str(args.rate), name))
                    if leg.status.get("200", 0) == 0:
                        raise SystemExit(f"{name}: no call served: {leg.status}")
                    p50[name].append(leg.p50_ms)
                    p99[name].append(leg.p99_ms)
        finally:
            if gw is not None:
                gw.terminate()
                try:
                    gw.wait(15)
                except subprocess.TimeoutExpired:
                    gw.kill()
            up.terminate()
            up.wait()
            nats.stop()
    med = {name: statistics.median(v) for name, v in p50.items()}
    delta = med["hit"] - med["upstream"]
    result.update({"p50_ms": p50, "p99_ms": p99, "median_p50_ms": med, "delta_ms": delta})
    verdict = (f"{'PASS' if delta <= BAR_P50_DELTA_MS else 'FAIL'} at {args.rate} calls/s: "
               f"p50 {med['upstream']:.3f} ms through the gateway to an upstream answering "
               f"from memory, {med['hit']:.3f} ms for a cache hit: {delta:+.3f} ms "
               f"(bar +{BAR_P50_DELTA_MS} ms)")
    result["verdict"] = verdict
    print(verdict)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"cache-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

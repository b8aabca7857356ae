"""Run-time keys (issue 15): how soon a change made on one gateway holds on another, and
what a directory key costs a call against a config-file key.

Two ``tollway serve`` processes (A and B) on one nats-server, as ``fleet_limits.py``
starts them:

(a) ``propagation``: ``--trials`` times, a key is made through A's admin API and B is
    called with it until it answers 200; then the key is revoked through B and A is
    called until it refuses it. Each wait is timed from the admin call's answer. Bar:
    within 1 s (median of 20 trials).
(b) ``lookup``: A at ``--rate`` calls/s (oha) with the config file's key and with a
    directory key of the same tenant, in interleaved rounds: p50 of each and the
    difference. Bar: at most +0.05 ms p50.

    python benchmarks/directory.py                 # both, about a minute
    python benchmarks/directory.py --trials 5 --rounds 1

Results go to ``benchmarks/results/directory-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from fleet_limits import ADMIN_KEY, KEY, UPSTREAM_KEY, _stop_all, start_gateways
from load import RESULTS, Leg, find_oha, parse_oha, run_oha

BAR_PROPAGATION_S = 1.0
BAR_P50_DELTA_MS = 0.05
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


def _status(client: httpx.Client, url: str, key: str) -> int:
    return client.post(f"{url}/api/ai/v1/chat/completions", json=BODY,
                       headers={"authorization": f"Bearer {key}"}).status_code


def _until(check: Any, limit_s: float = 30.0) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > limit_s:
            raise SystemExit("a change never reached the other gateway")
        time.sleep(0.005)
    return time.monotonic() - t0


def propagation(client: httpx.Client, a: str, b: str, trials: int) -> dict[str, Any]:
    made, revoked = [], []
    for _ in range(trials):
        r = client.post(f"{a}/api/ai/admin/keys", json={"tenant": "acme"}, headers=ADMIN)
        r.raise_for_status()
        key = r.json()
        made.append(_until(lambda k=key["key"]: _status(client, b, k) == 200))
        client.delete(f"{b}/api/ai/admin/keys/{key['id']}", headers=ADMIN).raise_for_status()
        revoked.append(_until(lambda k=key["key"]: _status(client, a, k) == 401))
    return {"trials": trials, "created_s": made, "revoked_s": revoked,
            "created_median_s": statistics.median(made), "created_max_s": max(made),
            "revoked_median_s": statistics.median(revoked), "revoked_max_s": max(revoked)}


def lookup(client: httpx.Client, a: str, rate: int, seconds: float, rounds: int
           ) -> dict[str, Any]:
    directory_key = client.post(f"{a}/api/ai/admin/keys", json={"tenant": "acme"},
                                headers=ADMIN).json()["key"]
    oha = find_oha()
    url = f"{a}/api/ai/v1/chat/completions"
    keys = {"config": KEY, "directory": directory_key}
    body = json.dumps(BODY)
    for key in keys.values():  # warm-up
        run_oha(oha, url, key, body, rate=rate, duration=1.0, connections=16)
    p50: dict[str, list[float]] = {name: [] for name in keys}
    for r in range(rounds):
        for name in (list(keys) if r % 2 == 0 else list(reversed(keys))):
            leg = parse_oha(run_oha(oha, url, keys[name], body, rate=rate, duration=seconds,
                                    connections=16), Leg(r, "plain", str(rate), name))
            if leg.status.get("200", 0) == 0:
                raise SystemExit(f"{name}: no call served: {leg.status}")
            p50[name].append(leg.p50_ms)
    med = {name: statistics.median(v) for name, v in p50.items()}
    return {"rate": rate, "rounds": rounds, "p50_ms": p50, "median_p50_ms": med,
            "delta_ms": med["directory"] - med["config"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from tollway.events.broker import EmbeddedNats

    started = datetime.now(UTC)
    env = {**os.environ, "TOLLWAY_ADMIN_KEY": ADMIN_KEY, "FAKE_API_KEY": UPSTREAM_KEY}
    result: dict[str, Any] = {"benchmark": "directory", "started_at": started.isoformat(),
                              "load_avg_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        nats = EmbeddedNats(tmp / "nats")
        nats.start()
        up = subprocess.Popen([sys.executable, "-m", "tollway.testing.upstream", "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
        procs: list[subprocess.Popen[str]] = []
        try:
            assert up.stdout is not None
            upstream = up.stdout.readline().split()[-1]
            a, b = start_gateways(procs, tmp, ["a", "b"], nats.url, upstream, 10**8, env)
            with httpx.Client(timeout=30) as client:
                for url in (a, b):
                    _until(lambda u=url: client.get(f"{u}/api/ai/ready").status_code == 200)
                print("(a) propagation ...", file=sys.stderr, flush=True)
                result["propagation"] = propagation(client, a, b, args.trials)
                print("(b) lookup ...", file=sys.stderr, flush=True)
                result["lookup"] = lookup(client, a, args.rate, args.seconds, args.rounds)
        finally:
            _stop_all(procs, up, nats)
    p, lk = result["propagation"], result["lookup"]
    verdicts = [
        f"{'PASS' if p['created_median_s'] <= BAR_PROPAGATION_S else 'FAIL'} (a) a key made "
        f"on A works on B after {p['created_median_s'] * 1000:.1f} ms (median of "
        f"{p['trials']}, max {p['created_max_s'] * 1000:.1f} ms; bar {BAR_PROPAGATION_S} s)",
        f"{'PASS' if p['revoked_median_s'] <= BAR_PROPAGATION_S else 'FAIL'} (a) a key "
        f"revoked on B is refused on A after {p['revoked_median_s'] * 1000:.1f} ms (median, "
        f"max {p['revoked_max_s'] * 1000:.1f} ms)",
        f"{'PASS' if lk['delta_ms'] <= BAR_P50_DELTA_MS else 'FAIL'} (b) p50 at {lk['rate']} "
        f"calls/s: config key {lk['median_p50_ms']['config']:.3f} ms, directory key "
        f"{lk['median_p50_ms']['directory']:.3f} ms ({lk['delta_ms']:+.3f} ms; bar "
        f"+{BAR_P50_DELTA_MS} ms)",
    ]
    result["verdicts"] = verdicts
    print("\n".join(verdicts))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"directory-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"written {path}")


if __name__ == "__main__":
    main()

"""A deterministic, realistic event sequence: the fixtures, the tests and the benchmark.

Three tenants on three tiers call four models on three providers over a few
days; most calls complete, some fail over or fail, some are rejected, each
dispatched call is granted from a budget lease and names it in its event,
and breakers open and close now and then.

``python -m tollway.events.synthetic --write`` regenerates
``events/fixtures/calls.jsonl`` (one event JSON per line; line n is stream
sequence n when published in order).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from tollway.events.schema import (
    BreakerChanged,
    BudgetReleased,
    BudgetReserved,
    CallCompleted,
    CallFailed,
    CallRejected,
    Event,
    day_of,
)

DAY0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
TENANTS = (("acme", "standard", 1_000_000_000), ("globex", "low", 100_000_000),
           ("initech", "premium", 10_000_000_000))
MODELS = (("gpt-4o-mini", "openai", 150, 600), ("gpt-4o", "openai", 2500, 10000),
          ("llama-3.1-8b", "local", 0, 0), ("claude-3.5-haiku", "openrouter", 800, 4000))
TASKS = ("chat", "draft", "summarize", "classify", "extract", "code")


def events(calls: int, *, seed: int = 7, start: float = DAY0, days: float = 2.0,
           instance: str = "gw-1") -> Iterator[Event]:
    """About 1.1 events per call: call events, budget leases, a few breaker changes.

    Budget as a gateway publishes it (``tollway.events.budget``): a tenant's calls are
    granted from a lease of about eight calls' worth; each call event names its lease,
    and a lease too small for the next call is given back with what its calls cost.
    """
    rng = random.Random(seed)
    step = days * 86400 / max(calls, 1)
    n = 0

    def eid() -> str:
        nonlocal n
        n += 1
        return f"{seed:04x}{n:028x}"

    breaker_open: set[str] = set()
    leases: dict[str, list[Any]] = {}  # tenant -> [lease id, day, free, settled]
    for i in range(calls):
        t = start + i * step
        tenant, tier, limit = TENANTS[rng.randrange(3)]
        model, provider, in_price, out_price = MODELS[rng.randrange(4)]
        rid = f"req-{seed}-{i}"
        prompt = rng.randrange(20, 2000)
        completion = rng.randrange(5, 800)
        cost = prompt * in_price + completion * out_price  # nano-USD per token = USD/Mtok * 1000
        estimate = cost + rng.randrange(0, cost + 1)
        common: dict[str, Any] = {
            "occurred_at": t, "tenant": tenant, "request_id": rid, "instance": instance,
            "route": rng.choice(("auto", model)), "model": model, "provider": provider,
            "upstream_model": model, "task": rng.choice(TASKS), "tier": tier,
            "sensitivity": rng.choice(("public", "internal", "confidential")),
            "estimated_cost_nanousd": estimate
        }
        roll = rng.random()
        if roll < 0.07:
            code = rng.choice(("rate_limit_exceeded", "insufficient_quota", "cost_limit_exceeded"))
            yield CallRejected(event_id=eid(), prompt_tokens=prompt, status=429 if code !=
                               "cost_limit_exceeded" else 400, error_type="requests",
                               error_code=code, error_message=f"refused: {code}", reason=code,
                               **common)
            continue
        day = day_of(t)
        lease = leases.get(tenant)
        if lease is not None and (lease[2] < estimate or lease[1] != day):
            yield BudgetReleased(event_id=eid(), occurred_at=t, tenant=tenant,
                                 instance=instance, reservation_id=lease[0], day=lease[1],
                                 settled_nanousd=lease[3])
            lease = None
        if lease is None:
            lease = leases[tenant] = [f"lease-{seed}-{i}", day, 8 * max(estimate, 1), 0]
            yield BudgetReserved(event_id=lease[0], occurred_at=t, tenant=tenant,
                                 instance=instance, reservation_id=lease[0], day=day,
                                 amount_nanousd=lease[2], limit_nanousd=limit,
                                 expires_at=t + 300)
        latency = round(rng.lognormvariate(-0.5, 0.6), 4)
        stream = rng.random() < 0.4
        if roll < 0.15:
            yield CallFailed(event_id=eid(), attempts=3, latency_s=latency, status=502,
                             fallbacks=("openrouter",) if provider != "openrouter" else (),
                             error_type="upstream_error", error_code="bad_gateway",
                             error_message="every candidate failed", stream=stream,
                             reservation_id=lease[0], **common)
            if provider not in breaker_open and rng.random() < 0.3:
                breaker_open.add(provider)
                yield BreakerChanged(event_id=eid(), occurred_at=t + 0.002, instance=instance,
                                     provider=provider, previous="closed", state="open",
                                     failures=5, reason="5 failures in 60s")
            continue
        if provider in breaker_open and rng.random() < 0.5:
            breaker_open.discard(provider)
            yield BreakerChanged(event_id=eid(), occurred_at=t, instance=instance,
                                 provider=provider, previous="half_open", state="closed",
                                 reason="probe succeeded")
        fallbacks = ("local",) if provider != "local" and rng.random() < 0.05 else ()
        lease[2] -= cost
        lease[3] += cost
        yield CallCompleted(event_id=eid(), prompt_tokens=prompt, completion_tokens=completion,
                            actual_cost_nanousd=cost, latency_s=latency,
                            ttft_s=round(latency / 4, 4) if stream else None,
                            overhead_s=0.0004, attempts=1 + len(fallbacks),
                            fallbacks=fallbacks, stream=stream, reservation_id=lease[0],
                            **common)


def default_fixture() -> Path:
    return Path(__file__).resolve().parents[3] / "events" / "fixtures" / "calls.jsonl"


FIXTURE_CALLS = 600


def jsonl(evs: Iterable[Event]) -> bytes:
    """One event per line, rendered by the standard library from the events' fields.

    Not msgspec's encoder: the file is a contract, so its bytes must not change with the
    msgspec release that renders it (the schema files are made the same way).
    """
    return b"".join(json.dumps(msgspec.to_builtins(e), ensure_ascii=False,
                               separators=(",", ":")).encode() + b"\n" for e in evs)


def fixture_bytes() -> bytes:
    return jsonl(events(FIXTURE_CALLS))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tollway.events.synthetic")
    ap.add_argument("--write", action="store_true", help="write events/fixtures/calls.jsonl")
    ap.add_argument("--calls", type=int, default=FIXTURE_CALLS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    data = jsonl(events(args.calls))
    if args.write or args.out:
        out = args.out or default_fixture()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        print(f"wrote {data.count(10)} events to {out}")
    else:
        print(data.decode(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

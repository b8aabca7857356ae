"""The shadow view: a pure fold of ``ShadowCompared`` events, per route, candidate and day.

Like the other projections (``tollway.events.projections``), :func:`apply`
reads only its arguments, updates the view in place, and skips any stream
sequence at or below the last one applied, so redelivery and replay over a
checkpoint change nothing. Any other event moves ``last_seq`` only. Which
events reach the fold -- each event id once, only of days the view keeps --
its ``seen`` decides, through its ``Projection``; :func:`prune` drops the days
it no longer keeps (``[events] retention_days``).

Latency percentiles come from fixed log-spaced histograms (bucket ``i``
holds ``[0.1 ms * 1.04**i, 0.1 ms * 1.04**(i+1))``; values below 0.1 ms go
to bucket 0): they merge by adding counts across days and processes, fold
deterministically (a random reservoir would not), and give a percentile
within 2 % of the exact one (the bucket's geometric middle). The primary's
latency counts every sample; the candidate's only those it answered (a
timeout says nothing about how fast its answers are; errors have their own
rate).

Call events of an A/B split (their ``reason`` names the arm, see
:mod:`tollway.shadow.ab`) fold into ``arms``: per route, arm, serving model
and day, the live calls' count, failures, cost and latency.
"""

from __future__ import annotations

import math
from typing import TypeVar

import msgspec

from tollway.events.schema import (
    CallEvent,
    CallFailed,
    CallRejected,
    Event,
    RouteLearned,
    day_of,
)
from tollway.events.seen import RETENTION_DAYS, Seen
from tollway.shadow.event import ShadowCompared
from tollway.shadow.sampling import parse_arm

__all__ = ["ArmRow", "Row", "ShadowView", "apply", "bucket", "dump", "load", "new",
           "percentile", "prune", "spend_by"]

VERSION = 2
HIST_MIN_S = 1e-4
HIST_GROWTH = 1.04
_LOG_GROWTH = math.log(HIST_GROWTH)
_MAX_BUCKET = 1000  # ~1.1e13 s: nothing real lands past it

Key = tuple[str, str, str]  # route, candidate model, day


class Row(msgspec.Struct):
    samples: int = 0
    errors: int = 0  # candidate failed (status, timeout, unreadable reply)
    scored: int = 0  # samples with an agreement score
    agreement_sum: float = 0.0
    agreed: int = 0  # score >= the threshold configured when it was scored
    primary_cost_nanousd: int = 0  # over scored samples: the cost ratio's denominator
    candidate_cost_nanousd: int = 0  # over scored samples: its numerator
    shadow_spend_nanousd: int = 0  # every sample, failed ones included
    primary_tokens: int = 0  # prompt + completion, over scored samples
    candidate_tokens: int = 0
    primary_latency: dict[int, int] = msgspec.field(default_factory=dict)
    candidate_latency: dict[int, int] = msgspec.field(default_factory=dict)
    primary_ttft: dict[int, int] = msgspec.field(default_factory=dict)
    primary_models: dict[str, int] = msgspec.field(default_factory=dict)
    errors_by_code: dict[str, int] = msgspec.field(default_factory=dict)
    methods: dict[str, int] = msgspec.field(default_factory=dict)
    candidate_provider: str = ""


class ArmRow(msgspec.Struct):
    """Live calls of one A/B arm served by one model (a candidate arm may fail over)."""

    calls: int = 0
    failed: int = 0
    rejected: int = 0
    cost_nanousd: int = 0  # completed calls
    tokens: int = 0
    latency: dict[int, int] = msgspec.field(default_factory=dict)  # completed calls
    ttft: dict[int, int] = msgspec.field(default_factory=dict)


ArmKey = tuple[str, str, str, str]  # route, arm (candidate | primary), model, day


class Learned(msgspec.Struct):
    """A learning routing decision (``route.learned``), as the report lists it."""

    at: float
    route: str
    task: str
    model: str  # "": back to the route's own order
    previous: str
    action: str
    samples: int
    agreement_rate: float
    why: str
    instance: str = ""


MAX_LEARNED = 200  # decisions the view keeps (the newest)


class ShadowView(msgspec.Struct):
    last_seq: int = 0
    rows: dict[Key, Row] = msgspec.field(default_factory=dict)
    arms: dict[ArmKey, ArmRow] = msgspec.field(default_factory=dict)
    # (route, day) -> instance -> shadow spend: the spend cap of every gateway process
    spend: dict[tuple[str, str], dict[str, int]] = msgspec.field(default_factory=dict)
    seen: Seen = msgspec.field(default_factory=lambda: Seen(RETENTION_DAYS))
    # Learning routing: its latest decisions, and (route, task) -> the model serving now
    # by the latest decision of each gateway process ("" : the route's own order).
    learned: list[Learned] = msgspec.field(default_factory=list)
    serving: dict[tuple[str, str, str], str] = msgspec.field(default_factory=dict)


def _learned(view: ShadowView, e: RouteLearned) -> None:
    view.learned.append(Learned(at=e.occurred_at, route=e.route, task=e.task, model=e.model,
                                previous=e.previous, action=e.action, samples=e.samples,
                                agreement_rate=e.agreement_rate, why=e.why,
                                instance=e.instance))
    if len(view.learned) > MAX_LEARNED:
        del view.learned[: len(view.learned) - MAX_LEARNED]
    view.serving[(e.route, e.task, e.instance)] = e.model


def new(keep_days: int = RETENTION_DAYS) -> ShadowView:
    return ShadowView(seen=Seen(keep_days))


def prune(view: ShadowView) -> None:
    """Drop what the view holds of days it no longer keeps."""
    oldest = view.seen.oldest
    _drop_before(view.rows, oldest)
    _drop_before(view.arms, oldest)
    _drop_before(view.spend, oldest)


_K = TypeVar("_K", bound=tuple[str, ...])
_V = TypeVar("_V")


def _drop_before(rows: dict[_K, _V], oldest: str) -> None:
    """Drop the rows keyed by a day (the key's last part) before ``oldest``."""
    for key in [k for k in rows if k[-1] < oldest]:
        del rows[key]


def bucket(seconds: float) -> int:
    if not seconds > HIST_MIN_S:  # also NaN
        return 0
    return min(_MAX_BUCKET, int(math.log(seconds / HIST_MIN_S) / _LOG_GROWTH))


def bucket_value(i: int) -> float:
    """The geometric middle of bucket ``i``."""
    return float(HIST_MIN_S * HIST_GROWTH ** (i + 0.5))


def _add(hist: dict[int, int], seconds: float) -> None:
    b = bucket(seconds)
    hist[b] = hist.get(b, 0) + 1


def percentile(hist: dict[int, int], q: float) -> float | None:
    """Nearest-rank ``q`` percentile (0 < q <= 1) in seconds; None when empty."""
    n = sum(hist.values())
    if n == 0:
        return None
    rank = max(1, math.ceil(q * n))
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= rank:
            return bucket_value(b)
    return bucket_value(max(hist))  # pragma: no cover - rank <= n always stops above


def apply(view: ShadowView, seq: int, event: Event) -> ShadowView:
    if seq <= view.last_seq:
        return view
    view.last_seq = seq
    if type(event) is not ShadowCompared:
        if isinstance(event, CallEvent) and "ab[" in event.reason:
            _arm(view, event)
        elif type(event) is RouteLearned:
            _learned(view, event)
        return view
    e: ShadowCompared = event
    day = day_of(e.occurred_at)
    key = (e.route, e.candidate_model, day)
    row = view.rows.get(key)
    if row is None:
        row = view.rows[key] = Row(candidate_provider=e.candidate_provider)
    row.samples += 1
    # What the shadow call cost: the candidate's, or the primary's for a check of a live
    # candidate (learning routing).
    spent = e.primary_cost_nanousd if e.verify else e.candidate_cost_nanousd
    row.shadow_spend_nanousd += spent
    row.primary_models[e.primary_model] = row.primary_models.get(e.primary_model, 0) + 1
    _add(row.primary_latency, e.primary_latency_s)
    if e.primary_ttft_s is not None:
        _add(row.primary_ttft, e.primary_ttft_s)
    if e.candidate_error is not None:
        row.errors += 1
        row.errors_by_code[e.candidate_error] = row.errors_by_code.get(e.candidate_error, 0) + 1
    else:
        _add(row.candidate_latency, e.candidate_latency_s)
    if e.agreement is not None:
        row.scored += 1
        row.agreement_sum += e.agreement
        row.agreed += 1 if e.agreed else 0
        row.methods[e.agreement_method] = row.methods.get(e.agreement_method, 0) + 1
        row.primary_cost_nanousd += e.primary_cost_nanousd
        row.candidate_cost_nanousd += e.candidate_cost_nanousd
        row.primary_tokens += e.primary_prompt_tokens + e.primary_completion_tokens
        row.candidate_tokens += e.candidate_prompt_tokens + e.candidate_completion_tokens
    if spent:
        by_instance = view.spend.setdefault((e.route, day), {})
        by_instance[e.instance] = by_instance.get(e.instance, 0) + spent
    return view


def _arm(view: ShadowView, e: CallEvent) -> None:
    found = parse_arm(e.reason)
    if found is None:
        return
    key = (found[0], found[1], e.model, day_of(e.occurred_at))
    row = view.arms.get(key)
    if row is None:
        row = view.arms[key] = ArmRow()
    row.calls += 1
    if type(e) is CallRejected:
        row.rejected += 1
    elif type(e) is CallFailed:
        row.failed += 1
    else:
        row.cost_nanousd += e.actual_cost_nanousd
        row.tokens += e.prompt_tokens + e.completion_tokens
        _add(row.latency, e.latency_s)
        if e.ttft_s is not None:
            _add(row.ttft, e.ttft_s)


def spend_by(view: ShadowView, route: str, day: str, *, excluding: str = "") -> int:
    """Shadow spend of ``route`` on ``day``, leaving out one instance (this process)."""
    by_instance = view.spend.get((route, day))
    if not by_instance:
        return 0
    return sum(v for k, v in by_instance.items() if k != excluding)


# ---- checkpoint ------------------------------------------------------------------------------
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(ShadowView)


def dump(view: ShadowView) -> bytes:
    return _enc.encode(view)


def load(data: bytes) -> ShadowView:
    return _dec.decode(data)

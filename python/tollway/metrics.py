"""Prometheus metrics, one registry per app, cheap on the hot path.

A dedicated :class:`CollectorRegistry` per app keeps several apps in one
process (tests) from clashing. prometheus-client's own metric objects take a
lock and validate on every increment; here counters and histograms are plain
dicts of floats keyed by label tuple, updated from the event loop thread
only, and turned into metric families when ``/api/ai/metrics`` is scraped.
prometheus-client still renders the exposition format.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from tollway.record import CallRecord

CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 3.5, 5.0, 6.0, 10.0,
                   30.0, 60.0, 120.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
                    0.025, 0.05, 0.1, 0.25)

NANO = 1_000_000_000
_C = TypeVar("_C", bound=Collector)


class Counter(Collector):
    """A labelled counter; ``name`` without the ``_total`` suffix."""

    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        self.name = name
        self.doc = doc
        self.labels = list(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for labels, value in list(self.values.items()):
            family.add_metric(labels, value)
        yield family


class Histogram(Collector):
    def __init__(self, name: str, doc: str, labels: Sequence[str],
                 buckets: Sequence[float]) -> None:
        self.name = name
        self.doc = doc
        self.labels = list(labels)
        self.bounds = tuple(buckets)
        # label tuple -> [count per bucket (last is +Inf)..., sum]
        self.values: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        row = self.values.get(labels)
        if row is None:
            row = self.values[labels] = [0.0] * (len(self.bounds) + 2)
        row[bisect_left(self.bounds, value)] += 1.0
        row[-1] += value

    def count(self, *labels: str) -> float:
        row = self.values.get(labels)
        return sum(row[:-1]) if row else 0.0

    def collect(self) -> Iterator[Metric]:
        family = Metric(self.name, self.doc, "histogram")
        bounds = [*(_fmt(b) for b in self.bounds), "+Inf"]
        for labels, row in list(self.values.items()):
            base = dict(zip(self.labels, labels, strict=True))
            cumulative = 0.0
            for bound, n in zip(bounds, row[:-1], strict=True):
                cumulative += n
                family.add_sample(self.name + "_bucket", {**base, "le": bound}, cumulative)
            family.add_sample(self.name + "_count", base, cumulative)
            family.add_sample(self.name + "_sum", base, row[-1])
        yield family


class Gauge(Collector):
    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.doc = doc
        self.value = 0.0

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.doc, value=self.value)


class BudgetGauges(Collector):
    """Each configured tenant's daily budget and what it has spent today, read when scraped
    (nothing per call): the alerts at 80% and 100% of a budget divide one by the other.

    ``daily`` is the budget guard's map (tenant -> nano-USD a day); ``spent_today(tenant)``
    the book's folded spend for the current UTC day (the events layer's shared view when it
    runs: the same fleet-wide figure on every process). The scrape may run in the metrics
    thread (``--workers``): both reads are single dict look-ups.
    """

    def __init__(self, daily: dict[str, int], spent_today: Callable[[str], int]) -> None:
        self.daily = daily
        self.spent_today = spent_today

    def collect(self) -> Iterator[Metric]:
        limit = GaugeMetricFamily(
            "tollway_budget_daily_limit_usd", "Daily budget of each configured tenant, in USD.",
            labels=["tenant"])
        spent = GaugeMetricFamily(
            "tollway_budget_spent_today_usd",
            "Spend folded for each configured tenant's current UTC day, in USD (open "
            "reservations not included).", labels=["tenant"])
        for tenant, nano in list(self.daily.items()):
            if "/" in tenant:  # a key's own budget ("<tenant>/<key id>"), not a tenant's
                continue
            limit.add_metric([tenant], nano / NANO)
            try:
                spent.add_metric([tenant], self.spent_today(tenant) / NANO)
            except Exception:  # the book not ready yet: the tenant has no spend sample
                continue
        yield limit
        yield spent


def _fmt(bound: float) -> str:
    return repr(float(bound))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        # Under `tollway serve --workers N`: renders this registry with the other workers'
        # (tollway.workers.SharedMetrics), so a scrape of the shared port sees them all.
        self.exposition: Callable[[CollectorRegistry], bytes] | None = None
        self.requests = self._add(Counter(
            "tollway_requests", "Calls by tenant, model, provider and HTTP status.",
            ["tenant", "model", "provider", "status"]))
        self.http_requests = self._add(Counter(
            "tollway_http_requests", "HTTP requests by route path and status.",
            ["path", "status"]))
        self.latency = self._add(Histogram(
            "tollway_request_duration_seconds",
            "Whole call as the gateway saw it, by endpoint, provider and task hint (empty: none).",
            ["endpoint", "provider", "task"], LATENCY_BUCKETS))
        self.overhead = self._add(Histogram(
            "tollway_gateway_overhead_seconds",
            "Time spent in the gateway itself (latency minus time waiting on providers).",
            ["endpoint"], OVERHEAD_BUCKETS))
        self.ttft = self._add(Histogram(
            "tollway_time_to_first_token_seconds", "Time to the first streamed token.",
            ["provider", "model"], LATENCY_BUCKETS))
        self.tokens = self._add(Counter(
            "tollway_tokens", "Tokens by tenant, model and kind (prompt, completion).",
            ["tenant", "model", "kind"]))
        self.cost = self._add(Counter(
            "tollway_cost_usd", "Actual cost in USD by tenant and model.", ["tenant", "model"]))
        self.retries = self._add(Counter(
            "tollway_retries", "Attempts beyond the first, by provider.", ["provider"]))
        self.fallbacks = self._add(Counter(
            "tollway_fallbacks", "Failovers away from a provider.", ["provider"]))
        self.rejections = self._add(Counter(
            "tollway_rejections", "Requests refused by the gateway, by reason.", ["reason"]))
        self.upstream_errors = self._add(Counter(
            "tollway_upstream_errors", "Failed provider attempts by provider and error code.",
            ["provider", "code"]))
        self.client_cancelled = self._add(Counter(
            "tollway_client_cancelled", "Streams the client abandoned.", ["provider"]))
        self.in_flight = self._add(Gauge("tollway_in_flight_requests", "Requests being served."))
        self.tool_calls = self._add(Counter(
            "tollway_tool_calls", "Calls replies made to registry tools, by tool and whether "
            "their arguments fit its schema (valid, invalid).", ["tool", "arguments"]))

    def _add(self, collector: _C) -> _C:
        self.registry.register(collector)
        return collector

    def observe_call(self, rec: CallRecord) -> None:
        """Everything a settled call contributes; called once per call."""
        tenant, model, provider = rec.tenant, rec.model, rec.provider
        self.requests.inc((tenant, model, provider, _status(rec.status)))
        if rec.outcome == "rejected":
            self.rejections.inc((rec.error_code or rec.error_type or "rejected",))
            return
        self.latency.observe((rec.endpoint, provider, rec.task), rec.latency_s)
        self.overhead.observe((rec.endpoint,), rec.overhead_s)
        if rec.ttft_s is not None:
            self.ttft.observe((provider, model), rec.ttft_s)
        if rec.prompt_tokens:
            self.tokens.inc((tenant, model, "prompt"), rec.prompt_tokens)
        if rec.completion_tokens:
            self.tokens.inc((tenant, model, "completion"), rec.completion_tokens)
        if rec.actual_cost_nanousd:
            self.cost.inc((tenant, model), rec.actual_cost_nanousd / NANO)
        if rec.attempts > 1:
            self.retries.inc((provider,), rec.attempts - 1)
        for failed in rec.fallbacks:
            self.fallbacks.inc((failed,))
        if rec.client_cancelled:
            self.client_cancelled.inc((provider,))
        if rec.tool_calls:
            invalid = list(rec.tool_calls_invalid)
            for name in rec.tool_calls:
                if name in invalid:
                    invalid.remove(name)
                    self.tool_calls.inc((name, "invalid"))
                else:
                    self.tool_calls.inc((name, "valid"))

    def render(self) -> bytes:
        if self.exposition is not None:
            return self.exposition(self.registry)
        return generate_latest(self.registry)


_STATUS_TEXT = {code: str(code) for code in range(100, 600)}


def _status(code: int) -> str:
    return _STATUS_TEXT.get(code) or str(code)

"""The JSON bodies of tollway's own read endpoints, as structs: the document's schemas.

The handlers build these bodies from the projections' query results; the
live fuzzing test (tests/openapi/test_fuzz.py) checks every answer against
these schemas, so a field renamed in a handler fails there.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class UsageFigures(msgspec.Struct):
    """Totals of one group of calls; money in nano-USD (and USD for reading)."""

    requests: int
    completed: int
    failed: int
    rejected: int
    prompt_tokens: int
    completion_tokens: int
    cost_nanousd: int
    cost_usd: float
    cache_hits: int  # calls answered by the response cache (cost 0)
    saved_nanousd: int  # what those answers cost when they were made
    saved_usd: float


class UsageGroup(UsageFigures):
    key: str  # the day, model or provider this row sums


class UsageRow(UsageFigures):
    tenant: str
    day: str
    model: str
    provider: str


class ToolUsage(msgspec.Struct):
    """Calls replies made to one registry tool, and how many had invalid arguments."""

    key: str  # the tool's name
    calls: int
    invalid: int


class UsageReport(msgspec.Struct):
    """The caller's usage from the projections (every tenant's for the admin key, unless
    `tenant` is given)."""

    object: Literal["usage"]
    tenant: str | None
    since: str
    until: str
    retention_days: int
    total: UsageFigures
    by_day: list[UsageGroup]
    by_model: list[UsageGroup]
    by_provider: list[UsageGroup]
    rows: list[UsageRow]
    as_of_sequence: int
    by_tool: list[ToolUsage] = []


class Reservation(msgspec.Struct):
    """Money held for a call under way ("call"), or a share of the budget this process
    holds to guard calls without asking the stream each time ("lease")."""

    reservation_id: str
    kind: Literal["call", "lease"]
    amount_nanousd: int
    expires_at: float  # unix seconds
    request_id: str


class Budget(msgspec.Struct):
    """A tenant's budget today: spend and open reservations against the daily limit."""

    object: Literal["budget"]
    tenant: str
    tier: str
    day: str
    max_call_usd: float
    max_call_nanousd: int
    daily_usd: float
    daily_nanousd: int
    spent_usd: float
    spent_nanousd: int
    reserved_usd: float
    reserved_nanousd: int
    in_flight_nanousd: int
    remaining_usd: float
    remaining_nanousd: int
    open_reservations: list[Reservation]
    as_of_sequence: int
    # ?key_id=: the key whose own budget these figures are (its account "<tenant>/<key id>")
    key: str | None = None


class BreakerInfo(msgspec.Struct):
    state: Literal["closed", "open", "half_open"]
    failures_in_window: int
    calls_in_window: int
    opens: int
    retry_after_s: float
    recovery_timeout_s: float


class ProviderStatus(msgspec.Struct):
    name: str
    kind: str
    configured: bool
    local: bool
    base_url_host: str
    models: list[str]
    breaker: BreakerInfo
    calls: int
    errors: int
    error_rate: float
    latency_ewma_s: float
    deployments: dict[str, dict[str, float]]


class ProviderList(msgspec.Struct):
    object: Literal["list"]
    data: list[ProviderStatus]


class ProviderTest(msgspec.Struct):
    """A live `GET {base_url}/models` against the provider; never holds a secret."""

    provider: str
    url: str
    ok: bool
    latency_ms: float
    status: int | None = None
    error: str | None = None
    models: int | None = None


class ShadowReport(msgspec.Struct):
    """Per route and candidate model, how shadow calls did against the primary; `ab`:
    the A/B split's arms over live calls; `learning`: learning routing's decisions, the
    model serving each route and task, and this process's evidence."""

    object: Literal["shadow.report"]
    since: str | None
    until: str | None
    source: str
    as_of_sequence: int
    data: list[dict[str, Any]]
    ab: list[dict[str, Any]]
    learning: dict[str, Any]
    runtime: dict[str, Any]

"""The event contract: frozen, tagged msgspec structs, their subjects and codecs.

Every event is JSON on the wire, tagged by ``"type"`` (``"call.completed"``,
...), and carries the envelope fields of :class:`Event`. Versioning rules
(also in ``events/README.md``): a new field always has a default, so old
readers ignore it and new readers decode old events; renaming, removing or
changing the meaning or type of a field bumps :data:`SCHEMA_VERSION`, and a
reader skips events of a version above its own. Money is an integer number of
nano-USD.

``python -m tollway.events.schema --write`` regenerates ``events/schema/*.json``
from these structs; ``--check`` fails when the files have drifted.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import msgspec

from tollway.record import CallRecord

SCHEMA_VERSION = 1
STREAM = "TOLLWAY"
SUBJECTS = "tollway.>"

# Subject families. The last token is the (escaped) tenant, or the provider for breakers.
CALL_COMPLETED = "tollway.call.completed"
CALL_FAILED = "tollway.call.failed"
CALL_REJECTED = "tollway.call.rejected"
SHADOW_COMPARED = "tollway.shadow.compared"
ROUTE_LEARNED = "tollway.route.learned"
BREAKER_CHANGED = "tollway.breaker.changed"
BUDGET_RESERVED = "tollway.budget.reserved"
BUDGET_SETTLED = "tollway.budget.settled"
BUDGET_RELEASED = "tollway.budget.released"
# Admin changes (the directory of tenants and keys): tollway.admin.<kind>.<id>, the id being
# the tenant's or the key's.
ADMIN = "tollway.admin"


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Envelope shared by every event."""

    subject_prefix: ClassVar[str] = ""

    event_id: str
    occurred_at: float  # unix seconds (UTC)
    schema_version: int = SCHEMA_VERSION
    tenant: str = ""
    request_id: str = ""
    instance: str = ""  # the gateway process that published it

    def subject(self) -> str:
        return f"{self.subject_prefix}.{subject_token(self.tenant)}"


class CallEvent(Event, frozen=True, kw_only=True):
    """Fields of every call event; one event per call, whatever its outcome."""

    endpoint: str = "chat.completions"
    route: str = ""
    provider: str = ""
    model: str = ""
    upstream_model: str = ""
    task: str = ""
    sensitivity: str = ""
    tier: str = ""
    latency_class: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_cost_nanousd: int = 0
    actual_cost_nanousd: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    overhead_s: float = 0.0
    attempts: int = 0
    fallbacks: tuple[str, ...] = ()
    stream: bool = False
    client_cancelled: bool = False
    status: int = 200
    error_type: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    reason: str = ""
    # The budget lease (a ``budget.reserved`` without request id) this call was granted
    # from; its cost leaves the lease and becomes spend when this event lands.
    reservation_id: str = ""
    # Output tokens per choice the gateway asked the provider for at most (sent as
    # max_tokens or max_completion_tokens, and a stream relayed no further), because the
    # tier's per-call cap or the tenant's remaining daily budget could not pay the
    # model's full output or the max_tokens asked; None when the request's own stood.
    max_tokens_bound: int | None = None
    # The feature flags (gradual rollouts, ``flag.changed``) that applied to the call.
    flags: tuple[str, ...] = ()
    # Of prompt_tokens, those read from and written to the provider's prompt cache, each
    # billed at the model's cache price (Anthropic's cache_read_input_tokens and
    # cache_creation_input_tokens); 0 for providers that report none.
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    # The directory key that made the call ("" for config keys).
    key_id: str = ""
    # A key with a daily budget of its own is a second budget account, named
    # ``<tenant>/<key id>``: the call's cost is its spend too, and ``key_reservation_id``
    # the lease of that account it was granted from (as ``reservation_id`` the tenant's).
    budget_scope: str = ""
    key_reservation_id: str = ""
    # Registry tools (tollway.tools) the reply called, one name per tool call, and those of
    # them whose arguments failed the tool's JSON Schema; ``tool_retried``: the reply was
    # asked for once more because of them ([tool_calls] retry_invalid), and these are the
    # second reply's (the tokens and cost are both replies').
    tool_calls: tuple[str, ...] = ()
    tool_calls_invalid: tuple[str, ...] = ()
    tool_retried: bool = False
    # The response cache: "hit" (answered from it; actual cost 0), "miss", "bypass", or ""
    # when the call's route and tenant did not opt in; a hit's saved_nanousd is what the
    # stored answer cost when it was made.
    cache: str = ""
    saved_nanousd: int = 0


class CallCompleted(CallEvent, frozen=True, kw_only=True, tag="call.completed"):
    """A call answered by a provider."""

    subject_prefix: ClassVar[str] = CALL_COMPLETED
    outcome: Literal["completed"] = "completed"


class CallFailed(CallEvent, frozen=True, kw_only=True, tag="call.failed"):
    """A call that reached dispatch but got no answer (every candidate failed)."""

    subject_prefix: ClassVar[str] = CALL_FAILED
    outcome: Literal["failed"] = "failed"


class CallRejected(CallEvent, frozen=True, kw_only=True, tag="call.rejected"):
    """A call refused before dispatch (policy, rate limit, budget, open breakers)."""

    subject_prefix: ClassVar[str] = CALL_REJECTED
    outcome: Literal["rejected"] = "rejected"


class BreakerChanged(Event, frozen=True, kw_only=True, tag="breaker.changed"):
    """A provider's circuit breaker moved between closed, open and half_open."""

    subject_prefix: ClassVar[str] = BREAKER_CHANGED
    provider: str
    previous: str = ""
    state: str = ""
    failures: int = 0
    reason: str = ""
    # How long it stays open (state "open"): every other gateway process on the NATS opens
    # its breaker for the provider for as long (tollway.events.breakers).
    recovery_s: float = 0.0

    def subject(self) -> str:
        return f"{self.subject_prefix}.{subject_token(self.provider)}"


class BudgetReserved(Event, frozen=True, kw_only=True, tag="budget.reserved"):
    """A call's maximum cost held against the tenant's daily budget before dispatch.

    Published with ``Nats-Expected-Last-Subject-Sequence`` so that two gateways
    cannot both grant the last of a budget (see events/README.md).
    """

    subject_prefix: ClassVar[str] = BUDGET_RESERVED
    reservation_id: str
    day: str  # UTC day the spend counts against, YYYY-MM-DD
    amount_nanousd: int
    limit_nanousd: int = 0
    expires_at: float = 0.0  # after this the hold lapses even if never settled


class BudgetSettled(Event, frozen=True, kw_only=True, tag="budget.settled"):
    """The call's actual cost is known; the hold shrinks to it until its call event lands.

    Gateways no longer publish it for calls granted from a lease (the call event names its
    lease instead); projections still fold it, so older streams replay the same.
    """

    subject_prefix: ClassVar[str] = BUDGET_SETTLED
    reservation_id: str
    day: str
    actual_nanousd: int


class BudgetReleased(Event, frozen=True, kw_only=True, tag="budget.released"):
    """The hold is given back: a call hold whose call never went out, or a lease.

    A lease keeps holding what its calls cost (``settled_nanousd`` in all) until their
    call events land.
    """

    subject_prefix: ClassVar[str] = BUDGET_RELEASED
    reservation_id: str
    day: str
    settled_nanousd: int = 0


class ShadowCompared(Event, frozen=True, kw_only=True, tag="shadow.compared"):
    """A candidate model answered (or failed) the request a primary model served live.

    One per shadow call (``tollway.shadow``). "primary" is the live call the caller got;
    "candidate" the non-streamed call made with the same request after it. ``agreement``
    is None when there is nothing to compare (the candidate failed); the rule is in
    ``tollway.shadow.agreement``.
    """

    subject_prefix: ClassVar[str] = SHADOW_COMPARED
    route: str = ""  # the [[shadow]] route the call matched
    endpoint: str = "chat.completions"
    task: str = ""
    sensitivity: str = ""
    primary_provider: str = ""
    primary_model: str = ""
    candidate_provider: str = ""
    candidate_model: str = ""
    primary_stream: bool = False
    primary_latency_s: float = 0.0  # time waiting on the provider (all attempts)
    primary_ttft_s: float | None = None  # streams: first token, from the call's arrival
    candidate_latency_s: float = 0.0  # the candidate's whole (non-streamed) reply
    candidate_delay_s: float = 0.0  # from the primary's end to the shadow call's start
    primary_prompt_tokens: int = 0
    primary_completion_tokens: int = 0
    candidate_prompt_tokens: int = 0
    candidate_completion_tokens: int = 0
    primary_cost_nanousd: int = 0
    candidate_cost_nanousd: int = 0  # charged to the route's shadow spend, no tenant's
    primary_finish_reason: str = ""
    candidate_finish_reason: str = ""
    candidate_status: int = 0  # the candidate's HTTP status; 0 when none came back
    candidate_error: str | None = None  # error code (e.g. upstream_timeout) when it failed
    candidate_error_message: str | None = None  # safe to publish: never holds a secret
    agreement: float | None = None  # in [0, 1]
    agreement_method: str = ""  # exact | json | tool_calls | similarity | empty
    agreement_threshold: float = 0.8
    agreed: bool = False  # agreement >= agreement_threshold
    # A check of a candidate that learning routing put live (tollway.learn): the live call
    # was the candidate's ("candidate" fields), the shadow call went to the route's
    # primary ("primary" fields), and the shadow spend is the primary's cost.
    verify: bool = False


class RouteLearned(Event, frozen=True, kw_only=True, tag="route.learned"):
    """Learning routing (``tollway.learn``) changed which model serves a route's task.

    ``model`` takes the traffic from now on ("" : the route's own order, its primary
    first); ``previous`` had it. The figures are the evidence the decision was made on:
    the candidate's last ``samples`` scored shadow samples of this route and task.
    Replaying the same ``shadow.compared`` events through the same rules makes the same
    decisions (``tollway.learn.evidence``)."""

    subject_prefix: ClassVar[str] = ROUTE_LEARNED
    route: str = ""
    task: str = ""
    model: str = ""
    previous: str = ""
    action: Literal["promoted", "demoted"] = "promoted"
    candidate: str = ""  # the candidate the evidence is about
    samples: int = 0
    agreement_rate: float = 0.0
    agreement_rule: str = ""  # exact | similarity>=<x>
    candidate_p95_s: float | None = None
    objective_s: float | None = None
    why: str = ""

    def subject(self) -> str:
        return f"{self.subject_prefix}.{subject_token(self.route)}"


class AdminEvent(Event, frozen=True, kw_only=True):
    """A change an operator made through the admin API (``tollway.directory``); ``tenant``
    is the tenant it concerns. Every gateway on the stream folds these into the directory
    it authenticates against."""

    admin: str = ""  # the admin key that made it: "sha256:" and the first 12 hex of its hash


class TenantLimitSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A run-time tenant's rate limits (0: that tier off; tokens_per_minute None: none)."""

    per_minute: int = 60
    per_hour: int = 1000
    per_day: int = 10000
    expensive_per_hour: int = 10
    tokens_per_minute: int | None = None


class TenantSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A run-time tenant's settings, whole (each change carries them all)."""

    tier: str = "standard"
    limits: TenantLimitSettings = TenantLimitSettings()
    daily_usd: float | None = None
    models: tuple[str, ...] | None = None
    max_sensitivity: str | None = None
    disabled: bool = False


class TenantCreated(AdminEvent, frozen=True, kw_only=True, tag="tenant.created"):
    subject_prefix: ClassVar[str] = f"{ADMIN}.tenant.created"
    settings: TenantSettings


class TenantChanged(AdminEvent, frozen=True, kw_only=True, tag="tenant.changed"):
    """The tenant's settings after the change (disabling is ``disabled = true``)."""

    subject_prefix: ClassVar[str] = f"{ADMIN}.tenant.changed"
    settings: TenantSettings


class KeyCreated(AdminEvent, frozen=True, kw_only=True, tag="key.created"):
    """A key for ``tenant``: only its SHA-256 is kept; the key itself was shown once."""

    subject_prefix: ClassVar[str] = f"{ADMIN}.key.created"
    key_id: str
    key_sha256: str
    prefix: str = ""  # the key's first characters, to tell keys apart in a list
    name: str = ""
    expires_at: float | None = None  # unix seconds; None: never
    models: tuple[str, ...] | None = None  # within the tenant's; None: the tenant's
    rotated_from: str = ""  # the key this one replaces (``key.rotated``)
    # The key's own rate limits, checked before the tenant's (0: that tier off); None:
    # only the tenant's.
    limits: TenantLimitSettings | None = None
    # The key's own daily budget (USD), held beside the tenant's; None: only the tenant's.
    daily_usd: float | None = None

    def subject(self) -> str:
        return f"{self.subject_prefix}.{subject_token(self.key_id)}"


class KeyRevoked(AdminEvent, frozen=True, kw_only=True, tag="key.revoked"):
    subject_prefix: ClassVar[str] = f"{ADMIN}.key.revoked"
    key_id: str

    def subject(self) -> str:
        return f"{self.subject_prefix}.{subject_token(self.key_id)}"


class KeyRotated(AdminEvent, frozen=True, kw_only=True, tag="key.rotated"):
    """``key_id`` keeps working until ``expires_at`` (the overlap), ``new_key_id`` (its
    ``key.created`` comes first) takes over."""

    subject_prefix: ClassVar[str] = f"{ADMIN}.key.rotated"
    key_id: str
    new_key_id: str
    expires_at: float

    def subject(self) -> str:
        return f"{self.subject_prefix}.{subject_token(self.key_id)}"


class FlagSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A gradual rollout, for the tenants in it. ``kind = "route"``: their calls to
    ``route`` (an alias or model id) go to ``candidates`` instead. ``kind = "shadow"``:
    the ``[[shadow]]`` route ``route`` samples their calls only (its ``fraction`` of
    them), nobody else's. ``kind = "guard"``: their calls to ``route`` (``*``: any) have
    ``max_call_usd`` as the per-call cost cap instead of their tier's. A tenant is in it
    when listed in ``tenants``, or when its sticky bucket (a hash of the flag's name and
    the tenant id, 0-100) is below ``percent``: the same tenants at 10 % stay in at 50 %,
    across restarts."""

    kind: Literal["route", "shadow", "guard"] = "route"
    route: str
    candidates: tuple[str, ...] = ()
    max_call_usd: float | None = None
    percent: float = 0.0
    tenants: tuple[str, ...] = ()
    enabled: bool = True


class FlagChanged(AdminEvent, frozen=True, kw_only=True, tag="flag.changed"):
    """A flag made or changed (its settings whole); ``tenant`` is empty."""

    subject_prefix: ClassVar[str] = f"{ADMIN}.flag.changed"
    flag: str
    settings: FlagSettings

    def subject(self) -> str:
        return f"{self.subject_prefix}.{subject_token(self.flag)}"


class ToolSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A registry tool (tollway.tools): what a request naming it gets inlined as an OpenAI
    function tool, and the JSON Schema its call arguments are checked against; ``tenants``
    may use it (None: every tenant)."""

    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    tenants: tuple[str, ...] | None = None


class ToolChanged(AdminEvent, frozen=True, kw_only=True, tag="tool.changed"):
    """A registry tool made or changed (its settings whole); ``tenant`` is empty."""

    subject_prefix: ClassVar[str] = f"{ADMIN}.tool.changed"
    tool: str
    settings: ToolSettings

    def subject(self) -> str:
        return f"{self.subject_prefix}.{subject_token(self.tool)}"


class ToolRemoved(AdminEvent, frozen=True, kw_only=True, tag="tool.removed"):
    """A registry tool taken out: requests naming it are refused from now on."""

    subject_prefix: ClassVar[str] = f"{ADMIN}.tool.removed"
    tool: str

    def subject(self) -> str:
        return f"{self.subject_prefix}.{subject_token(self.tool)}"


AnyEvent = (
    CallCompleted
    | CallFailed
    | CallRejected
    | BreakerChanged
    | BudgetReserved
    | BudgetSettled
    | BudgetReleased
    | ShadowCompared
    | RouteLearned
    | TenantCreated
    | TenantChanged
    | KeyCreated
    | KeyRevoked
    | KeyRotated
    | FlagChanged
    | ToolChanged
    | ToolRemoved
)
EVENT_TYPES: tuple[type[Event], ...] = (
    CallCompleted,
    CallFailed,
    CallRejected,
    BreakerChanged,
    BudgetReserved,
    BudgetSettled,
    BudgetReleased,
    ShadowCompared,
    RouteLearned,
    TenantCreated,
    TenantChanged,
    KeyCreated,
    KeyRevoked,
    KeyRotated,
    FlagChanged,
    ToolChanged,
    ToolRemoved,
)
CALL_EVENT_TYPES: dict[str, type[CallEvent]] = {
    "completed": CallCompleted,
    "failed": CallFailed,
    "rejected": CallRejected,
}


class _Envelope(msgspec.Struct):
    """What any reader can decode from an event of a type it does not know."""

    type: str = ""
    event_id: str = ""
    schema_version: int = 0


encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)
_envelope_decoder = msgspec.json.Decoder(_Envelope)


def encode(event: Event) -> bytes:
    return encoder.encode(event)


def decode(data: bytes) -> Event | None:
    """The event, or None for one this version cannot read: a type it does not know, or
    a ``schema_version`` above :data:`SCHEMA_VERSION` (a newer writer).

    Raises msgspec.DecodeError / ValidationError for bytes that are not an event at all.
    """
    try:
        event: Event = _decoder.decode(data)
    except msgspec.ValidationError:
        env = _envelope_decoder.decode(data)
        if env.schema_version > SCHEMA_VERSION or (env.type and env.type not in _KNOWN_TAGS):
            return None
        raise
    if event.schema_version > SCHEMA_VERSION:
        return None
    return event


_KNOWN_TAGS = frozenset(t.__struct_config__.tag for t in EVENT_TYPES)

# ---- subject tokens --------------------------------------------------------------------------
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_token_cache: dict[str, str] = {}


def subject_token(name: str) -> str:
    """``name`` as one NATS subject token, injectively.

    Letters, digits, ``_`` and ``-`` stay (config tenant ids only use these);
    any other byte becomes ``~XX`` and the empty name is ``~``, so two names
    never share a subject and no name can inject ``.``, ``*`` or ``>``.
    """
    tok = _token_cache.get(name)
    if tok is None:
        if name and all(c in _SAFE for c in name):
            tok = name
        elif not name:
            tok = "~"
        else:
            tok = "".join(
                c if c in _SAFE else "".join(f"~{b:02X}" for b in c.encode()) for c in name
            )
        if len(_token_cache) < 100_000:
            _token_cache[name] = tok
    return tok


# ---- days ------------------------------------------------------------------------------------
# Day number (unix seconds // 86400) -> "YYYY-MM-DD", filled by day_of; folds look days up
# here in their loops and call day_of only on a miss.
DAY_OF_NUMBER: dict[int, str] = {}


def day_of(ts: float) -> str:
    """The UTC day of a unix timestamp, YYYY-MM-DD (cached: folds call it per event)."""
    n = int(ts // 86400)
    day = DAY_OF_NUMBER.get(n)
    if day is None:
        day = time.strftime("%Y-%m-%d", time.gmtime(n * 86400))
        DAY_OF_NUMBER[n] = day
    return day


# ---- records -> events -----------------------------------------------------------------------
def event_from_record(rec: CallRecord, event_id: str, instance: str = "") -> CallEvent:
    """The one event for a settled call."""
    cls = CALL_EVENT_TYPES[rec.outcome]
    return cls(
        event_id=event_id,
        occurred_at=rec.occurred_at,
        tenant=rec.tenant,
        request_id=rec.request_id,
        instance=instance,
        endpoint=rec.endpoint,
        route=rec.route,
        provider=rec.provider,
        model=rec.model,
        upstream_model=rec.upstream_model,
        task=rec.task,
        sensitivity=rec.sensitivity,
        tier=rec.tier,
        latency_class=rec.latency_class,
        prompt_tokens=rec.prompt_tokens,
        completion_tokens=rec.completion_tokens,
        estimated_cost_nanousd=rec.estimated_cost_nanousd,
        actual_cost_nanousd=rec.actual_cost_nanousd,
        latency_s=rec.latency_s,
        ttft_s=rec.ttft_s,
        overhead_s=rec.overhead_s,
        attempts=rec.attempts,
        fallbacks=rec.fallbacks,
        stream=rec.stream,
        client_cancelled=rec.client_cancelled,
        status=rec.status,
        error_type=rec.error_type,
        error_code=rec.error_code,
        error_message=rec.error_message,
        reason=rec.reason,
        reservation_id=rec.reservation_id,
        max_tokens_bound=rec.max_tokens_bound,
        flags=rec.flags,
        cache_read_tokens=rec.cache_read_tokens,
        cache_write_tokens=rec.cache_write_tokens,
        key_id=rec.key_id,
        budget_scope=rec.budget_scope,
        key_reservation_id=rec.key_reservation_id,
        tool_calls=rec.tool_calls,
        tool_calls_invalid=rec.tool_calls_invalid,
        tool_retried=rec.tool_retried,
        cache=rec.cache,
        saved_nanousd=rec.saved_nanousd,
    )


_record_json = msgspec.json.Encoder()
_TAGS = {outcome: str(cls.__struct_config__.tag).encode()
         for outcome, cls in CALL_EVENT_TYPES.items()}


def encode_record(rec: CallRecord, event_id: str, instance: str = "") -> tuple[str, bytes]:
    """(subject, JSON) of :func:`event_from_record`'s event, without building it.

    The publisher's per-call path: a call record has every field of its call event under
    the same name, so the event is the record's JSON with the envelope in front (a
    struct of 36 fields built and encoded again cost more than all the rest of publishing).
    ``events/schema`` and the tests hold it to ``encode(event_from_record(...))``.
    """
    return RecordEncoder(instance)(rec, event_id)


class RecordEncoder:
    """:func:`encode_record` for one instance: the envelope's bytes that are the same for
    every call (its type, schema version and instance) are encoded once, not per call."""

    __slots__ = ("_heads",)

    def __init__(self, instance: str = "") -> None:
        tail = b'","schema_version":%d,"instance":%s,' % (
            SCHEMA_VERSION, _record_json.encode(instance))
        self._heads = {
            outcome: (cls.subject_prefix + ".", b'{"type":"%s","event_id":"' % _TAGS[outcome],
                      tail)
            for outcome, cls in CALL_EVENT_TYPES.items()}

    def __call__(self, rec: CallRecord, event_id: str) -> tuple[str, bytes]:
        prefix, head, tail = self._heads[rec.outcome]
        if event_id.isascii() and event_id.isalnum():  # the publisher's ids: no escapes
            eid = event_id.encode()
        else:
            eid = _record_json.encode(event_id)[1:-1]
        body = _record_json.encode(rec)
        return prefix + subject_token(rec.tenant), b"".join(
            (head, eid, tail, memoryview(body)[1:]))


# ---- JSON Schema files -----------------------------------------------------------------------
def _cleaned(node: object) -> object:
    """The schema with every ``description`` dedented by :func:`inspect.cleandoc` and
    every ``anyOf`` in one order.

    msgspec renders a docstring as written up to 0.19 and dedented from 0.20 on, and
    lists a union's ``null`` before a struct's ``$ref`` in 0.18 and after it later;
    the files are a contract, so they must not depend on which one is installed.
    """
    if isinstance(node, dict):
        out = {k: inspect.cleandoc(v) if k == "description" and isinstance(v, str)
               else _cleaned(v) for k, v in node.items()}
        any_of = out.get("anyOf")
        if isinstance(any_of, list):
            out["anyOf"] = sorted(any_of, key=lambda v: json.dumps(v, sort_keys=True))
        return out
    if isinstance(node, list):
        return [_cleaned(v) for v in node]
    return node


def schema_documents() -> dict[str, bytes]:
    """File name -> content of every ``events/schema/*.json`` file."""
    docs: dict[str, object] = {}
    for cls in EVENT_TYPES:
        docs[f"{cls.__struct_config__.tag}.json"] = _cleaned(msgspec.json.schema(cls))
    docs["events.json"] = _cleaned(msgspec.json.schema(AnyEvent))
    return {
        name: (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        for name, doc in docs.items()
    }


def default_schema_dir() -> Path:
    """``events/schema`` at the repository root (python/tollway/events/schema.py -> ../../..)."""
    return Path(__file__).resolve().parents[3] / "events" / "schema"


def drifted(directory: Path) -> list[str]:
    """Names of schema files that are missing, stale or no longer generated."""
    want = schema_documents()
    out = [n for n, body in want.items() if not (directory / n).is_file()
           or (directory / n).read_bytes() != body]
    if directory.is_dir():
        out += [p.name for p in directory.glob("*.json") if p.name not in want]
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tollway.events.schema",
                                 description="Write or check events/schema/*.json.")
    ap.add_argument("--dir", type=Path, default=None, help="default: <repo>/events/schema")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    directory: Path = args.dir or default_schema_dir()
    if args.check:
        stale = drifted(directory)
        for name in stale:
            print(f"drifted: {directory / name}", file=sys.stderr)
        return 1 if stale else 0
    directory.mkdir(parents=True, exist_ok=True)
    want = schema_documents()
    for p in directory.glob("*.json"):
        if p.name not in want:
            p.unlink()
    for name, body in want.items():
        (directory / name).write_bytes(body)
    print(f"wrote {len(want)} files to {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Configuration: one TOML file decoded into msgspec structs, plus built-ins.

The shape is fixed by DESIGN.md. Secrets never appear in the file, only the
name of the environment variable that holds them (``api_key_env``).

Loading is all-or-nothing: :func:`load_config` either returns a complete,
cross-checked :class:`Config` or raises :class:`ConfigError` naming the file
and the field (msgspec's path, e.g. ``$.tenants[0].tier``), so the process
never starts half-configured. Built-in defaults fill what the file leaves out:
providers enabled from the environment (``OPENAI_API_KEY``,
``OPENROUTER_API_KEY``, ``LOCAL_OPENAI_URL`` / ``LOCAL_API_KEY``), the models
of the built-in price table, the three budget tiers, and an ``auto`` route.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, field

NonNegative = Annotated[float, Meta(ge=0)]
Positive = Annotated[float, Meta(gt=0)]
Name = Annotated[str, Meta(min_length=1, max_length=128)]
# Tenant ids end up in NATS subjects (tollway.call.completed.<tenant>): no dots or wildcards.
TenantId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Sha256Hex = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}$")]


class ConfigError(Exception):
    """A configuration problem, naming the file and the field."""

    def __init__(self, message: str, *, source: str = "<config>", path: str | None = None) -> None:
        self.source = source
        self.path = path
        self.detail = message
        where = f"{source}: {path}: " if path else f"{source}: "
        super().__init__(where + message)


class _Base(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class ServerConfig(_Base):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    admin_key_env: str = "TOLLWAY_ADMIN_KEY"
    # Failed sign-ins on the admin paths one client address may make in a minute; past
    # them it is refused (429) until the minute ends, whatever key it sends.
    admin_sign_in_failures_per_minute: Annotated[int, Meta(ge=1)] = 10
    # The reverse proxies in front of the gateway (addresses or networks, "10.0.0.0/8"):
    # a request from one of them counts for the address its X-Forwarded-For names (the
    # last one no trusted proxy added), not the proxy's. Empty: the connection's address.
    trusted_proxies: list[str] = field(default_factory=list)
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 4 * 1024 * 1024
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True  # one JSON line per request on the "tollway.access" logger
    builtin_providers: bool = True  # enable openai/openrouter/local from the environment
    builtin_models: bool = True  # the models of the built-in price table
    # What a client may send, and how slowly (tollway.protocol); past each: refused, closed.
    max_header_bytes: Annotated[int, Meta(ge=1024)] = 32 * 1024  # request line + headers: 431
    max_headers: Annotated[int, Meta(ge=8)] = 100  # header fields: 431
    max_url_bytes: Annotated[int, Meta(ge=256)] = 8 * 1024  # the request target: 414
    # From the connection (or a later request's first byte) to the end of the headers: 408,
    # or a silent close when nothing came at all.
    header_timeout_s: Positive = 10.0
    body_timeout_s: Positive = 60.0  # from the end of the headers to the end of the body: 408
    keepalive_timeout_s: Positive = 5.0  # an idle keep-alive connection is closed after this
    # Open client connections (per process); a request on one past the cap: 503, Retry-After.
    max_connections: Annotated[int, Meta(ge=1)] = 1000
    # `tollway serve --workers`: processes serving the port under one parent ("auto": one
    # per core); the command line's --workers wins over it.
    workers: Annotated[int, Meta(ge=1)] | Literal["auto"] = 1
    # SIGTERM/SIGINT: in-flight calls and streams may finish for this long, then are cut.
    drain_timeout_s: Positive = 30.0

    def __post_init__(self) -> None:
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {proxy!r} is not an IP address or "
                                 "network (such as '10.0.0.0/8')") from None


class NatsConfig(_Base):
    # "embedded", or a server's URL, or a cluster's as a list (tried in turn; the nodes the
    # cluster announces are added): ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222", ...]
    url: str | list[str] = "embedded"
    data_dir: str = ".tollway"
    enabled: bool = True


class ProviderConfig(_Base):
    name: Name
    base_url: str
    # Wire format: "openai" (OpenAI-compatible) or "anthropic" (Anthropic's Messages API:
    # the key goes in x-api-key; serves /v1/messages only, passed through).
    kind: Literal["openai", "anthropic"] = "openai"
    # The anthropic-version header sent to a kind = "anthropic" provider when the caller
    # sent none.
    anthropic_version: str = "2023-06-01"
    # Serves OpenAI's Responses API itself (OpenAI does): /v1/responses calls pass through,
    # previous_response_id and store included; others get them translated to chat.
    responses: bool = False
    api_key_env: str | None = None
    local: bool = False  # may receive confidential data
    # OpenRouter's optional attribution headers (sent when set, on any provider).
    http_referer: str | None = None
    x_title: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # extra non-secret headers
    connect_timeout_s: Positive = 5.0
    # Until the response headers arrive (a whole completion when not streaming),
    # and the longest silence allowed between two stream chunks.
    first_byte_timeout_s: Positive = 120.0
    total_timeout_s: Positive = 600.0
    max_connections: Annotated[int, Meta(ge=1)] = 1000
    # One of tollway.providers.http.CLIENTS: only clients that pass the protocol suite.
    http_client: str = "raw"
    # Idle connections older than this are not reused: below uvicorn's 5 s (and most
    # servers' idle timeouts), so a request is not written into a closing connection.
    keepalive_s: Positive = 4.0
    ca_file: str | None = None  # PEM bundle trusted instead of the system's CAs (https)


class ModelConfig(_Base):
    id: Name
    provider: Name
    upstream: str = ""  # the provider's name for it; default: id
    input_usd_per_mtok: NonNegative = 0.0
    output_usd_per_mtok: NonNegative = 0.0
    # Prompt tokens read from and written to a provider's prompt cache (Anthropic's
    # cache_read_input_tokens / cache_creation_input_tokens). None: the built-in table's
    # price for this id, else the input price.
    cache_read_usd_per_mtok: NonNegative | None = None
    cache_write_usd_per_mtok: NonNegative | None = None
    # "embedding": served on /v1/embeddings (an embeddings call to a route keeps these);
    # "rerank": a reranker served on /v1/rerank (local providers only).
    kind: Literal["chat", "embedding", "rerank"] = "chat"
    # The most output tokens one choice can have, and the request field that bounds it
    # (OpenAI's reasoning models take only max_completion_tokens). None: the built-in
    # table's entry for this id (or its upstream name), else the defaults in
    # tollway.tokens. The budget's hold and the gateway's output bound depend on it.
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] | None = None

    def __post_init__(self) -> None:
        if not self.upstream:
            self.upstream = self.id


class RouteConfig(_Base):
    alias: Name
    candidates: Annotated[list[Name], Meta(min_length=1)]


class TierConfig(_Base):
    max_call_usd: NonNegative
    daily_usd: NonNegative


class TenantLimits(_Base):
    per_minute: Annotated[int, Meta(ge=0)] = 60
    per_hour: Annotated[int, Meta(ge=0)] = 1000
    per_day: Annotated[int, Meta(ge=0)] = 10000
    expensive_per_hour: Annotated[int, Meta(ge=0)] = 10
    tokens_per_minute: Annotated[int, Meta(ge=0)] | None = None


class TenantConfig(_Base):
    id: TenantId
    tier: str = "standard"
    key_sha256: list[Sha256Hex] = field(default_factory=list)
    limits: TenantLimits = field(default_factory=TenantLimits)
    daily_usd: NonNegative | None = None  # overrides the tier's daily budget
    models: list[Name] | None = None  # model ids / aliases allowed; None = all
    # The highest X-Tollway-Sensitivity its calls may declare; None: any.
    max_sensitivity: Literal["public", "internal", "confidential", "restricted"] | None = None
    # The response cache ([cache]) for all of this tenant's chat calls; None: [cache] decides.
    cache: bool | None = None


class EventsConfig(_Base):
    """[events]: the JetStream event log, its outbox, the projections and budget holds."""

    stream: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "TOLLWAY"
    replicas: Annotated[int, Meta(ge=1, le=5)] = 1  # 3 on a NATS cluster
    duplicate_window_s: Annotated[float, Meta(ge=120)] = 600.0  # resends within it are dropped
    max_age_days: NonNegative = 0.0  # 0: keep every event (the stream is the record of truth)
    kv_bucket: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "tollway_checkpoints"
    queue_size: Annotated[int, Meta(ge=1)] = 10_000  # in memory; beyond it, the outbox
    batch_size: Annotated[int, Meta(ge=1, le=4096)] = 256
    publish_timeout_s: Positive = 2.0  # acks not back by then: the batch goes to the outbox
    # Under load a batch goes out at most this often (events wait up to this long): fewer,
    # larger batches cost the gateway and nats-server less per event.
    publish_linger_s: Annotated[float, Meta(ge=0, le=1)] = 0.01
    # Every event is written (page cache) before its call answers: a process crash loses
    # none in any mode. A machine crash loses what was not fsync'd: the last interval, the
    # last batch ("always") or what the OS had not written back ("never"). Off the
    # response path in every mode.
    outbox_fsync: Literal["always", "interval", "never"] = "interval"
    outbox_fsync_interval_s: Positive = 1.0
    # Unsent bytes the outbox may hold (NATS down); events past it are dropped, counted in
    # tollway_events_dropped_total{reason="outbox_full"} and logged. Calls are still served.
    outbox_max_bytes: Annotated[int, Meta(ge=4096)] = 1 << 30
    checkpoint_interval_s: Positive = 10.0
    # Days the views keep: usage, spend and shadow rollups, and the event ids remembered
    # against resends; older days are pruned. The stream keeps the events themselves.
    retention_days: Annotated[int, Meta(ge=1, le=3660)] = 90
    reservation_ttl_s: Positive = 900.0  # a budget hold lapses after this (longer than any call)
    budget_fail_open: bool = True  # NATS down: grant from this process's view (else refuse)
    # Rate limits: one set per tenant for every gateway process on this NATS (allotments
    # taken ahead from a KV bucket; README "Fleet-wide rate limits"). false: per process.
    shared_rate_limits: bool = True
    rate_limit_bucket: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = (
        "tollway_ratelimits")
    rate_allotment_s: Annotated[float, Meta(gt=0, le=10)] = 0.5  # lifetime of an allotment
    heartbeat_s: Annotated[float, Meta(gt=0, le=60)] = 1.0  # live processes announce this often


class GuardsConfig(_Base):
    """[guards]: rate limits, the per-call cost cap and the daily budget (issue 4)."""

    enabled: bool = True  # false: no rate limits, estimates, cost cap nor budget (benchmarks)
    rate_limits: bool = True
    budget: bool = True
    # A call is "expensive" (the expensive_per_hour tier) when its first candidate is one
    # of these models, or when its estimated maximum cost reaches the threshold (0: off).
    expensive_models: list[Name] = field(default_factory=list)
    expensive_min_cost_usd: NonNegative = 0.01
    default_limits: TenantLimits = field(default_factory=TenantLimits)  # tenants without own


class RetryConfig(_Base):
    """[retry]: attempts per candidate, exponential backoff with full jitter, Retry-After."""

    attempts: Annotated[int, Meta(ge=1, le=10)] = 3  # per candidate, the first included
    initial_backoff_s: NonNegative = 0.25
    max_backoff_s: NonNegative = 8.0
    max_retry_after_s: NonNegative = 10.0  # a provider asking for longer: fail over instead


class BreakerConfig(_Base):
    """[breaker]: one circuit breaker per provider."""

    failure_threshold: Annotated[int, Meta(ge=1)] = 5  # failures within window_s open it
    window_s: Positive = 60.0
    recovery_s: Positive = 30.0  # open this long, then half-open: probes go through
    recovery_multiplier: Annotated[float, Meta(ge=1)] = 2.0  # growth on consecutive re-opens
    max_recovery_s: Positive = 300.0
    half_open_max_calls: Annotated[int, Meta(ge=1)] = 1
    success_threshold: Annotated[int, Meta(ge=1)] = 1  # good probes that close it
    # With NATS, every gateway process on it shares its breakers: an open in one opens
    # them all, and one process sends the half-open probe (tollway.events.breakers).
    fleet: bool = True
    # How long that process holds the probe (the others stay open meanwhile, unless its
    # outcome arrives first): longer than a probe call takes.
    probe_lease_s: Positive = 30.0


class PolicyConfig(_Base):
    """[policy]: routing by sensitivity, budget tier, latency class and task."""

    local_only: list[str] = field(default_factory=lambda: ["confidential", "restricted"])
    default_latency: Literal["interactive", "standard", "batch"] = "standard"
    # p95 latency objectives per task (upstream included); slower deployments go last.
    latency_objectives_s: dict[str, Positive] = field(
        default_factory=lambda: {"chat": 3.5, "draft": 6.0})
    # With model "auto", a task hint may pick another route alias (or model): {code = "coders"}.
    task_routes: dict[str, Name] = field(default_factory=dict)
    latency_ewma_alpha: Annotated[float, Meta(gt=0, le=1)] = 0.2


class CacheConfig(_Base):
    """[cache]: exact-match response cache of chat completions (tollway.cache), opt-in.

    A call uses it when its tenant is in ``tenants`` (or has ``cache = true``) or the route
    it asks for (alias or model id, ``"*"``: any) is in ``routes``; its temperature is at
    most ``max_temperature`` (unset counts as 1.0, OpenAI's default); and the caller sent
    no ``Cache-Control: no-cache`` / ``no-store``. Entries live in memory and in the NATS
    KV bucket ``bucket`` that the fleet shares; never across tenants."""

    enabled: bool = True  # false: no cache whatever routes/tenants say
    routes: list[str] = field(default_factory=list)  # route aliases or model ids; "*": all
    tenants: list[str] = field(default_factory=list)  # tenant ids; "*": all
    ttl_s: Positive = 3600.0  # an entry's life (also the bucket's max age)
    max_bytes: Annotated[int, Meta(ge=1 << 16)] = 64 << 20  # memory per process, and bucket
    max_entry_bytes: Annotated[int, Meta(ge=1024, le=1 << 20)] = 256 << 10  # larger: not kept
    # (ints in Meta: typing caches equal Annotated types, and the request schema has ints)
    max_temperature: Annotated[float, Meta(ge=0, le=2)] = 0.0
    bucket: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "tollway_cache"


class LearnConfig(_Base):
    """[learn]: routing that learns from shadow evidence (tollway.learn).

    For each ``[[shadow]]`` route listed in ``routes`` (``"*"``: every shadow route), and
    each task, live calls go to the cheapest candidate whose evidence qualifies: at least
    ``min_samples`` scored shadow samples on that route and task, agreeing with the
    primary at a rate of ``min_agreement`` or more over its last ``window`` samples and
    over its last ``recent``, with a p95 latency within the task's objective ([policy]
    latency_objectives_s). A serving candidate whose rate over its last ``recent``
    samples falls below ``min_agreement - hysteresis`` is demoted. A sample agrees, for
    classify and extract, only when the answers are equal (score 1); for the other tasks
    when the similarity is at least ``similarity``."""

    enabled: bool = False
    routes: list[str] = field(default_factory=lambda: ["*"])
    min_agreement: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.95
    min_samples: Annotated[int, Meta(ge=1)] = 30
    window: Annotated[int, Meta(ge=1, le=10_000)] = 50
    recent: Annotated[int, Meta(ge=1, le=10_000)] = 20
    hysteresis: Annotated[float, Meta(ge=0.0, le=0.5)] = 0.03
    similarity: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.8
    # While a candidate serves, this share of its calls is checked against the primary
    # (a shadow call to the primary), on top of the route's own fraction.
    verify_fraction: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.2
    # (the shadow route's `seed` seeds this sampler too)


class ShadowRouteConfig(_Base):
    """[[shadow]]: one route's shadow candidates and caps, or its A/B split (tollway.shadow).

    One table per route alias (or concrete model id) as the caller names it in
    ``model``::

        [[shadow]]
        route = "auto"                  # calls asking for this alias (or model id)
        candidates = ["llama-3.1-8b"]   # model ids, each compared on the same sampled calls
        fraction = 0.10                 # share of the route's completed calls that are shadowed
        daily_usd = 1.00                # shadow spend cap per UTC day, all candidates together
        max_in_flight = 4               # shadow calls of this route running at once
        # timeout_s = 120, agreement_threshold = 0.8, seed = <int> (reproducible sampling)

        [[shadow]]
        route = "chat"
        mode = "ab"                     # live A/B split instead of shadowing
        candidates = ["gpt-4o-mini"]
        weights = [0.2]                 # share of callers each candidate serves; the rest: primary
        sticky = "user"                 # same arm per X-Tollway-User / `user` field (else tenant)
        # salt = "exp-2"                # a new salt reshuffles who lands in which arm
    """

    route: Name  # a route alias or model id, as callers name it in `model`
    candidates: Annotated[list[Name], Meta(min_length=1, max_length=8)]  # model ids
    mode: Literal["shadow", "ab"] = "shadow"
    # shadow mode
    fraction: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0  # share of calls shadowed
    daily_usd: NonNegative = 1.0  # shadow spend cap per UTC day (no tenant's budget)
    max_in_flight: Annotated[int, Meta(ge=0, le=10_000)] = 4  # over it: skipped, not queued
    timeout_s: Positive = 120.0  # a slower candidate counts as an error
    agreement_threshold: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.8
    seed: int | None = None  # sampling RNG seed (tests, reproducible experiments)
    # A/B mode: each candidate serves weights[i] of the callers, sticky by tenant or user
    weights: list[Annotated[float, Meta(ge=0.0, le=1.0)]] = field(default_factory=list)
    sticky: Literal["tenant", "user"] = "tenant"
    salt: str = ""  # change it to reshuffle who lands in which arm


# Tool names as OpenAI takes them (and as NATS subject tokens): letters, digits, _ and -.
ToolName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class ToolConfig(_Base):
    """[[tools]]: a registry tool. A request names it in ``tools`` as
    ``{"type": "registry", "name": "..."}`` and the gateway inlines it as an OpenAI function
    tool; the arguments of the reply's calls to it are checked against ``parameters``
    (tollway.tools). Tools made through the admin API live beside these; a name defined
    here is the config's."""

    name: ToolName
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})
    tenants: list[TenantId] | None = None  # who may use it; None: every tenant


class ToolCallsConfig(_Base):
    """[tool_calls]: what the gateway does with the calls a reply makes to registry tools."""

    # Check each call's arguments against the tool's JSON Schema (header, call event).
    validate: bool = True
    # A non-streamed reply with invalid arguments is asked for once more (same request);
    # the call then costs both replies. Streams cannot be: their first bytes are sent.
    retry_invalid: bool = False


class TracingConfig(_Base):
    """[tracing]: OpenTelemetry traces, exported over OTLP/HTTP (the ``tollway[otel]`` extra).

    One span per call (the GenAI semantic conventions, plus ``tollway.*`` attributes) and a
    child span per upstream attempt; the caller's W3C ``traceparent`` is the call span's
    parent, and each attempt's context goes upstream in its own ``traceparent``
    (:mod:`tollway.tracing`). Off by default, and then a call does no tracing work at all.

    What the file leaves out comes from the environment, as OpenTelemetry's SDKs read it:
    ``OTEL_TRACES_EXPORTER=otlp`` turns tracing on (``none``: off), ``OTEL_SDK_DISABLED=true``
    turns it off whatever the file says, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (else
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/traces``), ``OTEL_SERVICE_NAME``,
    ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``; always from the environment:
    ``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`` (a collector's token: never in the file),
    ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_BSP_*`` (the batch processor)::

        [tracing]
        enabled = true
        endpoint = "http://otel-collector:4318/v1/traces"
        service_name = "tollway"
        sample_ratio = 0.1     # of the traces tollway starts; a caller's sampled flag wins
    """

    enabled: bool | None = None  # None: on when OTEL_TRACES_EXPORTER is otlp
    # The OTLP/HTTP traces URL, path included; default http://localhost:4318/v1/traces.
    endpoint: str | None = None
    service_name: Name | None = None  # default: OTEL_SERVICE_NAME, else "tollway"
    # Share of new traces recorded (1: all); a caller's traceparent decides for its calls.
    sample_ratio: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    export_timeout_s: Positive = 10.0  # one export request to the collector, at most


class StreamsConfig(_Base):
    # Relay a chat completions stream in the Rust core once its first token has gone out
    # (pipeline/native.py): the upstream's bytes go from its socket to the client's with
    # no Python per chunk. Only where it is simple: a plain-HTTP upstream, no output limit
    # on the stream, the client's connection with nothing left to write; every other
    # stream is relayed in Python as before, and so is every stream with this false.
    native_relay: bool = True


class Config(_Base):
    server: ServerConfig = field(default_factory=ServerConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)
    providers: list[ProviderConfig] = field(default_factory=list)
    models: list[ModelConfig] = field(default_factory=list)
    routes: list[RouteConfig] = field(default_factory=list)
    tiers: dict[str, TierConfig] = field(default_factory=dict)
    tenants: list[TenantConfig] = field(default_factory=list)
    events: EventsConfig = field(default_factory=EventsConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    shadow: list[ShadowRouteConfig] = field(default_factory=list)
    tools: list[ToolConfig] = field(default_factory=list)
    tool_calls: ToolCallsConfig = field(default_factory=ToolCallsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    streams: StreamsConfig = field(default_factory=StreamsConfig)

    def provider(self, name: str) -> ProviderConfig | None:
        return next((p for p in self.providers if p.name == name), None)

    def tenant(self, tenant_id: str) -> TenantConfig | None:
        return next((t for t in self.tenants if t.id == tenant_id), None)


DEFAULT_TIERS: dict[str, dict[str, float]] = {
    "low": {"max_call_usd": 0.002, "daily_usd": 0.10},
    "standard": {"max_call_usd": 0.01, "daily_usd": 1.00},
    "premium": {"max_call_usd": 0.05, "daily_usd": 10.00},
}

OPENAI_BASE_URL = "https://api.openai.com/v1"
OPENROUTER_BASE_URL = "https://openrouter.ai/api/v1"


def builtin_providers(env: Mapping[str, str]) -> list[ProviderConfig]:
    """The providers the environment enables (keys are read later, by name)."""
    out: list[ProviderConfig] = []
    if env.get("OPENAI_API_KEY"):
        out.append(
            ProviderConfig(name="openai", base_url=OPENAI_BASE_URL, api_key_env="OPENAI_API_KEY",
                           responses=True)
        )
    if env.get("OPENROUTER_API_KEY"):
        out.append(
            ProviderConfig(
                name="openrouter",
                base_url=OPENROUTER_BASE_URL,
                api_key_env="OPENROUTER_API_KEY",
                http_referer=env.get("OPENROUTER_HTTP_REFERER") or None,
                x_title=env.get("OPENROUTER_X_TITLE") or None,
            )
        )
    if env.get("LOCAL_OPENAI_URL"):
        out.append(
            ProviderConfig(
                name="local",
                base_url=env["LOCAL_OPENAI_URL"].rstrip("/"),
                api_key_env="LOCAL_API_KEY" if env.get("LOCAL_API_KEY") else None,
                local=True,
            )
        )
    return out


def builtin_models() -> list[ModelConfig]:
    """The models of the built-in price table (``tollway/data/prices.toml``).

    The table is keyed by model id: ``vendor/model`` ids are OpenRouter's, the
    rest OpenAI's.
    """
    from tollway.tokens import load_cache_prices, load_output_limits, load_price_table

    models = []
    limits = load_output_limits()
    cache = load_cache_prices()
    for mid, price in load_price_table().items():
        models.append(ModelConfig(
            id=mid,
            provider="openrouter" if "/" in mid else "openai",
            input_usd_per_mtok=price["input_usd_per_mtok"],
            output_usd_per_mtok=price["output_usd_per_mtok"],
            kind="embedding" if "embedding" in mid else "chat",
            max_output_tokens=limits[mid].max_output_tokens,
            max_tokens_field=limits[mid].max_tokens_field,
            cache_read_usd_per_mtok=cache[mid][0],
            cache_write_usd_per_mtok=cache[mid][1],
        ))
    return models


def _default_route(models: list[ModelConfig]) -> RouteConfig | None:
    chat = [m for m in models if m.kind == "chat"]
    if not chat:
        return None
    # Cheapest first: without a policy of its own, `auto` should not surprise a bill.
    chat.sort(key=lambda m: (m.input_usd_per_mtok + m.output_usd_per_mtok, m.id))
    return RouteConfig(alias="auto", candidates=[m.id for m in chat])


def _convert(raw: dict[str, Any], source: str) -> Config:
    tiers = raw.get("tiers", {})
    if isinstance(tiers, dict):
        # A file may give only one field of a built-in tier; the other keeps its default.
        merged = {name: dict(vals) for name, vals in DEFAULT_TIERS.items()}
        for name, vals in tiers.items():
            merged[name] = {**merged.get(name, {}), **vals} if isinstance(vals, dict) else vals
        raw = {**raw, "tiers": merged}
    try:
        return msgspec.convert(raw, Config, str_keys=True)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        path = None
        m = re.search(r" - at `(\$[^`]*)`$", msg)
        if m:
            path, msg = m.group(1), msg[: m.start()]
        raise ConfigError(msg, source=source, path=path) from None


def _check_http_client(name: str, source: str, path: str) -> None:
    from tollway.providers.http import CLIENTS  # imported here: providers import config

    if name not in CLIENTS:
        why = (" (aiohttp was removed: it failed the protocol suite, see the README)"
               if name == "aiohttp" else "")
        raise ConfigError(f"http_client {name!r} is not available; choose one of "
                          f"{', '.join(map(repr, CLIENTS))}: only clients that pass the "
                          f"protocol suite can be chosen{why}", source=source, path=path)


def _check_nats_url(url: str | list[str], source: str) -> None:
    """``"embedded"``, or one server URL, or a cluster's: a list (or one string with commas);
    a URL without a scheme is ``nats://``, as nats-py reads it."""
    if url == "embedded":
        return
    urls = [url] if isinstance(url, str) else url
    parts = [(i, p.strip()) for i, u in enumerate(urls) for p in u.split(",")]
    if not any(p for _, p in parts):
        raise ConfigError("url needs at least one server URL (or \"embedded\")",
                          source=source, path="$.nats.url")
    for i, p in parts:
        where = "$.nats.url" if isinstance(url, str) else f"$.nats.url[{i}]"
        if p == "embedded":
            raise ConfigError("\"embedded\" cannot be one of several URLs", source=source,
                              path=where)
        scheme = p.partition("://")[0] if "://" in p else "nats"
        if p and scheme not in ("nats", "tls", "ws", "wss"):
            raise ConfigError(f"a NATS URL is nats://, tls://, ws:// or wss://, not {scheme}://",
                              source=source, path=where)


def _check(cfg: Config, file_cfg: Config, source: str) -> None:
    """Cross-references; paths point into the file where the fault is."""
    _check_nats_url(file_cfg.nats.url, source)
    seen: set[str] = set()
    for i, p in enumerate(file_cfg.providers):
        if p.name in seen:
            raise ConfigError(f"duplicate provider {p.name!r}", source=source,
                              path=f"$.providers[{i}].name")
        seen.add(p.name)
        if not p.base_url.startswith(("http://", "https://")):
            raise ConfigError("base_url must start with http:// or https://", source=source,
                              path=f"$.providers[{i}].base_url")
        _check_http_client(p.http_client, source, f"$.providers[{i}].http_client")
        if p.ca_file is not None:
            try:
                ssl.create_default_context(cafile=p.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"ca_file {p.ca_file!r} is not a readable PEM CA bundle "
                                  f"({exc.strerror or exc.__class__.__name__})", source=source,
                                  path=f"$.providers[{i}].ca_file") from None
    endpoint = file_cfg.tracing.endpoint
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise ConfigError("endpoint must be an http:// or https:// URL (OTLP/HTTP)",
                          source=source, path="$.tracing.endpoint")
    providers = {p.name for p in cfg.providers}
    seen = set()
    for i, m in enumerate(file_cfg.models):
        if m.id in seen:
            raise ConfigError(f"duplicate model {m.id!r}", source=source, path=f"$.models[{i}].id")
        seen.add(m.id)
        if m.provider not in providers:
            raise ConfigError(
                f"model {m.id!r} names provider {m.provider!r}, which is not configured "
                f"(configured: {', '.join(sorted(providers)) or 'none'})",
                source=source, path=f"$.models[{i}].provider")
    models = {m.id for m in cfg.models}
    aliases: set[str] = set()
    for i, r in enumerate(file_cfg.routes):
        if r.alias in aliases:
            raise ConfigError(f"duplicate route {r.alias!r}", source=source,
                              path=f"$.routes[{i}].alias")
        if r.alias in models:
            raise ConfigError(f"route alias {r.alias!r} is also a model id", source=source,
                              path=f"$.routes[{i}].alias")
        aliases.add(r.alias)
        for j, c in enumerate(r.candidates):
            if c not in models:
                raise ConfigError(
                    f"route {r.alias!r} names model {c!r}, which is not configured "
                    "(or its provider is not enabled)",
                    source=source, path=f"$.routes[{i}].candidates[{j}]")
    aliases |= {r.alias for r in cfg.routes}
    for path, message in check_shadow(file_cfg.shadow,
                                      {m.id: m.kind == "chat" for m in cfg.models}, aliases):
        raise ConfigError(message, source=source, path=path)
    for path, message in check_tools(file_cfg.tools):
        raise ConfigError(message, source=source, path=path)
    shadowed = {e.route for e in file_cfg.shadow if e.mode == "shadow"}
    for i, name in enumerate(file_cfg.learn.routes if file_cfg.learn.enabled else ()):
        if name != "*" and name not in shadowed:
            raise ConfigError(f"[learn] route {name!r} has no [[shadow]] table in shadow mode: "
                              "its candidates and evidence come from there", source=source,
                              path=f"$.learn.routes[{i}]")
    ids: set[str] = set()
    hashes: dict[str, str] = {}
    for i, t in enumerate(file_cfg.tenants):
        if t.id in ids:
            raise ConfigError(f"duplicate tenant {t.id!r}", source=source,
                              path=f"$.tenants[{i}].id")
        ids.add(t.id)
        if t.tier not in cfg.tiers:
            raise ConfigError(
                f"unknown tier {t.tier!r} (tiers: {', '.join(sorted(cfg.tiers))})",
                source=source, path=f"$.tenants[{i}].tier")
        for j, h in enumerate(t.key_sha256):
            other = hashes.get(h.lower())
            if other is not None:
                raise ConfigError(f"key hash already used by tenant {other!r}", source=source,
                                  path=f"$.tenants[{i}].key_sha256[{j}]")
            hashes[h.lower()] = t.id
        for j, name in enumerate(t.models or ()):
            if name not in models and name not in aliases:
                raise ConfigError(f"unknown model or route {name!r}", source=source,
                                  path=f"$.tenants[{i}].models[{j}]")


def check_shadow(entries: list[ShadowRouteConfig], models: dict[str, bool],
                 routes: set[str]) -> list[tuple[str, str]]:
    """Problems as (msgspec path, message); ``models`` maps model id -> is a chat model."""
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, e in enumerate(entries):
        at = f"$.shadow[{i}]"
        if e.route in seen:
            problems.append((f"{at}.route", f"route {e.route!r} has two [[shadow]] tables"))
        seen.add(e.route)
        if e.route not in routes and e.route not in models:
            problems.append((f"{at}.route", f"{e.route!r} is neither a route alias nor a model"))
        if len(set(e.candidates)) != len(e.candidates):
            problems.append((f"{at}.candidates", "a candidate is named twice"))
        for j, c in enumerate(e.candidates):
            if c not in models:
                problems.append((f"{at}.candidates[{j}]", f"model {c!r} is not configured "
                                 "(or its provider is not enabled)"))
            elif not models[c]:
                problems.append((f"{at}.candidates[{j}]",
                                 f"model {c!r} is not a chat model (only chat calls are shadowed)"))
        if e.mode == "ab":
            if len(e.weights) != len(e.candidates):
                problems.append((f"{at}.weights", "mode = \"ab\" needs one weight per candidate"))
            elif sum(e.weights) > 1.0 + 1e-9:
                problems.append((f"{at}.weights", "the weights add up to more than 1"))
        elif e.weights:
            problems.append((f"{at}.weights", "weights are for mode = \"ab\"; shadow mode "
                             "samples with `fraction`"))
    return problems


def check_tools(tools: list[ToolConfig]) -> list[tuple[str, str]]:
    """Problems as (msgspec path, message): names twice, a schema that is not one."""
    from tollway.tools.schema import ToolSchemaError, compile_schema  # tools import config

    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, t in enumerate(tools):
        if t.name in seen:
            problems.append((f"$.tools[{i}].name", f"tool {t.name!r} is defined twice"))
        seen.add(t.name)
        try:
            compile_schema(t.parameters)
        except ToolSchemaError as exc:
            problems.append((f"$.tools[{i}].parameters", str(exc)))
    return problems


def parse_config(
    raw: dict[str, Any], *, source: str = "<config>", env: Mapping[str, str] | None = None
) -> Config:
    """Build a complete Config from a TOML-shaped dict plus the built-ins."""
    env = os.environ if env is None else env
    file_cfg = _convert(raw, source)
    server = file_cfg.server

    providers = {p.name: p for p in (builtin_providers(env) if server.builtin_providers else [])}
    providers.update({p.name: p for p in file_cfg.providers})
    models = {m.id: m for m in (builtin_models() if server.builtin_models else [])
              if m.provider in providers}
    models.update({m.id: m for m in file_cfg.models})
    routes = list(file_cfg.routes)
    if not any(r.alias == "auto" for r in routes) and "auto" not in models:
        auto = _default_route(list(models.values()))
        if auto is not None:
            routes.append(auto)
    tenants = [
        msgspec.structs.replace(t, key_sha256=[h.lower() for h in t.key_sha256])
        for t in file_cfg.tenants
    ]
    cfg = msgspec.structs.replace(
        file_cfg,
        providers=list(providers.values()),
        models=list(models.values()),
        routes=routes,
        tenants=tenants,
    )
    _check(cfg, file_cfg, source)
    return cfg


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML file; raises ConfigError naming the file and field."""
    source = str(path)
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", source=source) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=source) from None
    return parse_config(raw, source=source, env=env)


def default_config(*, env: Mapping[str, str] | None = None) -> Config:
    """The configuration without a file: built-ins and the environment only."""
    return parse_config({}, source="<defaults>", env=env)


def missing_secrets(cfg: Config, env: Mapping[str, str] | None = None) -> list[str]:
    """Env var names the config refers to that are not set (a half-configured start)."""
    env = os.environ if env is None else env
    return sorted({p.api_key_env for p in cfg.providers
                   if p.api_key_env and not env.get(p.api_key_env)})

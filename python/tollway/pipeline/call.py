"""The state of one call as it moves through the pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from tollway.config import TenantConfig
from tollway.context import RequestInfo
from tollway.errors import TollwayError
from tollway.pipeline.plan import Deployment, RoutePlan
from tollway.pipeline.surface import CHAT_SURFACE, EMBEDDINGS_SURFACE, Surface, Wire
from tollway.pipeline.taps import Tap
from tollway.pipeline.usage import Usage
from tollway.providers.http import Reply

CHAT = "chat.completions"
EMBEDDINGS = "embeddings"


class CallTrace(Protocol):
    """A call's trace (``call.trace``): the dispatcher marks each upstream attempt's start
    and end, and passes the attempt's context upstream in the request headers; the tracer's
    finisher ends what is still open."""

    def attempt(self, call: Call, dep: Deployment) -> None: ...

    def attempt_end(self, error: TollwayError | None) -> None: ...

    def headers(self, extra: Mapping[str, str] | None) -> Mapping[str, str]: ...


class Call:
    __slots__ = (
        "attempts", "body", "budget_replies", "budget_scope", "cache", "cache_control",
        "cache_read_tokens", "cache_write_tokens", "client_cancelled", "completion_tokens",
        "cost_nanousd", "deployment", "endpoint", "error", "estimated_cost_nanousd", "fallbacks",
        "flags", "headers", "hold_id", "include_usage", "info", "key_hold_id", "key_id",
        "key_reservation", "latency_class", "limit_scope", "occurred_at", "output_bound", "plan",
        "prompt_counts", "prompt_tokens", "protocol_headers", "reason", "relay_to", "reply",
        "request", "reservation", "response_started", "saved_nanousd", "sensitivity", "settled",
        "status", "stream", "surface", "t0", "tap", "task", "tenant", "tier", "tool_calls",
        "tool_calls_invalid", "tool_retried", "tools", "trace", "usage",
        "user",  # shadow: X-Tollway-User (sticky A/B arms)
        "wire",
    )

    def __init__(self, endpoint: str, info: RequestInfo, tenant: TenantConfig,
                 occurred_at: float, surface: Surface | None = None) -> None:
        self.endpoint = endpoint
        # The API the call came in on, and how the serving (or last tried) provider
        # speaks it (tollway.pipeline.surface).
        self.surface = surface or (EMBEDDINGS_SURFACE if endpoint == EMBEDDINGS
                                   else CHAT_SURFACE)
        self.wire: Wire | None = None
        # The server's response cycle (uvicorn's), when a stream may be handed over to
        # the native relay (pipeline/native.py); None when the ASGI send is not its own.
        self.relay_to: object | None = None
        # The caller's protocol headers the surface passes on (anthropic-version, ...).
        self.protocol_headers: dict[str, str] = {}
        self.info = info
        self.tenant = tenant
        self.t0 = info.t0
        # The call's one instant, unix seconds on the gateway's clock, read once as it
        # arrives: its budget day (reservation and settle) and its event's day, so a call
        # that runs past midnight is not reserved on one day and spent on the next.
        self.occurred_at = occurred_at
        self.tier = tenant.tier
        self.task = ""
        self.sensitivity = ""
        self.flags: tuple[str, ...] = ()  # feature flags (rollouts) that applied
        # The key's own rate limits (a directory key with ``limits``): its limiter
        # identity, "<tenant>/<key id>"; empty when only the tenant's apply.
        self.limit_scope = ""
        # The key's own daily budget (a directory key with ``daily_usd``): its budget
        # account, "<tenant>/<key id>", held beside the tenant's; empty when none.
        self.budget_scope = ""
        # Whole replies the budget holds for: 2 when an invalid tool call may be asked
        # for once more ([tool_calls] retry_invalid), so the retry is paid for too.
        self.budget_replies = 1
        self.key_id = ""  # the directory key that made the call ("" for config keys)
        self.latency_class = ""
        self.body = b""
        self.request: Any = None  # ChatRequest | EmbeddingsRequest once decoded
        self.stream = False
        self.include_usage = False  # the caller asked for the usage chunk
        self.plan: RoutePlan | None = None
        self.deployment: Deployment | None = None  # serving, or last tried
        # Output tokens per choice that deployment was asked for at most, because the
        # call's cap or budget could not pay its full output (0: the request's own stood).
        self.output_bound = 0
        self.attempts = 0
        self.fallbacks: list[str] = []
        self.reply: Reply | None = None
        self.usage: Usage | None = None  # the provider's, from a non-streamed reply
        self.tap: Tap | None = None
        self.response_started = False
        self.client_cancelled = False
        self.prompt_tokens = 0
        # Prompt tokens by encoding, counted once (tollway.pipeline.prompt); -1: uncountable.
        self.prompt_counts: dict[str, int] = {}
        self.completion_tokens = 0
        # Of prompt_tokens, those read from / written to the provider's prompt cache.
        self.cache_read_tokens = 0
        self.cache_write_tokens = 0
        self.estimated_cost_nanousd = 0
        self.cost_nanousd = 0
        self.status = 200
        self.error: TollwayError | None = None
        self.reason = ""
        self.settled = False
        # Extra response headers every reply of this call carries (e.g. x-ratelimit-*),
        # as ASGI raw pairs.
        self.headers: list[tuple[bytes, bytes]] = []
        self.user = ""  # shadow: X-Tollway-User (sticky A/B arms)
        self.reservation: Any = None  # what a guard holds until the call ends (budget)
        self.hold_id = ""  # the shared budget's lease it was granted from (for the record)
        self.key_reservation: Any = None  # the hold on the key's own budget, if it has one
        self.key_hold_id = ""  # that account's lease
        # Registry tools the request named (tollway.tools: name -> Tool), and what the
        # reply did with them: the registry tools it called (one name per call), those
        # whose arguments failed the schema, and whether it was asked for again.
        self.tools: dict[str, Any] | None = None
        self.tool_calls: tuple[str, ...] = ()
        self.tool_calls_invalid: tuple[str, ...] = ()
        self.tool_retried = False
        # The response cache (tollway.cache): the caller's Cache-Control header, the
        # cache's state for this call ("hit", "miss", "bypass"; "" when it did not apply)
        # and, on a hit, what the stored answer cost when it was made.
        self.cache_control = ""
        self.cache: Any = None  # the cache's own per-call state (a tollway.cache.wiring.Lookup)
        self.saved_nanousd = 0
        self.trace: CallTrace | None = None  # its spans, when tracing is on (tollway.tracing)

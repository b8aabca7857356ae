"""The seam between the request pipeline and everything that records calls.

The pipeline builds exactly one :class:`CallRecord` per call (completed,
failed or rejected) once the call is settled, and hands it to each recorder
in ``Pipeline.recorders``, in order (the events layer's, shadow mode's A/B
arms when events are off, a test's; often none). ``record`` is synchronous
and must never block or raise: the events layer turns records into JetStream
events from a queue of its own, so nothing here sits on the response path.
"""

from __future__ import annotations

from typing import Literal, Protocol

import msgspec

Outcome = Literal["completed", "failed", "rejected"]


class CallRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Everything known about one call once it is settled. Money in nano-USD."""

    request_id: str
    tenant: str
    occurred_at: float  # unix seconds when the call was received
    outcome: Outcome
    endpoint: str = "chat.completions"  # or "embeddings", "completions", "messages"
    route: str = ""  # the alias asked for ("auto", a task route) or the model id
    provider: str = ""  # provider that served (or last tried) the call
    model: str = ""  # model id (tollway's name) that served or was last tried
    upstream_model: str = ""
    task: str = ""
    sensitivity: str = ""
    tier: str = ""
    latency_class: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_cost_nanousd: int = 0
    actual_cost_nanousd: int = 0
    latency_s: float = 0.0  # whole call as the gateway saw it
    ttft_s: float | None = None  # time to first token (streams)
    overhead_s: float = 0.0  # time spent in the gateway itself
    attempts: int = 0
    fallbacks: tuple[str, ...] = ()  # providers failed over from, in order
    stream: bool = False
    client_cancelled: bool = False
    status: int = 200  # HTTP status returned to the caller
    error_type: str | None = None  # OpenAI envelope `type` when not completed
    error_code: str | None = None  # OpenAI envelope `code` (e.g. rate_limit_exceeded)
    error_message: str | None = None  # safe to publish: never holds a secret
    reason: str = ""  # policy / guard decision, e.g. "sensitivity=confidential->local"
    reservation_id: str = ""  # the shared budget's lease the call was granted from
    # Output tokens per choice the gateway asked the provider for at most, because the
    # tier's cap or the day's remaining budget could not pay the full output; None: the
    # request's own bound (or none) stood.
    max_tokens_bound: int | None = None
    flags: tuple[str, ...] = ()  # the feature flags (rollouts) that applied to the call
    # Of prompt_tokens, those read from / written to the provider's prompt cache (priced
    # at the model's cache prices; Anthropic's cache_read/cache_creation_input_tokens).
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    key_id: str = ""  # the directory key that made the call ("" for config keys)
    # The key's own budget account (``<tenant>/<key id>``) when it has one, and that
    # account's lease the call was granted from.
    budget_scope: str = ""
    key_reservation_id: str = ""
    # Registry tools the reply called (one name per call), those whose arguments failed
    # their schema, and whether the reply was asked for again because of them.
    tool_calls: tuple[str, ...] = ()
    tool_calls_invalid: tuple[str, ...] = ()
    tool_retried: bool = False
    # The response cache (tollway.cache): "hit" (answered from it: no provider, no cost),
    # "miss" (answered by a provider, then stored when it could be), "bypass" (the
    # route opted in, the request did not qualify); "" when it did not apply.
    cache: str = ""
    saved_nanousd: int = 0  # a hit: what the stored answer cost when it was made


class Recorder(Protocol):
    """Where settled calls go. Implementations must not block or raise."""

    def record(self, rec: CallRecord) -> None: ...


class NullRecorder:
    """Records nothing: what a record costs without a recorder (``benchmarks/events.py``)."""

    def record(self, rec: CallRecord) -> None:
        return None

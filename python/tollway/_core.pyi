"""Typed stubs for the Rust extension ``tollway._core`` (rust_core/src/py.rs)."""

__version__: str

from collections.abc import Mapping as _Mapping
from collections.abc import Sequence as _Sequence
from typing import Any as _Any
from typing import Self as _Self
from typing import final as _final

def count_tokens(text: str, encoding: str = "o200k_base") -> int:
    """len(tiktoken encode_ordinary(text)) for "o200k_base" or "cl100k_base"."""

def encode_ordinary(text: str, encoding: str = "o200k_base") -> list[int]: ...
def encoding_file(name: str) -> bytes:
    """The embedded .tiktoken file of an encoding, byte for byte."""

def encoding_for_model(model: str) -> str: ...
def count_chat_tokens(
    messages: _Sequence[_Mapping[str, _Any]],
    model: str,
    tools: _Sequence[_Mapping[str, _Any]] | None = None,
) -> int: ...
def scan_js_deliveries(
    buf: bytes, pos: int, end: int, sid: bytes, delivered: int
) -> tuple[list[int], list[bytes], int, int, int]:
    """JetStream deliveries on subscription ``sid`` cut from ``buf`` between ``pos`` and
    ``end``: (stream sequences, payloads, position after them, last consumer sequence,
    pending after it or -1). Stops at any other frame; ValueError on a consumer gap."""

def plain_end(block: bytes) -> int:
    """Where the complete events of ``block`` (LF line ends) stop being plain: the start of
    the first event holding ``[DONE]``, ``"error"`` or a ``"usage"`` that is not null;
    ``len(block)`` when none does; 0 when that start is inside a run of blank lines. A
    false alarm (the words inside a JSON string are escaped, so it takes odd JSON) only
    costs reading the run event by event."""

def text_deltas(run: bytes, head: bytes, middle: bytes, tail: bytes,
                seq: int) -> tuple[bytes, str, str | None, str | None, int] | None:
    """A run of complete chat chunk events (LF line ends) that are text deltas alone, as
    events of another API: for each non-empty piece ``head``, the sequence number (from
    ``seq``, counting; none when ``seq`` < 0), ``middle``, the piece's JSON string as
    sent, ``tail``. (events, the pieces' text, first and last finish reason, events
    written); None when any chunk is anything else (a tool call, a refusal, usage, an
    error, not one ``data:`` line, not valid JSON of the chunk's types, a member named
    twice): the Python translator reads that run."""

def duplicate_member(body: bytes) -> str | None:
    """The first name the top-level object of ``body`` (JSON already decoded) holds twice,
    escapes decoded; None when every name is distinct or ``body`` is not an object."""

def utf8_error(body: bytes) -> int | None:
    """The offset of the first byte where ``body`` stops being UTF-8, else None."""

class CoreError(RuntimeError):
    """A bug in the Rust core (a panic), caught where Python called in."""

def _panic(message: str) -> None:
    """Test-only: panics inside the core's boundary, so it raises CoreError."""

class UnknownModelError(KeyError):
    """The model has no price in the estimator's table."""

@_final
class Estimate:
    def __new__(
        cls, prompt_tokens: int, max_output_tokens: int, max_cost_nanousd: int
    ) -> _Self: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def max_output_tokens(self) -> int: ...
    @property
    def max_cost_nanousd(self) -> int: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@_final
class CostEstimator:
    """Prices per model (pico-USD per token) and cost bounds (nano-USD)."""

    def __new__(
        cls,
        prices: _Mapping[str, _Mapping[str, object]],
        *,
        default_max_output_tokens: int = 1024,
    ) -> _Self: ...
    @property
    def default_max_output_tokens(self) -> int: ...
    def set_price(
        self, model: str, input_usd_per_mtok: object, output_usd_per_mtok: object
    ) -> None: ...
    def price(self, model: str) -> tuple[int, int] | None: ...
    def prices(self) -> list[tuple[str, int, int]]: ...
    def estimate(self, model: str, prompt_tokens: int, max_output_tokens: int) -> Estimate: ...
    def estimate_chat(self, model: str, request: _Mapping[str, _Any]) -> Estimate: ...
    def estimate_embeddings(
        self,
        model: str,
        input: str | _Sequence[str] | _Sequence[int] | _Sequence[_Sequence[int]],
    ) -> Estimate: ...
    def cost(self, model: str, prompt_tokens: int, completion_tokens: int = 0) -> int: ...

@_final
class Limits:
    """Per-tier limits of a key; 0 or None disables a tier.

    Defaults (DESIGN.md): per_minute=60, per_hour=1000, per_day=10000,
    expensive_per_hour=10, tokens_per_minute=None.
    """

    def __new__(
        cls,
        per_minute: int | None = ...,
        per_hour: int | None = ...,
        per_day: int | None = ...,
        expensive_per_hour: int | None = ...,
        tokens_per_minute: int | None = None,
    ) -> Limits: ...
    @staticmethod
    def unlimited() -> Limits: ...
    @property
    def per_minute(self) -> int | None: ...
    @property
    def per_hour(self) -> int | None: ...
    @property
    def per_day(self) -> int | None: ...
    @property
    def expensive_per_hour(self) -> int | None: ...
    @property
    def tokens_per_minute(self) -> int | None: ...
    def as_dict(self) -> dict[str, int | None]: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@_final
class TierStatus:
    @property
    def name(self) -> str: ...
    @property
    def limit(self) -> int: ...
    @property
    def remaining(self) -> int:
        """Whole units that could be consumed now."""
    @property
    def reset(self) -> float:
        """Seconds until the bucket is full again."""

@_final
class RateDecision:
    @property
    def allowed(self) -> bool: ...
    @property
    def retry_after(self) -> float:
        """Seconds until the denying tiers admit the same cost; 0 if allowed, inf if never."""
    @property
    def denied_by(self) -> tuple[str, ...]: ...
    @property
    def tiers(self) -> dict[str, TierStatus]:
        """Every enabled tier, after this check's consumption."""
    @property
    def limits(self) -> Limits: ...
    def tier(self, name: str) -> TierStatus | None: ...
    def __bool__(self) -> bool: ...

@_final
class RateLimiter:
    """Multi-tier token-bucket rate limiter keyed by tenant; thread-safe."""

    def __new__(cls, limits: Limits | None = None, *, shards: int = 64) -> RateLimiter: ...
    def check(
        self,
        key: str,
        cost: int = 1,
        *,
        expensive: bool = False,
        tokens: int = 0,
        now: float | None = None,
    ) -> RateDecision: ...
    def status(
        self,
        key: str,
        cost: int = 1,
        *,
        expensive: bool = False,
        tokens: int = 0,
        now: float | None = None,
    ) -> RateDecision: ...
    def set_limits(self, key: str, limits: Limits | None, *, now: float | None = None) -> None: ...
    def limits(self, key: str) -> Limits: ...
    @property
    def default_limits(self) -> Limits: ...
    def set_default_limits(self, limits: Limits, *, now: float | None = None) -> None: ...
    def evict_idle(self, now: float | None = None) -> int: ...
    def __len__(self) -> int: ...

@_final
class BreakerSnapshot:
    @property
    def state(self) -> str: ...
    @property
    def failures(self) -> int: ...
    @property
    def calls(self) -> int: ...
    @property
    def opens(self) -> int: ...
    @property
    def consecutive_opens(self) -> int: ...
    @property
    def recovery_timeout(self) -> float: ...
    @property
    def retry_after(self) -> float: ...
    @property
    def probes_in_flight(self) -> int: ...
    @property
    def dropped_transitions(self) -> int: ...

@_final
class CircuitBreaker:
    """The raw breaker; use :class:`tollway.breaker.CircuitBreaker` for listeners."""

    def __new__(
        cls,
        *,
        failure_threshold: int = 5,
        window_s: float = 60.0,
        failure_rate: float | None = None,
        min_calls: int = 20,
        recovery_s: float = 30.0,
        recovery_multiplier: float = 2.0,
        max_recovery_s: float = 300.0,
        half_open_max_calls: int = 1,
        success_threshold: int = 1,
        slow_call_s: float | None = None,
        probe_timeout_s: float = 60.0,
        healthy_reset_s: float = 60.0,
    ) -> CircuitBreaker: ...
    def allow(self, now: float | None = None) -> bool: ...
    def record_success(
        self, now: float | None = None, duration_s: float = 0.0
    ) -> tuple[str, str, float, str] | None: ...
    def record_failure(self, now: float | None = None) -> tuple[str, str, float, str] | None: ...
    def state(self, now: float | None = None) -> str: ...
    def retry_after(self, now: float | None = None) -> float: ...
    def snapshot(self, now: float | None = None) -> BreakerSnapshot: ...
    def reset(self, now: float | None = None) -> tuple[str, str, float, str] | None: ...
    def force_open(
        self, open_for_s: float, now: float | None = None
    ) -> tuple[str, str, float, str] | None: ...
    def force_close(self, now: float | None = None) -> tuple[str, str, float, str] | None: ...
    def drain_transitions(self) -> list[tuple[str, str, float, str]]: ...
    @property
    def pending_transitions(self) -> int: ...
    def config(self) -> dict[str, int | float | None]: ...

# (id, end, done, error, usage payload or None, the forwarded events, message); end: 0 the
# body's end, 1 broken by the upstream, 2 the client left, 3 timed out, 4 not events.
RelayOutcome = tuple[int, int, bool, bool, bytes | None, bytes, str]

class Relay:
    """The native stream relay (rust_core/src/relay.rs): one thread, one epoll."""

    def __init__(self) -> None: ...
    @property
    def notify_fd(self) -> int: ...
    def start(
        self,
        up_fd: int,
        client_fd: int,
        reply: bytes,
        untaken: int,
        pending: bytes,
        keep_usage: bool,
        silence_s: float,
        total_s: float,
    ) -> int: ...
    def cancel(self, id: int) -> bool: ...
    def finished(self) -> list[RelayOutcome]: ...
    def running(self) -> int: ...
    def close(self) -> list[RelayOutcome]: ...

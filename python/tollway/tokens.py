"""Token counts and cost estimates: the typed facade of ``tollway._core``.

Counting is tiktoken-exact (``encode_ordinary``) for ``o200k_base`` and
``cl100k_base`` and runs in Rust; the functions here are the Rust ones
themselves, so a hot call pays no Python layer. Money is integer: prices are
pico-USD per token, costs nano-USD, rounded up.

Approximations (documented in ``rust_core/src/tokenizer/chat.rs``):
models whose tokenizer is not public count with ``o200k_base``; image parts
count a fixed 85 tokens (``detail: "low"``) or 765; tool calls and tool
definitions follow OpenAI's cookbook formulas.

An estimator raises :class:`UnknownModelError` (a ``KeyError``) for a model
with no price, and :meth:`CostEstimator.price` returns ``None`` for it. A
panic in the Rust core raises :class:`CoreError` (a ``RuntimeError``), which
the pipeline turns into its internal error.
"""

from __future__ import annotations

import functools
import math
import tomllib
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypedDict

from tollway._core import (
    CoreError,
    CostEstimator,
    Estimate,
    UnknownModelError,
    count_chat_tokens,
    count_tokens,
    encode_ordinary,
    encoding_file,
    encoding_for_model,
)

__all__ = [
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "DEFAULT_MODEL_OUTPUT_TOKENS",
    "ENCODINGS",
    "MAX_TOKENS_FIELDS",
    "CachePrices",
    "CoreError",
    "CostEstimator",
    "Estimate",
    "ModelPrice",
    "OutputLimit",
    "UnknownModelError",
    "count_chat_tokens",
    "count_tokens",
    "encode_ordinary",
    "encoding_file",
    "encoding_for_model",
    "load_cache_prices",
    "load_output_limits",
    "load_price_table",
]

ENCODINGS = ("o200k_base", "cl100k_base")
# The output a call without max_tokens is assumed to have where only a typical size matters
# (the tokens-per-minute tier, "expensive"); money is held at the model's full output.
DEFAULT_MAX_OUTPUT_TOKENS = 1024
# The output limit of a model the table and the config say nothing about: OpenAI's for
# gpt-4o. Set ``max_output_tokens`` in the config for such a model.
DEFAULT_MODEL_OUTPUT_TOKENS = 16_384
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
_PRICE_KEYS = ("input_usd_per_mtok", "output_usd_per_mtok")
_LIMIT_KEYS = ("max_output_tokens", "max_tokens_field")
_CACHE_KEYS = ("cache_read_usd_per_mtok", "cache_write_usd_per_mtok")


class ModelPrice(TypedDict):
    """List price of one model, in USD per million tokens."""

    input_usd_per_mtok: float
    output_usd_per_mtok: float


class OutputLimit(NamedTuple):
    """How much one choice of a model can output, and the field that bounds it."""

    max_output_tokens: int | None
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] | None


def load_price_table(path: str | Path | None = None) -> dict[str, ModelPrice]:
    """Read a price table (``[models]``: id -> both prices) from TOML.

    Without ``path``, the built-in table shipped in ``tollway/data/prices.toml``.
    Raises ``ValueError`` naming the entry when the table is malformed.
    """
    return {model: ModelPrice(input_usd_per_mtok=entry["input_usd_per_mtok"],
                              output_usd_per_mtok=entry["output_usd_per_mtok"])
            for model, entry in _read_table(path).items()}


def load_output_limits(path: str | Path | None = None) -> dict[str, OutputLimit]:
    """The table's ``max_output_tokens`` and ``max_tokens_field`` per model (None where
    the entry gives none); the built-in table (``path`` None) is read once."""
    if path is None:
        return _builtin_limits()
    return _limits(_read_table(path))


def load_cache_prices(path: str | Path | None = None
                      ) -> dict[str, tuple[float | None, float | None]]:
    """The table's (cache read, cache write) USD per Mtok per model; None where the entry
    gives none. Without ``path``, the built-in table (read once)."""
    table = _builtin_table() if path is None else _read_table(path)
    return {model: (entry.get(_CACHE_KEYS[0]), entry.get(_CACHE_KEYS[1]))
            for model, entry in table.items()}


class CachePrices:
    """What prompt tokens read from or written to a provider's prompt cache cost, per
    model, in pico-USD per token (a model without such prices: its input price).

    The cost of a call with cached tokens is computed here as the estimator computes any
    call's: integer pico-USD per token, the total rounded up to nano-USD once."""

    __slots__ = ("_prices",)

    def __init__(self, prices: dict[str, tuple[float | None, float | None]]) -> None:
        self._prices = {model: (_pico(read), _pico(write))
                        for model, (read, write) in prices.items()}

    def cost(self, estimator: CostEstimator, model: str, uncached_prompt: int,
             completion: int, cache_read: int, cache_write: int) -> int:
        """Nano-USD of a call: ``uncached_prompt`` input tokens at the input price, the
        cache's at theirs, ``completion`` at the output price."""
        price = estimator.price(model)
        if price is None:
            return 0
        p_in, p_out = price
        read, write = self._prices.get(model, (None, None))
        pico = (uncached_prompt * p_in + completion * p_out
                + cache_read * (p_in if read is None else read)
                + cache_write * (p_in if write is None else write))
        return -(-pico // 1000)


def _pico(usd_per_mtok: float | None) -> int | None:
    if usd_per_mtok is None:
        return None
    # As the core parses a price: the float's shortest repr, exactly (1 USD/Mtok is
    # 10^6 pico-USD a token).
    return int(Decimal(repr(usd_per_mtok)) * 1_000_000)


@functools.cache
def _builtin_table() -> dict[str, dict[str, Any]]:
    return _read_table(None)


@functools.cache
def _builtin_limits() -> dict[str, OutputLimit]:
    return _limits(_builtin_table())


def _limits(table: dict[str, dict[str, Any]]) -> dict[str, OutputLimit]:
    return {model: OutputLimit(entry.get("max_output_tokens"), entry.get("max_tokens_field"))
            for model, entry in table.items()}


def _read_table(path: str | Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        text = resources.files("tollway").joinpath("data/prices.toml").read_text("utf-8")
        source = "the built-in price table"
    else:
        text = Path(path).read_text("utf-8")
        source = str(path)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: {exc}") from exc
    models = document.get("models")
    if not isinstance(models, dict):
        raise ValueError(f"{source}: expected a [models] table")
    for model, entry in models.items():
        if (not isinstance(entry, dict) or not set(_PRICE_KEYS) <= set(entry)
                or not set(entry) <= {*_PRICE_KEYS, *_LIMIT_KEYS, *_CACHE_KEYS}):
            raise ValueError(f"{source}: {model!r} must have {', '.join(_PRICE_KEYS)}, and "
                             f"may have {', '.join((*_LIMIT_KEYS, *_CACHE_KEYS))}")
        for value in (entry[key] for key in (*_PRICE_KEYS, *_CACHE_KEYS) if key in entry):
            valid = isinstance(value, int | float) and not isinstance(value, bool)
            if not valid or not math.isfinite(value) or value < 0:
                raise ValueError(f"{source}: {model!r} has an invalid price {value!r}")
        limit = entry.get("max_output_tokens", 1)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"{source}: {model!r} has an invalid max_output_tokens {limit!r}")
        if entry.get("max_tokens_field", MAX_TOKENS_FIELDS[0]) not in MAX_TOKENS_FIELDS:
            raise ValueError(f"{source}: {model!r}: max_tokens_field must be one of "
                             f"{', '.join(MAX_TOKENS_FIELDS)}")
    return models

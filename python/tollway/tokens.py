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

import math
import tomllib
from importlib import resources
from pathlib import Path
from typing import TypedDict

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
    "ENCODINGS",
    "CoreError",
    "CostEstimator",
    "Estimate",
    "ModelPrice",
    "UnknownModelError",
    "count_chat_tokens",
    "count_tokens",
    "encode_ordinary",
    "encoding_file",
    "encoding_for_model",
    "load_price_table",
]

ENCODINGS = ("o200k_base", "cl100k_base")
DEFAULT_MAX_OUTPUT_TOKENS = 1024
_PRICE_KEYS = ("input_usd_per_mtok", "output_usd_per_mtok")


class ModelPrice(TypedDict):
    """List price of one model, in USD per million tokens."""

    input_usd_per_mtok: float
    output_usd_per_mtok: float


def load_price_table(path: str | Path | None = None) -> dict[str, ModelPrice]:
    """Read a price table (``[models]``: id -> both prices) from TOML.

    Without ``path``, the built-in table shipped in ``tollway/data/prices.toml``.
    Raises ``ValueError`` naming the entry when the table is malformed.
    """
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
    table: dict[str, ModelPrice] = {}
    for model, entry in models.items():
        if not isinstance(entry, dict) or set(entry) != set(_PRICE_KEYS):
            raise ValueError(f"{source}: {model!r} must have exactly {', '.join(_PRICE_KEYS)}")
        prices = [entry[key] for key in _PRICE_KEYS]
        for value in prices:
            valid = isinstance(value, int | float) and not isinstance(value, bool)
            if not valid or not math.isfinite(value) or value < 0:
                raise ValueError(f"{source}: {model!r} has an invalid price {value!r}")
        table[model] = ModelPrice(input_usd_per_mtok=prices[0], output_usd_per_mtok=prices[1])
    return table

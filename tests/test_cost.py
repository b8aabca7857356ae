"""Prices and cost estimates: the built-in table, integer money, the estimator."""

from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tollway.tokens import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    CostEstimator,
    Estimate,
    ModelPrice,
    OutputLimit,
    UnknownModelError,
    count_chat_tokens,
    count_tokens,
    load_output_limits,
    load_price_table,
)

REQUIRED_MODELS = [
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "o3",
    "o3-mini",
    "o4-mini",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "gpt-3.5-turbo",
    "gpt-4-turbo",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
    "openai/gpt-4o",
    "openai/gpt-4o-mini",
    "anthropic/claude-3.5-sonnet",
    "anthropic/claude-3.5-haiku",
    "meta-llama/llama-3.1-8b-instruct",
    "meta-llama/llama-3.1-70b-instruct",
    "google/gemini-flash-1.5",
    "mistralai/mistral-7b-instruct",
]


@pytest.fixture
def estimator() -> CostEstimator:
    return CostEstimator(load_price_table())


def test_builtin_table_covers_the_common_models() -> None:
    table = load_price_table()
    missing = [m for m in REQUIRED_MODELS if m not in table]
    assert not missing
    assert table["gpt-4o-mini"] == {"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60}
    assert table["text-embedding-3-small"]["output_usd_per_mtok"] == 0
    for price in table.values():
        assert price["input_usd_per_mtok"] > 0


def test_builtin_prices_are_exact_integers(estimator: CostEstimator) -> None:
    # 0.15 USD/Mtok is 150,000 pico-USD per token: no float error survives.
    assert estimator.price("gpt-4o-mini") == (150_000, 600_000)
    assert estimator.price("google/gemini-flash-1.5") == (75_000, 300_000)
    assert estimator.price("gpt-4o") == (2_500_000, 10_000_000)


def test_custom_table_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        '[models]\n"local-llama" = { input_usd_per_mtok = 0, output_usd_per_mtok = 0 }\n'
    )
    assert load_price_table(path) == {
        "local-llama": {"input_usd_per_mtok": 0, "output_usd_per_mtok": 0}
    }
    assert load_output_limits(path) == {"local-llama": OutputLimit(None, None)}


def test_table_output_limits(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text('[models]\n"r" = { input_usd_per_mtok = 1, output_usd_per_mtok = 4, '
                    'max_output_tokens = 100_000, max_tokens_field = "max_completion_tokens" }\n')
    assert load_price_table(path) == {"r": {"input_usd_per_mtok": 1, "output_usd_per_mtok": 4}}
    assert load_output_limits(path) == {"r": OutputLimit(100_000, "max_completion_tokens")}
    builtin = load_output_limits()
    chat = [m for m in load_price_table() if "embedding" not in m]
    assert all(builtin[m].max_output_tokens for m in chat)  # every chat model has one
    assert builtin["gpt-4o"] == OutputLimit(16_384, None)
    assert builtin["o3"] == OutputLimit(100_000, "max_completion_tokens")


@pytest.mark.parametrize(
    "body",
    [
        "models = 3\n",
        '[models]\n"m" = { input_usd_per_mtok = 1 }\n',
        '[models]\n"m" = { input_usd_per_mtok = -1, output_usd_per_mtok = 1 }\n',
        '[models]\n"m" = { input_usd_per_mtok = "1", output_usd_per_mtok = 1 }\n',
        '[models]\n"m" = { input_usd_per_mtok = true, output_usd_per_mtok = 1 }\n',
        '[models]\n"m" = { input_usd_per_mtok = nan, output_usd_per_mtok = 1 }\n',
        '[models]\n"m" = { input_usd_per_mtok = 1, output_usd_per_mtok = 1, x = 1 }\n',
        '[models]\n"m" = { input_usd_per_mtok = 1, output_usd_per_mtok = 1, '
        'max_output_tokens = 0 }\n',
        '[models]\n"m" = { input_usd_per_mtok = 1, output_usd_per_mtok = 1, '
        'max_tokens_field = "max_output" }\n',
        "[models\n",
    ],
)
def test_malformed_tables_are_rejected(tmp_path: Path, body: str) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(body)
    with pytest.raises(ValueError, match=str(path).replace("\\", "\\\\")):
        load_price_table(path)


def test_estimate_chat_bounds_prompt_and_output(estimator: CostEstimator) -> None:
    messages = [{"role": "user", "content": "Summarise the design in one line."}]
    prompt = count_chat_tokens(messages, "gpt-4o-mini")
    est = estimator.estimate_chat("gpt-4o-mini", {"model": "auto", "messages": messages})
    assert est.prompt_tokens == prompt
    assert est.max_output_tokens == DEFAULT_MAX_OUTPUT_TOKENS == 1024
    assert est.max_cost_nanousd == prompt * 150 + 1024 * 600

    est = estimator.estimate_chat("gpt-4o-mini", {"messages": messages, "max_tokens": 10})
    assert (est.max_output_tokens, est.max_cost_nanousd) == (10, prompt * 150 + 6_000)
    # max_completion_tokens wins over the deprecated max_tokens; n multiplies.
    request = {"messages": messages, "max_tokens": 10, "max_completion_tokens": 20, "n": 3}
    assert estimator.estimate_chat("gpt-4o-mini", request).max_output_tokens == 60
    nulls = {"messages": messages, "max_tokens": None, "n": None}
    assert estimator.estimate_chat("gpt-4o-mini", nulls).max_output_tokens == 1024


def test_estimate_chat_counts_tools(estimator: CostEstimator) -> None:
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "description": "Does f."}}]
    plain = estimator.estimate_chat("gpt-4o", {"messages": messages})
    with_tools = estimator.estimate_chat("gpt-4o", {"messages": messages, "tools": tools})
    assert with_tools.prompt_tokens == count_chat_tokens(messages, "gpt-4o", tools)
    assert with_tools.prompt_tokens > plain.prompt_tokens


def test_estimate_chat_counts_deprecated_functions(estimator: CostEstimator) -> None:
    messages = [{"role": "user", "content": "hi"}]
    function = {"name": "f", "description": "Does f."}
    tools = [{"type": "function", "function": function}]
    with_tools = estimator.estimate_chat("gpt-4o", {"messages": messages, "tools": tools})
    legacy = estimator.estimate_chat("gpt-4o", {"messages": messages, "functions": [function]})
    assert legacy == with_tools


def test_default_output_is_configurable() -> None:
    est = CostEstimator(load_price_table(), default_max_output_tokens=50)
    assert est.default_max_output_tokens == 50
    request = {"messages": [{"role": "user", "content": "x"}]}
    assert est.estimate_chat("gpt-4o", request).max_output_tokens == 50


def test_bad_request_fields(estimator: CostEstimator) -> None:
    with pytest.raises(ValueError, match="messages"):
        estimator.estimate_chat("gpt-4o", {"model": "gpt-4o"})
    with pytest.raises(ValueError, match="max_tokens"):
        estimator.estimate_chat("gpt-4o", {"messages": [], "max_tokens": -1})


def test_embeddings_estimate(estimator: CostEstimator) -> None:
    model = "text-embedding-3-small"  # cl100k_base, 0.02 USD/Mtok = 20 nano-USD/token
    one = estimator.estimate_embeddings(model, "hello world")
    assert one == Estimate(2, 0, 40)
    many = estimator.estimate_embeddings(model, ["hello world", "a longer sentence here"])
    assert many.prompt_tokens == 2 + count_tokens("a longer sentence here", "cl100k_base")
    assert estimator.estimate_embeddings(model, [1, 2, 3]).prompt_tokens == 3
    assert estimator.estimate_embeddings(model, [[1, 2], [3]]).prompt_tokens == 3
    with pytest.raises(TypeError):
        estimator.estimate_embeddings(model, [1.5])  # type: ignore[arg-type]


def test_actual_cost_from_usage(estimator: CostEstimator) -> None:
    # 1000 x 2.5 + 100 x 10 USD per Mtok = 0.0035 USD = 3,500,000 nano-USD.
    assert estimator.cost("gpt-4o", 1000, 100) == 3_500_000
    assert estimator.cost("gpt-4o", 0) == 0


def test_costs_round_up_to_the_next_nanousd() -> None:
    est = CostEstimator({"tiny": {"input_usd_per_mtok": "0.000001", "output_usd_per_mtok": 0}})
    assert est.price("tiny") == (1, 0)
    assert est.cost("tiny", 1) == 1  # 1 pico-USD -> 1 nano-USD
    assert est.cost("tiny", 1000) == 1
    assert est.cost("tiny", 1001) == 2
    est.set_price("finer", "0.0000001", 0)  # below 1 pico-USD/token: rounds up
    assert est.price("finer") == (1, 0)


def test_unknown_model_raises_a_key_error(estimator: CostEstimator) -> None:
    request: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}]}
    for call in (
        lambda: estimator.estimate_chat("no-such-model", request),
        lambda: estimator.estimate_embeddings("no-such-model", "x"),
        lambda: estimator.cost("no-such-model", 1, 1),
        lambda: estimator.estimate("no-such-model", 1, 1),
    ):
        with pytest.raises(UnknownModelError, match="no-such-model"):
            call()
    assert issubclass(UnknownModelError, KeyError)
    assert estimator.price("no-such-model") is None


def test_lookup_falls_back_to_undated_and_unprefixed_ids(estimator: CostEstimator) -> None:
    mini = estimator.price("gpt-4o-mini")
    assert estimator.price("gpt-4o-mini-2024-07-18") == mini
    assert estimator.price("openai/gpt-4o-mini-2024-07-18") == mini
    assert estimator.price("gpt-3.5-turbo-0125") == estimator.price("gpt-3.5-turbo")


def test_set_price_adds_and_replaces(estimator: CostEstimator) -> None:
    estimator.set_price("local-llama", 0, 0)
    assert estimator.cost("local-llama", 10**6, 10**6) == 0
    estimator.set_price("gpt-4o-mini", 1.5, Decimal("2.25"))
    assert estimator.price("gpt-4o-mini") == (1_500_000, 2_250_000)
    names = [m for m, _, _ in estimator.prices()]
    assert names == sorted(names)
    assert "local-llama" in names


@pytest.mark.parametrize("bad", [-1, "abc", float("inf"), float("nan"), True])
def test_bad_prices_are_rejected(estimator: CostEstimator, bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        estimator.set_price("m", bad, 0)


def test_construct_from_typed_table() -> None:
    table: dict[str, ModelPrice] = {
        "m": ModelPrice(input_usd_per_mtok=1.0, output_usd_per_mtok=3.0)
    }
    assert CostEstimator(table).price("m") == (1_000_000, 3_000_000)
    with pytest.raises(ValueError, match="output_usd_per_mtok"):
        CostEstimator({"m": {"input_usd_per_mtok": 1}})


def test_estimate_value_semantics() -> None:
    a = Estimate(1, 2, 3)
    assert a == Estimate(1, 2, 3)
    assert a != Estimate(1, 2, 4)
    assert hash(a) == hash(Estimate(1, 2, 3))
    assert repr(a) == "Estimate(prompt_tokens=1, max_output_tokens=2, max_cost_nanousd=3)"
    with pytest.raises(AttributeError):
        a.prompt_tokens = 5  # type: ignore[misc]


def test_estimator_is_safe_across_threads(estimator: CostEstimator) -> None:
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(300):
                estimator.set_price(f"m-{k}-{i}", i, 0)
                assert estimator.cost(f"m-{k}-{i}", 1_000_000) == i * 10**9
                estimator.estimate_chat("gpt-4o", {"messages": [{"role": "user", "content": "x"}]})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(estimator.prices()) == len(load_price_table()) + 1200

"""The output bound's arithmetic (tollway.pipeline.bound) against the Rust estimator."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tollway.pipeline.bound import MIN_REPLY_TOKENS, Fit
from tollway.tokens import CostEstimator

USD = st.decimals(min_value=0, max_value=100, places=3).map(float)


@settings(max_examples=300, deadline=None)
@given(price_in=USD, price_out=USD, prompt=st.integers(0, 200_000),
       full=st.integers(1, 200_000), n=st.integers(1, 8),
       limit=st.integers(0, 10**10))
def test_lower_finds_the_most_output_the_limit_pays(
        price_in: float, price_out: float, prompt: int, full: int, n: int, limit: int) -> None:
    est = CostEstimator({"m": {"input_usd_per_mtok": price_in,
                               "output_usd_per_mtok": price_out}})
    fit = Fit(prompt, est.price("m"), full, n)
    assert fit.cost == est.estimate("m", prompt, full * n).max_cost_nanousd
    if not fit.lower(limit):
        # Not even a minimal reply (or the prompt alone) fits; nothing changed.
        assert fit.out == full
        least = est.estimate("m", prompt, min(full, MIN_REPLY_TOKENS) * n).max_cost_nanousd
        assert fit.least() == least > limit
        return
    assert fit.cost == est.estimate("m", prompt, fit.out * n).max_cost_nanousd <= limit
    assert fit.out <= full  # never raised
    if fit.out < full:  # lowered: the most the limit pays, and no less than a minimal reply
        assert fit.bound == fit.out >= MIN_REPLY_TOKENS
        assert est.estimate("m", prompt, (fit.out + 1) * n).max_cost_nanousd > limit
    else:
        assert fit.bound == 0


def test_free_output_is_never_bounded() -> None:
    fit = Fit(1000, (0, 0), 16_384, 1)
    assert fit.lower(0) and fit.bound == 0 and fit.cost == 0
    priced_prompt = Fit(1000, (1_000_000, 0), 16_384, 1)  # 1 USD/M in, output free
    assert not priced_prompt.lower(999_999)  # the prompt alone costs 1,000,000 nano-USD
    assert priced_prompt.lower(1_000_000) and priced_prompt.bound == 0

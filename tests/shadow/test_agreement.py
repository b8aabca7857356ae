"""The agreement rule: exact for short answers, canonical JSON, tool calls, similarity."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from tollway.shadow.agreement import SHORT_WORDS, score, similarity, tool_calls


def test_short_answers_match_after_case_space_and_punctuation() -> None:
    s = score("  Positive.\n", "positive")
    assert (s.value, s.method) == (1.0, "exact")
    assert score("Paris", "PARIS!").value == 1.0
    assert score("yes", "no").value == 0.0
    assert score("42", "42.0").value == 0.0  # not JSON (not an object/array): text


def test_short_means_both_sides_short() -> None:
    long = "the answer is positive because the review praises the product a lot"
    s = score("positive", long)
    assert s.method == "similarity"
    assert 0.0 < s.value < 0.5


def test_json_is_compared_canonically() -> None:
    a = '{"b": [1, 2, {"x": null}], "a": "s"}'
    b = '```json\n{ "a":"s",\n  "b":[1.0,2,{"x":null}] }\n```'
    s = score(a, b)
    assert (s.value, s.method) == (1.0, "json")
    assert score(a, '{"a": "s", "b": [2, 1, {"x": null}]}').value == 0.0  # list order counts
    # JSON on one side only: disagreement, still judged as JSON
    s = score('{"a": 1}', "a is 1")
    assert (s.value, s.method) == (0.0, "json")


def test_tool_calls_compare_names_and_arguments() -> None:
    a = 'get_weather{"city": "Paris", "unit": "c"}'
    b = 'get_weather{"unit":"c","city":"Paris"}'
    assert score(a, b, "tool_calls", "tool_calls").value == 1.0
    assert score(a, 'get_weather{"city": "Rome"}', "tool_calls", "tool_calls").value == 0.5
    assert score(a, 'get_time{"city": "Paris"}', "tool_calls", "tool_calls").value == 0.0
    s = score(a, "It is sunny in Paris.", "tool_calls", "stop")
    assert (s.value, s.method) == (0.0, "tool_calls")
    # two calls vs one: the second position has no partner
    two = a + 'get_time{"tz": "CET"}'
    assert score(two, a, "tool_calls", "tool_calls").value == 0.5
    assert tool_calls(two) == [("get_weather", '{"city":"Paris","unit":"c"}'),
                               ("get_time", '{"tz":"CET"}')]
    assert tool_calls("not a call") is None


def test_similarity_orders_closeness() -> None:
    ref = "The quick brown fox jumps over the lazy dog near the river bank today"
    same_words_shuffled = "today the river bank near the lazy dog the quick brown fox jumps over"
    reworded = "A fast brown fox leaps over a sleepy dog by the river today"
    unrelated = "Quarterly revenue grew eleven percent on strong cloud subscriptions"
    s_same = score(ref, ref.upper() + "  ")
    assert (s_same.value, s_same.method) == (1.0, "similarity")
    a = score(ref, same_words_shuffled).value
    b = score(ref, reworded).value
    c = score(ref, unrelated).value
    assert 1.0 > a > b > c
    assert c == 0.0
    assert a >= 0.5  # every word shared: the unigram half is 1


def test_empty_outputs() -> None:
    assert (score("", "  ").value, score("", "").method) == (1.0, "empty")
    assert score("", "something").value == 0.0


@given(st.text(max_size=300), st.text(max_size=300))
def test_score_is_bounded_and_symmetric(a: str, b: str) -> None:
    s1, s2 = score(a, b), score(b, a)
    assert 0.0 <= s1.value <= 1.0
    assert abs(s1.value - s2.value) < 1e-12
    assert score(a, a).value == 1.0


def test_similarity_is_linear_time() -> None:
    # Nearly the same long text: difflib's ratio would be quadratic here. It takes ~0.07 s;
    # a quadratic pass over 20,000 words would take minutes. The bound is only that gap: a
    # loaded CI machine may well be ten times slower than alone.
    words = [f"w{i % 997}" for i in range(30_000)]
    a = " ".join(words)
    b = " ".join(reversed(words))
    t = time.perf_counter()
    value = similarity(a, b)
    assert time.perf_counter() - t < 10
    assert 0.4 < value < 1.0


def test_short_words_boundary() -> None:
    a = " ".join(["x"] * SHORT_WORDS)
    b = " ".join(["x"] * (SHORT_WORDS - 1) + ["y"])
    assert score(a, b).method == "exact"
    assert score(a + " z", b + " z").method == "similarity"

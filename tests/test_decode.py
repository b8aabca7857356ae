"""The request body as the provider gets it: rewritten only where the gateway must."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollway.errors import InvalidRequest
from tollway.pipeline.decode import ChatRequest, decode_chat, rewrite

BODY = (b'{"model": "auto", "stream": true, "stream_options": {"include_usage": false, "x": 1},'
        b' "messages": [{"role": "user", "content": "caf\\u00e9,  as sent"}], "extra": null}')


def test_rewrite_replaces_the_model_and_asks_for_usage_and_copies_the_rest_as_sent() -> None:
    out = rewrite(BODY, model="gpt-4o-mini", include_usage=True)
    assert json.loads(out) == {**json.loads(BODY), "model": "gpt-4o-mini",
                               "stream_options": {"include_usage": True, "x": 1}}
    assert list(json.loads(out)) == ["model", "stream", "stream_options", "messages", "extra"]
    # The messages are copied byte for byte, not decoded and encoded again.
    assert b'[{"role": "user", "content": "caf\\u00e9,  as sent"}]' in out


def test_rewrite_of_the_model_alone_and_of_usage_alone() -> None:
    assert json.loads(rewrite(BODY, model="m", include_usage=False))["stream_options"] == {
        "include_usage": False, "x": 1}
    only_usage = json.loads(rewrite(b'{"model": "a", "messages": []}', model=None,
                                    include_usage=True))
    assert only_usage == {"model": "a", "messages": [], "stream_options": {"include_usage": True}}


# ---- a top-level member named twice (tollway.pipeline.decode._unique_members) ----------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=4)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=6)
# Members the gateway does not type, so any value decodes.
EXTRA = st.dictionaries(st.text(max_size=5).filter(
    lambda k: k not in ChatRequest.__struct_fields__), JSON_VALUES, max_size=5)
# (between members, between name and value): Python's, compact, anything JSON allows
STYLES = [(", ", ": "), (",", ":"), (" ,\n\t", "\r\n : ")]
BASE = [("model", "gpt-4o-mini"), ("messages", [{"role": "user", "content": "x"}])]


def escaped(name: str) -> str:
    """The name with every character written as a \\u escape (still the same name)."""
    units = name.encode("utf-16-be")
    return '"' + "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}"
                         for i in range(0, len(units), 2)) + '"'


def render(members: list[tuple[str, Any]], style: tuple[str, str],
           names: dict[int, str] | None = None) -> bytes:
    item, colon = style
    return ("{" + item.join((names or {}).get(i, json.dumps(k)) + colon + json.dumps(v)
                            for i, (k, v) in enumerate(members)) + "}").encode()


@settings(max_examples=100, deadline=None)
@given(extra=EXTRA, style=st.sampled_from(STYLES), data=st.data())
def test_a_body_whose_members_are_unique_is_accepted(
        extra: dict[str, Any], style: tuple[str, str], data: st.DataObject) -> None:
    members = data.draw(st.permutations([*BASE, *extra.items()]))
    names = {i: escaped(k) for i, (k, _) in enumerate(members)
             if data.draw(st.booleans())}  # written with escapes: still unique
    assert decode_chat(render(members, style, names)).model == "gpt-4o-mini"


@settings(max_examples=100, deadline=None)
@given(extra=EXTRA, style=st.sampled_from(STYLES), value=JSON_VALUES, data=st.data())
def test_a_body_naming_a_member_twice_is_refused(
        extra: dict[str, Any], style: tuple[str, str], value: Any, data: st.DataObject) -> None:
    members = data.draw(st.permutations([*BASE, *extra.items()]))
    name = data.draw(st.sampled_from(members))[0]
    at = data.draw(st.integers(0, len(members)))
    members.insert(at, (name, value))
    names = {at: escaped(name)} if data.draw(st.booleans()) else {}
    with pytest.raises(InvalidRequest) as refused:
        decode_chat(render(members, style, names))
    if name in extra:  # for model or messages, a wrong type may be what is refused first
        assert refused.value.code == "duplicate_key"


def test_a_body_of_many_members_is_checked_in_one_pass() -> None:
    """Unknown members pass through to the provider, so a caller can send any number of
    them: the duplicate check compares each name once (a set past a few), not with every
    other (100,000 members would then take minutes on the loop)."""
    extra = "".join(f'"x{i}": {i}, ' for i in range(100_000))
    body = '{"model": "gpt-4o-mini", ' + extra + '"messages": [{"role": "user", "content": "x"}]}'
    assert decode_chat(body.encode()).model == "gpt-4o-mini"
    with pytest.raises(InvalidRequest) as refused:
        decode_chat((body[:-1] + ', "x99999": 0}').encode())
    assert refused.value.code == "duplicate_key"
    assert "x99999" in refused.value.message

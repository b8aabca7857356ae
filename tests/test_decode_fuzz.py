"""The request decoder under arbitrary input (hypothesis): it accepts a body or refuses it
with InvalidRequest (a 400 in OpenAI's envelope), and never raises anything else, which
the pipeline would answer with a 500."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support import auth
from tollway.errors import InvalidRequest, error_body
from tollway.pipeline.decode import decode_chat, decode_embeddings, rewrite

Decoder = Callable[[bytes], Any]
_top_level = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
DECODERS = (decode_chat, decode_embeddings)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63)
    | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": JSON | st.text(max_size=70)},
                                optional={"content": JSON, "name": JSON, "tool_calls": JSON})
# Request-shaped objects whose members hold anything: they get past the JSON parser and
# into the validation of every field.
REQUEST = st.fixed_dictionaries(
    {"model": JSON | st.text(max_size=300)},
    optional={name: JSON for name in (
        "stream", "stream_options", "max_tokens", "max_completion_tokens", "n", "temperature",
        "top_p", "tools", "tool_choice", "response_format", "user", "input",
        "encoding_format", "dimensions")} | {"messages": st.lists(MESSAGE, max_size=3) | JSON})
VALID = (b'{"model":"gpt-4o-mini","input":"hi","stream":true,"stream_options":{"x":1},'
         b'"messages":[{"role":"user","content":"caf\\u00e9"}]}')


def _encode(value: Any) -> bytes:
    # allow_nan: NaN and Infinity are not JSON, which is what a hostile client sends.
    return json.dumps(value, allow_nan=True).encode()


def _decodes_or_refuses(decode: Decoder, body: bytes) -> None:
    try:
        decode(body)
    except InvalidRequest as exc:
        status, envelope = error_body(exc)
        assert status == 400
        assert json.loads(envelope)["error"]["type"] == "invalid_request_error"
        return
    # Accepted: the gateway may rewrite it for the provider, which reads more of it.
    try:
        out = _top_level(rewrite(body, model="m", include_usage=True))
    except InvalidRequest:
        return
    assert msgspec.json.decode(out["model"]) == "m"
    assert msgspec.json.decode(out["stream_options"])["include_usage"] is True


@settings(max_examples=300)
@given(decode=st.sampled_from(DECODERS), body=st.binary(max_size=300))
def test_arbitrary_bytes(decode: Decoder, body: bytes) -> None:
    _decodes_or_refuses(decode, body)


@settings(max_examples=150)
@given(decode=st.sampled_from(DECODERS), value=REQUEST | JSON)
def test_arbitrary_json(decode: Decoder, value: Any) -> None:
    _decodes_or_refuses(decode, _encode(value))


@given(decode=st.sampled_from(DECODERS), at=st.integers(0, len(VALID)),
       junk=st.binary(min_size=1, max_size=8))
def test_a_valid_body_with_bytes_spliced_in(decode: Decoder, at: int, junk: bytes) -> None:
    """Bad UTF-8, stray bytes, a body cut short or run on."""
    _decodes_or_refuses(decode, VALID[:at] + junk + VALID[at:])
    _decodes_or_refuses(decode, VALID[:at])


@settings(max_examples=50)
@given(decode=st.sampled_from(DECODERS), depth=st.integers(0, 20_000),
       where=st.sampled_from(["content", "extra", "top"]))
def test_any_depth_of_nesting(decode: Decoder, depth: int, where: str) -> None:
    nested = "[" * depth + "]" * depth
    if where == "top":
        body = nested
    else:
        extra, content = (nested, "1") if where == "extra" else ("1", nested)
        body = (f'{{"model":"m","input":"x","extra":{extra},'
                f'"messages":[{{"role":"u","content":{content}}}]}}')
    _decodes_or_refuses(decode, body.encode())


@pytest.mark.parametrize("member", [b'"\x80x":1', b'"stream":true,"stream_options":{"\x80":1}'])
def test_bad_utf8_in_a_member_the_decoder_skips_is_a_400_when_the_body_is_rewritten(
        client: httpx.Client, member: bytes) -> None:
    """Found by the fuzzing above: the model alias (or a stream without a usage request)
    makes the gateway rewrite the body, whose reader refused the member's name, and the
    pipeline answered 500."""
    body = b'{"model":"auto",%s,"messages":[{"role":"user","content":"hi"}]}' % member
    r = client.post("/api/ai/v1/chat/completions", headers=auth(), content=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"


def test_an_output_bound_past_64_bits_is_a_400(client: httpx.Client) -> None:
    """Found by the live fuzzing (tests/openapi/test_fuzz.py): max_completion_tokens times n
    overflowed the core's estimate, and the pipeline answered 500."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 7770844741751732906, "n": 121}
    r = client.post("/api/ai/v1/chat/completions", headers=auth(), json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "max_completion_tokens"


def test_deep_nesting_is_a_400_and_the_gateway_keeps_serving(client: httpx.Client) -> None:
    """Found by the fuzzing above: msgspec raised RecursionError past ~1,000 levels, and
    the pipeline answered 500."""
    deep = b"[" * 5000 + b"]" * 5000
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":%s}]}' % deep
    r = client.post("/api/ai/v1/chat/completions", headers=auth(), content=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "nesting_too_deep"
    ok = client.post("/api/ai/v1/chat/completions", headers=auth(),
                     json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200, ok.text

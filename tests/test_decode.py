"""The request body as the provider gets it: rewritten only where the gateway must."""

from __future__ import annotations

import json

from tollway.pipeline.decode import rewrite

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

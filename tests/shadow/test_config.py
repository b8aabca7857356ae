"""``[[shadow]]`` in the config: defaults, and cross-checks naming the field at fault."""

from __future__ import annotations

from typing import Any

import pytest

from support import gateway_env
from tollway.config import ConfigError, parse_config

from .rig import raw_config


def cfg(shadow: list[dict[str, Any]]) -> Any:
    return parse_config(raw_config("http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1", shadow),
                        source="t.toml", env=gateway_env())


def test_defaults() -> None:
    (entry,) = cfg([{"route": "auto", "candidates": ["small"]}]).shadow
    assert (entry.mode, entry.fraction, entry.daily_usd, entry.max_in_flight) == (
        "shadow", 0.0, 1.0, 4)
    assert (entry.weights, entry.sticky, entry.agreement_threshold) == ([], "tenant", 0.8)
    assert cfg([]).shadow == []


@pytest.mark.parametrize(("entry", "path", "text"), [
    ({"route": "nope", "candidates": ["small"]}, "$.shadow[0].route", "neither a route"),
    ({"route": "auto", "candidates": ["ghost"]}, "$.shadow[0].candidates[0]", "not configured"),
    ({"route": "auto", "candidates": ["small", "small"]}, "$.shadow[0].candidates", "twice"),
    ({"route": "auto", "candidates": ["small"], "mode": "ab"}, "$.shadow[0].weights",
     "one weight per candidate"),
    ({"route": "auto", "candidates": ["small", "local-small"], "mode": "ab",
      "weights": [0.6, 0.5]}, "$.shadow[0].weights", "more than 1"),
    ({"route": "auto", "candidates": ["small"], "weights": [0.5]}, "$.shadow[0].weights",
     "mode = \"ab\""),
    ({"route": "auto", "candidates": ["small"], "fraction": 1.5}, "$.shadow[0].fraction",
     "<= 1.0"),
    ({"route": "auto", "candidates": ["small"], "speed": 1}, "$.shadow[0]", "speed"),
])
def test_bad_entries_name_the_field(entry: dict[str, Any], path: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg([entry])
    assert info.value.source == "t.toml"
    assert info.value.path == path
    assert text in str(info.value)


def test_a_route_has_one_table() -> None:
    with pytest.raises(ConfigError) as info:
        cfg([{"route": "auto", "candidates": ["small"]},
             {"route": "auto", "candidates": ["local-small"]}])
    assert info.value.path == "$.shadow[1].route"


def test_route_may_be_a_model_id() -> None:
    (entry,) = cfg([{"route": "big", "candidates": ["small"], "fraction": 0.1}]).shadow
    assert entry.route == "big"

"""The registry's sources: config tools checked at load, admin tools folded from events."""

from __future__ import annotations

from typing import Any

import pytest

from support import make_raw_config
from tollway.config import ConfigError, parse_config
from tollway.events.projections import directory as view_of
from tollway.events.schema import ToolChanged, ToolRemoved, ToolSettings
from tollway.tools.registry import ToolRegistry
from tollway.tools.schema import ToolSchemaError, compile_schema


class _Projection:
    def __init__(self) -> None:
        self.view = view_of.new()


def _config(tools: list[dict[str, Any]]) -> Any:
    return parse_config(make_raw_config("http://127.0.0.1:9", tools=tools), source="<test>",
                        env={"FAKE_API_KEY": "k"})


@pytest.mark.parametrize(("tools", "path"), [
    ([{"name": "a", "parameters": {"type": "array"}}], "$.tools[0].parameters"),
    ([{"name": "a", "parameters": {"type": "object", "minProperties": -1}}],
     "$.tools[0].parameters"),
    ([{"name": "a", "parameters": {"type": "object", "$schema": "https://example.com/x"}}],
     "$.tools[0].parameters"),
    ([{"name": "a"}, {"name": "a"}], "$.tools[1].name"),
    ([{"name": "a b"}], "$.tools[0].name"),
])
def test_config_tools_are_checked_at_load(tools: list[dict[str, Any]], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(tools)
    assert err.value.path == path


def test_schemas_never_reach_outside_themselves() -> None:
    local = {"type": "object", "$defs": {"n": {"type": "integer"}},
             "properties": {"$ref": {"$ref": "#/$defs/n"}}}  # a property named "$ref"
    v = compile_schema(local)
    assert v.check('{"$ref": 3}') is None and v.check('{"$ref": "x"}') is not None
    for ref in ("https://example.com/s.json", "other.json#/x", "file:///etc/passwd"):
        with pytest.raises(ToolSchemaError):
            compile_schema({"type": "object", "properties": {"a": {"$ref": ref}}})
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(5000):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(ToolSchemaError):
        compile_schema(deep)


def test_the_reason_names_the_path_and_keyword_never_the_value() -> None:
    v = compile_schema({"type": "object", "properties": {"pin": {"type": "integer"}}})
    why = v.check('{"pin": "secret-4242"}')
    assert why == "$.pin: fails `type`" and "secret" not in why
    assert v.check("[1, 2]") == "$: fails `type`"
    assert v.check('{"a": ' * 5000 + "1" + "}" * 5000) is not None  # nesting: no crash


def test_admin_tools_fold_into_the_registry_and_the_config_wins() -> None:
    registry = ToolRegistry(_config([{"name": "cfg", "description": "config's"}]))
    projection = _Projection()
    registry.projection = projection  # type: ignore[assignment]
    view = projection.view
    s1 = ToolSettings(description="v1", parameters={"type": "object"}, tenants=("acme",))
    events = [
        ToolChanged(event_id="e1", occurred_at=1.0, tool="t", settings=s1, admin="sha256:a"),
        ToolChanged(event_id="e2", occurred_at=2.0, tool="cfg", settings=s1),
    ]
    for seq, e in enumerate(events, 1):
        view_of.apply(view, seq, e)
    tools = registry.tools()
    assert set(tools) == {"cfg", "t"} and tools["cfg"].description == "config's"
    assert tools["t"].allows("acme") and not tools["t"].allows("globex")
    version = view.version
    view_of.skipped(view, 1, events[0])  # folded again: nothing changes
    assert view.version == version and registry.tools()["t"] is tools["t"]

    view_of.apply(view, 3, ToolRemoved(event_id="e3", occurred_at=3.0, tool="t"))
    assert set(registry.tools()) == {"cfg"}
    view_of.skipped(view, 3, ToolRemoved(event_id="e3", occurred_at=3.0, tool="t"))
    assert view.version == version + 1
    s2 = ToolSettings(description="v2", parameters={"type": "object"})
    view_of.apply(view, 4, ToolChanged(event_id="e4", occurred_at=4.0, tool="t", settings=s2))
    again = registry.tools()["t"]
    assert again.description == "v2" and again.allows("globex")
    assert view_of.load(view_of.dump(view)).tools == view.tools  # the checkpoint keeps them

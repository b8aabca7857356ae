"""Tool-call validation, fuzzed: hypothesis draws JSON Schemas (objects of strings, numbers,
integers, booleans, nulls, enums, arrays and objects, nested, with their bounds,
``required`` and ``additionalProperties``) and, for each, arguments that fit it and
arguments that break it in one known way (a wrong type, a bound crossed, a required
member missing, a member it does not allow, a value outside an enum, at any depth), plus
text that is not JSON at all.

Valid and invalid are known by construction, never by asking a validator, so the
property holds the gateway's checks (:mod:`tollway.tools`) to the JSON Schema
specification: every invalid argument set is flagged, and no valid one.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tollway.tools.calls import check
from tollway.tools.registry import Tool
from tollway.tools.schema import compile_schema

Strategy = st.SearchStrategy[Any]
NAMES = st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=6)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.text(max_size=6))
ANY_JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(NAMES, inner, max_size=3), max_leaves=6)


@dataclass
class Node:
    schema: dict[str, Any]
    valid: Strategy
    invalid: Strategy  # each draw breaks the schema in one known way


def _not_number() -> Strategy:
    return st.one_of(st.text(max_size=4), st.none(), st.booleans(), st.lists(SCALARS, max_size=2))


@st.composite
def string_node(draw: st.DrawFn) -> Node:
    lo = draw(st.integers(0, 4))
    hi = draw(st.none() | st.integers(lo, lo + 6))
    schema: dict[str, Any] = {"type": "string", "minLength": lo}
    if hi is not None:
        schema["maxLength"] = hi
    bad = [st.integers(-5, 5), st.none(), st.booleans(), st.lists(st.text(max_size=2), max_size=2)]
    if lo:
        bad.append(st.text(max_size=lo - 1))
    if hi is not None:
        bad.append(st.text(min_size=hi + 1, max_size=hi + 4))
    return Node(schema, st.text(min_size=lo, max_size=hi if hi is not None else lo + 8),
                st.one_of(bad))


@st.composite
def integer_node(draw: st.DrawFn) -> Node:
    lo = draw(st.integers(-100, 100))
    hi = lo + draw(st.integers(0, 50))
    bad = [st.integers(max_value=lo - 1, min_value=lo - 1000),
           st.integers(min_value=hi + 1, max_value=hi + 1000),
           st.just(lo + 0.5), _not_number()]
    return Node({"type": "integer", "minimum": lo, "maximum": hi}, st.integers(lo, hi),
                st.one_of(bad))


@st.composite
def number_node(draw: st.DrawFn) -> Node:
    lo = draw(st.integers(-100, 100))
    hi = lo + draw(st.integers(0, 50))
    valid = st.floats(lo, hi, allow_nan=False) | st.integers(lo, hi)
    bad = [st.floats(lo - 1000, lo - 0.25), st.floats(hi + 0.25, hi + 1000), _not_number()]
    return Node({"type": "number", "minimum": lo, "maximum": hi}, valid, st.one_of(bad))


def boolean_node() -> Strategy:
    return st.just(Node({"type": "boolean"}, st.booleans(),
                        st.one_of(st.integers(0, 1), st.text(max_size=4), st.none())))


def null_node() -> Strategy:
    return st.just(Node({"type": "null"}, st.none(),
                        st.one_of(st.integers(), st.text(max_size=3), st.booleans())))


@st.composite
def enum_node(draw: st.DrawFn) -> Node:
    values = draw(st.lists(st.text(max_size=4) | st.integers(-5, 5), min_size=1, max_size=4,
                           unique=True))
    outside = (st.text(max_size=4) | st.integers(-10, 10)).filter(lambda v: v not in values)
    return Node({"enum": values}, st.sampled_from(values), outside | st.none())


@st.composite
def array_node(draw: st.DrawFn, depth: int) -> Node:
    item: Node = draw(nodes(depth + 1))
    lo = draw(st.integers(0, 2))
    hi = draw(st.none() | st.integers(max(lo, 1), lo + 3))
    schema: dict[str, Any] = {"type": "array", "items": item.schema, "minItems": lo}
    if hi is not None:
        schema["maxItems"] = hi
    top = hi if hi is not None else lo + 3
    valid = st.lists(item.valid, min_size=lo, max_size=top)

    @st.composite
    def bad_item(draw: st.DrawFn) -> list[Any]:
        items = draw(st.lists(item.valid, min_size=max(lo, 1), max_size=top))
        items[draw(st.integers(0, len(items) - 1))] = draw(item.invalid)
        return items

    bad = [bad_item(), st.text(max_size=3), st.integers(), st.dictionaries(NAMES, SCALARS,
                                                                           max_size=2)]
    if lo:
        bad.append(st.lists(item.valid, max_size=lo - 1))
    if hi is not None:
        bad.append(st.lists(item.valid, min_size=hi + 1, max_size=hi + 3))
    return Node(schema, valid, st.one_of(bad))


@st.composite
def object_node(draw: st.DrawFn, depth: int) -> Node:
    props: dict[str, Node] = draw(st.dictionaries(NAMES, nodes(depth + 1), max_size=4))
    required = sorted(draw(st.sets(st.sampled_from(sorted(props)))) if props else set())
    closed = draw(st.booleans())
    schema: dict[str, Any] = {"type": "object",
                              "properties": {k: n.schema for k, n in props.items()}}
    if required:
        schema["required"] = required
    if closed:
        schema["additionalProperties"] = False
    valid_fixed = st.fixed_dictionaries(
        {k: props[k].valid for k in required},
        optional={k: n.valid for k, n in props.items() if k not in required})
    if closed:
        valid = valid_fixed
    else:
        extra = st.dictionaries(NAMES.filter(lambda k: k not in props), ANY_JSON, max_size=2)
        valid = st.builds(lambda a, b: {**b, **a}, valid_fixed, extra)

    @st.composite
    def missing(draw: st.DrawFn) -> dict[str, Any]:
        value: dict[str, Any] = draw(valid)
        del value[draw(st.sampled_from(required))]
        return value

    @st.composite
    def bad_member(draw: st.DrawFn) -> dict[str, Any]:
        value: dict[str, Any] = draw(valid)
        name = draw(st.sampled_from(sorted(props)))
        value[name] = draw(props[name].invalid)
        return value

    @st.composite
    def unknown_member(draw: st.DrawFn) -> dict[str, Any]:
        value: dict[str, Any] = draw(valid)
        value[draw(NAMES.filter(lambda k: k not in props))] = draw(SCALARS)
        return value

    bad = [st.lists(SCALARS, max_size=2), st.text(max_size=3), st.integers(), st.none()]
    if required:
        bad.append(missing())
    if props:
        bad.append(bad_member())
    if closed:
        bad.append(unknown_member())
    return Node(schema, valid, st.one_of(bad))


def nodes(depth: int = 0) -> Strategy:
    leaves = [string_node(), integer_node(), number_node(), boolean_node(), null_node(),
              enum_node()]
    if depth >= 3:
        return st.one_of(leaves)
    return st.one_of(*leaves, array_node(depth), object_node(depth))


NOT_JSON = st.sampled_from(["", "{", "{'city': 'x'}", "nope", '{"a": 1,}', "NaN", "[1, 2"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_invalid_argument_set_is_flagged_and_no_valid_one(data: st.DataObject) -> None:
    root: Node = data.draw(object_node(0), label="schema")
    validator = compile_schema(root.schema)  # every drawn schema is a usable one
    valid = data.draw(st.lists(root.valid, min_size=1, max_size=3), label="valid")
    invalid = data.draw(st.lists(root.invalid, min_size=1, max_size=3), label="invalid")
    for value in valid:
        assert validator.check(json.dumps(value)) is None, value
    for value in invalid:
        assert validator.check(json.dumps(value)) is not None, value
    assert validator.check(data.draw(NOT_JSON)) is not None

    # The same through the registry's check of a reply's calls, in a shuffled order, with
    # calls to a tool that is not the registry's (not checked, not counted) among them.
    tool = Tool("t", "", root.schema, None, "config")
    calls = [("t", json.dumps(v)) for v in valid] + [("t", json.dumps(v)) for v in invalid]
    calls.append(("own_tool", "not json"))
    order = data.draw(st.permutations(range(len(calls))))
    shuffled = [calls[i] for i in order]
    called, flagged, why = check({"t": tool}, shuffled)
    assert called == ("t",) * (len(valid) + len(invalid))
    assert len(flagged) == len(invalid) and why.startswith("t: ")

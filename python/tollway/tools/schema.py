"""A registry tool's JSON Schema: checked once when the tool is registered, compiled once,
and used to check the arguments of every call a reply makes to the tool.

The schema is a JSON Schema (Draft 2020-12 unless its ``$schema`` names another draft
jsonschema knows) of ``"type": "object"``, as OpenAI's function ``parameters`` are. Its
references stay inside it (``$ref`` starting with ``#``): the gateway never fetches a
schema from anywhere (the validator gets an empty registry, so nothing is retrieved
even if a check were missed). ``format`` is an annotation, not checked, as the
specification's default has it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
from jsonschema import validators
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from jsonschema.protocols import Validator
from referencing import Registry

__all__ = ["MAX_SCHEMA_BYTES", "ToolSchemaError", "ToolValidator", "compile_schema"]

MAX_SCHEMA_BYTES = 64 * 1024
_DRAFTS = {
    "https://json-schema.org/draft/2020-12/schema",
    "https://json-schema.org/draft/2019-09/schema",
    "http://json-schema.org/draft-07/schema",
    "http://json-schema.org/draft-06/schema",
    "http://json-schema.org/draft-04/schema",
}
_decode = msgspec.json.decode
_encode = msgspec.json.encode


class ToolSchemaError(ValueError):
    """A tool's parameters are not a usable JSON Schema (the message says why)."""


class ToolValidator:
    """One tool's compiled schema."""

    __slots__ = ("_validator",)

    def __init__(self, validator: Validator) -> None:
        self._validator = validator

    def check(self, arguments: str | None) -> str | None:
        """None when ``arguments`` (the JSON text a model wrote) fit the schema, else why
        not: a JSON path and the schema keyword it broke (never the value, which is the
        model's output and may hold anything)."""
        if arguments is None:
            return "no arguments"
        try:
            value = _decode(arguments)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            return "arguments are not JSON"
        try:
            if self._validator.is_valid(value):
                return None
            error = best_match(self._validator.iter_errors(value))
        except RecursionError:
            return "arguments nest too deeply"
        return _why(error)


def _why(error: ValidationError | None) -> str:
    if error is None:  # is_valid said no, so there is one; belt and braces
        return "arguments do not fit the schema"
    path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                         for p in error.absolute_path)
    return f"{path}: fails `{error.validator}`"[:200]


def compile_schema(schema: Any) -> ToolValidator:
    """The validator of a tool's ``parameters``; raises :class:`ToolSchemaError`."""
    try:
        return _compile(schema)
    except RecursionError:
        raise ToolSchemaError("parameters nest too deeply") from None


def _compile(schema: Any) -> ToolValidator:
    if not isinstance(schema, dict):
        raise ToolSchemaError("parameters must be a JSON Schema object")
    if schema.get("type") != "object":
        raise ToolSchemaError('parameters must be a schema of "type": "object" (the '
                              "arguments of a tool call are a JSON object)")
    if len(_encode(schema)) > MAX_SCHEMA_BYTES:
        raise ToolSchemaError(f"parameters take more than {MAX_SCHEMA_BYTES} bytes as JSON")
    declared = schema.get("$schema")
    if declared is not None and str(declared).rstrip("#") not in _DRAFTS:
        raise ToolSchemaError(f"$schema {declared!r} is not a JSON Schema draft the gateway "
                              "knows (2020-12, 2019-09, 7, 6, 4)")
    for ref in _refs(schema):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ToolSchemaError(f"$ref {ref!r} leaves the schema: only references inside "
                                  "it (#/$defs/...) are followed")
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise ToolSchemaError(f"not a valid JSON Schema at parameters{where}: "
                              f"{exc.message[:200]}") from None
    return ToolValidator(cls(schema, registry=Registry()))


# Keywords whose value maps names (a property may be called "$ref") to schemas.
_NAMED = frozenset({"properties", "patternProperties", "$defs", "definitions",
                    "dependentSchemas"})

_DATA = frozenset({"enum", "const", "default", "examples"})  # values, not schemas


def _refs(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef", "$recursiveRef"):
                yield value
            elif key in _DATA:
                continue
            elif key in _NAMED and isinstance(value, dict):
                for sub in value.values():
                    yield from _refs(sub)
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)

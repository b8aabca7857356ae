"""The OpenAPI 3.1 document, built from :data:`OPERATIONS` and the structs it names.

Schemas come from ``msgspec.json.schema_components`` (JSON Schema 2020-12,
which OpenAPI 3.1 uses as is), with descriptions dedented as the event
schemas are, so the document is the same whichever msgspec renders it.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from tollway._version import __version__
from tollway.errors import ERROR_TABLE, ErrorEnvelope
from tollway.openapi.operations import OPERATIONS, Access, Operation, Param, Reply

_REF = "#/components/schemas/{name}"

# Security requirement of each kind of access (alternatives: any one of them).
_SECURITY: dict[Access, list[dict[str, list[str]]]] = {
    "public": [],
    "tenant": [{"apiKey": []}],
    "key": [{"apiKey": []}, {"adminKey": []}],
    "admin": [{"adminKey": []}],
}

_ERRORS = {
    400: "invalid request (bad JSON, wrong types, a bad hint header) or a call over the "
         "tier's per-call cost cap",
    401: "missing, unknown, revoked or expired API key, or a key in the URL's query string",
    403: "a valid key that may not do this: the admin key on a tenant route, a tenant key "
         "on an admin route, a model or data sensitivity the policy forbids",
    404: "no such model, route alias or resource",
    409: "an admin change that conflicts with what exists (the tenant exists, it is the "
         "config file's, the key is no longer active)",
    413: "request body larger than `[server] max_body_bytes`",
    429: "the tenant's rate limit (`rate_limit_exceeded`, with `Retry-After`) or daily "
         "budget (`insufficient_quota`), or too many failed admin sign-ins",
    502: "the provider failed or sent an unreadable reply",
    503: "nothing can serve the call now (breakers open, provider rate-limited; "
         "`Retry-After` when known), or a part of the gateway is not ready",
    504: "the provider did not answer in time",
}

_DESCRIPTION = """\
tollway is an OpenAI-compatible AI gateway. Send the API key as
`Authorization: Bearer <key>`: a tenant key for the OpenAI routes and the
caller's own usage and budget, the admin key for the admin routes. Health,
readiness, metrics and this document are public: they tell nothing about
tenants, keys or traffic that the source does not. A key in a URL's query
string is refused on every path (401 `key_in_query`). Every error is OpenAI's
envelope `{"error": {"message", "type", "param", "code"}}`; every answer
carries `X-Request-ID`. Every GET also answers HEAD (headers only). Money is
in nano-USD (integers), with USD alongside for reading."""



def _header(description: str, type_: str, required: bool = False) -> dict[str, Any]:
    return {"description": description, "schema": {"type": type_}, "required": required}


# On every answer of the app.
_COMMON = {
    "X-Request-ID": _header("the request's id (the caller's, when it sent one)", "string",
                            required=True),
    "X-Tollway-Overhead-Ms": _header("time spent in the gateway itself", "number",
                                     required=True),
}
# On an answer a provider served.
_SERVED = {
    **_COMMON,
    "X-Tollway-Provider": _header("the provider that served the call", "string", True),
    "X-Tollway-Model": _header("the model that served it (a route alias resolved)",
                               "string", True),
    "X-Tollway-Cost-USD": _header("what the call cost (not on a stream: its cost is known "
                                  "only at its end, in the call event)", "string"),
    "X-Tollway-Max-Tokens": _header("the output bound the gateway asked the provider for "
                                    "(tokens per choice), when the cap or the budget could "
                                    "not pay the request's own", "integer"),
    "X-Tollway-Tool-Arguments": _header("`valid` or `invalid`: whether the reply's calls to "
                                        "registry tools have arguments their JSON Schemas "
                                        "allow (only when it made some)", "string"),
    "X-Tollway-Tool-Invalid": _header("the registry tools whose calls had invalid "
                                      "arguments, comma-separated", "string"),
    **{f"x-ratelimit-{what}-{unit}": _header(text, kind) for unit in ("requests", "tokens")
       for what, text, kind in (("limit", "the tightest limit's size", "integer"),
                                ("remaining", "calls (tokens) left in it", "integer"),
                                ("reset", "when it refills, e.g. `6s`", "string"))},
}
_RETRY = {**_COMMON, "Retry-After": _header("when to try again: seconds (or an HTTP date passed on "
                                             "from a provider)", "string")}


def _canonical(node: object) -> object:
    """``node`` with what msgspec renders differently from version to version made one way:
    descriptions dedented (a docstring is kept as written up to 0.19, dedented from 0.20
    on) and the alternatives of an ``anyOf`` in one order (0.18 puts ``null`` first)."""
    if isinstance(node, dict):
        out = {k: inspect.cleandoc(v) if k == "description" and isinstance(v, str)
               else _canonical(v) for k, v in node.items()}
        alternatives = out.get("anyOf")
        if isinstance(alternatives, list):
            out["anyOf"] = sorted(alternatives, key=lambda v: json.dumps(v, sort_keys=True))
        return out
    if isinstance(node, list):
        return [_canonical(v) for v in node]
    return node


def _error(status: int, envelope: dict[str, Any]) -> dict[str, Any]:
    """The shared response of one error status; its codes are read from the error table."""
    codes = sorted({s.code for s in ERROR_TABLE.values() if s.status == status and s.code})
    listed = f" `error.code` is one of {', '.join(f'`{c}`' for c in codes)} or another." \
        if codes else ""
    return {"description": _ERRORS[status] + "." + listed,
            "headers": _RETRY if status in (429, 503) else _COMMON,
            "content": {"application/json": {"schema": envelope}}}


def _shape(op: Operation) -> str:
    """The name of the shared error responses of ``op``: ``Error`` (OpenAI's envelope) or
    its own error body's (Anthropic's on the Messages API)."""
    return "Error" if op.error_body is None else op.error_body.__name__


def _param(p: Param) -> dict[str, Any]:
    return {"name": p.name, "in": p.where, "description": p.description,
            "required": p.required or p.where == "path", "schema": p.schema}


def _event(data: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event (the schema covers each event, as OpenAPI 3.2's `itemSchema`
    does): its `data` is the JSON of ``data``, an error envelope that ends a stream the
    provider broke, or the `[DONE]` that ends a whole one."""
    payload = {"type": "string", "contentMediaType": "application/json",
               "contentSchema": {"anyOf": [data, error]}}
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]},
                           "event": {"type": "string"}, "id": {"type": "string"}}}


def _reply(reply: Reply, refs: dict[type, dict[str, Any]],
           error: type = ErrorEnvelope) -> dict[str, Any]:
    schema = refs[reply.body] if reply.body is not None else {"type": "string"}
    if reply.also is not None:
        schema = {"anyOf": [schema, refs[reply.also]]}
    if reply.body is None and reply.media == "application/json":
        schema = {"type": "object"}
    content: dict[str, Any] = {reply.media: {"schema": schema}}
    if reply.events is not None:
        content["text/event-stream"] = {"schema": _event(refs[reply.events], refs[error])}
    return {"description": reply.description, "headers": _SERVED if reply.served else _COMMON,
            "content": content}


def _operation(op: Operation, refs: dict[type, dict[str, Any]]) -> dict[str, Any]:
    error = op.error_body or ErrorEnvelope
    responses: dict[str, Any] = {str(r.status): _reply(r, refs, error) for r in op.replies}
    for status in op.errors:
        responses[str(status)] = {"$ref": f"#/components/responses/{_shape(op)}{status}"}
    out: dict[str, Any] = {
        "operationId": f"{op.method}_{op.path.removeprefix('/api/ai/')}".replace("/", "_")
        .replace("{", "").replace("}", "").replace(".", "_"),
        "summary": op.summary,
        "tags": [op.tag],
        "security": _SECURITY[op.access],
        "responses": responses,
    }
    if op.params:
        out["parameters"] = [_param(p) for p in op.params]
    if op.request is not None:
        out["requestBody"] = {"required": True,
                              "content": {"application/json": {"schema": refs[op.request]}}}
    return out


def _structs(ops: Iterable[Operation]) -> list[type]:
    seen: dict[type, None] = {ErrorEnvelope: None}
    for op in ops:
        for t in (op.request, op.error_body, *(r.body for r in op.replies),
                  *(r.also for r in op.replies),
                  *(r.events for r in op.replies)):
            if t is not None:
                seen[t] = None
    return list(seen)


def build(ops: tuple[Operation, ...] = OPERATIONS) -> dict[str, Any]:
    """The document as a JSON-ready dict."""
    types = _structs(ops)
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    refs = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method] = _operation(op, refs)
    shapes = {_shape(op): op.error_body or ErrorEnvelope for op in ops}
    statuses = {name: sorted({s for op in ops if _shape(op) == name for s in op.errors})
                for name in shapes}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "tollway", "version": __version__, "description": _DESCRIPTION,
                 "license": {"name": "MIT", "identifier": "MIT"}},
        "security": _SECURITY["tenant"],
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": {f"{name}{s}": _error(s, refs[shapes[name]])
                          for name in sorted(shapes) for s in statuses[name]},
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "a tenant's API key (`tollway keys create`)"},
                "adminKey": {"type": "http", "scheme": "bearer",
                             "description": "the admin key (`[server] admin_key_env`)"},
            },
        },
    }
    cleaned = _canonical(doc)
    assert isinstance(cleaned, dict)
    return cleaned


def encoded(ops: tuple[Operation, ...] = OPERATIONS) -> bytes:
    """The document as served: sorted keys, so its bytes change only when it does."""
    return json.dumps(build(ops), sort_keys=True, separators=(",", ":")).encode()


def pretty() -> str:
    """The document as committed in docs/openapi.json, for people and diffs."""
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


DEFAULT_PATH = Path(__file__).resolve().parents[3] / "docs" / "openapi.json"


def main(argv: list[str] | None = None) -> int:
    """``python -m tollway.openapi [PATH]``: write the document (after changing a struct or
    an operation; a test fails while the committed file differs)."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else DEFAULT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(pretty(), encoding="utf-8")
    print(f"wrote {path}")
    return 0


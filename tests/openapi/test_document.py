"""The OpenAPI document: every route the app serves is in it, it is valid OpenAPI 3.1, it
is served without a key, and what it says of access is what the auth middleware does."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator
from starlette.routing import BaseRoute, Route

from support import gateway_env, make_config
from tollway.app import create_app
from tollway.auth import ADMIN_PREFIXES, PUBLIC_PATHS
from tollway.openapi.document import build, pretty
from tollway.openapi.operations import OPERATIONS

# The repository's copy (not tollway.openapi.document.DEFAULT_PATH, which is found from the
# package's own location: inside site-packages when the suite runs against the wheel).
COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"

# Starlette answers HEAD on every GET route by itself; the document says so once.
_IMPLICIT = {"HEAD"}


def _served(routes: list[BaseRoute]) -> set[tuple[str, str]]:
    out = set()
    for route in routes:
        # A Mount or another kind of route would serve paths this walk cannot list: document
        # it and teach this walk about it.
        assert isinstance(route, Route), f"not a plain Route: {route!r}"
        for method in (route.methods or set()) - _IMPLICIT:
            out.add((method.lower(), route.path))
    return out


def test_every_route_the_app_serves_is_documented_and_nothing_else() -> None:
    app = create_app(make_config("http://127.0.0.1:9/v1"), env=gateway_env())
    served = _served(app.routes)
    doc = build()
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert served - documented == set(), "routes missing from the OpenAPI document"
    assert documented - served == set(), "documented operations the app does not serve"


def test_a_route_missing_from_the_document_is_caught() -> None:
    app = create_app(make_config("http://127.0.0.1:9/v1"), env=gateway_env())
    doc = build(tuple(op for op in OPERATIONS if op.path != "/api/ai/budget"))
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert _served(app.routes) - documented == {("get", "/api/ai/budget")}


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = build()
    assert doc["openapi"].startswith("3.1.")
    errors = [e.message for e in OpenAPIV31SpecValidator(doc).iter_errors()]
    assert errors == []


def test_a_broken_document_is_refused_by_the_validator() -> None:
    doc = build()
    doc["paths"]["/api/ai/health"]["get"]["responses"]["200"].pop("description")
    assert list(OpenAPIV31SpecValidator(doc).iter_errors())


def test_access_in_the_document_is_what_auth_enforces() -> None:
    public = {op.path for op in OPERATIONS if op.access == "public"}
    assert public == set(PUBLIC_PATHS)
    for op in OPERATIONS:
        assert (op.access == "admin") == op.path.startswith(ADMIN_PREFIXES), op.path
    doc = build()
    for op in OPERATIONS:
        security = doc["paths"][op.path][op.method]["security"]
        assert (security == []) == (op.access == "public")
        assert ({"adminKey": []} in security) == (op.access in ("admin", "key"))


def test_every_error_status_answers_the_openai_envelope() -> None:
    """... but on Anthropic's Messages API, where its clients read Anthropic's shape."""
    doc = build()
    envelope = {"$ref": "#/components/schemas/ErrorEnvelope"}
    anthropic = {"$ref": "#/components/schemas/AnthropicError"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, resp in op["responses"].items():
                if int(status) < 400 or (path, status) == ("/api/ai/ready", "503"):
                    continue
                name = resp["$ref"].rsplit("/", 1)[1]
                body = doc["components"]["responses"][name]["content"]["application/json"]
                shape = anthropic if path.startswith("/api/ai/v1/messages") else envelope
                assert body["schema"] == shape, (method, path, status)
    error = doc["components"]["schemas"]["AnthropicError"]
    assert set(error["required"]) == {"type", "error"}
    detail = doc["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}


def _descriptions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "description" and isinstance(v, str):
                yield v
            else:
                yield from _descriptions(v)
    elif isinstance(node, list):
        for v in node:
            yield from _descriptions(v)


def _any_ofs(node: Any) -> Iterator[list[Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("anyOf"), list):
            yield node["anyOf"]
        for v in node.values():
            yield from _any_ofs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _any_ofs(v)


def test_what_msgspec_versions_render_differently_is_rendered_one_way() -> None:
    # Up to 0.19 msgspec keeps a docstring's indentation (from 0.20 on it dedents it), and
    # 0.18 puts the null of `X | None` first.
    doc = build()
    found = list(_descriptions(doc))
    assert any("\n" in d for d in found)  # multi-line docstrings are in it
    assert [d for d in found if d != inspect.cleandoc(d)] == []
    orders = list(_any_ofs(doc))
    assert any({"type": "null"} in alternatives for alternatives in orders)
    assert [a for a in orders if a != sorted(a, key=lambda v: json.dumps(v, sort_keys=True))
            ] == []


def test_the_committed_document_is_the_one_the_code_builds() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == pretty(), (
        "docs/openapi.json is stale: run python -m tollway.openapi")


@pytest.mark.parametrize("key", [None, "tw-not-a-key"])
def test_served_without_a_key_as_built(client: httpx.Client, key: str | None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = client.get("/api/ai/openapi.json", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == build()

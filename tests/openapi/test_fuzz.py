"""Property-based fuzzing of a live gateway against its own OpenAPI document (schemathesis).

A real gateway (uvicorn on loopback, the embedded nats-server, the fake upstream) is
called with requests generated from the document: valid ones (with a configured model
in about half of the calls, so they reach the provider) and invalid ones. Every answer
must be below 500 and conform to the document: a documented status, its content type,
its schema and its headers. The keys are valid (each operation's own kind), so the
requests reach the handlers rather than stop at the auth middleware.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from support import (
    ACME_KEY,
    ADMIN_KEY,
    UPSTREAM_KEY,
    Server,
    auth,
    gateway_env,
    make_config,
    make_raw_config,
    mounted,
    unlimited_acme,
)
from tollway.app import create_app
from tollway.openapi.document import build
from tollway.openapi.operations import OPERATIONS, Operation
from tollway.testing.upstream import FakeUpstream

# Per operation and generation mode: about 30 s for the module on a shared two-core
# machine. TOLLWAY_FUZZ_EXAMPLES=500 fuzzes longer, e.g. after changing the decoder.
EXAMPLES = int(os.environ.get("TOLLWAY_FUZZ_EXAMPLES", "40"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]


class Live:
    def __init__(self, server: Server, upstream: FakeUpstream) -> None:
        self.url = server.url
        self.upstream = upstream
        self.session = requests.Session()
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.made: dict[str, str] = {}


def _directory_entries(live: Live) -> dict[str, str]:
    """A run-time tenant and two keys the admin operations' paths can name."""
    def post(path: str, body: dict[str, Any]) -> Any:
        r = live.session.post(live.url + path, json=body, headers=auth(ADMIN_KEY), timeout=30)
        assert r.status_code == 201, r.text
        return r.json()

    post("/api/ai/admin/tenants", {"id": "fuzzed"})
    flag = live.session.put(live.url + "/api/ai/admin/flags/fuzzflag", headers=auth(ADMIN_KEY),
                            json={"route": "auto", "candidates": ["gpt-4o-mini"]}, timeout=30)
    assert flag.status_code == 200, flag.text
    tool = live.session.put(live.url + "/api/ai/admin/tools/fuzztool", headers=auth(ADMIN_KEY),
                            json={"parameters": {"type": "object"}}, timeout=30)
    assert tool.status_code == 200, tool.text
    return {"tenant": "fuzzed", "flag": "fuzzflag", "tool": "fuzztool",
            "revoke": post("/api/ai/admin/keys", {"tenant": "acme"})["id"],
            "rotate": post("/api/ai/admin/keys", {"tenant": "acme"})["id"]}


def _with_a_reranker(base_url: str) -> dict[str, Any]:
    """providers= and models= with a local provider (the same fake) serving a reranker:
    rerank goes to local providers only."""
    raw = make_raw_config(base_url)
    return {"providers": [*raw["providers"],
                          {**raw["providers"][0], "name": "lab", "local": True}],
            "models": [*raw["models"], {"id": "reranker", "provider": "lab", "kind": "rerank"}]}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    data = Path(tmp_path_factory.mktemp("fuzz")) / "data"
    with FakeUpstream(api_key=UPSTREAM_KEY) as up:
        cfg = make_config(
            up.base_url, nats={"url": "embedded", "data_dir": str(data)},
            **_with_a_reranker(up.base_url),
            tenants=unlimited_acme(tier="premium", daily_usd=10**6),
            # negative cases send broken keys: the admin paths must not lock the fuzzer out
            server={"builtin_providers": False, "builtin_models": False,
                    "admin_sign_in_failures_per_minute": 10**6})
        with Server(create_app(cfg, env=gateway_env())) as server:
            it = Live(server, up)
            it.made = _directory_entries(it)
            try:
                yield it
            finally:
                it.session.close()


SCHEMA = schemathesis.openapi.from_dict(build())


def _operation(op: Operation) -> Any:
    for result in SCHEMA.get_all_operations():
        found = result.ok()
        if found.method.lower() == op.method and found.path == op.path:
            return found
    raise LookupError(op.path)


def _keys(op: Operation) -> st.SearchStrategy[dict[str, str]]:
    if op.access == "public":
        return st.just({})
    if op.access == "admin":
        return st.just(auth(ADMIN_KEY))
    if op.access == "tenant":
        return st.just(auth(ACME_KEY))
    return st.sampled_from([auth(ACME_KEY), auth(ADMIN_KEY)])


_INTEGERS = ("n", "best_of", "top_k", "max_tokens", "max_completion_tokens", "dimensions",
             "max_output_tokens")


def _use_known_names(case: Any, stream: bool, made: dict[str, str]) -> None:
    """What the config allows, where the document can only say "a string" (a model, a
    provider, a tier, data the remote provider may see, a tenant or key that exists), so
    that valid calls reach the provider or the directory rather than end in a refusal;
    chat calls streamed or not, half and half."""
    body = case.body
    embed = case.path.endswith("/embeddings")
    rerank = case.path.endswith("/rerank")
    if case.path.startswith("/api/ai/admin/"):
        _known_admin_names(case, made)
    elif isinstance(body, dict):
        body["model"] = ("text-embedding-3-small" if embed else "reranker" if rerank
                         else "gpt-4o-mini")
        if not (embed or rerank):
            body["stream"] = stream
        if case.path.endswith("/responses"):  # the state tollway keeps none of
            body.pop("previous_response_id", None)
            body["store"] = False
        if "prompt" in body and not (body["prompt"] and isinstance(body["prompt"], str)):
            body["prompt"] = "hello"  # as `input`: the schema says "any array"
        if "input" in body and not (body["input"] and isinstance(body["input"], str)):
            body["input"] = "hello"  # the schema says "any array"; the gateway wants texts
        if case.path.endswith(("/messages", "/messages/count_tokens")) \
                and isinstance(body.get("messages"), list):
            for m in body["messages"]:  # the schema says "any blocks"; they must say something
                if isinstance(m, dict) and isinstance(m.get("content"), list):
                    m["content"] = "hello"
        if rerank and isinstance(body.get("top_n"), float):
            body["top_n"] = 2
        for name in _INTEGERS:  # JSON Schema counts 8.0 as an integer; msgspec does not
            if isinstance(body.get(name), float):
                body[name] = 8
    if case.path_parameters and "name" in case.path_parameters and "/admin/" not in case.path:
        case.path_parameters["name"] = "fake"
    headers = case.headers or {}
    for name, value in headers.items():
        if not _plain(value):  # what older HTTP parsers refuse (see below)
            headers[name] = "x"
    for name, value in (("X-Tollway-Budget-Tier", "standard"),
                        ("X-Tollway-Sensitivity", "internal")):
        if name in headers:
            headers[name] = value


def _known_admin_names(case: Any, made: dict[str, str]) -> None:
    body = case.body
    if isinstance(body, dict):
        if "tier" in body:
            body["tier"] = "standard"
        for name in ("models", "expires_at"):
            body.pop(name, None)
        if "tenant" in body:
            body["tenant"] = "acme"
        if "overlap_s" in body:
            body["overlap_s"] = 3600.0
        if case.path.startswith("/api/ai/admin/flags/"):  # a route flag that fits
            body.update(kind="route", route="auto", candidates=["gpt-4o-mini"])
            body.pop("tenants", None)
            body.pop("max_call_usd", None)
        if case.path.startswith("/api/ai/admin/tools/"):  # a schema the registry takes
            body["parameters"] = {"type": "object"}
            body.pop("tenants", None)
    params = case.path_parameters
    if params and "name" in params:
        params["name"] = made["tool" if "/tools/" in case.path else "flag"]
    if params and "id" in params:
        if case.path.startswith("/api/ai/admin/tenants/"):
            params["id"] = made["tenant"]
        else:
            params["id"] = made["rotate" if case.path.endswith("/rotate") else "revoke"]


def _plain(value: object) -> bool:
    return all(c == "\t" or " " <= c <= "~" for c in str(value))


def _refused_by_the_http_parser(case: Any, response: requests.Response) -> bool:
    """A header value with bytes outside visible ASCII is refused by the older httptools
    and schemathesis of the lowest versions the bounds allow, as a malformed message,
    before the app sees it: a 400 that is not the API's, so the document does not
    describe it."""
    if "x-request-id" in response.headers:
        return False  # the app answered
    assert not all(_plain(v) for v in (case.headers or {}).values()), response.text
    assert response.status_code == 400, response.text
    return True


POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
# Invalid requests only where there is something to get wrong: a body, or parameters other
# than a path's (any string names a provider, and an unknown one is a 404 like any path).
CASES = [pytest.param(op, mode, id=f"{op.method} {op.path} {mode}") for op in OPERATIONS
         for mode in (POSITIVE, NEGATIVE) if mode == POSITIVE or op.request
         or any(p.where != "path" for p in op.params)]


@pytest.mark.parametrize(("op", "mode"), CASES)
def test_every_answer_conforms_and_none_is_a_5xx(
        live: Live, op: Operation, mode: schemathesis.GenerationMode) -> None:
    _fuzz(live, op, mode, EXAMPLES)


@pytest.fixture(scope="module")
def mounted_live() -> Iterator[Live]:
    """A gateway mounted under a prefix in a host FastAPI app (events off: the OpenAI
    routes' conformance, not the event stream's, is what the prefix could change)."""
    with FakeUpstream(api_key=UPSTREAM_KEY) as up:
        cfg = make_config(up.base_url, **_with_a_reranker(up.base_url),
                          tenants=unlimited_acme(tier="premium", daily_usd=10**6))
        with mounted(create_app(cfg, env=gateway_env()), "fastapi") as server:
            it = Live(server, up)
            try:
                yield it
            finally:
                it.session.close()


@pytest.mark.parametrize("op", [pytest.param(op, id=f"{op.method} {op.path}")
                                for op in OPERATIONS if op.path.startswith("/api/ai/v1/")])
def test_the_openai_routes_conform_through_a_mount_prefix(mounted_live: Live,
                                                          op: Operation) -> None:
    # Fewer examples: each with the known names, so that every one reaches the handler.
    _fuzz(mounted_live, op, POSITIVE, max(5, EXAMPLES // 4), known=st.just(True))


def _fuzz(live: Live, op: Operation, mode: schemathesis.GenerationMode, examples: int,
          known: st.SearchStrategy[bool] | None = None) -> None:
    strategy = _operation(op).as_strategy(generation_mode=mode)
    key = f"{op.method} {op.path} {mode}"

    def run(known: st.SearchStrategy[bool], examples: int) -> None:
        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy, keys=_keys(op), known=known, stream=st.booleans())
        def check(case: Any, keys: dict[str, str], known: bool, stream: bool) -> None:
            if known and mode.is_positive:
                _use_known_names(case, stream, live.made)
            response = case.call(base_url=live.url, session=live.session, headers=keys)
            live.statuses[(key, response.status_code)] += 1
            if _refused_by_the_http_parser(case, response):
                return
            case.validate_response(response, checks=CHECKS, headers=keys)

        check()

    if known is not None or not mode.is_positive:
        run(st.booleans() if known is None else known, examples)
    else:  # a drawn half may hold no known names at all (Hypothesis drew 3 of 40 once)
        sure = max(2, examples // 8)
        run(st.booleans(), examples - sure)
        run(st.just(True), sure)
    if mode == POSITIVE:  # the fuzzing reached the handler, not only its refusals
        assert sum(n for (label, status), n in live.statuses.items()
                   if label == key and 200 <= status < 300), live.statuses

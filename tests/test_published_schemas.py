"""Every body and event tollway writes on the OpenAI surfaces it translates or completes,
validated against OpenAI's published OpenAPI document: the Responses API (a response,
every typed stream event, whole, incomplete, with tools, broken off) and legacy
completions' replies.

tests/fixtures/openai-schemas.json holds the schemas of openai-openapi.yaml that
Response, ResponseStreamEvent and CreateCompletionResponse reach (refs as #/$defs)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from support import auth
from tollway.testing.upstream import FakeUpstream, Fault

FIXTURE = Path(__file__).parent / "fixtures" / "openai-schemas.json"
TOOLS = [{"type": "function", "name": "lookup",
          "parameters": {"type": "object", "properties": {"q": {"type": "string"}},
                         "required": ["q"]}}]


@functools.cache
def defs() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(FIXTURE.read_text("utf-8"))["$defs"]
    return loaded


@functools.cache
def event_schemas() -> dict[str, str]:
    """Event type -> the name of its schema."""
    out: dict[str, str] = {}
    for name, schema in defs().items():
        kind = schema.get("properties", {}).get("type", {}) if isinstance(schema, dict) else {}
        if name.endswith("Event") and isinstance(kind, dict) and len(kind.get("enum", [])) == 1:
            out.setdefault(kind["enum"][0], name)
    return out


def errors(name: str, instance: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator({"$defs": defs(), "$ref": f"#/$defs/{name}"})
    return [f"{list(e.path)}: {e.message[:300]}" for e in validator.iter_errors(instance)]


def events(body: bytes) -> list[dict[str, Any]]:
    out = []
    for raw in body.split(b"\n\n"):
        data = b"\n".join(line[6:] for line in raw.split(b"\n") if line.startswith(b"data: "))
        if data and data != b"[DONE]":
            out.append(json.loads(data))
    return out


RESPONSES_CALLS = [
    pytest.param({"input": "hello there world"}, id="text"),
    pytest.param({"input": "find cats", "tools": TOOLS}, id="tools"),
    pytest.param({"input": " ".join(["w"] * 40), "max_output_tokens": 16}, id="incomplete"),
    pytest.param({"input": [{"role": "developer", "content": "be brief"},
                            {"role": "user", "content": [
                                {"type": "input_text", "text": "hello"}]}],
                  "instructions": "x", "user": "u-1", "temperature": 0.5}, id="items"),
    pytest.param({"input": "say this", "text": {"format": {
        "type": "json_schema", "name": "echo", "strict": True, "schema": {
            "type": "object", "properties": {"echo": {"type": "string"}},
            "required": ["echo"], "additionalProperties": False}}}}, id="json-schema"),
]


@pytest.mark.parametrize("body", RESPONSES_CALLS)
def test_responses_bodies_and_events_match_the_published_schemas(
        client: httpx.Client, body: dict[str, Any]) -> None:
    url = "/api/ai/v1/responses"
    resp = client.post(url, headers=auth(), json={"model": "gpt-4o-mini", **body})
    assert resp.status_code == 200
    assert errors("Response", resp.json()) == []
    streamed = client.post(url, headers=auth(),
                           json={"model": "gpt-4o-mini", "stream": True, **body})
    seen = events(streamed.content)
    assert len(seen) > 3
    for ev in seen:
        assert errors(event_schemas()[ev["type"]], ev) == [], ev["type"]


def test_a_broken_responses_stream_ends_with_a_valid_error_event(
        client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.add_fault(Fault(kind="cut_stream", after_chunks=3))
    resp = client.post("/api/ai/v1/responses", headers=auth(),
                       json={"model": "gpt-4o-mini", "input": "one two three four",
                             "stream": True})
    seen = events(resp.content)
    assert seen[-1]["type"] == "error"
    for ev in seen:
        assert errors(event_schemas()[ev["type"]], ev) == [], ev["type"]


def test_completions_replies_match_the_published_schema(client: httpx.Client) -> None:
    # Whole replies only: the document has no schema for a legacy stream's chunks (OpenAI
    # streams `finish_reason: null`, which CreateCompletionResponse does not allow).
    for body in ({"prompt": "def add(a, b):", "suffix": "return c"},
                 {"prompt": ["one", "two"], "max_tokens": 1}):
        resp = client.post("/api/ai/v1/completions", headers=auth(),
                           json={"model": "gpt-4o-mini", **body})
        assert resp.status_code == 200
        assert errors("CreateCompletionResponse", resp.json()) == []

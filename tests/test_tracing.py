"""OpenTelemetry tracing ([tracing], tollway.tracing) against a real OTLP/HTTP receiver.

The gateway exports to :class:`tollway.testing.otlp.OtlpReceiver`, a real HTTP server on
loopback that decodes the protobuf export requests with opentelemetry-proto; the upstream
is the simulated provider, which records the headers it got (the traceparent).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from support import (
    ACME_KEY,
    HANG_S,
    UPSTREAM_KEY,
    Server,
    auth,
    chat_body,
    eventually,
    gateway_env,
    make_raw_config,
    unlimited_acme,
)
from tollway.app import create_app
from tollway.config import ConfigError, TracingConfig, parse_config
from tollway.testing.otlp import OtlpReceiver, ReceivedSpan
from tollway.testing.upstream import FakeUpstream, Fault
from tollway.tracing import tracing_settings

CHAT = "/api/ai/v1/chat/completions"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
CALLER = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


def traced_config(base_url: str, **tracing: Any) -> dict[str, Any]:
    """Two providers on the one upstream, a route that fails over from the first to the
    second, retries without backoff and breakers that stay closed."""
    raw = make_raw_config(base_url, tenants=unlimited_acme(), tracing=tracing)
    raw["providers"].append({**raw["providers"][0], "name": "backup"})
    raw["models"].append({"id": "spare", "provider": "backup", "upstream": "gpt-4o",
                          "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0})
    raw["routes"].append({"alias": "chain", "candidates": ["gpt-4o-mini", "spare"]})
    raw["retry"] = {"attempts": 2, "initial_backoff_s": 0.0, "max_backoff_s": 0.0}
    raw["breaker"] = {"failure_threshold": 1000}
    return raw


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(latency_s=0.0, api_key=UPSTREAM_KEY) as up:
        yield up


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream, otlp: OtlpReceiver) -> Iterator[Server]:
    raw = traced_config(upstream.base_url, enabled=True, endpoint=otlp.endpoint,
                        service_name="tollway-under-test")
    env = gateway_env() | {
        "OTEL_BSP_SCHEDULE_DELAY": "20",  # export within milliseconds: the tests wait less
        "OTEL_SERVICE_NAME": "not-this-one",  # the file's wins
        "OTEL_EXPORTER_OTLP_HEADERS": "x-collector-token=tok%20en",
    }
    config = parse_config(raw, source="<test>", env=env)
    with Server(create_app(config, env=env)) as server:
        yield server


@pytest.fixture
def client(gateway: Server, upstream: FakeUpstream, otlp: OtlpReceiver) -> Iterator[httpx.Client]:
    upstream.clear()
    otlp.clear()
    with httpx.Client(base_url=gateway.url, timeout=HANG_S) as c:
        yield c


def call_spans(otlp: OtlpReceiver, request_id: str, attempts: int) -> tuple[
        ReceivedSpan, list[ReceivedSpan]]:
    """The call's span (found by its request id) and its attempts' spans, in order, once
    all of them have been received."""

    def complete(spans: list[ReceivedSpan]) -> bool:
        return _split(spans, request_id, attempts) is not None

    found = _split(otlp.wait_for(complete), request_id, attempts)
    assert found is not None
    return found


def _split(spans: list[ReceivedSpan], request_id: str, attempts: int) -> tuple[
        ReceivedSpan, list[ReceivedSpan]] | None:
    calls = [s for s in spans if s.attributes.get("tollway.request_id") == request_id]
    if len(calls) != 1:
        return None
    children = sorted((s for s in spans if s.parent_span_id == calls[0].span_id),
                      key=lambda s: s.start_ns)
    return (calls[0], children) if len(children) >= attempts else None


def parent_of(traceparent: str) -> tuple[str, str, str]:
    """(trace id, parent span id, flags) of a W3C traceparent."""
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id, flags


def test_call_span_continues_the_callers_trace_and_the_attempt_goes_upstream(
    client: httpx.Client, upstream: FakeUpstream, otlp: OtlpReceiver
) -> None:
    r = client.post(CHAT, json=chat_body("tell me something"),
                    headers=auth() | {"traceparent": CALLER, "tracestate": "vendor=abc"})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    call, attempts = call_spans(otlp, r.headers["x-request-id"], 1)
    # The call's span: the caller's span is its parent, in the caller's trace.
    assert (call.trace_id, call.parent_span_id) == (TRACE_ID, CALLER_SPAN)
    assert call.kind == "SERVER" and call.name == "chat gpt-4o-mini"
    assert call.status == "UNSET"
    assert call.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": usage["prompt_tokens"],
        "gen_ai.usage.output_tokens": usage["completion_tokens"],
        "http.response.status_code": 200,
        "tollway.tenant": "acme",
        "tollway.route": "gpt-4o-mini",
        "tollway.request_id": r.headers["x-request-id"],
        "tollway.endpoint": "chat.completions",
        "tollway.provider": "fake",
        "tollway.model": "gpt-4o-mini",
        "tollway.attempts": 1,
        "tollway.stream": False,
        "tollway.cost_usd": float(r.headers["x-tollway-cost-usd"]),
    }
    assert call.resource["service.name"] == "tollway-under-test"
    assert call.scope == "tollway"
    # One attempt, its child, in the same trace, within the call's time.
    (attempt,) = attempts
    assert attempt.trace_id == TRACE_ID and attempt.kind == "CLIENT"
    assert attempt.name == "chat gpt-4o-mini" and attempt.status == "UNSET"
    assert call.start_ns <= attempt.start_ns <= attempt.end_ns <= call.end_ns
    assert attempt.attributes["gen_ai.system"] == "openai"
    assert attempt.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attempt.attributes["server.address"] == "127.0.0.1"
    assert attempt.attributes["server.port"] == upstream.port
    assert attempt.attributes["tollway.attempt"] == 1
    # The upstream got the attempt's context, and the caller's tracestate.
    (sent,) = upstream.requests
    assert parent_of(sent.headers["traceparent"]) == (TRACE_ID, attempt.span_id, "01")
    assert sent.headers["tracestate"] == "vendor=abc"
    # The export carried OTEL_EXPORTER_OTLP_HEADERS (percent-decoded).
    assert all(h["x-collector-token"] == "tok en" for h in otlp.requests)
    assert all(h["content-type"] == "application/x-protobuf" for h in otlp.requests)


def test_a_streamed_call_starts_a_trace_and_its_attempt_spans_the_stream(
    client: httpx.Client, upstream: FakeUpstream, otlp: OtlpReceiver
) -> None:
    body = chat_body("one two three four", stream=True, stream_options={"include_usage": True})
    # A traceparent that is not W3C's is ignored, as the spec says: a new trace.
    r = client.post(CHAT, json=body, headers=auth() | {"traceparent": "00-xyz-01"})
    assert r.status_code == 200
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    call, (attempt,) = call_spans(otlp, r.headers["x-request-id"], 1)
    assert call.parent_span_id == "" and call.trace_id != TRACE_ID
    assert call.attributes["tollway.stream"] is True
    assert call.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert call.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 4
    assert attempt.trace_id == call.trace_id and attempt.status == "UNSET"
    assert attempt.end_ns <= call.end_ns
    (sent,) = upstream.requests
    assert parent_of(sent.headers["traceparent"])[:2] == (call.trace_id, attempt.span_id)
    assert "tracestate" not in sent.headers


def test_retries_and_failover_are_sibling_attempt_spans(
    client: httpx.Client, upstream: FakeUpstream, otlp: OtlpReceiver
) -> None:
    # Both tries on the first candidate fail (503, then 429); the second candidate serves.
    upstream.add_fault(Fault(status=503, model="gpt-4o-mini"))
    upstream.add_fault(Fault(status=429, model="gpt-4o-mini"))
    r = client.post(CHAT, json=chat_body(model="chain"), headers=auth() | {
        "traceparent": CALLER})
    assert r.status_code == 200, r.text
    assert r.headers["x-tollway-provider"] == "backup"
    call, attempts = call_spans(otlp, r.headers["x-request-id"], 3)
    assert call.name == "chat chain" and call.status == "UNSET"
    assert call.attributes["gen_ai.request.model"] == "chain"
    assert call.attributes["gen_ai.response.model"] == "spare"
    assert call.attributes["tollway.attempts"] == 3
    assert call.attributes["tollway.provider"] == "backup"
    assert "error.type" not in call.attributes
    first, retry, failover = attempts
    assert [a.attributes["tollway.attempt"] for a in attempts] == [1, 2, 3]
    assert [a.attributes["tollway.provider"] for a in attempts] == ["fake", "fake", "backup"]
    assert [a.name for a in attempts] == ["chat gpt-4o-mini", "chat gpt-4o-mini", "chat gpt-4o"]
    assert first.end_ns <= retry.start_ns and retry.end_ns <= failover.start_ns
    for failed, status, code in ((first, 503, "upstream_unavailable"),
                                 (retry, 429, "upstream_rate_limited")):
        assert failed.status == "ERROR" and failed.status_message
        assert failed.attributes["http.response.status_code"] == status
        assert failed.attributes["error.type"] == code
    assert failover.status == "UNSET" and "error.type" not in failover.attributes
    # Each upstream request carried its own attempt's context.
    sent = [parent_of(s.headers["traceparent"]) for s in upstream.requests]
    assert sent == [(TRACE_ID, a.span_id, "01") for a in attempts]


def test_failed_and_refused_calls_carry_their_error(
    client: httpx.Client, upstream: FakeUpstream, otlp: OtlpReceiver
) -> None:
    upstream.add_fault(Fault(status=500, times=None))
    try:
        failed = client.post(CHAT, json=chat_body(), headers=auth())
    finally:
        upstream.clear()
    assert failed.status_code == 502, failed.text
    call, attempts = call_spans(otlp, failed.headers["x-request-id"], 2)
    assert call.status == "ERROR" and call.attributes["error.type"] == "upstream_error"
    assert call.attributes["http.response.status_code"] == 502
    assert "gen_ai.response.model" not in call.attributes
    assert [a.status for a in attempts] == ["ERROR", "ERROR"]
    # A refusal (an unknown model) is the client's error: error.type, but no ERROR status,
    # and no attempt.
    refused = client.post(CHAT, json=chat_body(model="no-such-model"), headers=auth())
    assert refused.status_code == 404, refused.text
    call, attempts = call_spans(otlp, refused.headers["x-request-id"], 0)
    assert attempts == [] and call.status == "UNSET"
    assert call.attributes["error.type"] == refused.json()["error"]["code"]
    assert call.attributes["http.response.status_code"] == 404
    assert call.attributes["tollway.attempts"] == 0


def test_embeddings_are_their_own_operation(
    client: httpx.Client, upstream: FakeUpstream, otlp: OtlpReceiver
) -> None:
    r = client.post("/api/ai/v1/embeddings", headers=auth(),
                    json={"model": "text-embedding-3-small", "input": "hello"})
    assert r.status_code == 200, r.text
    call, (attempt,) = call_spans(otlp, r.headers["x-request-id"], 1)
    assert call.name == "embeddings text-embedding-3-small"
    assert call.attributes["gen_ai.operation.name"] == "embeddings"
    assert call.attributes["gen_ai.usage.input_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert attempt.name == "embeddings text-embedding-3-small"


def test_a_stuck_collector_does_not_hold_up_calls(
    client: httpx.Client, upstream: FakeUpstream, otlp: OtlpReceiver
) -> None:
    otlp.hold()
    try:
        first = client.post(CHAT, json=chat_body(), headers=auth())
        assert first.status_code == 200
        # The exporter's thread now waits on the collector's answer ...
        eventually(lambda: otlp.held, timeout=HANG_S)
        assert otlp.held == 1
        # ... and the gateway serves on.
        later = [client.post(CHAT, json=chat_body(), headers=auth()) for _ in range(5)]
        assert [r.status_code for r in later] == [200] * 5
        assert otlp.held == 1 and otlp.spans == []
    finally:
        otlp.release()
    for r in (first, *later):
        call_spans(otlp, r.headers["x-request-id"], 1)


def test_tracing_from_the_environment_samples_and_flushes_at_shutdown(
    upstream: FakeUpstream, otlp: OtlpReceiver
) -> None:
    """OTEL_* alone turn tracing on; sample_ratio 0 records no new trace but follows a
    caller's sampled flag; the spans still queued when the app stops are exported."""
    upstream.clear()
    otlp.clear()
    raw = traced_config(upstream.base_url, sample_ratio=0.0)
    env = gateway_env() | {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp.port}",  # + /v1/traces
        "OTEL_BSP_SCHEDULE_DELAY": "600000",  # nothing leaves before the shutdown's flush
    }
    app = create_app(parse_config(raw, source="<test>", env=env), env=env)
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=HANG_S) as c:
        sampled = c.post(CHAT, json=chat_body(), headers=auth(ACME_KEY) | {
            "traceparent": CALLER})
        unsampled = c.post(CHAT, json=chat_body(), headers=auth(ACME_KEY))
        assert sampled.status_code == unsampled.status_code == 200
        assert otlp.requests == []
    # The lifespan's end flushed the queue: the sampled call's two spans, and no other.
    spans = otlp.wait_for(lambda spans: len(spans) >= 2)
    assert len(spans) == 2 and {s.trace_id for s in spans} == {TRACE_ID}
    assert spans[0].resource["service.name"] == "tollway"
    call, (attempt,) = call_spans(otlp, sampled.headers["x-request-id"], 1)
    assert call.parent_span_id == CALLER_SPAN
    to_sampled, to_unsampled = (s.headers["traceparent"] for s in upstream.requests)
    assert parent_of(to_sampled) == (TRACE_ID, attempt.span_id, "01")
    # Not recorded, but the upstream still gets a context to join (sampled flag off).
    trace_id, span_id, flags = parent_of(to_unsampled)
    assert trace_id not in (TRACE_ID, "0" * 32) and span_id != "0" * 16
    assert int(flags, 16) & 1 == 0


def test_a_stuck_collector_does_not_hold_up_the_stop(
    upstream: FakeUpstream, otlp: OtlpReceiver
) -> None:
    raw = traced_config(upstream.base_url, enabled=True, endpoint=otlp.endpoint,
                        export_timeout_s=0.2)
    env = gateway_env() | {"OTEL_BSP_SCHEDULE_DELAY": "600000"}
    otlp.hold()
    try:
        server = Server(create_app(parse_config(raw, source="<test>", env=env), env=env))
        with server:
            r = httpx.post(server.url + CHAT, json=chat_body(), headers=auth(),
                           timeout=HANG_S)
            assert r.status_code == 200
        # The flush at the stop met a collector that never answers: the export timed out
        # (the exporter logs it) and the gateway stopped all the same.
        assert not server.thread.is_alive()
    finally:
        otlp.release()


def test_off_by_default_with_no_hook_and_no_traceparent(upstream: FakeUpstream) -> None:
    upstream.clear()
    raw = make_raw_config(upstream.base_url)
    app = create_app(parse_config(raw, source="<test>", env=gateway_env()), env=gateway_env())
    gateway = app.state.gateway
    assert gateway.tracing is None
    with Server(app) as server:
        assert gateway.pipeline.tracer is None  # the layer attached nothing
        r = httpx.post(server.url + CHAT, json=chat_body(), timeout=HANG_S,
                       headers=auth() | {"traceparent": CALLER})
        assert r.status_code == 200
    (sent,) = upstream.requests
    assert "traceparent" not in sent.headers  # neither made nor passed through


# ---- settings: the file, then the environment, as OpenTelemetry's SDKs read it


def settings_of(env: dict[str, str], **fields: Any) -> Any:
    return tracing_settings(TracingConfig(**fields), env)


def test_settings_off_unless_asked() -> None:
    assert settings_of({}) is None
    assert settings_of({"OTEL_TRACES_EXPORTER": "console"}) is None
    assert settings_of({"OTEL_TRACES_EXPORTER": "otlp"}) is not None
    assert settings_of({}, enabled=True) is not None
    assert settings_of({"OTEL_TRACES_EXPORTER": "otlp"}, enabled=False) is None
    # OTEL_SDK_DISABLED and OTEL_TRACES_EXPORTER=none win over the file.
    assert settings_of({"OTEL_SDK_DISABLED": "true"}, enabled=True) is None
    assert settings_of({"OTEL_TRACES_EXPORTER": "none"}, enabled=True) is None


def test_settings_endpoint_service_and_sampler() -> None:
    on = {"OTEL_TRACES_EXPORTER": "otlp"}
    s = settings_of(on)
    assert (s.endpoint, s.service_name, s.sample_ratio, s.parent_based) == (
        "http://localhost:4318/v1/traces", "tollway", 1.0, True)
    s = settings_of(on | {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/",
                          "OTEL_SERVICE_NAME": "gw", "OTEL_TRACES_SAMPLER": "traceidratio",
                          "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    assert (s.endpoint, s.service_name, s.sample_ratio, s.parent_based) == (
        "http://c:4318/v1/traces", "gw", 0.25, False)
    s = settings_of(on | {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://c/x",
                          "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                          "OTEL_TRACES_SAMPLER": "parentbased_always_off"})
    assert (s.endpoint, s.sample_ratio, s.parent_based) == ("https://c/x", 0.0, True)
    s = settings_of(on | {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://c/x",
                          "OTEL_TRACES_SAMPLER": "always_off"},
                    endpoint="http://file/v1/traces", sample_ratio=0.5, service_name="f")
    assert (s.endpoint, s.sample_ratio, s.parent_based, s.service_name) == (
        "http://file/v1/traces", 0.5, True, "f")


@pytest.mark.parametrize(("env", "message"), [
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "http/protobuf"),
    ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "from 0 to 1"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "not an http"),
    ({"OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
    ({"OTEL_EXPORTER_OTLP_HEADERS": "authorization"}, "key=value"),
])
def test_settings_refuse_what_they_cannot_do(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_of({"OTEL_TRACES_EXPORTER": "otlp"} | env)


def test_config_file_section_is_checked() -> None:
    raw = make_raw_config("http://127.0.0.1:9/v1", tracing={"endpoint": "grpc://c:4317"})
    with pytest.raises(ConfigError, match="endpoint") as info:
        parse_config(raw, source="<test>", env=gateway_env())
    assert info.value.path == "$.tracing.endpoint"
    raw = make_raw_config("http://127.0.0.1:9/v1", tracing={"sample_ratio": 1.5})
    with pytest.raises(ConfigError) as info:
        parse_config(raw, source="<test>", env=gateway_env())
    assert info.value.path == "$.tracing.sample_ratio"

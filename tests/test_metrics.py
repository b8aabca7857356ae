"""Prometheus metrics: names, labels, conventions, one registry per app."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from support import GLOBEX_KEY, ListRecorder, auth, chat_body, make_config
from tollway.app import create_app
from tollway.metrics import Metrics
from tollway.record import CallRecord
from tollway.testing.upstream import FakeUpstream, Fault

CHAT = "/api/ai/v1/chat/completions"


def scrape(client: httpx.Client) -> dict[str, list[tuple[dict[str, str], float]]]:
    r = client.get("/api/ai/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    return sum(v for lbl, v in samples.get(name, []) if labels.items() <= lbl.items())


def test_metric_names_and_values(
    client: httpx.Client, upstream: FakeUpstream, recorder: ListRecorder
) -> None:
    client.post(CHAT, json=chat_body("one two three"), headers=auth())
    client.post(CHAT, json=chat_body("streamed words", stream=True), headers=auth())
    upstream.add_fault(Fault(status=500))
    client.post(CHAT, json=chat_body(model="auto"), headers=auth())  # fails over once
    client.post(CHAT, json=chat_body(model="gpt-4o-mini"), headers=auth(GLOBEX_KEY))  # 403
    client.post(CHAT, json=chat_body(), headers=auth("wrong"))  # 401
    client.post(CHAT, content=b"{", headers=auth())  # 400
    recs = recorder.wait(5)
    m = scrape(client)

    assert value(m, "tollway_requests_total", tenant="acme", model="gpt-4o-mini",
                 provider="fake", status="200") == 2
    assert value(m, "tollway_requests_total", tenant="acme", model="fast", status="200") == 1
    assert value(m, "tollway_requests_total", tenant="globex", status="403") == 1
    assert value(m, "tollway_rejections_total", reason="invalid_api_key") == 1
    assert value(m, "tollway_rejections_total", reason="model_not_allowed") == 1
    assert value(m, "tollway_rejections_total", reason="invalid_json") == 1
    assert value(m, "tollway_retries_total", provider="fake") == 1
    assert value(m, "tollway_fallbacks_total", provider="fake") == 1
    assert value(m, "tollway_upstream_errors_total", provider="fake") == 1
    completed = [r for r in recs if r.outcome == "completed"]
    assert value(m, "tollway_tokens_total", tenant="acme", kind="prompt") == sum(
        r.prompt_tokens for r in completed)
    assert value(m, "tollway_tokens_total", tenant="acme", kind="completion") == sum(
        r.completion_tokens for r in completed)
    cost = value(m, "tollway_cost_usd_total", tenant="acme")
    assert abs(cost - sum(r.actual_cost_nanousd for r in completed) / 1e9) < 1e-12
    assert value(m, "tollway_request_duration_seconds_count", endpoint="chat.completions") == 3
    assert value(m, "tollway_gateway_overhead_seconds_count") == 3
    assert value(m, "tollway_time_to_first_token_seconds_count", provider="fake") == 1
    inf = value(m, "tollway_gateway_overhead_seconds_bucket", le="+Inf")
    assert inf == 3
    assert value(m, "tollway_http_requests_total", path=CHAT) == 6
    assert value(m, "tollway_in_flight_requests") == 1  # the scrape itself


def test_each_app_has_its_own_registry(upstream: FakeUpstream) -> None:
    from support import gateway_env

    a = create_app(make_config(upstream.base_url), env=gateway_env())
    b = create_app(make_config(upstream.base_url), env=gateway_env())
    ga, gb = a.state.gateway, b.state.gateway
    assert ga.metrics.registry is not gb.metrics.registry
    rec = CallRecord(request_id="r", tenant="t", occurred_at=0.0, outcome="completed",
                     model="m", provider="p", prompt_tokens=3)
    ga.metrics.observe_call(rec)
    assert b"tollway_tokens_total" in ga.metrics.render()
    assert ga.metrics.tokens.value("t", "m", "prompt") == 3
    assert gb.metrics.tokens.value("t", "m", "prompt") == 0


def test_histogram_buckets_are_cumulative() -> None:
    m = Metrics()
    for v in (0.00005, 0.0003, 0.0003, 0.02, 99.0):
        m.overhead.observe(("chat",), v)
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    samples = {(s.name, s.labels.get("le")): s.value
               for s in families["tollway_gateway_overhead_seconds"].samples}
    assert samples[("tollway_gateway_overhead_seconds_bucket", "0.0001")] == 1
    assert samples[("tollway_gateway_overhead_seconds_bucket", "0.0005")] == 3
    assert samples[("tollway_gateway_overhead_seconds_bucket", "0.025")] == 4
    assert samples[("tollway_gateway_overhead_seconds_bucket", "+Inf")] == 5
    assert samples[("tollway_gateway_overhead_seconds_count", None)] == 5
    assert abs(samples[("tollway_gateway_overhead_seconds_sum", None)] - 99.02065) < 1e-9

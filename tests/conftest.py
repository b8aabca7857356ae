"""Shared fixtures: a simulated upstream and a gateway on a real uvicorn server."""

from __future__ import annotations

import gc
import io
import logging
from collections.abc import Iterator

import httpx
import pytest

from support import MOUNTS, UPSTREAM_KEY, ListRecorder, Server, gateway_env, make_config, mounted
from tollway.app import create_app
from tollway.logs import JsonFormatter
from tollway.testing.upstream import FakeUpstream

# Every log line and event of the run is scanned for keys; a key found fails the run.
pytest_plugins = ["secret_scan"]


@pytest.fixture(autouse=True, scope="module")
def _collect_garbage_after_each_module() -> Iterator[None]:
    """A socket left in a reference cycle warns only when the collector gets to it, at a
    random later test or after the session; collecting here fails the module that left it."""
    yield
    gc.collect()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY) as up:
        yield up


@pytest.fixture
def recorder() -> ListRecorder:
    return ListRecorder()


@pytest.fixture
def gateway(upstream: FakeUpstream, recorder: ListRecorder) -> Iterator[Server]:
    app = create_app(make_config(upstream.base_url), env=gateway_env(), recorder=recorder)
    with Server(app) as server:
        yield server


@pytest.fixture(params=MOUNTS)
def mounted_gateway(request: pytest.FixtureRequest, upstream: FakeUpstream,
                    recorder: ListRecorder) -> Iterator[Server]:
    """:func:`gateway`, served alone and mounted under a prefix in a Starlette and a FastAPI
    app (a test module runs its tests through every mount by taking it as ``gateway``)."""
    app = create_app(make_config(upstream.base_url), env=gateway_env(), recorder=recorder)
    with mounted(app, request.param) as server:
        yield server


@pytest.fixture
def client(gateway: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        yield c


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tollway")
    old_level, old_handlers = log.level, log.handlers[:]
    log.handlers[:] = [handler]
    # INFO at least (the access lines); more if the run's secret scan asked for more.
    log.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
    try:
        yield buf
    finally:
        log.handlers[:] = old_handlers
        log.setLevel(old_level)

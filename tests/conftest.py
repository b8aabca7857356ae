"""Shared fixtures: a simulated upstream and a gateway on a real uvicorn server."""

from __future__ import annotations

import gc
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import settings

from support import MOUNTS, UPSTREAM_KEY, ListRecorder, Server, gateway_env, make_config, mounted
from tollway.app import create_app
from tollway.logs import JsonFormatter
from tollway.testing.upstream import FakeUpstream

# Every log line and event of the run is scanned for keys; a key found fails the run.
pytest_plugins = ["secret_scan"]

# No time limit on an example: hypothesis's default (200 ms) is a timed assertion, and the
# suite shares two cores with the other worker and the servers the tests start (a nesting
# 20,000 deep once took 270 ms there). A test's own settings still apply on top.
settings.register_profile("tollway", deadline=None)
settings.load_profile("tollway")


# Tests that start several processes (gateways, workers, NATS clusters) or hundreds of
# streams: one xdist group, so two of them never share the two cores; the rest of the suite
# runs beside them on the other worker.
HEAVY = (
    "tests/events/test_cluster.py",
    "tests/events/test_crash.py",
    "tests/events/test_fleet_breakers.py",
    "tests/events/test_fleet_budget.py",
    "tests/events/test_fleet_serve.py",
    "tests/events/test_outage.py",
    "tests/events/test_ratelimits.py",
    "tests/test_stream_lifecycle.py",
    "tests/test_stream_native.py",
    "tests/test_workers.py",
)
# Folders whose session fixture starts a server (PostgreSQL, promtool's files): one worker
# each, so the server starts once.
FOLDERS = ("tests/sink/", "tests/deploy/")
_ROOT = Path(__file__).resolve().parent.parent
assert all((_ROOT / path).exists() for path in (*HEAVY, *FOLDERS)), "a group names a path gone"


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist's marker, declared for runs without it too (-p no:xdist).
    config.addinivalue_line("markers", "xdist_group(name): run the group on one worker")


@pytest.hookimpl(tryfirst=True)  # before xdist's, which adds the group to the test's id
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        group = "heavy" if path in HEAVY else next(
            (folder for folder in FOLDERS if path.startswith(folder)), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Whole modules to a worker (their module-scoped gateways and the tests that read what
    the module's earlier tests did stay together), and each group to one worker."""
    from xdist.scheduler import LoadGroupScheduling

    class ByModule(LoadGroupScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.rfind("@") > nodeid.rfind("]"):
                return nodeid.rsplit("@", 1)[1]  # the group, as loadgroup has it
            return nodeid.split("::", 1)[0]

    return ByModule(config, log)


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

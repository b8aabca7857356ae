"""benchmarks/soak.py: its gateway config loads, it sees a socket left behind (procstat.py),
and its verdict fails a run whose memory or fds climb or that answered a 5xx."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tollway.config import parse_config

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# soak.py imports its helpers by module name, as a script run from benchmarks/ would
for _helper in ("load", "procstat"):
    if _helper not in sys.modules:
        _import(_helper, BENCHMARKS / f"{_helper}.py")
PROCSTAT = sys.modules["procstat"]
SOAK = _import("bench_soak", BENCHMARKS / "soak.py")


def test_the_soak_gateway_config_loads_with_every_tenant() -> None:
    load = sys.modules["load"]
    cfg = load.deep_merge(load.BASE_CONFIG, SOAK.soak_overlay(3))
    cfg["providers"][0]["base_url"] = "http://127.0.0.1:9/v1"
    config = parse_config(tomllib.loads(load.to_toml(cfg)), source="soak", env={})
    assert [t.id for t in config.tenants] == ["soak0", "soak1", "soak2"]
    assert config.nats.enabled and config.nats.url == "embedded"
    assert len({SOAK.tenant_key(i) for i in range(3)}) == 3


def test_the_flows_split_the_rate_by_mode_and_tenant() -> None:
    plan = SOAK.flows(300.0, 0.3, 3)
    assert len(plan) == 6
    assert sum(f.rate for f in plan) == pytest.approx(300.0)
    assert sum(f.rate for f in plan if f.mode == "stream") == pytest.approx(90.0)
    assert [f.mode for f in SOAK.flows(300.0, 0.0, 2)] == ["plain", "plain"]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket, int]]:
    """A listener of this process and one connection to it: (client, server side, port)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        server, _ = listener.accept()
        try:
            yield client, server, port
        finally:
            client.close()
            server.close()


def test_a_socket_left_behind_counts_as_a_fixed_fd(
    pair: tuple[socket.socket, socket.socket, int],
) -> None:
    client, server, port = pair
    peers = {"clients": {port}}
    before = PROCSTAT.proc_state(os.getpid(), PROCSTAT.tcp_sockets(), peers)
    # both ends are this process's: the accepted side by its local port, the client side by
    # its remote port
    assert before.conns["clients"] == 2
    client.close()  # the peer hangs up, the server side stays open: a leak's shape
    server.settimeout(5)
    assert server.recv(1) == b""  # the FIN has arrived: the socket is in CLOSE_WAIT now
    after = PROCSTAT.proc_state(os.getpid(), PROCSTAT.tcp_sockets(), peers)
    assert after.conns["clients"] == 0
    assert after.conns["close_wait"] == 1
    assert after.fixed_fds == before.fixed_fds + 1  # the client fd went, the dead one stayed


def _samples(n: int = 24, **trend: Any) -> list[Any]:
    """A 4-minute run of 10 s samples; ``trend``: per-sample increase of rss_mb/fixed_fds,
    or status codes to add to the last sample."""
    out = []
    for i in range(n):
        gw = PROCSTAT.ProcState(
            rss_mb=60.0 + trend.get("rss", 0.0) * i,
            fds=90 + (i % 3) * 10,  # the connections come and go
            fixed_fds=19 + int(trend.get("fds", 0.0) * i),
            cpu_s=float(i),
            conns={"clients": 48, "upstream": 20 + (i % 3) * 10, "nats": 3, "other": 0,
                   "close_wait": 0},
        )  # fmt: skip
        status = {"200": 3000}
        if i == n - 1:
            status |= trend.get("status", {})
        out.append(SOAK.Sample(
            t_s=10.0 * (i + 1), interval_s=10.0, calls_per_s=300.0,
            answered=sum(status.values()), status=status, errors=0, p50_ms=1.0, p99_ms=9.0,
            p50_ms_by_mode={}, p99_ms_by_mode={}, gateway=gw, nats=None,
            gateway_cpu_share=0.3, nats_cpu_share=0.05, upstream_cpu_share=0.1,
            generator_cpu_share=0.1, generator_cpu_us_per_call=300.0, load_avg=1.0, metrics={},
            machine_stalls={},
        ))  # fmt: skip
    return out


def test_a_steady_run_passes_though_its_connections_come_and_go() -> None:
    v = SOAK.verdict(_samples(), warmup_s=60.0, rate=300.0)
    assert v["pass"], v["lines"]
    assert v["fds_min_max_after_warmup"] == [90, 110]


@pytest.mark.parametrize(
    ("trend", "failed"),
    [
        # the first minute after the warm-up's median 66.8 MB, the last's 76 MB: +14 %
        ({"rss": 0.8}, "rss"),
        ({"fds": 0.5}, "fds"),  # one more fd held every 20 s
        ({"status": {"502": 1}}, "5xx"),
    ],
)
def test_a_climb_or_a_5xx_fails_the_soak(trend: dict[str, Any], failed: str) -> None:
    v = SOAK.verdict(_samples(**trend), warmup_s=60.0, rate=300.0)
    assert not v["pass"]
    assert [k for k, ok in v["checks"].items() if not ok] == [failed]

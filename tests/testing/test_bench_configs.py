"""benchmarks/load.py writes gateway configs; they must stay valid as the config grows."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from tollway.config import parse_config

LOAD_PY = Path(__file__).resolve().parents[2] / "benchmarks" / "load.py"


def _import() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_load", LOAD_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_load"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


BENCH = _import()


@pytest.fixture
def load() -> ModuleType:
    return BENCH


def test_toml_writer_round_trips(load: ModuleType) -> None:
    cfg = {
        "title": 'a "quoted" name',
        "server": {"port": 8080, "ratio": 0.5, "on": True, "hosts": ["a", "b"]},
        "tenants": [{"id": "x", "limits": {"per_minute": 5}}, {"id": "y"}],
        "tiers": {"low": {"max_call_usd": 0.002}},
    }
    assert tomllib.loads(load.to_toml(cfg)) == cfg


def test_deep_merge_merges_tables_and_replaces_the_rest(load: ModuleType) -> None:
    base = {"server": {"host": "h", "port": 1}, "providers": [{"name": "a"}]}
    merged = load.deep_merge(base, {"server": {"port": 2}, "providers": [{"name": "b"}]})
    assert merged == {"server": {"host": "h", "port": 2}, "providers": [{"name": "b"}]}
    assert base["server"]["port"] == 1  # the base is not touched


@pytest.mark.parametrize("variant", sorted(BENCH.VARIANTS))
def test_every_variant_is_a_valid_gateway_config(load: ModuleType, variant: str) -> None:
    cfg = load.deep_merge(load.BASE_CONFIG, load.VARIANTS[variant])
    cfg["providers"][0]["base_url"] = "http://127.0.0.1:9/v1"
    config = parse_config(tomllib.loads(load.to_toml(cfg)), source=f"variant {variant}", env={})
    assert [p.name for p in config.providers] == ["sim"]
    assert [t.id for t in config.tenants] == ["bench"]


def test_only_loopback_targets(load: ModuleType) -> None:
    load.check_loopback("http://127.0.0.1:8080/v1")
    load.check_loopback("http://localhost:8080/v1")
    load.check_loopback("http://[::1]:8080/v1")
    with pytest.raises(SystemExit):
        load.check_loopback("http://10.0.0.1:8080/v1")

"""`tollway events tail`, `tollway usage`, `tollway replay` against a real server."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from tollway.cli import main
from tollway.config import parse_config
from tollway.events.broker import EmbeddedNats
from tollway.events.cli import run_replay, show_usage, tail, tail_subject

from .test_runner import fixture_lines, publish_lines, pure_fold


def _config(url: str, tmp_path: Path) -> object:
    return parse_config({"server": {"builtin_providers": False},
                         "nats": {"url": url, "data_dir": str(tmp_path / "d")}}, env={})


def test_tail_subjects() -> None:
    assert tail_subject(None, None) == "tollway.*.*.*"
    assert tail_subject("acme", "completed") == "tollway.call.completed.acme"
    assert tail_subject("acme", None) == "tollway.*.*.acme"
    assert tail_subject(None, "budget") == "tollway.budget.*.*"
    assert tail_subject("a.b", "call.failed") == "tollway.call.failed.a~2Eb"
    with pytest.raises(ValueError):
        tail_subject(None, "nonsense")


async def test_tail_prints_one_json_event_per_line(nc: NatsClient, nats_server: EmbeddedNats,
                                                   tmp_path: Path) -> None:
    lines = fixture_lines()
    await publish_lines(nc, lines)
    cfg = _config(nats_server.url, tmp_path)
    out = io.StringIO()
    args = argparse.Namespace(tenant="acme", type="completed", from_start=True, since_seq=0,
                              durable=None, count=0, idle_timeout=0.5, url=None)
    await tail(cfg, args, out)  # type: ignore[arg-type]
    got = [json.loads(x) for x in out.getvalue().splitlines()]
    want = [json.loads(x) for x in lines]
    want = [e for e in want if e["type"] == "call.completed" and e["tenant"] == "acme"]
    assert got == want and got
    # A durable consumer continues where it stopped.
    first, second = io.StringIO(), io.StringIO()
    args = argparse.Namespace(tenant=None, type="rejected", from_start=True, since_seq=0,
                              durable="analytics", count=5, idle_timeout=0.5, url=None)
    await tail(cfg, args, first)  # type: ignore[arg-type]
    args.count = 0
    await tail(cfg, args, second)  # type: ignore[arg-type]
    a = [json.loads(x)["event_id"] for x in first.getvalue().splitlines()]
    b = [json.loads(x)["event_id"] for x in second.getvalue().splitlines()]
    rejected = [json.loads(x)["event_id"] for x in lines
                if json.loads(x)["type"] == "call.rejected"]
    assert len(a) == 5 and a + b == rejected


async def test_usage_and_replay(nc: NatsClient, nats_server: EmbeddedNats,
                                tmp_path: Path) -> None:
    lines = fixture_lines()
    await publish_lines(nc, lines)
    cfg = _config(nats_server.url, tmp_path)
    out = io.StringIO()
    await run_replay(cfg, argparse.Namespace(url=None, dry_run=False), out)  # type: ignore[arg-type]
    report = json.loads(out.getvalue())
    assert report["messages"] == len(lines) and report["views"]["usage"] == len(lines)
    out = io.StringIO()
    args = argparse.Namespace(url=None, tenant="globex", days=36500, json=True)
    await show_usage(cfg, args, out)  # type: ignore[arg-type]
    from tollway.events.projections import usage

    want = usage.query(pure_fold(lines)[0].view, tenant="globex")
    assert json.loads(out.getvalue()) == json.loads(json.dumps(want))
    out = io.StringIO()
    args.json = False
    await show_usage(cfg, args, out)  # type: ignore[arg-type]
    table = out.getvalue().splitlines()
    assert table[0].split()[:4] == ["day", "tenant", "model", "provider"]
    assert table[-1].startswith("total") and str(want["total"]["requests"]) in table[-1]


def test_commands_are_registered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Without a running gateway the command starts an embedded server of its own.
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[server]\nbuiltin_providers = false\n[nats]\ndata_dir = "{tmp_path / "d"}"\n')
    assert main(["replay", "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out)["messages"] == 0
    assert main(["usage", "--config", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["requests"] == 0

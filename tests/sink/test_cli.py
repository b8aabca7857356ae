"""``tollway sink postgres`` from the command line: the DSN, --migrate-only, and a database
whose schema is behind."""

from __future__ import annotations

import json

import psycopg
import pytest

from tollway.cli import main
from tollway.events.broker import EmbeddedNats
from tollway.sink import migrations


def test_without_a_dsn(monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TOLLWAY_SINK_DSN", raising=False)
    assert main(["sink", "postgres", "--url", "nats://127.0.0.1:1"]) == 2
    assert "TOLLWAY_SINK_DSN" in capsys.readouterr().err


def test_migrate_only_then_once(dsn: str, nats_server: EmbeddedNats,
                                monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TOLLWAY_SINK_DSN", dsn)
    url = ["--url", nats_server.url]
    # Not migrated: refused, with what to do.
    assert main(["sink", "postgres", *url, "--once"]) == 2
    assert "--migrate" in capsys.readouterr().err
    assert main(["sink", "postgres", *url, "--migrate-only"]) == 0
    applied = json.loads(capsys.readouterr().out)["applied"]
    assert applied == [m.version for m in migrations.shipped()]
    assert main(["sink", "postgres", *url, "--once"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["events"] == 0
    with psycopg.connect(dsn) as conn:
        assert migrations.current_version(conn) == len(applied)


def test_export_refuses_an_empty_range(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "parquet", "--since", "2026-02-01", "--until", "2026-01-01",
                 "--url", "nats://127.0.0.1:1", "out"]) == 2
    assert "--until" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "parquet", "--since", "yesterday", "out"])

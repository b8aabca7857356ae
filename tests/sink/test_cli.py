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


def test_a_database_that_is_not_there_fails_fast(nats_server: EmbeddedNats,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong DSN at start is an error to fix, not an outage to wait out."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    dsn = f"postgresql://tollway:secret-pw-123@127.0.0.1:{port}/postgres"
    assert main(["sink", "postgres", "--url", nats_server.url, "--dsn", dsn]) == 1
    err = capsys.readouterr().err
    assert "PostgreSQL" in err and "secret-pw-123" not in err


def test_export_refuses_an_empty_range(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "parquet", "--since", "2026-02-01", "--until", "2026-01-01",
                 "--url", "nats://127.0.0.1:1", "out"]) == 2
    assert "--until" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "parquet", "--since", "yesterday", "out"])

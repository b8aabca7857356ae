"""The ledger's schema: versioned files shipped in the package, applied forward only, from an
empty database and from the previous version; a column added later leaves older rows valid."""

from __future__ import annotations

import threading
from pathlib import Path

import msgspec
import psycopg
import pytest
from nats.aio.client import Client as NatsClient

from tollway.events import schema, synthetic
from tollway.events.schema import CallCompleted, CallEvent
from tollway.sink import ledger, migrations
from tollway.sink.postgres import PostgresSink, Writer

from .conftest import publish


def _columns(conn: psycopg.Connection[tuple[str, str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for t, c in conn.execute("SELECT table_name, column_name FROM information_schema.columns "
                             "WHERE table_schema = 'public'").fetchall():
        out.setdefault(t, set()).add(c)
    return out


def test_shipped_files_are_numbered_and_in_the_package() -> None:
    shipped = migrations.shipped()
    assert [m.version for m in shipped] == list(range(1, len(shipped) + 1))
    assert len(shipped) >= 2
    assert all(m.sql.strip() for m in shipped)


def test_from_empty_every_event_field_has_a_column(dsn: str) -> None:
    """After the shipped migrations every table has a column for each field of its events:
    a field added to an event without a migration fails here."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert migrations.current_version(conn) == 0
        assert migrations.migrate(conn) == [m.version for m in migrations.shipped()]
        assert migrations.migrate(conn) == []  # idempotent
        assert migrations.check(conn) == len(migrations.shipped())
        have = _columns(conn)
    for t in ledger.TABLES.values():
        # Admin events keep their own fields (settings, limits) in the details column.
        kinds = (schema.AdminEvent,) if t.name == "admin_events" else t.events
        fields = {f.name for cls in kinds for f in msgspec.structs.fields(cls)}
        assert fields <= set(t.columns), (t.name, fields - set(t.columns))
        assert set(t.columns) <= have[t.name], (t.name, set(t.columns) - have[t.name])
    # Every event type has its table, or is knowingly left to other_events (none today).
    assert set(ledger.TABLE_OF) == set(schema.EVENT_TYPES)


async def test_from_the_previous_version_rows_stay(nc: NatsClient, dsn: str) -> None:
    """A database at the previous version, with rows, migrates forward; its rows are read
    by the new version's views and the sink goes on from its position."""
    latest = len(migrations.shipped())
    evs = list(synthetic.events(200))
    half = len(evs) // 2
    await publish(nc, evs[:half])
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn, target=latest - 1)
        assert migrations.current_version(conn) == latest - 1
        with pytest.raises(migrations.SchemaError, match="--migrate"):
            migrations.check(conn)
    # A sink without --migrate refuses the old schema rather than writing to it.
    with pytest.raises(migrations.SchemaError):
        await PostgresSink(nc, dsn).run(until_caught_up=True)
    # Rows written at the previous version: into the tables and columns it has (events it
    # had no column for were newer than it).
    writer = Writer(dsn, "TOLLWAY")
    writer.conn = psycopg.connect(dsn, autocommit=True)
    had = _columns(writer.conn)
    keep = {t.name: [i for i, c in enumerate(t.columns) if c in had[t.name]]
            for t in ledger.TABLES.values() if t.name in had}
    writer._columns = {name: tuple(ledger.TABLES[name].columns[i] for i in idx)
                       for name, idx in keep.items()}
    for name in (*writer._columns, "other_events"):
        writer.conn.execute(f"CREATE TEMP TABLE _in_{name} (LIKE {name} INCLUDING DEFAULTS) "
                            "ON COMMIT DELETE ROWS")
    writer.position("")
    rows = ledger.to_rows(enumerate((schema.encode(e) for e in evs[:half]), 1), schema.decode)
    rows.by_table = {name: [tuple(r[i] for i in keep[name]) for r in lst]
                     for name, lst in rows.by_table.items() if name in keep}
    writer.write(rows, half)
    writer.close()
    await publish(nc, evs[half:])
    await PostgresSink(nc, dsn, migrate=True).run(until_caught_up=True)
    calls = [e for e in evs if isinstance(e, CallEvent)]
    with psycopg.connect(dsn) as conn:
        assert migrations.current_version(conn) == latest
        assert conn.execute("SELECT sum(requests), sum(cost_nanousd) FROM usage_daily"
                            ).fetchone() == (len(calls), sum(e.actual_cost_nanousd
                                                             for e in calls))


def test_a_changed_shipped_file_is_refused(dsn: str, tmp_path: Path) -> None:
    for m in migrations.shipped():
        (tmp_path / f"{m.version:04d}_{m.name}.sql").write_text(m.sql)
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn)
        first = next(tmp_path.glob("0001_*.sql"))
        first.write_text(first.read_text() + "\n-- edited\n")
        with pytest.raises(migrations.SchemaError, match="never change"):
            migrations.migrate(conn, migrations.shipped(tmp_path))


def test_two_migrating_at_once_apply_each_version_once(dsn: str) -> None:
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                results.append(migrations.migrate(conn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(v for r in results for v in r) == [m.version for m in migrations.shipped()]


async def test_a_column_added_later_leaves_older_rows_and_sinks_working(
        nc: NatsClient, dsn: str, tmp_path: Path) -> None:
    """An event gains a field (with a default, as the versioning rules want): a migration adds
    its column with a default. Rows written before read the default; a sink that does not
    know the column yet keeps writing; events from older gateways (without the field, nor
    the fields added since the first release) decode with their defaults."""
    for m in migrations.shipped():
        (tmp_path / f"{m.version:04d}_{m.name}.sql").write_text(m.sql)
    await publish(nc, [CallCompleted(event_id="before", occurred_at=synthetic.DAY0,
                                     tenant="acme", actual_cost_nanousd=7)])
    await PostgresSink(nc, dsn, migrate=True).run(until_caught_up=True)
    n = len(migrations.shipped()) + 1
    (tmp_path / f"{n:04d}_calls_region.sql").write_text(
        "ALTER TABLE calls ADD COLUMN region text NOT NULL DEFAULT 'eu';")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert migrations.migrate(conn, migrations.shipped(tmp_path)) == [n]
    # An older gateway's event: none of the fields added after the first release.
    old = (b'{"type":"call.completed","event_id":"old","occurred_at":1767225600.5,'
           b'"schema_version":1,"tenant":"acme","model":"m","actual_cost_nanousd":3}')
    await nc.jetstream().publish("tollway.call.completed.acme", old)
    await PostgresSink(nc, dsn).run(until_caught_up=True)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT event_id, region, actual_cost_nanousd, flags, "
                            "cache_read_tokens, max_tokens_bound FROM calls ORDER BY seq"
                            ).fetchall()
    assert rows == [("before", "eu", 7, [], 0, None), ("old", "eu", 3, [], 0, None)]

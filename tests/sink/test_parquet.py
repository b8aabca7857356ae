"""``tollway export parquet``: the stream as Parquet files by table and UTC day, read back
by DuckDB and pandas with the sums of the stream."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import duckdb
import pandas as pd
from nats.aio.client import Client as NatsClient

from tollway.config import default_config
from tollway.events import synthetic
from tollway.events.schema import CallEvent, day_of
from tollway.sink import cli as sink_cli
from tollway.sink import ledger
from tollway.sink.parquet import export

from .conftest import publish


async def test_round_trip_duckdb_and_pandas(nc: NatsClient, tmp_path: Path) -> None:
    evs = list(synthetic.events(900, days=3.0))
    await publish(nc, evs)
    await nc.jetstream().publish("tollway.call.completed.x", b"garbage")
    result = await export(nc, tmp_path)
    calls = [e for e in evs if isinstance(e, CallEvent)]
    assert result.read == len(evs) + 1 and result.unreadable == 1
    assert result.events == len(evs)
    per_day = Counter(day_of(e.occurred_at) for e in calls)
    assert {p: n for p, n in result.files.items() if p.startswith("calls/")} == {
        f"calls/{d}.parquet": n for d, n in per_day.items()}
    assert len(per_day) == 3
    db = duckdb.connect()
    glob = str(tmp_path / "calls" / "*.parquet")
    count, cost, prompt = db.execute(
        f"SELECT count(*), sum(actual_cost_nanousd), sum(prompt_tokens) FROM read_parquet('{glob}')"
    ).fetchone() or (0, 0, 0)
    assert (count, cost, prompt) == (len(calls), sum(e.actual_cost_nanousd for e in calls),
                                     sum(e.prompt_tokens for e in calls))
    # The same columns as the PostgreSQL table, typed.
    described = db.execute(f"DESCRIBE SELECT * FROM read_parquet('{glob}')").fetchall()
    assert tuple(r[0] for r in described) == ledger.CALL_COLUMNS
    types = {r[0]: r[1] for r in described}
    assert types["occurred_at"] == "TIMESTAMP WITH TIME ZONE" and types["day"] == "DATE"
    assert types["fallbacks"] == "VARCHAR[]" and types["actual_cost_nanousd"] == "BIGINT"
    by_day = dict(db.execute(f"SELECT CAST(day AS VARCHAR), count(*) FROM read_parquet('{glob}') "
                             "GROUP BY day").fetchall())
    assert by_day == dict(per_day)
    df = pd.read_parquet(tmp_path / "calls")
    assert len(df) == len(calls) and int(df["actual_cost_nanousd"].sum()) == cost
    budget = pd.read_parquet(tmp_path / "budget_events")
    assert len(budget) == sum(type(e).__name__.startswith("Budget") for e in evs)


async def test_since_until_and_reexport(nc: NatsClient, tmp_path: Path) -> None:
    """Only events with since <= occurred_at < until; a day exported again is replaced."""
    evs = list(synthetic.events(600, days=3.0))
    await publish(nc, evs)
    since, until = synthetic.DAY0 + 86400, synthetic.DAY0 + 2 * 86400
    # The events are older than the stream's own clock: --since takes them all from the start.
    result = await export(nc, tmp_path, since=since, until=until)
    want = [e for e in evs if since <= e.occurred_at < until]
    assert result.events == len(want)
    assert {p.split("/")[1] for p in result.files} == {"2026-01-02.parquet"}
    again = await export(nc, tmp_path, since=since, until=until)
    assert again.files == result.files
    n = duckdb.connect().execute(
        f"SELECT count(*) FROM read_parquet('{tmp_path}/calls/*.parquet')").fetchone()
    assert n == (sum(isinstance(e, CallEvent) for e in want),)
    assert not list(tmp_path.rglob("*.tmp"))


async def test_since_after_the_last_publish_exports_nothing(nc: NatsClient,
                                                            tmp_path: Path) -> None:
    await publish(nc, list(synthetic.events(20)))
    far = 4102444800.0  # 2100-01-01
    result = await export(nc, tmp_path, since=far)
    assert result.events == 0 and result.files == {}


async def test_cli(nc: NatsClient, tmp_path: Path, nats_server: object) -> None:
    evs = list(synthetic.events(50))
    await publish(nc, evs)
    out = io.StringIO()
    args = sink_cli.argparse.Namespace(url=nats_server.url,  # type: ignore[attr-defined]
                                       since=sink_cli.parse_time("2026-01-01"),
                                       until=sink_cli.parse_time("2026-01-02T00:00:00Z"),
                                       out=str(tmp_path))
    assert await sink_cli.run_export(default_config(), args, out) == 0
    report = json.loads(out.getvalue())
    assert report["events"] == sum(day_of(e.occurred_at) == "2026-01-01" for e in evs)
    assert set(report["files"]) <= {f"{t}/2026-01-01.parquet" for t in ledger.TABLES}

"""``tollway export parquet``: the ledger as Parquet files, one per table and UTC day.

``OUT/<table>/<YYYY-MM-DD>.parquet`` holds the events of that day (by ``occurred_at``) with
the columns of the PostgreSQL table of the same name (``tollway.sink.ledger``); DuckDB reads
a table as ``read_parquet('OUT/calls/*.parquet')``, pandas as ``read_parquet('OUT/calls')``.
The export reads the stream itself (no database needed): from the first message published at
``since`` (less a clock-skew margin) to the stream's end, since an event reaches the stream
after it occurred, sometimes much later (the outbox holds events while NATS is away). An
exported day's file is replaced whole, written under a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
from nats.aio.client import Client as NatsClient
from nats.js.api import ConsumerConfig, DeliverPolicy

from tollway.events.nats.bulk import BulkReader, BulkUnavailable
from tollway.events.schema import STREAM, SUBJECTS, decode
from tollway.sink import ledger

SKEW_S = 600.0  # events published up to this long before they occurred (clocks apart)
FLUSH_ROWS = 100_000  # rows of one file kept in memory before they are written as a row group

_DERIVED: dict[str, pa.DataType] = {
    "seq": pa.int64(), "occurred_at": pa.timestamp("us", tz="UTC"),
    "expires_at": pa.timestamp("us", tz="UTC"), "day": pa.date32(), "type": pa.string(),
    "outcome": pa.string(), "subject_id": pa.string(), "details": pa.string(),
}


def _arrow_type(hint: Any) -> pa.DataType:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return _arrow_type(inner)
    if origin is typing.Literal or hint is str:
        return pa.string()
    if origin is tuple:
        return pa.list_(_arrow_type(args[0]))
    if hint is bool:
        return pa.bool_()
    if hint is int:
        return pa.int64()
    if hint is float:
        return pa.float64()
    raise TypeError(f"no Parquet type for {hint!r}")


def schema(table: ledger.Table) -> pa.Schema:
    hints: dict[str, Any] = {}
    for cls in table.events:
        for f in msgspec.structs.fields(cls):
            hints.setdefault(f.name, f.type)
    return pa.schema([(c, _DERIVED[c] if c in _DERIVED else _arrow_type(hints[c]))
                      for c in table.columns])


SCHEMAS = {name: schema(t) for name, t in ledger.TABLES.items()}
_OCCURRED = {name: t.columns.index("occurred_at") for name, t in ledger.TABLES.items()}


@dataclass
class ExportResult:
    files: dict[str, int] = field(default_factory=dict)  # relative path -> rows
    events: int = 0  # events written
    read: int = 0  # messages read from the stream
    unreadable: int = 0  # messages this version cannot read (not exported)
    first_seq: int = 0
    last_seq: int = 0


class _Files:
    """One Parquet writer per (table, day), opened on first rows, renamed into place at end."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.buffers: dict[tuple[str, str], list[ledger.Row]] = {}
        self.writers: dict[tuple[str, str], pq.ParquetWriter] = {}
        self.counts: dict[tuple[str, str], int] = {}

    def _path(self, key: tuple[str, str], tmp: bool = False) -> Path:
        table, day = key
        return self.out / table / (f".{day}.parquet.tmp" if tmp else f"{day}.parquet")

    def add(self, table: str, day: str, row: ledger.Row) -> None:
        key = (table, day)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = []
        buf.append(row)
        if len(buf) >= FLUSH_ROWS:
            self._flush(key)

    def _flush(self, key: tuple[str, str]) -> None:
        rows = self.buffers.pop(key, [])
        if not rows:
            return
        sch = SCHEMAS[key[0]]
        cols = list(zip(*rows, strict=True))
        batch = pa.record_batch([pa.array(c, type=f.type) for c, f in zip(cols, sch,
                                                                            strict=True)],
                                schema=sch)
        w = self.writers.get(key)
        if w is None:
            path = self._path(key, tmp=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            w = self.writers[key] = pq.ParquetWriter(path, sch, compression="zstd")
        w.write_batch(batch)
        self.counts[key] = self.counts.get(key, 0) + len(rows)

    def close(self) -> dict[str, int]:
        for key in list(self.buffers):
            self._flush(key)
        out = {}
        for key, w in self.writers.items():
            w.close()
            self._path(key, tmp=True).replace(self._path(key))
            out[str(self._path(key).relative_to(self.out))] = self.counts[key]
        self.writers = {}
        return out

    def abort(self) -> None:
        for key, w in self.writers.items():
            with contextlib.suppress(Exception):
                w.close()
            self._path(key, tmp=True).unlink(missing_ok=True)
        self.writers = {}


async def _start_seq(nc: NatsClient, stream: str, since: float | None) -> int:
    """The first sequence published at ``since - SKEW_S`` or later (0: none).

    Asked of the server through a consumer created at that time (the JetStream API itself:
    nats-py's ConsumerConfig takes the time as a string or a datetime depending on its
    release); it reports the sequence it starts from and is deleted at once.
    """
    info = await nc.jetstream().stream_info(stream)
    if info.state.messages == 0:
        return 0
    if since is None:
        return int(info.state.first_seq)
    at = datetime.fromtimestamp(max(0.0, since - SKEW_S), UTC)
    config = {"deliver_policy": "by_start_time",
              "opt_start_time": at.isoformat().replace("+00:00", "Z"),
              "ack_policy": "none", "mem_storage": True, "num_replicas": 1,
              "inactive_threshold": 10_000_000_000}
    reply = await nc.request(f"$JS.API.CONSUMER.CREATE.{stream}",
                             msgspec.json.encode({"stream_name": stream, "config": config}),
                             timeout=10.0)
    created: dict[str, Any] = msgspec.json.decode(reply.data)
    if "error" in created:
        raise RuntimeError(f"JetStream refused a consumer on {stream}: {created['error']}")
    with contextlib.suppress(Exception):
        await nc.request(f"$JS.API.CONSUMER.DELETE.{stream}.{created['name']}", b"",
                         timeout=10.0)
    if int(created.get("num_pending", 0)) == 0:
        return 0
    return int(created["delivered"]["stream_seq"]) + 1


async def _messages(nc: NatsClient, stream: str, start: int, stop: int,
                    ) -> typing.AsyncIterator[Iterable[tuple[int, bytes]]]:
    try:
        async with await BulkReader.connect(nc) as reader, contextlib.aclosing(
                reader.read(stream, start_seq=start, stop_seq=stop)) as batches:
            async for seqs, payloads in batches:
                yield zip(seqs, payloads, strict=True)
        return
    except BulkUnavailable:
        pass
    js = nc.jetstream()
    sub = await js.subscribe(SUBJECTS, stream=stream, ordered_consumer=True,
                             config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                                   opt_start_seq=start))
    try:
        while True:
            msg = await sub.next_msg(timeout=30.0)
            seq = int(msg.metadata.sequence.stream)
            if seq > stop:
                return
            yield [(seq, msg.data)]
            if seq >= stop or msg.metadata.num_pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def export(nc: NatsClient, out: Path, *, since: float | None = None,
                 until: float | None = None, stream: str = STREAM) -> ExportResult:
    """Events with ``since <= occurred_at < until`` (unix seconds; None: unbounded)."""
    result = ExportResult()
    start = await _start_seq(nc, stream, since)
    if start == 0:
        return result
    stop = int((await nc.jetstream().stream_info(stream)).state.last_seq)
    lo = float("-inf") if since is None else since
    hi = float("inf") if until is None else until
    files = _Files(out)
    try:
        async for batch in _messages(nc, stream, start, stop):
            rows = ledger.to_rows(batch, decode)
            result.read += rows.count
            result.unreadable += len(rows.other)
            for name, lst in rows.by_table.items():
                at = _OCCURRED[name]
                for r in lst:
                    ts: datetime = r[at]
                    t = ts.timestamp()
                    if lo <= t < hi:
                        files.add(name, ts.date().isoformat(), r)
                        result.events += 1
                if lst:
                    result.first_seq = result.first_seq or lst[0][1]
                    result.last_seq = max(result.last_seq, lst[-1][1])
        result.files = files.close()
    except BaseException:
        files.abort()
        raise
    return result

"""``tollway sink postgres``: every event of the stream into PostgreSQL, exactly once.

The position is in PostgreSQL, not in NATS: each transaction inserts a batch of rows and
moves ``sink_position.last_seq`` to the batch's last stream sequence (a compare-and-set on
the sequence it read), so rows and position commit or vanish together. A sink that starts
(or restarts after a crash anywhere) reads the position and consumes the stream from the
next sequence; what it had read and not committed is read again. Rows are keyed by
``event_id`` and inserted ``ON CONFLICT DO NOTHING``: an event published twice (an outbox
resend after the stream's duplicate window, a stream recreated under the sink) is still one
row.

The stream is read through the bulk reader (``tollway.events.nats.bulk``, an ephemeral push
consumer from the position), or nats-py's ordered consumer where that cannot be used (TLS,
nkeys). A batch is written with COPY into a temporary table and one ``INSERT ... SELECT ...
ON CONFLICT`` per table; while PostgreSQL commits one batch, the next is read. Only one sink
writes to a database at a time (a session advisory lock): start two, and the second waits as
a standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
import psycopg
from nats.aio.client import Client as NatsClient
from nats.js.api import ConsumerConfig, DeliverPolicy

from tollway.events.nats.bulk import BulkReader, BulkUnavailable
from tollway.events.schema import STREAM, SUBJECTS, decode
from tollway.sink import ledger, migrations

log = logging.getLogger("tollway.sink")

LOCK_KEY = 0x746F6C6C77617932  # "tollway2": the session lock of the writing sink


# What PostgreSQL (or psycopg, dumping the row) refuses of a row: a NUL in a text, a number
# past bigint, a time past any date; a value it cannot even allocate (seen as "out of
# memory", ProgramLimitExceeded, with the oldest psycopg the bounds allow). The batch then
# goes row by row, each refused row kept whole in other_events.
REFUSED = (psycopg.DataError, psycopg.errors.ProgramLimitExceeded, ValueError, OverflowError)

class PositionMoved(RuntimeError):
    """Another writer moved the position under this one: start again from the database."""


@dataclass
class SinkStats:
    committed_seq: int = 0  # the stream sequence the database holds every event up to
    stream_last_seq: int = 0  # the stream's last sequence, as last seen
    events: int = 0  # messages committed by this process
    rows: int = 0  # of which new rows (not already there)
    batches: int = 0
    restarts: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def lag(self) -> int:
        return max(0, self.stream_last_seq - self.committed_seq)


class Writer:
    """One psycopg connection (used from a worker thread): schema check, lock, batches."""

    def __init__(self, dsn: str, stream: str) -> None:
        self.dsn = dsn
        self.stream = stream
        self.conn: psycopg.Connection[Any] | None = None
        self.last_seq = 0
        self.stream_created = ""
        self._columns: dict[str, tuple[str, ...]] = {}
        self._types: dict[str, list[str]] = {}  # tables written with binary COPY

    def open(self, *, migrate: bool = False) -> int:
        conn = self.conn = psycopg.connect(self.dsn, autocommit=True,
                                           application_name="tollway-sink")
        if migrate:
            done = migrations.migrate(conn)
            if done:
                log.info("sink: migrated the ledger schema", extra={"versions": done})
        version = migrations.check(conn)
        self._columns = self._writable_columns()
        for name in (*self._columns, "other_events"):
            conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS _in_{name} "
                         f"(LIKE {name} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
        return version

    def _writable_columns(self) -> dict[str, tuple[str, ...]]:
        """The columns this sink writes per table; every one must exist in the database."""
        assert self.conn is not None
        have: dict[str, dict[str, str]] = {}
        for table, column, type_ in self.conn.execute(
                "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) "
                "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                "WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r' "
                "AND a.attnum > 0 AND NOT a.attisdropped").fetchall():
            have.setdefault(table, {})[column] = type_
        out = {}
        self._types = {}
        for t in ledger.TABLES.values():
            cols = have.get(t.name, {})
            missing = [c for c in t.columns if c not in cols]
            if missing:
                raise migrations.SchemaError(
                    f"table {t.name} lacks columns {missing}: run `tollway sink postgres "
                    "--migrate` (or the migrations lag behind the events: a bug)")
            out[t.name] = t.columns
            types = [cols[c] for c in t.columns]
            if "jsonb" not in types:
                self._types[t.name] = types
        return out

    def try_lock(self) -> bool:
        assert self.conn is not None
        row = self.conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
        return bool(row and row[0])

    def position(self, stream_created: str) -> int:
        """The committed sequence; a stream made anew since (its creation time changed)
        is read again from its start: the rows it holds already are not inserted twice."""
        assert self.conn is not None
        with self.conn.transaction():
            row = self.conn.execute("SELECT last_seq, stream_created FROM sink_position "
                                    "WHERE stream = %s FOR UPDATE", (self.stream,)).fetchone()
            if row is None:
                self.conn.execute("INSERT INTO sink_position (stream, last_seq, stream_created)"
                                  " VALUES (%s, 0, %s)", (self.stream, stream_created))
                last = 0
            elif row[1] and stream_created and row[1] != stream_created:
                log.warning("sink: stream %s was created anew since the last run; reading it "
                            "from its start (rows already stored are skipped)", self.stream)
                self.conn.execute("UPDATE sink_position SET last_seq = 0, stream_created = %s "
                                  "WHERE stream = %s", (stream_created, self.stream))
                last = 0
            else:
                last = int(row[0])
                if not row[1] and stream_created:
                    self.conn.execute("UPDATE sink_position SET stream_created = %s WHERE "
                                      "stream = %s", (stream_created, self.stream))
        self.last_seq = last
        self.stream_created = stream_created
        return last

    def write(self, rows: ledger.Rows, last_seq: int,
              raw: tuple[list[int], list[bytes]] | None = None) -> int:
        """Insert ``rows`` and move the position to ``last_seq`` in one transaction; returns
        the rows inserted (events already stored are not). ``raw``: the batch's sequences and
        messages, for a row PostgreSQL refuses (kept whole in other_events instead)."""
        assert self.conn is not None
        conn = self.conn
        inserted = 0
        with conn.transaction():
            cur = conn.cursor()
            batches = [(name, self._columns[name], lst) for name, lst in rows.by_table.items()
                       if lst]
            if rows.other:
                batches.append(("other_events", ledger.OTHER_COLUMNS, rows.other))
            for name, cols, lst in batches:
                # Straight into the table (binary COPY: the least work on both sides); a row
                # already there fails it, and the batch goes again through the temporary
                # table, inserted with ON CONFLICT DO NOTHING.
                try:
                    with conn.transaction():
                        self._copy(cur, name, name, cols, lst)
                    inserted += len(lst)
                except psycopg.errors.UniqueViolation:
                    inserted += self._insert_new(cur, name, cols, lst)
                except REFUSED:
                    inserted += self._row_by_row(cur, name, cols, lst, raw)
            cur.execute("UPDATE sink_position SET last_seq = %s, updated_at = now() "
                        "WHERE stream = %s AND last_seq = %s",
                        (last_seq, self.stream, self.last_seq))
            if cur.rowcount != 1:
                raise PositionMoved(f"sink_position of {self.stream} is no longer at "
                                    f"{self.last_seq}: another sink wrote")
        self.last_seq = last_seq
        return inserted

    def _insert_new(self, cur: psycopg.Cursor[Any], name: str, cols: tuple[str, ...],
                    rows: list[ledger.Row]) -> int:
        """Through the temporary table: the rows not there yet."""
        self._copy(cur, f"_in_{name}", name, cols, rows)
        names = ", ".join(cols)
        cur.execute(f"INSERT INTO {name} ({names}) SELECT {names} FROM _in_{name} "
                    "ON CONFLICT (event_id) DO NOTHING")
        n = max(cur.rowcount, 0)
        cur.execute(f"TRUNCATE _in_{name}")
        return n

    def _row_by_row(self, cur: psycopg.Cursor[Any], name: str, cols: tuple[str, ...],
                    rows: list[ledger.Row], raw: tuple[list[int], list[bytes]] | None) -> int:
        """A batch PostgreSQL refused (a NUL character in a text, a number past bigint): row by
        row, each one it refuses kept whole in other_events, so one bad event cannot stop
        the sink."""
        assert self.conn is not None
        messages = dict(zip(*raw, strict=True)) if raw is not None else {}
        n = 0
        for r in rows:
            try:
                with self.conn.transaction():
                    n += self._insert_new(cur, name, cols, [r])
            except REFUSED as exc:
                seq = int(r[1])
                log.warning("sink: PostgreSQL refused the event at sequence %d (%s); kept "
                            "whole in other_events", seq, type(exc).__name__)
                data = messages.get(seq, b"")
                n += self._insert_new(cur, "other_events", ledger.OTHER_COLUMNS,
                                      [ledger.other_row(seq, data)])
        return n

    def _copy(self, cur: psycopg.Cursor[Any], into: str, table: str, cols: tuple[str, ...],
              rows: list[ledger.Row]) -> None:
        types = self._types.get(table)
        names = ", ".join(cols)
        if types is None:  # jsonb (admin details, kept as text) and other_events: text COPY
            with cur.copy(f"COPY {into} ({names}) FROM STDIN") as copy:
                for r in rows:
                    copy.write_row(r)
            return
        with cur.copy(f"COPY {into} ({names}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(types)
            for r in rows:
                copy.write_row(r)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def migrate_only(dsn: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True, application_name="tollway-sink") as conn:
        return migrations.migrate(conn)


class PostgresSink:
    """Runs until stopped (or, with ``until_caught_up``, until the stream's end at start)."""

    def __init__(self, nc: NatsClient, dsn: str, *, stream: str = STREAM,
                 batch_size: int = 5000, max_wait_s: float = 0.5, bulk: bool = True,
                 migrate: bool = False, log_interval_s: float = 30.0,
                 standby_poll_s: float = 2.0,
                 on_commit: Callable[[SinkStats], None] | None = None) -> None:
        self.nc = nc
        self.dsn = dsn
        self.stream = stream
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.bulk = bulk
        self.migrate = migrate
        self.log_interval_s = log_interval_s
        self.standby_poll_s = standby_poll_s
        self.on_commit = on_commit
        self.stats = SinkStats()
        self._seqs: list[int] = []
        self._payloads: list[bytes] = []
        self._arrived = asyncio.Event()
        self._drained = asyncio.Event()
        self._opened = False  # the database was reached once: later failures are retried

    # ---- the loop --------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None, *, until_caught_up: bool = False,
                  retry_s: float = 0.5) -> SinkStats:
        stop = stop or asyncio.Event()
        delay = retry_s
        while not stop.is_set():
            try:
                if await self._run_once(stop, until_caught_up):
                    break
                delay = retry_s
            except (migrations.SchemaError, psycopg.errors.InsufficientPrivilege):
                raise  # not going to change by itself
            except (OSError, psycopg.Error, nats.errors.Error, PositionMoved, RuntimeError,
                    TimeoutError, msgspec.DecodeError) as exc:
                if not self._opened:
                    raise  # never got going (a wrong DSN, no database): say so, not retry
                # Lost PostgreSQL or NATS, or another writer: start again from the database.
                self.stats.restarts += 1
                log.warning("sink: %s: %s; starting again from the database's position in "
                            "%.1fs", type(exc).__name__, exc, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
                delay = min(delay * 2, 10.0)
        return self.stats

    async def _run_once(self, stop: asyncio.Event, until_caught_up: bool) -> bool:
        """One connection's life; True when done (caught up), False when stopped."""
        writer = Writer(self.dsn, self.stream)
        reader_task: asyncio.Task[None] | None = None
        try:
            await asyncio.to_thread(writer.open, migrate=self.migrate)
            self._opened = True
            standby = False
            while not await asyncio.to_thread(writer.try_lock):
                if not standby:
                    standby = True
                    log.info("sink: another sink holds the database; waiting as a standby")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.standby_poll_s):
                        await stop.wait()
                if stop.is_set():
                    return False
            info = await self.nc.jetstream().stream_info(self.stream)
            created = str(getattr(info, "created", "") or "")
            start = await asyncio.to_thread(writer.position, created) + 1
            self.stats.committed_seq = start - 1
            self.stats.stream_last_seq = info.state.last_seq
            target = info.state.last_seq
            if 1 < start < info.state.first_seq:
                log.warning("sink: the stream no longer holds sequences %d-%d (its limits "
                            "removed them before they were written)", start,
                            info.state.first_seq - 1)
            if until_caught_up and start > target:
                return True
            log.info("sink: writing the stream from sequence %d", start)
            self._seqs, self._payloads = [], []
            reader_task = asyncio.create_task(self._read(start))
            return await self._write_loop(writer, reader_task, stop,
                                          target if until_caught_up else None)
        finally:
            if reader_task is not None:
                reader_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader_task
            await asyncio.to_thread(writer.close)

    async def _write_loop(self, writer: Writer, reader: asyncio.Task[None], stop: asyncio.Event,
                          target: int | None) -> bool:
        """Gather a batch, decode it while the previous one commits, then commit it."""
        next_log = time.monotonic() + self.log_interval_s
        in_flight: asyncio.Future[int] | None = None
        flight_seqs = (0, 0)  # events and last sequence of the batch in flight

        async def landed() -> None:
            nonlocal in_flight, next_log
            if in_flight is None:
                return
            fut, in_flight = in_flight, None
            inserted = await fut
            n, last = flight_seqs
            st = self.stats
            st.committed_seq = last
            st.stream_last_seq = max(st.stream_last_seq, last)
            st.events += n
            st.rows += inserted
            st.batches += 1
            if self.on_commit is not None:
                self.on_commit(st)
            if time.monotonic() >= next_log:
                next_log = time.monotonic() + self.log_interval_s
                rate = st.events / max(1e-9, time.monotonic() - st.started)
                log.info("sink: committed", extra={
                    "committed_seq": st.committed_seq, "lag": st.lag, "events": st.events,
                    "rows": st.rows, "events_per_s": round(rate)})

        try:
            while True:
                if target is not None and (self._seqs and self._seqs[0] > target):
                    await landed()
                    return True
                first_wait = time.monotonic()
                # Up to a batch, or what came within max_wait_s of the first message.
                while len(self._seqs) < self.batch_size:
                    if reader.done():
                        reader.result()  # raises what stopped it
                        raise RuntimeError("the stream reader stopped")
                    if in_flight is not None and in_flight.done():
                        await landed()
                        if target is not None and self.stats.committed_seq >= target:
                            return True
                    if stop.is_set() and not self._seqs:
                        await landed()
                        return False
                    left = self.max_wait_s - (time.monotonic() - first_wait)
                    if self._seqs and (left <= 0 or stop.is_set()):
                        break
                    if target is not None and self._seqs and self._seqs[-1] >= target:
                        break
                    self._arrived.clear()
                    waiters: list[asyncio.Future[Any]] = [
                        asyncio.ensure_future(self._arrived.wait()),
                        asyncio.ensure_future(stop.wait()), reader]
                    if in_flight is not None:
                        waiters.append(in_flight)
                    await asyncio.wait(waiters, timeout=left if self._seqs else None,
                                       return_when=asyncio.FIRST_COMPLETED)
                    for w in waiters[:2]:
                        w.cancel()
                    if not self._seqs:
                        first_wait = time.monotonic()
                n = min(len(self._seqs), self.batch_size)
                if target is not None:
                    # Stop at the target: what came after it is for the next run.
                    n = min(n, next((i + 1 for i, s in enumerate(self._seqs) if s >= target),
                                    n))
                seqs, payloads = self._seqs[:n], self._payloads[:n]
                del self._seqs[:n], self._payloads[:n]
                self._drained.set()
                rows = ledger.to_rows(zip(seqs, payloads, strict=True), decode)
                await landed()  # one transaction at a time, in order
                in_flight = asyncio.ensure_future(asyncio.to_thread(
                    writer.write, rows, seqs[-1], (seqs, payloads)))
                flight_seqs = (len(seqs), seqs[-1])
                if target is not None and seqs[-1] >= target:
                    await landed()
                    return True
        finally:
            if in_flight is not None:
                # Let a transaction under way end (committed or not) before the connection
                # is closed under it.
                with contextlib.suppress(Exception):
                    await asyncio.shield(in_flight)

    # ---- reading ---------------------------------------------------------------------------
    def _add(self, seqs: list[int], payloads: list[bytes]) -> None:
        self._seqs.extend(seqs)
        self._payloads.extend(payloads)
        self._arrived.set()

    async def _backpressure(self) -> None:
        while len(self._seqs) >= 4 * self.batch_size:
            self._drained.clear()
            await self._drained.wait()

    async def _read(self, start: int) -> None:
        if self.bulk:
            try:
                async with await BulkReader.connect(self.nc) as reader, contextlib.aclosing(
                        reader.read(self.stream, start_seq=start, follow=True)) as batches:
                    async for seqs, payloads in batches:
                        self._add(seqs, payloads)
                        self.stats.stream_last_seq = max(self.stats.stream_last_seq,
                                                         seqs[-1] + max(0, reader.pending))
                        await self._backpressure()
                return
            except BulkUnavailable as exc:
                log.info("sink: reading the stream through nats-py (%s)", exc)
        await self._read_nats_py(start)

    async def _read_nats_py(self, start: int) -> None:
        js = self.nc.jetstream()
        sub = await js.subscribe(SUBJECTS, stream=self.stream, ordered_consumer=True,
                                 config=ConsumerConfig(
                                     deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                     opt_start_seq=start))
        try:
            while True:
                msg = await sub.next_msg(timeout=None)
                seq = msg.metadata.sequence.stream
                self._add([seq], [msg.data])
                self.stats.stream_last_seq = max(self.stats.stream_last_seq,
                                                 seq + msg.metadata.num_pending)
                if len(self._seqs) >= 4 * self.batch_size:
                    await self._backpressure()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

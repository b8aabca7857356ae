"""The publisher: every event written to the outbox as it is submitted, and published from
a bounded in-memory queue by one task.

``submit`` is what the response path pays, before the call's last bytes go out
(:meth:`tollway.pipeline.Pipeline.run`): the event is encoded and appended to
the :class:`~tollway.events.outbox.Outbox` with one ``write`` (the page cache,
no fsync), so a process killed any time after the client got its answer
loses no event of it: the restart sends what the outbox holds. The entry is
also queued; the task writes batches of publishes to the connection at once
(pipelined, each with ``Nats-Msg-Id = event_id``), waits for their acks, and
marks the acked lines sent in the outbox (an offset; the file is truncated
once all of it is sent and it has grown past 1 MiB).

When the queue cannot be published -- NATS unreachable, acks not back in
time, the queue full -- it is let go ("spilled"): its events are in the outbox
already, and the task sends the outbox, in order, from the file until it is
empty, then goes back to the queue. Outbox reads and fsyncs run in a writer
thread of the publisher's own, so the loop never waits for the disk to sync.
Writes past the outbox's byte cap (``outbox_full``) or that fail
(``outbox_unwritable``) are not made durable: while the queue is in use the
event is published from memory, else it is dropped; both are counted and
logged.

The publishes go out on a raw NATS connection of the publisher's own
(:class:`~tollway.events.nats.wire.PublishWire`: a batch is one write, its acks are
parsed in bulk from the received bytes), opened with the credentials of the
nats-py client it is attached to. When that cannot be done (TLS, nkeys, JWTs:
``BulkUnavailable``), or with ``raw=False``, they go through the nats-py
client instead; when the raw connection cannot be opened for a while although
nats-py is connected, through nats-py meanwhile. A raw connection lost with a
batch in flight, or silent past ``publish_timeout_s``, is NATS failing: the
queue is spilled, and a new connection is opened on the next cycle. A resend
of what did reach the stream is dropped there as a duplicate. An event larger
than the server's ``max_payload`` is never sent (the server would close the
connection over it): it is dropped and counted as rejected, on either path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tollway.aio import cancel_and_wait
from tollway.events.metrics import EventMetrics
from tollway.events.nats.bulk import BulkError, BulkUnavailable, Endpoint
from tollway.events.nats.wire import (
    DUP,
    FATAL,
    HEADER_OVERHEAD,
    NO_ACK,
    OK,
    RETRY,
    PublishWire,
    classify,
)
from tollway.events.outbox import Outbox, OutboxEntry, line_of
from tollway.events.schema import Event, RecordEncoder, encode
from tollway.record import CallRecord

log = logging.getLogger("tollway.events")

Item = CallRecord | Event
T = TypeVar("T")


class EventIds:
    """Unique, cheap event ids: a random 80-bit prefix per process plus a counter."""

    def __init__(self) -> None:
        self._format = os.urandom(10).hex() + "%012x"  # faster than an f-string per id
        self._n = itertools.count()

    def __call__(self) -> str:
        return self._format % next(self._n)


class _RateLimitedLog:
    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = collections.Counter()
        self._lock = threading.Lock()  # the writer thread logs too

    def __call__(self, level: int, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e9) < self.every_s:
                self._suppressed[key] += 1
                return
            n = self._suppressed.pop(key, 0)
            self._last[key] = now
        log.log(level, msg + (f" ({n} similar suppressed)" if n else ""), *args)


class Publisher:
    """Queue + publisher task + outbox. One per gateway process."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        metrics: EventMetrics | None = None,
        instance: str = "",
        queue_size: int = 10_000,
        batch_size: int = 256,
        publish_timeout_s: float = 2.0,
        linger_s: float = 0.01,
        on_no_stream: Callable[[], Awaitable[None]] | None = None,
        raw: bool = True,
    ) -> None:
        self.outbox = outbox
        self.metrics = metrics or EventMetrics()
        self.instance = instance
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.publish_timeout_s = publish_timeout_s
        self.linger_s = linger_s
        self.on_no_stream = on_no_stream
        self.raw = raw
        self.via = ""  # how the last batch went out: "wire" (raw connection) or "nats-py"
        self.new_id = EventIds()
        self._encode_record = RecordEncoder(instance)
        # Entries with the bytes of their outbox line (0: not in the outbox), in the
        # outbox's order: while not spilled, they are its unsent lines after the batch out.
        self._q: collections.deque[tuple[OutboxEntry, int]] = collections.deque()
        self._spilled = False  # the outbox file, not the queue, holds what is sent next
        self._spill_reason = ""
        self._io: asyncio.Future[Any] | None = None  # the outbox operation in its thread
        # One thread of its own: outbox operations run one at a time, in order, and a hung
        # disk holds this thread only, not the loop's default executor other work shares.
        self._writer: ThreadPoolExecutor | None = None
        self._full_dropped = 0  # events refused at the outbox cap since it filled
        self._refusal = "outbox_unwritable"  # why the outbox refused an event last
        self._nc: NatsClient | None = None
        self._wire: PublishWire | None = None
        self._no_wire = "" if raw else "raw=False"  # why this connection is not spoken raw
        self._wire_retry_at = 0.0
        self._wire_backoff = 0.0
        self._outstanding = 0  # entries of the batch in flight
        self._last_send = 0.0  # time.monotonic() when the last batch from the queue went out
        # The nats-py path: entry i of the batch in flight has reply token _base + i.
        self._prefix = ""
        self._sub: Any = None
        self._next_token = 1
        self._base = 0
        self._results: list[int] = []
        self._awaiting = 0
        self._acked = asyncio.Event()
        self._wake = asyncio.Event()
        self._idle = False
        self._stopping = False
        self._stopped = False
        self._no_stream = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._log = _RateLimitedLog()
        self._drained = asyncio.Event()
        self.metrics.queue_depth.set_function(lambda: len(self._q))
        self.metrics.outbox_depth.set_function(
            lambda: self.outbox.pending if self._spilled else 0)
        self.metrics.outbox_bytes.set_function(lambda: self.outbox.unsent_bytes)
        self.metrics.outbox_max_bytes.set(self.outbox.max_bytes)

    # ---- the response path -------------------------------------------------------------------
    def submit(self, item: Item) -> None:
        """Write one record or event to the outbox and queue it. Never raises; waits for
        one ``write`` (not for an fsync, nor NATS)."""
        try:
            if self._loop_thread and threading.get_ident() != self._loop_thread:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self.submit, item)
                return
            try:
                entry = self._entry(item)
            except Exception as exc:
                self._unencodable(exc)
                return
            n = self._journal(entry)
            if self._stopped:
                # A call settling after stop(): no task is left to send it; the next start
                # does, from the outbox.
                if n:
                    self.metrics.spilled.labels("shutdown").inc()
                    self.outbox.flush(force_sync=True)
                else:
                    self._drop(1)
                return
            if not self._spilled and len(self._q) >= self.queue_size:
                self._log(logging.WARNING, "overflow", "events queue full (%d): events are "
                          "sent from the outbox", self.queue_size)
                self._spill("queue_full")
            if self._spilled:
                if n:
                    self.metrics.spilled.labels(self._spill_reason).inc()
                else:
                    self._drop(1)
            else:
                self._q.append((entry, n))
            if self._idle:
                self._idle = False
                if self.linger_s:  # let a few more events join the batch
                    assert self._loop is not None
                    self._loop.call_later(self.linger_s, self._wake.set)
                else:
                    self._wake.set()
        except Exception as exc:  # the pipeline must never see an events failure
            self.metrics.dropped.labels("internal").inc()
            self._log(logging.ERROR, "submit", "events: could not queue an event (%r); "
                      "dropped", exc)

    def _journal(self, entry: OutboxEntry) -> int:
        """Append to the outbox: the bytes written; 0 when the cap or the disk refused."""
        try:
            n = self.outbox.append(line_of(entry))
        except OSError as exc:
            self._refused("outbox_unwritable")
            self._log(logging.ERROR, "outbox", "events: outbox not writable (%s); events "
                      "are not durable until it is", exc)
            return 0
        if n:
            if self._full_dropped:
                log.warning("events: the outbox takes events again; %d were refused while "
                            "it was full", self._full_dropped)
                self._full_dropped = 0
            return n
        self._refused("outbox_full")
        if not self._full_dropped:
            log.error("events: the outbox reached its cap of %d unsent bytes; events past it "
                      "are not durable until it drains (published from memory while NATS "
                      "keeps up, else dropped; calls are still served)", self.outbox.max_bytes)
        self._full_dropped += 1
        return 0

    def _refused(self, reason: str) -> None:
        self._refusal = reason
        self.metrics.not_journaled.labels(reason).inc()

    def _drop(self, n: int) -> None:
        """Events in neither the stream nor the outbox, nor to be published from memory."""
        self.metrics.dropped.labels(self._refusal).inc(n)
        self._log(logging.ERROR, "drop", "events: %d events dropped (%s)", n, self._refusal)

    def _spill(self, reason: str) -> None:
        """Send from the outbox from now on: the queue's events are there already (in order,
        after the batch in flight), but for those it could not take."""
        if self._spilled:
            return
        self._spilled = True
        self._spill_reason = reason
        q, self._q = self._q, collections.deque()
        lost = sum(1 for _, n in q if not n)
        if len(q) > lost:
            self.metrics.spilled.labels(reason).inc(len(q) - lost)
        if lost:
            self._drop(lost)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self, nc: NatsClient | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tollway-outbox")
        if self.outbox.pending:  # lines from an earlier run go out before anything new
            self._spill("earlier_run")
        if nc is not None:
            await self.attach(nc)
        self._task = asyncio.create_task(self._run(), name="tollway-events-publisher")

    async def attach(self, nc: NatsClient) -> None:
        """Use this connection (also after a late first connect).

        The raw connection is opened by the task, with the credentials of ``nc``."""
        if nc is not self._nc:
            await self._close_wire()
            await self._unsubscribe()
            self._no_wire = "" if self.raw else "raw=False"
            self._wire_retry_at = self._wire_backoff = 0.0
        self._nc = nc
        self.kick()

    def kick(self) -> None:
        """Wake the task (NATS is back, or something was queued from outside)."""
        self._idle = False
        self._wake.set()

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def queued(self) -> int:
        return len(self._q)

    async def flush(self, timeout: float = 10.0, *, outbox: bool = True) -> bool:
        """Wait until the queue (and the outbox) are empty; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._idle_now(outbox):
                return True
            self._drained.clear()
            self.kick()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.05, max(0.0, deadline - time.monotonic()))):
                    await self._drained.wait()
        return self._idle_now(outbox)

    def _idle_now(self, outbox: bool = True) -> bool:
        return (not self._q and not self._outstanding
                and (not outbox or not self.outbox.pending))

    async def stop(self, timeout: float = 5.0) -> None:
        """Publish what is queued (up to ``timeout``); the rest waits in the outbox for the
        next start (the caller closes it)."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            self.kick()
            try:
                async with asyncio.timeout(timeout):
                    await task
            except TimeoutError:
                await cancel_and_wait(task, what="the publisher's task")
        io = self._io
        if io is not None:  # an outbox operation the cancelled task left running
            with contextlib.suppress(Exception):
                await io
        self._stopped = True
        self._spill("shutdown")  # whatever is queued is in the outbox for the next start
        await self._unsubscribe()
        await self._close_wire()
        await self._in_thread(self.outbox.flush, force_sync=True)
        if self._writer is not None:
            self._writer.shutdown(wait=False)  # idle now; records after stop() are written here
        if self.outbox.pending:
            log.warning("events: %d events left in the outbox at shutdown; they are sent "
                        "at the next start", self.outbox.pending)

    # ---- the task ----------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = 0.0
        while True:
            try:
                if self._stopping:
                    if self.connected and not self._idle_now():
                        await self._cycle()  # one last round; stop() bounds how long
                    return
                if backoff:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(backoff):
                            await self._wake.wait()
                    self._wake.clear()
                elif not self._q and not (self.outbox.pending and self._spilled
                                          and self.connected):
                    self._drained.set()
                    self._idle = True
                    if self.outbox.sync_due:
                        await self._in_thread(self.outbox.flush)
                    if self.outbox.needs_sync:  # the fsync interval has not passed yet
                        # No thread hop per idle moment: woken by the next event, or when
                        # the fsync is due.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self.outbox.sync_in):
                                await self._wake.wait()
                    else:
                        await self._wake.wait()
                    self._wake.clear()
                    continue  # a late lingering wake-up may find nothing to do
                ok = await self._cycle()
                backoff = 0.0 if ok else min(max(backoff * 2, 0.1), 2.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log(logging.ERROR, "cycle", "events publisher cycle failed")
                log.debug("publisher cycle", exc_info=True)
                backoff = 1.0

    async def _cycle(self) -> bool:
        """One round: the outbox while spilled, then the queue. False when NATS is failing."""
        if not self.connected or not await self._open_path():
            await self._spill_and_sync("nats_down")
            return False
        if self._no_stream and self.on_no_stream is not None:
            try:
                await self.on_no_stream()
            except Exception as exc:
                # A cluster electing the stream's leader answers nothing for a moment:
                # the events wait in the outbox and the next cycle asks again.
                self._log(logging.WARNING, "ensure", "events: the stream cannot be checked "
                          "(%s); events wait in the outbox", type(exc).__name__)
                await self._spill_and_sync("nats_down")
                return False
            self._no_stream = False
        while True:
            if self.outbox.sync_due:  # under a load that never lets the task idle
                await self._in_thread(self.outbox.flush)
            if self._spilled:
                if not await self._send_outbox():
                    return False
                continue
            if not self._q:
                return True
            if len(self._q) < self.batch_size and self.linger_s and not self._stopping:
                # Under load, batches go out at most every linger_s: a batch per ack round
                # trip was one or two events, each batch a write and a wake-up here and in
                # the server (which then spent twice the CPU per event).
                wait = self._last_send + self.linger_s - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue  # the queue may have been spilled meanwhile
            self._last_send = time.monotonic()
            batch, sizes = self._take(min(len(self._q), self.batch_size))
            # Waiting for the acks yields to the loop once per batch: a long drain does
            # not starve the requests being served. A cancel leaves the batch in the outbox.
            results = await self._publish(batch)
            done = next((i for i, r in enumerate(results) if r >= RETRY), len(results))
            self._count(batch[:done], results[:done])
            sent = sizes[:done]
            self.outbox.advance(sum(sent), len(sent) - sent.count(0))
            if done < len(results):
                # From the first failure on, the outbox sends the batch again, then what
                # followed it (the stream drops the copies of those it stored).
                await self._spill_and_sync("publish_failed")
                return False

    async def _send_outbox(self) -> bool:
        """One batch from the outbox file; False when NATS is failing. Back to the queue
        once the outbox is empty (checked on the loop, where submit appends: nothing can
        come in between)."""
        if not self.outbox.pending:
            self._spilled = False
            return True
        entries, end = await self._in_thread(self.outbox.read_batch, self.batch_size)
        if not entries:
            return True
        results = await self._publish(entries)
        if max(results) >= RETRY:
            await self._in_thread(self.outbox.flush)
            return False
        self._count(entries, results)
        await self._in_thread(self.outbox.commit, end, len(entries))
        return True

    def _count(self, entries: list[OutboxEntry], results: list[int]) -> None:
        ok, dup, fatal = results.count(OK), results.count(DUP), results.count(FATAL)
        if ok or dup:
            self.metrics.published.inc(ok + dup)
        if dup:
            self.metrics.duplicates.inc(dup)
        if fatal:
            self.metrics.dropped.labels("rejected_by_stream").inc(fatal)
            ids = [e.event_id for e, r in zip(entries, results, strict=True) if r == FATAL]
            self._log(logging.ERROR, "fatal", "events: JetStream refused %d events (first %s); "
                      "dropped", fatal, ids[0])

    def _take(self, n: int) -> tuple[list[OutboxEntry], list[int]]:
        """The next ``n`` queued entries and the bytes of their outbox lines (0: not in the
        outbox)."""
        popleft = self._q.popleft
        batch: list[OutboxEntry] = []
        sizes: list[int] = []
        for _ in range(n):
            entry, size = popleft()
            batch.append(entry)
            sizes.append(size)
        return batch, sizes

    def _unencodable(self, exc: Exception) -> None:
        self.metrics.dropped.labels("internal").inc()
        self._log(logging.ERROR, "entry", "events: could not encode an event (%r); dropped",
                  exc)

    def _entry(self, item: Item) -> OutboxEntry:
        if isinstance(item, CallRecord):
            event_id = self.new_id()
            subject, payload = self._encode_record(item, event_id)
            return OutboxEntry(subject, event_id, payload)
        return OutboxEntry(item.subject(), item.event_id, encode(item))

    # ---- the outbox, in a thread -------------------------------------------------------------
    async def _in_thread(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run an outbox operation in the writer thread. Cancelling the task does not
        abandon it: stop() waits for it (a write half done when stop() writes would reorder
        lines)."""
        fut = asyncio.get_running_loop().run_in_executor(
            self._writer, functools.partial(fn, *args, **kw))
        self._io = fut
        return await asyncio.shield(fut)

    async def _spill_and_sync(self, reason: str) -> None:
        self._spill(reason)
        await self._in_thread(self.outbox.flush)

    # ---- the connections -------------------------------------------------------------------
    async def _open_path(self) -> bool:
        """Make sure a batch can go out: (re)open the raw connection when it is due, else
        subscribe nats-py to the acks. False when neither works."""
        nc = self._nc
        assert nc is not None
        wire = self._wire
        if wire is not None and not wire.closed:
            return True
        if wire is not None:
            await self._close_wire()
        if not self._no_wire and time.monotonic() >= self._wire_retry_at:
            try:
                self._wire = await PublishWire.open_any(
                    Endpoint.all_of_client(nc), name=f"tollway publisher {self.instance}".strip(),
                    timeout=self.publish_timeout_s)
                self._wire_backoff = 0.0
                return True
            except BulkUnavailable as exc:
                self._no_wire = str(exc)
                log.info("events: publishing through the nats-py client (%s)", exc)
            except BulkError as exc:
                self._wire_backoff = min(max(self._wire_backoff * 2, 0.5), 30.0)
                self._wire_retry_at = time.monotonic() + self._wire_backoff
                self._log(logging.WARNING, "wire", "events: cannot open the publishing "
                          "connection (%s); publishing through the nats-py client meanwhile",
                          exc)
        if self._sub is None:
            try:
                self._prefix = nc.new_inbox() + "."
                self._sub = await nc.subscribe(self._prefix + "*", cb=self._on_ack)
            except Exception as exc:  # closed / draining / reconnecting
                self._log(logging.WARNING, "subscribe", "events: cannot subscribe to acks "
                          "(%s)", exc)
                return False
        return True

    async def _close_wire(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            await wire.close()

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # ---- publishing --------------------------------------------------------------------------
    async def _publish(self, entries: list[OutboxEntry]) -> list[int]:
        """Publish a batch pipelined; one result per entry (OK, DUP, FATAL; RETRY or NO_ACK:
        send it again)."""
        self._outstanding = len(entries)
        try:
            wire = self._wire
            if wire is None:
                self.via = "nats-py"
                return await self._publish_nats_py(entries)
            self.via = "wire"
            results = await wire.publish(entries, self.publish_timeout_s)
        finally:
            self._outstanding = 0
        if wire.no_responders:
            wire.no_responders = 0
            self._no_stream_seen()
        for text in wire.errors:
            self._log(logging.WARNING, "server", "events: NATS server error: %s", text)
        wire.errors.clear()
        missing = results.count(NO_ACK)
        if missing:
            if wire.closed:
                self._log(logging.WARNING, "lost", "events: publishing connection lost with "
                          "%d of %d acks outstanding; they go to the outbox", missing,
                          len(entries))
            else:
                self._log(logging.WARNING, "timeout", "events: %d of %d acks not back after "
                          "%.1fs; the batch goes to the outbox", missing, len(entries),
                          self.publish_timeout_s)
                await self._close_wire()  # a half-open connection would time out forever
        return results

    def _no_stream_seen(self) -> None:
        self._no_stream = True
        self._log(logging.WARNING, "nostream", "events: no JetStream stream answers on the "
                  "event subjects (none, or a cluster electing its leader)")

    async def _publish_nats_py(self, entries: list[OutboxEntry]) -> list[int]:
        nc = self._nc
        assert nc is not None
        n = len(entries)
        self._results = results = [NO_ACK] * n
        self._base = base = self._next_token
        self._next_token += n
        self._awaiting = n
        self._acked.clear()
        prefix = self._prefix
        limit = nc.max_payload or (1 << 20)
        fast = hasattr(nc, "_send_command") and hasattr(nc, "_flush_pending")
        try:
            for i, e in enumerate(entries):
                reply = f"{prefix}{base + i}"
                if HEADER_OVERHEAD + len(e.event_id) + len(e.payload) > limit:
                    results[i] = FATAL  # the server would close the connection over it
                    self._awaiting -= 1
                elif fast:
                    # nats-py's publish() costs ~4x this per message (validation, header
                    # dict walk, a flush request each); these are our own subjects and ids.
                    hdr = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % e.event_id.encode()
                    await nc._send_command(
                        b"HPUB %s %s %d %d\r\n%s%s\r\n"
                        % (e.subject.encode(), reply.encode(), len(hdr),
                           len(hdr) + len(e.payload), hdr, e.payload)
                    )
                else:
                    await nc.publish(e.subject, e.payload, reply=reply,
                                     headers={"Nats-Msg-Id": e.event_id})
            if self._awaiting > 0:
                if fast:
                    await nc._flush_pending()
                async with asyncio.timeout(self.publish_timeout_s):
                    await self._acked.wait()
        except TimeoutError:
            self._log(logging.WARNING, "timeout", "events: %d of %d acks not back after %.1fs; "
                      "the batch goes to the outbox", self._awaiting, n,
                      self.publish_timeout_s)
        except Exception as exc:  # connection closed / draining / buffer full
            self._log(logging.WARNING, "publish", "events: publish failed (%s)", exc)
        finally:
            self._results = []  # late acks find nothing to settle
            self._awaiting = 0
        return results

    async def _on_ack(self, msg: Msg) -> None:
        try:
            i = int(msg.subject[len(self._prefix):]) - self._base
        except ValueError:
            return
        results = self._results
        if not 0 <= i < len(results) or results[i] != NO_ACK:
            return  # a late ack for a batch already given up on (resent; deduplicated)
        data = msg.data
        if not data and (msg.headers or {}).get("Status", "") == "503":
            self._no_stream_seen()  # no responders: no stream listens on the subject
        results[i] = classify(data)
        self._awaiting -= 1
        if self._awaiting <= 0:
            self._acked.set()

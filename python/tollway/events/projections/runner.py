"""Feeds the stream into the projections, checkpoints them, and resumes after a restart.

One ordered push consumer (ephemeral, in-memory, no acks) delivers every
message of the stream from the lowest sequence any projection still needs,
read by a :class:`~tollway.events.nats.bulk.BulkReader` in follow mode on a
connection of its own (what arrives together is folded together); where that
reader cannot be used (TLS, nkeys, JWT) or keeps failing, by nats-py.
Each message is decoded once and applied to every projection; a projection
skips sequences it already has, which is what makes resuming from a
checkpoint and redelivery after a reconnect harmless. Views are saved to the
KV bucket every ``checkpoint_interval_s`` (when they moved) and at stop.

A backlog of ``bulk_min_backlog`` messages or more (a first start, a long
downtime, ``tollway replay``) is folded first by a bulk read up to the
stream's end (:mod:`tollway.events.nats.bulk`, several times faster than nats-py's
per-message delivery), in batches, projection by projection; the live tail
then follows from where it stopped. If the bulk reader cannot be used or
fails part way, nats-py folds the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamState
from nats.js.kv import KeyValue

from tollway.aio import cancel_and_wait
from tollway.events.metrics import EventMetrics
from tollway.events.nats.bulk import BulkReader, BulkUnavailable
from tollway.events.projections import (
    Projection,
    checkpoint,
    fold_event,
    fold_events,
    link,
    linked,
)
from tollway.events.schema import SCHEMA_VERSION, STREAM, SUBJECTS, AnyEvent, Event, decode

log = logging.getLogger("tollway.events")

Listener = Callable[[int, Event], None]

BULK_RETRY_S = 60.0  # after a failed bulk read, backlogs go through nats-py for this long
HORIZON_S = 86400.0  # events this far ahead of our clock fold, but move the views' days on not

# schema.decode without its per-message Python call; a batch it cannot take whole (an
# unknown type, a newer version, not an event) goes through schema.decode message by message.
_decode_event = msgspec.json.Decoder(AnyEvent).decode
_version = operator.attrgetter("schema_version")


def _seq_pending(reply: str) -> tuple[int, int]:
    """Stream sequence and pending count from a JetStream delivery's reply subject.

    ``$JS.ACK.<stream>.<consumer>.<dlv>.<sseq>.<cseq>.<ts>.<pending>`` (9 tokens) or the
    newer form with domain and account hash in front (12 or more tokens).
    """
    t = reply.split(".")
    if len(t) == 9:
        return int(t[5]), int(t[8])
    return int(t[7]), int(t[10])


class ProjectionRunner:
    def __init__(
        self,
        nc: NatsClient,
        projections: list[Projection[Any]],
        *,
        kv: KeyValue | None = None,
        stream: str = STREAM,
        checkpoint_interval_s: float = 10.0,
        idle_heartbeat_s: float = 2.0,
        metrics: EventMetrics | None = None,
        read_only: bool = False,
        bulk: bool = True,
        bulk_min_backlog: int = 5000,
    ) -> None:
        self.nc = nc
        self.read_only = read_only  # load checkpoints, never write them (CLI readers)
        self.js: JetStreamContext = nc.jetstream()
        self.projections = projections
        self.by_name = {p.name: p for p in projections}
        self.kv = kv
        self.stream = stream
        self.checkpoint_interval_s = checkpoint_interval_s
        self.idle_heartbeat_s = idle_heartbeat_s
        self.metrics = metrics
        self.listeners: list[Listener] = []
        self.bulk = bulk  # fold large backlogs through the bulk reader
        self.bulk_min_backlog = bulk_min_backlog
        self.bulk_applied = 0  # messages applied through it (tests, benchmarks)
        self._bulk_retry_at = 0.0
        self._tail_failures = 0  # live-tail failures in a row while NATS was up
        self.last_seq = 0  # last sequence delivered to the projections
        self.applied = 0  # messages applied since start (tests, benchmarks)
        self.decode_errors = 0
        self._target = 0  # stream's last sequence when we started
        self._stream_id = ""  # its creation time: which incarnation our sequences refer to
        self._pending = 0  # nats-py tail: the server's count of messages after the last one
        self._sub: Any = None  # the nats-py subscription, when the tail is not on a reader
        self._tail: asyncio.Task[None] | None = None  # the tail on a BulkReader
        self._reader: BulkReader | None = None
        self._sub_lock = asyncio.Lock()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._saved_seq: dict[str, int] = {}
        self._groups: list[list[Projection[Any]]] = []  # views folded as one (see link)
        self._task: asyncio.Task[None] | None = None
        self._resubscribe = asyncio.Event()

    # ---- lifecycle ---------------------------------------------------------------------------
    async def load_checkpoints(self) -> None:
        if self.kv is None:
            return
        if not self._stream_id:
            with contextlib.suppress(Exception):
                await self._stream_state()
        for p in self.projections:
            m = await checkpoint.load(self.kv, p)
            if m is not None:
                if m.stream and self._stream_id and m.stream != self._stream_id:
                    log.error("checkpoint of %s was taken on another incarnation of stream %s "
                              "(recreated?): folding the whole stream on top of it", p.name,
                              self.stream)
                    p.rebase(0)
                log.info("projection %s resumed from checkpoint at sequence %d", p.name,
                         p.view.last_seq)
            self._saved_seq[p.name] = p.view.last_seq
        self.last_seq = min((p.view.last_seq for p in self.projections), default=0)

    async def _stream_state(self) -> StreamState:
        info = await self.js.stream_info(self.stream)
        created = str(info.created or "")
        if self._stream_id and created and created != self._stream_id:
            # Recreated under us (its store lost): its sequences start again. Keep what the
            # views hold and fold the new stream from its start.
            log.error("stream %s was recreated: folding it from its first message on top of "
                      "the views", self.stream)
            for p in self.projections:
                p.rebase(max(0, info.state.first_seq - 1))
                self._saved_seq[p.name] = 0
            self.last_seq = max(0, info.state.first_seq - 1)
        self._stream_id = created or self._stream_id
        return info.state

    async def start(self, *, resume: bool = True) -> None:
        """Load the checkpoints, then fold the backlog and follow the stream.

        A backlog for the bulk reader is folded by the runner's task: this returns at once
        and :attr:`caught_up` says when the views are there.
        """
        with contextlib.suppress(Exception):
            self._target = (await self._stream_state()).last_seq
        if resume:
            await self.load_checkpoints()
        if self._wants_bulk(self._target):
            self._resubscribe.set()  # the supervisor folds it, then subscribes
        else:
            with contextlib.suppress(Exception):
                await self._subscribe()
        self._task = asyncio.create_task(self._supervise(), name="tollway-projections")

    async def stop(self) -> None:
        await cancel_and_wait(self._task, what="the projections' task")
        self._task = None
        await self._unsubscribe()
        with contextlib.suppress(Exception):
            await self.checkpoint()
        for _, fut in self._waiters:
            fut.cancel()
        self._waiters.clear()

    def reconnected(self) -> None:
        """NATS came back: the server may have lost our in-memory consumer; start a new one."""
        self._resubscribe.set()

    async def _supervise(self) -> None:
        next_save = time.monotonic() + self.checkpoint_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, min(1.0, next_save - time.monotonic()))):
                    await self._resubscribe.wait()
            try:
                if self._resubscribe.is_set() or not self._following:
                    self._resubscribe.clear()
                    await self._subscribe()
                if time.monotonic() >= next_save:
                    next_save = time.monotonic() + self.checkpoint_interval_s
                    await self.checkpoint()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("projection runner: %s", exc)

    async def _subscribe(self) -> None:
        async with self._sub_lock:
            await self._unsubscribe()
            if not self.nc.is_connected:
                return
            state = await self._stream_state()
            if self._wants_bulk(state.last_seq):
                await self._catch_up_bulk(state.last_seq)
            start = min(p.view.last_seq for p in self.projections) + 1
            if self.bulk and time.monotonic() >= self._bulk_retry_at:
                self._tail = asyncio.create_task(self._follow(start),
                                                 name="tollway-projections-tail")
                return
            self._sub = await self.js.subscribe(
                SUBJECTS,
                stream=self.stream,
                cb=self._on_msg,
                ordered_consumer=True,
                idle_heartbeat=self.idle_heartbeat_s,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=start,
                ),
            )

    def _wants_bulk(self, last_seq: int) -> bool:
        backlog = last_seq - min(p.view.last_seq for p in self.projections)
        return (self.bulk and backlog >= self.bulk_min_backlog
                and time.monotonic() >= self._bulk_retry_at)

    async def _catch_up_bulk(self, stop_seq: int) -> None:
        try:
            await self.fold_bulk(stop_seq)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._bulk_retry_at = time.monotonic() + BULK_RETRY_S
            log.warning("projection runner: bulk read stopped at sequence %d (%s); nats-py "
                        "folds the rest", self.last_seq, exc)

    async def fold_bulk(self, stop_seq: int | None = None) -> int:
        """Fold the stream through the bulk reader, from the lowest sequence a projection
        still needs up to ``stop_seq`` (default: the stream's last sequence now); returns
        the number of messages applied.

        Raises (BulkError, OSError, ...) when the reader cannot be used or fails; the views
        keep what was folded and a subscription resumes from there.
        """
        start = min(p.view.last_seq for p in self.projections) + 1
        applied = self.applied
        next_save = time.monotonic() + self.checkpoint_interval_s
        try:
            async with await BulkReader.connect(self.nc) as reader:
                if stop_seq is None:
                    stop_seq = int((await reader.stream_info(self.stream))["state"]["last_seq"])
                async with contextlib.aclosing(reader.read(
                        self.stream, start_seq=start, stop_seq=stop_seq,
                        idle_heartbeat_s=self.idle_heartbeat_s)) as batches:
                    async for seqs, payloads in batches:
                        self.feed_batch(seqs, payloads)
                        if time.monotonic() >= next_save:  # a long backlog: keep the progress
                            next_save = time.monotonic() + self.checkpoint_interval_s
                            await self.checkpoint()
        finally:
            self.bulk_applied += self.applied - applied
        if stop_seq > self.last_seq:  # the messages at the end were deleted: read past them
            self.last_seq = stop_seq
            if self._waiters:
                self._wake_waiters()
        return self.applied - applied

    async def _follow(self, start: int) -> None:
        """Fold the stream from ``start`` on, live, through a bulk reader in follow mode."""
        try:
            async with await BulkReader.connect(self.nc) as reader:
                self._reader = reader
                async with contextlib.aclosing(reader.read(
                        self.stream, start_seq=start, follow=True,
                        idle_heartbeat_s=self.idle_heartbeat_s)) as batches:
                    async for seqs, payloads in batches:
                        self.feed_batch(seqs, payloads)
                        self._tail_failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Lost with its connection (NATS restarting) or stopped on a gap: start again
            # from the last sequence folded. Whatever keeps failing goes through nats-py.
            if isinstance(exc, BulkUnavailable) or not self.nc.is_connected:
                retry = BULK_RETRY_S if isinstance(exc, BulkUnavailable) else 0.0
            else:
                self._tail_failures += 1
                retry = BULK_RETRY_S if self._tail_failures >= 3 else 0.0
            if retry:
                self._bulk_retry_at = time.monotonic() + retry
                self._tail_failures = 0
            log.warning("projection runner: live tail stopped at sequence %d (%s); %s",
                        self.last_seq, exc, "nats-py follows" if retry else "restarting")
            self._resubscribe.set()
        finally:
            self._reader = None

    @property
    def _following(self) -> bool:
        return self._sub is not None or (self._tail is not None and not self._tail.done())

    async def _unsubscribe(self) -> None:
        tail, self._tail = self._tail, None
        if tail is not None:
            tail.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await tail
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def checkpoint(self, *, force: bool = False) -> None:
        """Save every view that moved since its last save (``force``: every view)."""
        if len(self._groups) > 1:
            self._groups = []  # views that were apart may have met since: link them again
        if self.kv is None or self.read_only:
            return
        if not self._stream_id:
            with contextlib.suppress(Exception):
                await self._stream_state()
        for p in self.projections:
            seq = p.view.last_seq
            if force or seq > self._saved_seq.get(p.name, 0):
                await checkpoint.save(self.kv, p, force=force, stream=self._stream_id)
                self._saved_seq[p.name] = seq
                if self.metrics is not None:
                    self.metrics.projection_lag.labels(p.name).set(seq)

    # ---- folding -----------------------------------------------------------------------------
    async def _on_msg(self, msg: Msg) -> None:
        seq, self._pending = _seq_pending(msg.reply)
        self.feed(seq, msg.data)

    def _decode(self, seq: int, data: bytes) -> Event | None:
        try:
            return decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.decode_errors += 1
            if self.decode_errors <= 10 or self.decode_errors % 1000 == 0:
                log.error("projection runner: message %d is not a valid event (%s); skipped "
                          "(%d so far)", seq, exc, self.decode_errors)
            return None

    def feed(self, seq: int, data: bytes) -> None:
        """Apply one stream message to every projection."""
        event = self._decode(seq, data)
        if event is None:
            self._fold([seq], [event])
            return
        horizon = time.time() + HORIZON_S
        for group in self._linked():
            fold_event(group, seq, event, horizon)
        self._advance(seq, 1)
        for listener in self.listeners:
            listener(seq, event)

    def feed_batch(self, seqs: list[int], payloads: Sequence[bytes]) -> None:
        """Apply stream messages with ascending sequences to every projection: what
        :meth:`feed` does message by message, done projection by projection (each view's
        fold in a tight loop), with the same result."""
        if not seqs:
            return
        if self.listeners:  # a listener sees each event after every view has folded it
            for seq, data in zip(seqs, payloads, strict=True):
                self.feed(seq, data)
            return
        events: list[Event | None] | None
        try:
            events = list(map(_decode_event, payloads))
            if max(map(_version, events)) > SCHEMA_VERSION:
                events = None
        except (msgspec.DecodeError, msgspec.ValidationError):
            events = None
        if events is None:  # unknown types, newer versions: only last_seq moves past them
            events = [self._decode(s, d) for s, d in zip(seqs, payloads, strict=True)]
        self._fold(seqs, events)

    def _fold(self, seqs: list[int], events: list[Event | None]) -> None:
        if None in events:
            kept = [(s, e) for s, e in zip(seqs, events, strict=True) if e is not None]
            fold_seqs, fold = [s for s, _ in kept], [e for _, e in kept]
        else:
            fold_seqs, fold = seqs, cast("list[Event]", events)
        last = seqs[-1]
        horizon = time.time() + HORIZON_S
        for group in self._linked():
            if group[0].view.last_seq < last:
                if fold:
                    fold_events(group, fold_seqs, fold, horizon)
                for p in group:  # past the messages that are not events too
                    p.view.last_seq = max(p.view.last_seq, last)
        self._advance(last, len(seqs))

    def _linked(self) -> list[list[Projection[Any]]]:
        if not self._groups or not linked(self._groups):
            self._groups = link(self.projections)
        return self._groups

    def _advance(self, last: int, messages: int) -> None:
        if last > self.last_seq:
            self.last_seq = last
        self.applied += messages
        if self._waiters:
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        keep = []
        for target, fut in self._waiters:
            if self.last_seq >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep

    async def wait_for(self, seq: int, timeout: float = 5.0) -> bool:
        """Wait until every message up to ``seq`` has been applied."""
        if self.last_seq >= seq:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, fut))
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            return False
        return True

    async def catch_up(self, timeout: float = 30.0) -> bool:
        """Wait until the views include everything in the stream right now."""
        try:
            last = (await self.js.stream_info(self.stream)).state.last_seq
        except Exception:
            return False
        return await self.wait_for(last, timeout)

    @property
    def tail(self) -> str:
        """What follows the stream live: "reader" (a BulkReader), "nats-py", or ""."""
        if self._sub is not None:
            return "nats-py"
        return "reader" if self._following else ""

    @property
    def subscribed(self) -> bool:
        """Following the stream live (a reader's consumer exists, or a nats-py one)."""
        if self._sub is not None:
            return True
        reader = self._reader
        return self._following and reader is not None and bool(reader.consumer)

    @property
    def pending(self) -> int:
        """Messages in the stream after the last one folded, as the server counted them at
        the last delivery; -1 while not following the stream."""
        if self._sub is not None:
            return self._pending
        if not self._following or self._reader is None:
            return -1
        return self._reader.pending

    @property
    def caught_up(self) -> bool:
        """The views have reached where the stream was at start, and nothing is pending."""
        if self._sub is not None:
            pending = self._pending
        else:  # the reader's count, from its consumer's creation on
            pending = self._reader.pending if self._reader is not None else -1
        return self.subscribed and self.last_seq >= self._target and pending == 0

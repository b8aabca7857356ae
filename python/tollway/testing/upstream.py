"""A simulated OpenAI-compatible upstream: a real HTTP/1.1 server for tests, demo and benchmarks.

It speaks ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON and SSE,
tools, ``stream_options.include_usage``), ``POST /v1/completions`` (legacy),
``POST /v1/embeddings``, vLLM's ``POST /v1/rerank`` and Anthropic's ``POST /v1/messages`` (its
events, tool
use, prompt-cache usage; the key as ``x-api-key``) with
deterministic content, records every request it receives, and injects
faults on demand (error statuses with ``Retry-After``, a silent delay, a
stream cut in the middle, a connection reset), to every matching request or
to a seeded random fraction of them. It notes when a client leaves in the
middle of a slow stream (:attr:`FakeUpstream.aborted`), as the provider would
see it: the fault benchmarks time how soon the gateway hangs up.

It is the zero-latency upstream of the load benchmarks, where it shares two
cores with the gateway and the load generator, so it is written on asyncio
protocols and httptools (uvloop when available) and answers on the fast path
without creating a task: only delays and slow streams go through coroutines.

In-process (tests)::

    with FakeUpstream(latency_s=0.0) as up:
        client = OpenAI(base_url=up.base_url, api_key="k")
        up.add_fault(Fault(status=429, retry_after=1))

As its own process (demo, benchmarks)::

    python -m tollway.testing.upstream --host 127.0.0.1 --port 9001 --latency-ms 0

Streams at an LLM's pace for the long-stream benchmark: ``chunk_interval_s``
(``--chunk-interval-ms``) sends each stream's events that far apart, from a
random phase, all streams driven by one timer (a coroutine per stream would
cost the upstream more CPU than the gateway it measures), and ``stamp``
(``--stamp``) starts each event with a comment line ``: t=<ns>`` holding
``time.monotonic_ns()`` as it is written, so a client on the same host can
tell how long the event took to reach it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import http
import itertools
import math
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import httptools
import msgspec

from tollway.testing.replies import DEFAULT_MODELS, Full, Replies, default_error_code, error

__all__ = ["Aborted", "FakeUpstream", "Fault", "RecordedRequest", "main"]

FaultKind = Literal["status", "timeout", "cut_stream", "reset"]

_DEFAULT_TIMEOUT_DELAY_S = 30.0


@dataclass(frozen=True)
class Fault:
    """One injected failure, consumed by the next ``times`` matching requests.

    kind "status": reply ``status`` with an OpenAI error envelope (or ``body``),
    plus ``Retry-After`` when ``retry_after`` is set. kind "timeout": say nothing
    for ``delay_s`` seconds (default 30), then answer normally if the client is
    still there. kind "cut_stream": send the headers and ``after_chunks`` SSE
    events, then close the connection (no ``[DONE]``); a non-stream reply is cut
    half-way through its body. kind "reset": close the connection with an RST
    and no response. ``times=None`` applies to every matching request.

    ``fraction`` below 1 applies the fault to that share of the matching
    requests, drawn from the upstream's seeded generator (the others pass as
    if it were not there, and do not use up ``times``); ``statuses`` draws each
    faulted request's status from these instead of ``status``.
    """

    status: int = 503
    kind: FaultKind = "status"
    retry_after: float | str | None = None
    times: int | None = 1
    model: str | None = None  # only requests for this model
    path: str | None = None  # only requests whose path ends with this, e.g. "/embeddings"
    body: Any = None  # dict/list -> JSON, str/bytes sent as is; None -> OpenAI envelope
    headers: Mapping[str, str] | None = None
    delay_s: float | None = None  # "timeout": how long to stay silent; others: wait first
    after_chunks: int = 2
    fraction: float = 1.0
    statuses: tuple[int, ...] = ()

    def matches(self, path: str, model: str | None) -> bool:
        if self.model is not None and self.model != model:
            return False
        return self.path is None or path.endswith(self.path)


@dataclass(frozen=True)
class RecordedRequest:
    """A request as the upstream received it; ``headers`` keys are lower-case."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # decoded JSON, or None when there was no body or it was not JSON
    at: float  # unix seconds
    query: str = ""
    raw_body: bytes = b""


@dataclass(frozen=True)
class Aborted:
    """A stream whose client left before its last event: when (``time.monotonic()``, the
    moment this side saw the connection close) and how far it had got."""

    at: float
    events_sent: int
    events_total: int


class _Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query", "raw")

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        raw: bytes,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.raw = raw
        self.keep_alive = keep_alive
        self.body: Any = None


_encode = msgspec.json.encode
_decode = msgspec.json.decode


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class _Connection(asyncio.Protocol):
    """One client connection: parses pipelined HTTP/1.1 requests, answers them in order."""

    def __init__(self, up: FakeUpstream) -> None:
        self.up = up
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._queue: collections.deque[_Request] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self.streaming: list[int] | None = None  # [events sent, events in all] of a slow stream

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)
        self.up._conns.add(self)
        self.up.connections_opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.up._conns.discard(self)
        if self.streaming is not None:
            self.up._note_abort(Aborted(time.monotonic(), *self.streaming))
            self.streaming = None
        if self._task is not None:
            self._task.cancel()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # after a reply with "connection: close", a cut or a parse error
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.send_full(error(400, "malformed HTTP request"), keep_alive=False)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        url = httptools.parse_url(self._url)
        req = _Request(
            self.parser.get_method().decode("ascii"),
            url.path.decode("latin-1"),
            url.query.decode("latin-1") if url.query else "",
            self._headers,
            b"".join(self._body),
            self.parser.should_keep_alive(),
        )
        if self._task is not None or self._queue:
            self._queue.append(req)
        else:
            self._dispatch(req)

    # answering
    def _dispatch(self, req: _Request) -> None:
        later = self.up._handle(self, req)
        if later is not None:
            self._task = asyncio.get_running_loop().create_task(self._finish(later))

    async def _finish(self, later: Coroutine[Any, Any, None]) -> None:
        try:
            await later
        finally:
            self._task = None
        while self._queue and self._task is None and not self.closed:
            self._dispatch(self._queue.popleft())

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def end(self, keep_alive: bool) -> None:
        if not keep_alive and self.transport is not None:
            self.transport.close()

    def send_full(self, reply: Full, keep_alive: bool, cut: bool = False) -> None:
        body = reply.body
        self.write(
            self.up._head(reply.status, reply.content_type, len(body), keep_alive, reply.headers)
        )
        if cut:
            self.write(body[: len(body) // 2])
            self.cut()
            return
        self.write(body)
        self.end(keep_alive)

    def cut(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        # SO_LINGER 0 makes close() send RST instead of FIN: a real "connection reset by peer".
        with contextlib.suppress(OSError, AttributeError, TypeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


def _chunk(event: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(event), event)


_TICK_S = 0.001  # the pacer's resolution


class _Paced:
    """One stream the pacer is sending."""

    __slots__ = ("conn", "done", "events", "keep_alive", "progress")

    def __init__(self, conn: _Connection, events: list[bytes], keep_alive: bool,
                 done: asyncio.Future[None]) -> None:
        self.conn = conn
        self.events = events
        self.keep_alive = keep_alive
        self.done = done
        self.progress = conn.streaming = [0, len(events)]


class _Pacer:
    """Sends the events of every paced stream ``interval`` apart from one timer."""

    def __init__(self, interval: float, stamp: bool, seed: int | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.interval = interval
        self.stamp = stamp
        self.rng = random.Random(seed)
        self.due: dict[int, list[_Paced]] = {}
        self.handle: asyncio.TimerHandle | None = None
        self.handle_slot = 0

    async def send(self, conn: _Connection, events: list[bytes], keep_alive: bool) -> None:
        """Send ``events`` on ``conn``, the first after a random share of the interval."""
        done = self.loop.create_future()
        paced = _Paced(conn, events, keep_alive, done)
        self._put(paced, self.loop.time() + self.rng.random() * self.interval)
        await done

    def _put(self, paced: _Paced, at: float) -> None:
        slot = math.ceil(at / _TICK_S)
        found = self.due.get(slot)
        if found is None:
            self.due[slot] = [paced]
        else:
            found.append(paced)
        if self.handle is None or slot < self.handle_slot:
            if self.handle is not None:
                self.handle.cancel()
            self.handle_slot = slot
            self.handle = self.loop.call_at(slot * _TICK_S, self._run)

    def _run(self) -> None:
        self.handle = None
        now = self.loop.time()
        current = math.floor(now / _TICK_S + 1e-9)
        for slot in sorted(s for s in self.due if s <= current):
            for paced in self.due.pop(slot):
                self._step(paced, slot * _TICK_S, now)
        if self.due and self.handle is None:
            self.handle_slot = min(self.due)
            self.handle = self.loop.call_at(self.handle_slot * _TICK_S, self._run)

    def _step(self, paced: _Paced, at: float, now: float) -> None:
        conn = paced.conn
        if conn.closed:
            if not paced.done.done():
                paced.done.set_result(None)
            return
        if conn._write_paused:  # the client is slow: try again on the next tick
            self._put(paced, now + _TICK_S)
            return
        progress = paced.progress
        event = paced.events[progress[0]]
        if self.stamp:
            event = b": t=%d\n%b" % (time.monotonic_ns(), event)
        conn.write(_chunk(event))
        progress[0] += 1
        if progress[0] < progress[1]:
            self._put(paced, max(at + self.interval, now))
            return
        conn.streaming = None
        conn.write(b"0\r\n\r\n")
        conn.end(paced.keep_alive)
        if not paced.done.done():
            paced.done.set_result(None)


class FakeUpstream:
    """A simulated OpenAI-compatible provider on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        name: str = "openai",
        *,
        latency_s: float = 0.0,
        chunk_delay_s: float = 0.0,
        chunk_interval_s: float = 0.0,
        stamp: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        require_auth: bool = True,
        api_key: str | None = None,
        reply_words: int | None = None,
        models: Sequence[str] = DEFAULT_MODELS,
        record: bool = True,
        use_uvloop: bool = True,
        seed: int | None = 0,
    ) -> None:
        self.name = name
        self.replies = Replies(name, models, reply_words)
        self.latency_s = latency_s  # before the first byte of every reply
        self.chunk_delay_s = chunk_delay_s  # between two SSE events of a stream
        # Streams paced by one timer (see the module docstring); chunk_delay_s comes first.
        self.chunk_interval_s = chunk_interval_s
        self.stamp = stamp  # a ": t=<monotonic ns>" line opens each paced event
        self._seed = seed
        self._pacer: _Pacer | None = None
        # A test's gate: while it is an unset Event, replies wait for it (a candidate that
        # answers when the test says so, not after a delay a loaded machine may outlast).
        self.release: threading.Event | None = None
        self.host = host
        self.port = port  # the bound port once started
        self.require_auth = require_auth  # 401 without an Authorization header
        self.api_key = api_key  # when set, 401 unless "Bearer <api_key>"
        self.record = record
        self.use_uvloop = use_uvloop
        self.connections_opened = 0
        self._requests: list[RecordedRequest] = []
        self._faults: list[list[Any]] = []  # [Fault, remaining uses or None]
        self._faults_lock = threading.Lock()
        self._rng = random.Random(seed)  # draws the faulted fraction; under _faults_lock
        self._aborted: list[Aborted] = []
        self._aborted_cond = threading.Condition()
        self._conns: set[_Connection] = set()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # ---- public API
    @property
    def reply_words(self) -> int | None:
        """Fixed reply length in words; None echoes the last user message."""
        return self.replies.reply_words

    @reply_words.setter
    def reply_words(self, value: int | None) -> None:
        self.replies.reply_words = value

    @property
    def models(self) -> list[str]:
        return self.replies.models

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        return list(self._requests)

    @property
    def last_request(self) -> RecordedRequest | None:
        return self._requests[-1] if self._requests else None

    def add_fault(self, fault: Fault) -> None:
        with self._faults_lock:
            self._faults.append([fault, fault.times])

    @property
    def aborted(self) -> list[Aborted]:
        """Slow streams (``chunk_delay_s`` > 0) whose client closed the connection early."""
        with self._aborted_cond:
            return list(self._aborted)

    def wait_for_aborted(self, n: int, timeout: float = 5.0) -> list[Aborted]:
        """Block until ``n`` streams were left early (or ``timeout``); returns them all."""
        with self._aborted_cond:
            self._aborted_cond.wait_for(lambda: len(self._aborted) >= n, timeout)
            return list(self._aborted)

    def _note_abort(self, aborted: Aborted) -> None:
        with self._aborted_cond:
            self._aborted.append(aborted)
            self._aborted_cond.notify_all()

    @property
    def pending_faults(self) -> int:
        """Faults added and not used up yet."""
        with self._faults_lock:
            return len(self._faults)

    def clear(self) -> None:
        """Drop recorded requests, pending faults and aborted streams."""
        with self._faults_lock:
            self._faults.clear()
        self._requests.clear()
        with self._aborted_cond:
            self._aborted.clear()

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until ``n`` requests were recorded (e.g. a shadow call made after the reply)."""
        deadline = time.monotonic() + timeout
        while len(self._requests) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._requests)} requests recorded, wanted {n}")
            time.sleep(0.005)
        return self.requests

    def start(self) -> FakeUpstream:
        """Serve from a background thread with its own event loop; returns once listening."""
        if self._thread is not None:
            raise RuntimeError("FakeUpstream already started")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(
            target=self._thread_main, name=f"fake-upstream-{self.name}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(10.0):
            raise RuntimeError("FakeUpstream did not start within 10 s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"FakeUpstream failed to start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already finished
                loop.call_soon_threadsafe(stop.set)
        thread.join(10.0)
        self._thread = None

    def serve_forever(self, on_ready: Callable[[FakeUpstream], None] | None = None) -> None:
        """Serve in the calling thread until SIGINT/SIGTERM (the command-line mode)."""
        self._run(self._serve(on_ready=on_ready, signals=True))

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FakeUpstream:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    # ---- server lifecycle
    def _run(self, main: Coroutine[Any, Any, None]) -> None:
        factory: Callable[[], asyncio.AbstractEventLoop] | None = None
        if self.use_uvloop:
            try:
                import uvloop
            except ImportError:
                pass
            else:
                factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main)

    def _thread_main(self) -> None:
        try:
            self._run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(
        self, on_ready: Callable[[FakeUpstream], None] | None = None, signals: bool = False
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._pacer = None  # a pacer belongs to one loop
        self._stop = asyncio.Event()
        server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, backlog=2048, reuse_address=True
        )
        self.port = server.sockets[0].getsockname()[1]
        if signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
        self._ready.set()
        if on_ready is not None:
            on_ready(self)
        try:
            await self._stop.wait()
        finally:
            server.close()
            for conn in list(self._conns):
                if conn.transport is not None:
                    conn.transport.abort()
            await server.wait_closed()
            await asyncio.sleep(0)  # let connection_lost callbacks run before the loop closes

    # ---- request handling
    def _handle(self, conn: _Connection, req: _Request) -> Coroutine[Any, Any, None] | None:
        """Answer now when nothing needs to wait, else return the coroutine that will."""
        if req.raw:
            try:
                req.body = _decode(req.raw)
            except msgspec.DecodeError:
                req.body = None
        if self.record:
            self._requests.append(
                RecordedRequest(
                    req.method, req.path, req.headers, req.body, time.time(), req.query, req.raw
                )
            )
        key = req.headers.get("x-api-key")  # Anthropic's clients send the key so
        if not self._authorized(req.headers.get("authorization")
                                or (f"Bearer {key}" if key else None)):
            conn.send_full(
                error(
                    401,
                    "Incorrect API key provided."
                    if self.api_key
                    else "You didn't provide an API key.",
                    code="invalid_api_key",
                ),
                req.keep_alive,
            )
            return None
        model = req.body.get("model") if isinstance(req.body, dict) else None
        fault = self._take_fault(req.path, model if isinstance(model, str) else None)
        stream = isinstance(req.body, dict) and req.body.get("stream") is True
        if (
            (fault is None or fault.kind != "timeout")
            and not (fault and fault.delay_s)
            and self.latency_s <= 0
            and self.release is None
            and (not stream or (self.chunk_delay_s <= 0 and self.chunk_interval_s <= 0))
        ):
            self._reply(conn, req, fault)
            return None
        return self._reply_later(conn, req, fault)

    def _authorized(self, header: str | None) -> bool:
        if self.api_key is not None:
            return header == f"Bearer {self.api_key}"
        return header is not None or not self.require_auth

    def _take_fault(self, path: str, model: str | None) -> Fault | None:
        if not self._faults:
            return None
        with self._faults_lock:
            for i, entry in enumerate(self._faults):
                fault: Fault = entry[0]
                if fault.matches(path, model):
                    if fault.fraction < 1.0 and self._rng.random() >= fault.fraction:
                        continue
                    if fault.statuses:
                        fault = dataclasses.replace(fault, status=self._rng.choice(fault.statuses))
                    if entry[1] is not None:
                        entry[1] -= 1
                        if entry[1] <= 0:
                            del self._faults[i]
                    return fault
        return None

    def _reply(self, conn: _Connection, req: _Request, fault: Fault | None) -> None:
        if fault is not None and fault.kind == "reset":
            conn.reset()
            return
        if fault is not None and fault.kind == "status":
            conn.send_full(self._fault_reply(fault), req.keep_alive)
            return
        reply = self.replies.route(req.method, req.path, req.body)
        cut = fault is not None and fault.kind == "cut_stream"
        if isinstance(reply, Full):
            conn.send_full(reply, req.keep_alive, cut=cut)
            return
        conn.write(self._stream_head(req.keep_alive))
        events = reply.events
        stop_at = min(fault.after_chunks, len(events) - 1) if fault is not None and cut else None
        conn.write(b"".join(_chunk(e) for e in events[:stop_at]))
        if stop_at is not None:
            conn.cut()
            return
        conn.write(b"0\r\n\r\n")
        conn.end(req.keep_alive)

    async def _reply_later(self, conn: _Connection, req: _Request, fault: Fault | None) -> None:
        gate = self.release
        while gate is not None and not gate.is_set():
            await asyncio.sleep(0.005)
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        if fault is not None and fault.kind == "timeout":
            await asyncio.sleep(
                _DEFAULT_TIMEOUT_DELAY_S if fault.delay_s is None else fault.delay_s
            )
            fault = None
        elif fault is not None and fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if conn.closed:
            return
        stream = isinstance(req.body, dict) and req.body.get("stream") is True
        if stream and fault is None and self.chunk_delay_s <= 0 < self.chunk_interval_s:
            reply = self.replies.route(req.method, req.path, req.body)
            if isinstance(reply, Full):
                conn.send_full(reply, req.keep_alive)
                return
            if self._pacer is None:
                self._pacer = _Pacer(self.chunk_interval_s, self.stamp, self._seed)
            self._pacer.interval, self._pacer.stamp = self.chunk_interval_s, self.stamp
            conn.write(self._stream_head(req.keep_alive))
            await self._pacer.send(conn, reply.events, req.keep_alive)
            return
        if (
            self.chunk_delay_s <= 0
            or not stream
            or (fault is not None and fault.kind != "cut_stream")
        ):
            self._reply(conn, req, fault)
            return
        reply = self.replies.route(req.method, req.path, req.body)
        if isinstance(reply, Full):  # a bad stream request gets its error at once
            conn.send_full(reply, req.keep_alive)
            return
        events = reply.events
        stop_at = min(fault.after_chunks, len(events) - 1) if fault is not None else len(events)
        conn.write(self._stream_head(req.keep_alive))
        conn.streaming = progress = [0, len(events)]
        for i, event in enumerate(events[:stop_at]):
            if i:
                await asyncio.sleep(self.chunk_delay_s)
                if conn.closed:
                    return
            conn.write(_chunk(event))
            progress[0] = i + 1
            await conn.drain()
        conn.streaming = None
        if fault is not None:
            conn.cut()
            return
        conn.write(b"0\r\n\r\n")
        conn.end(req.keep_alive)

    def _head(
        self,
        status: int,
        content_type: str,
        length: int | None,
        keep_alive: bool,
        extra: Mapping[str, str] | None = None,
    ) -> bytes:
        lines = [
            f"HTTP/1.1 {status} {_reason(status)}",
            f"content-type: {content_type}",
            f"x-request-id: req_{next(self._ids):012x}",
            "openai-processing-ms: 0",
            "server: tollway-fake-upstream",
        ]
        if length is None:
            lines.append("transfer-encoding: chunked")
            lines.append("cache-control: no-cache")
        else:
            lines.append(f"content-length: {length}")
        if not keep_alive:
            lines.append("connection: close")
        if extra:
            lines.extend(f"{k}: {v}" for k, v in extra.items())
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _stream_head(self, keep_alive: bool) -> bytes:
        return self._head(200, "text/event-stream; charset=utf-8", None, keep_alive)

    def _fault_reply(self, fault: Fault) -> Full:
        headers = dict(fault.headers or {})
        if fault.retry_after is not None:
            ra = fault.retry_after
            headers["retry-after"] = (
                str(int(ra)) if isinstance(ra, float) and ra.is_integer() else str(ra)
            )
        if fault.body is None:
            return error(
                fault.status,
                f"simulated upstream error {fault.status}",
                code=default_error_code(fault.status),
                headers=headers,
            )
        if isinstance(fault.body, bytes):
            return Full(fault.status, fault.body, "application/octet-stream", headers)
        if isinstance(fault.body, str):
            return Full(fault.status, fault.body.encode(), "text/plain; charset=utf-8", headers)
        return Full(fault.status, _encode(fault.body), headers=headers)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tollway.testing.upstream",
        description="Run the simulated OpenAI-compatible upstream.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001, help="0 picks a free port")
    parser.add_argument("--name", default="openai")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every reply")
    parser.add_argument(
        "--chunk-delay-ms", type=float, default=0.0, help="delay between two stream events"
    )
    parser.add_argument(
        "--chunk-interval-ms",
        type=float,
        default=0.0,
        help="send stream events this far apart, every stream from one timer (benchmarks)",
    )
    parser.add_argument(
        "--stamp",
        action="store_true",
        help="open each paced event with ': t=<monotonic ns>' (the long-stream benchmark)",
    )
    parser.add_argument(
        "--reply-words",
        type=int,
        default=None,
        help="fixed reply length in words (default: echo the last user message)",
    )
    parser.add_argument("--api-key", default=None, help="accept only this bearer key")
    parser.add_argument(
        "--no-auth", action="store_true", help="do not require an Authorization header"
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help="keep every request in memory (off: a long benchmark would grow)",
    )
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    up = FakeUpstream(
        args.name,
        host=args.host,
        port=args.port,
        latency_s=args.latency_ms / 1000.0,
        chunk_delay_s=args.chunk_delay_ms / 1000.0,
        chunk_interval_s=args.chunk_interval_ms / 1000.0,
        stamp=args.stamp,
        reply_words=args.reply_words,
        api_key=args.api_key,
        require_auth=not args.no_auth,
        record=args.record,
        use_uvloop=not args.no_uvloop,
    )

    def ready(u: FakeUpstream) -> None:
        # One parseable line: the benchmarks start us with --port 0 and read the port from it.
        print(f"listening on {u.base_url}", flush=True)

    up.serve_forever(on_ready=ready)


if __name__ == "__main__":
    main(sys.argv[1:])

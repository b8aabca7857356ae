"""``tollway.Gateway``: the gateway as a Python API, for services that call it in process.

::

    async with tollway.Gateway(config, tenant="acme") as gw:
        reply = await gw.chat(model="auto", messages=[{"role": "user", "content": "hi"}])
        async with gw.chat_stream(model="auto", messages=...) as stream:
            async for chunk in stream: ...
        vectors = await gw.embeddings(model="text-embedding-3-small", input=["a", "b"])

A call is the HTTP path's call without the socket: the request is encoded
as the OpenAI SDK would send it and handed to the same
:class:`tollway.pipeline.Pipeline` handler the HTTP route runs (decode,
policy, guards, dispatch with retries and breakers, settle, one call
event), with the tenant as its principal and the keyword hints as the
``X-Tollway-*`` headers. What the pipeline answers is decoded into msgspec
structs of the OpenAI shape (:mod:`tollway.openapi.wire`); an error answer is
raised as :class:`APIError`, with the status and envelope HTTP would send.

The same gateway serves HTTP too (:attr:`Gateway.app`, e.g. mounted in the
host app) and guards the host's own routes (``tollway.GuardMiddleware``): one
set of limits, one budget, one event stream.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self

import msgspec

from tollway.app import GatewayApp, app_of, running
from tollway.asgi import Message, Scope
from tollway.auth import Principal
from tollway.clock import Clock
from tollway.config import Config, default_config, load_config
from tollway.context import SCOPE_KEY, RequestInfo, new_request_id, request_id_var
from tollway.gateway import Gateway as Core
from tollway.logs import log_request
from tollway.openapi.wire import ChatCompletion, ChatCompletionChunk, EmbeddingList
from tollway.record import Recorder

__all__ = ["APIError", "ChatStream", "Gateway"]

CHAT_PATH = "/api/ai/v1/chat/completions"
IN_PROCESS = "CALL"  # the access line's method of an in-process call (its path: the route's)
EMBEDDINGS_PATH = "/api/ai/v1/embeddings"

Handler = Callable[[Scope, Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]


class _Error(msgspec.Struct):
    message: str = ""
    type: str = ""
    param: str | None = None
    code: str | None = None


class _Envelope(msgspec.Struct):
    error: _Error


_envelope = msgspec.json.Decoder(_Envelope)
_completion = msgspec.json.Decoder(ChatCompletion)
_chunk = msgspec.json.Decoder(ChatCompletionChunk)
_embeddings = msgspec.json.Decoder(EmbeddingList)
_encode = msgspec.json.Encoder().encode


class APIError(Exception):
    """What the HTTP path would have answered with an error status: its status, the
    OpenAI envelope's fields, the response headers (``retry-after``, ``x-ratelimit-*``)
    and the call's request id."""

    def __init__(self, status: int, message: str, *, type: str = "", code: str | None = None,
                 param: str | None = None, headers: Mapping[str, str] | None = None,
                 request_id: str = "") -> None:
        super().__init__(f"{status} {code or type}: {message}")
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.request_id = request_id


def _error_of(status: int, body: bytes, headers: dict[str, str], rid: str) -> APIError:
    try:
        err = _envelope.decode(body).error
    except msgspec.DecodeError:
        return APIError(status, body.decode("utf-8", "replace")[:500], headers=headers,
                        request_id=rid)
    return APIError(status, err.message, type=err.type, code=err.code, param=err.param,
                    headers=headers, request_id=rid)


def _headers(message: Message) -> dict[str, str]:
    return {bytes(k).decode("latin-1"): bytes(v).decode("latin-1")
            for k, v in message.get("headers", ())}


class Gateway:
    """The gateway in this process: ``async with Gateway(config) as gw`` starts it
    (providers, NATS, publisher, projections, shadow mode) and stops it on exit.

    ``config``: a :class:`tollway.config.Config`, a path to a ``tollway.toml``, or None
    (the defaults, providers from the environment). ``tenant``: the tenant calls are made
    for unless a call names one (tenants are the config's or the admin API's)."""

    def __init__(self, config: Config | str | os.PathLike[str] | None = None, *,
                 tenant: str | None = None, env: Mapping[str, str] | None = None,
                 recorder: Recorder | None = None, clock: Clock | None = None) -> None:
        if config is None:
            config = default_config(env=env)
        elif not isinstance(config, Config):
            config = load_config(config, env=env)
        self.core = Core(config, env=env, recorder=recorder, clock=clock)
        self.tenant = tenant
        self._app: GatewayApp | None = None
        self._run: Any = None

    @property
    def app(self) -> GatewayApp:
        """The HTTP API over this gateway, to mount in the host app (its lifespan is this
        object's ``async with``, or the app's own :meth:`GatewayApp.lifespan`)."""
        if self._app is None:
            self._app = app_of(self.core)
        return self._app

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """This gateway's ``async with`` as a host app's lifespan (``lifespan=gw.lifespan``);
        ``app`` is not used."""
        async with self:
            yield

    async def __aenter__(self) -> Self:
        run = running(self.core)
        await run.__aenter__()
        self._run = run
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        run, self._run = self._run, None
        if run is not None:
            await run.__aexit__(exc_type, exc, tb)

    # ---- calls -----------------------------------------------------------------
    async def chat(self, *, model: str, messages: list[dict[str, Any]],
                   tenant: str | None = None, task: str | None = None,
                   sensitivity: str | None = None, budget_tier: str | None = None,
                   latency: str | None = None, user: str | None = None,
                   request_id: str | None = None, **params: Any) -> ChatCompletion:
        """A chat completion (``POST /v1/chat/completions``): ``params`` are the request's
        other fields (temperature, tools, response_format, ...), passed through."""
        if params.get("stream"):
            raise TypeError("for a stream, call chat_stream()")
        body = {"model": model, "messages": messages, **params}
        status, headers, data, rid = await self._once(
            self.core.pipeline.chat, CHAT_PATH, body, tenant, task, sensitivity, budget_tier,
            latency, user, request_id)
        if status != 200:
            raise _error_of(status, data, headers, rid)
        return _completion.decode(data)

    def chat_stream(self, *, model: str, messages: list[dict[str, Any]],
                    tenant: str | None = None, task: str | None = None,
                    sensitivity: str | None = None, budget_tier: str | None = None,
                    latency: str | None = None, user: str | None = None,
                    request_id: str | None = None, **params: Any) -> ChatStream:
        """A streamed chat completion: ``async with gw.chat_stream(...) as s: async for
        chunk in s``. Leaving early ends the call as a client that went away would."""
        body = {"model": model, "messages": messages, **params, "stream": True}
        return ChatStream(self, body, tenant, task, sensitivity, budget_tier, latency, user,
                          request_id)

    async def embeddings(self, *, model: str, input: str | list[str] | list[int] | list[
                         list[int]], tenant: str | None = None, task: str | None = None,
                         sensitivity: str | None = None, budget_tier: str | None = None,
                         latency: str | None = None, user: str | None = None,
                         request_id: str | None = None, **params: Any) -> EmbeddingList:
        """Embeddings (``POST /v1/embeddings``)."""
        body = {"model": model, "input": input, **params}
        status, headers, data, rid = await self._once(
            self.core.pipeline.embeddings, EMBEDDINGS_PATH, body, tenant, task, sensitivity,
            budget_tier, latency, user, request_id)
        if status != 200:
            raise _error_of(status, data, headers, rid)
        return _embeddings.decode(data)

    # ---- the call, as the pipeline sees it ----------------------------------------------
    def _scope(self, path: str, body: bytes, tenant: str | None,
               hints: tuple[tuple[bytes, str | None], ...], request_id: str | None
               ) -> tuple[Scope, str]:
        core = self.core
        if not core.running:
            raise RuntimeError("tollway.Gateway is not running: use `async with Gateway(...)`")
        tenant_id = tenant or self.tenant
        if not tenant_id:
            raise TypeError("no tenant: pass tenant= to the call or to Gateway()")
        known = core.tenant(tenant_id)
        if known is None:
            raise APIError(403, f"unknown tenant {tenant_id!r}", type="permission_error",
                           code="unknown_tenant")
        rid = request_id or new_request_id()
        info = RequestInfo(rid, time.perf_counter())
        info.principal = Principal(known)
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", b"%d" % len(body))]
        headers += [(name, value.encode("latin-1")) for name, value in hints if value]
        scope: Scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "inprocess", "path": path, "raw_path": path.encode(),
            "root_path": "", "query_string": b"", "headers": headers, "client": None,
            "server": None, SCOPE_KEY: info,
        }
        return scope, rid

    async def _once(self, handler: Handler, path: str, body: dict[str, Any],
                    tenant: str | None, task: str | None, sensitivity: str | None,
                    budget_tier: str | None, latency: str | None, user: str | None,
                    request_id: str | None) -> tuple[int, dict[str, str], bytes, str]:
        payload = _encode(body)
        scope, rid = self._scope(path, payload, tenant, _hints(
            task, sensitivity, budget_tier, latency, user), request_id)
        sent: list[Message] = []
        never = asyncio.Event()
        first = True

        async def receive() -> Message:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": payload, "more_body": False}
            await never.wait()  # the caller is here until the call returns
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        token = request_id_var.set(rid)
        try:
            await handler(scope, receive, send)
        finally:
            log_request(scope[SCOPE_KEY], IN_PROCESS, path, time.perf_counter())
            request_id_var.reset(token)
        head = next(m for m in sent if m["type"] == "http.response.start")
        data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return head["status"], _headers(head), data, rid


def _hints(task: str | None, sensitivity: str | None, budget_tier: str | None,
           latency: str | None, user: str | None) -> tuple[tuple[bytes, str | None], ...]:
    return ((b"x-tollway-task", task), (b"x-tollway-sensitivity", sensitivity),
            (b"x-tollway-budget-tier", budget_tier), (b"x-tollway-latency", latency),
            (b"x-tollway-user", user))


class ChatStream:
    """The chunks of a streamed chat completion, as they arrive: an async iterator and an
    async context manager (its exit, or :meth:`aclose`, ends a call left early).

    ``headers`` are the response's (provider, model, rate limits) once the stream began;
    ``request_id`` the call's. An error answer, or an error event mid-stream, raises
    :class:`APIError`."""

    def __init__(self, gateway: Gateway, body: dict[str, Any], tenant: str | None,
                 task: str | None, sensitivity: str | None, budget_tier: str | None,
                 latency: str | None, user: str | None, request_id: str | None) -> None:
        self._gateway = gateway
        self._body = body
        self._call = (tenant, _hints(task, sensitivity, budget_tier, latency, user),
                      request_id)
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._gone = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._buffer = b""
        self._pending: list[ChatCompletionChunk] = []
        self._done = False
        self.headers: dict[str, str] = {}
        self.request_id = ""

    async def _start(self) -> None:
        payload = _encode(self._body)
        tenant, hints, request_id = self._call
        scope, self.request_id = self._gateway._scope(CHAT_PATH, payload, tenant, hints,
                                                      request_id)
        queue, gone = self._queue, self._gone
        first = True

        async def receive() -> Message:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": payload, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if gone.is_set():
                raise OSError("the in-process caller closed the stream")
            queue.put_nowait(message)

        handler = self._gateway.core.pipeline.chat

        async def run() -> None:
            token = request_id_var.set(self.request_id)
            try:
                await handler(scope, receive, send)
            finally:
                log_request(scope[SCOPE_KEY], IN_PROCESS, CHAT_PATH, time.perf_counter())
                request_id_var.reset(token)
                queue.put_nowait(None)

        self._task = asyncio.ensure_future(run())
        head = await self._next_message()
        if head is None or head["type"] != "http.response.start":
            await self.aclose()
            raise APIError(500, "the gateway ended the call without an answer",
                           request_id=self.request_id)
        self.headers = _headers(head)
        if head["status"] != 200:
            data = b""
            while (m := await self._next_message()) is not None:
                data += m.get("body", b"")
            self._done = True
            await self._finish()
            raise _error_of(head["status"], data, self.headers, self.request_id)

    async def _next_message(self) -> Message | None:
        return await self._queue.get()

    async def __aenter__(self) -> Self:
        if self._task is None:
            await self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        if self._task is None:
            await self._start()
        while not self._pending:
            if self._done:
                await self._finish()
                raise StopAsyncIteration
            message = await self._next_message()
            if message is None:  # the pipeline returned without [DONE]
                self._done = True
                continue
            self._feed(message.get("body", b""))
        return self._pending.pop(0)

    def _feed(self, data: bytes) -> None:
        self._buffer += data
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self._done = True
                    return
                try:
                    self._pending.append(_chunk.decode(payload))
                except msgspec.ValidationError:
                    self._done = True
                    raise _error_of(502, payload, self.headers, self.request_id) from None
                except msgspec.DecodeError:
                    self._done = True
                    raise APIError(502, "the stream sent an event that is not JSON",
                                   headers=self.headers, request_id=self.request_id) from None

    async def _finish(self) -> None:
        task = self._task
        if task is not None and not task.done():
            await task

    async def aclose(self) -> None:
        """End the call: at once if the stream is under way (the call's record says the
        client left), else after its last event."""
        if self._task is None:
            return
        if not self._done:
            self._gone.set()
            self._done = True
        await self._finish()

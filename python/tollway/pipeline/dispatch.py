"""Step 5: send the call to the plan's candidates, in order, and relay the reply.

Each candidate gets up to ``[retry] attempts`` tries while its errors are
retryable (connect error, timeout, 429, 5xx), with a full-jitter backoff or
the provider's ``Retry-After`` (up to a cap) in between, then the call fails
over to the next candidate; a provider's 4xx about the request itself goes
straight back to the caller, neither retried nor failed over. Every attempt's
outcome is fed to the provider's breaker (a provider whose breaker refuses is
skipped) and its latency to the tracker the policy orders by; when every
candidate fails, the error lists each one's. Sleeping and timing use the
gateway's clock (see :mod:`tollway.resilience`).

A stream is retried or fails over only before its first byte: the response
headers go to the client once the provider's first chunk has arrived, and
from then on a failure ends the stream with an error event. While it relays,
a watcher waits for the client to leave; when it does, the upstream request
is dropped at once and what was streamed so far is still counted. However a
relay ends (the provider breaks the stream, the client leaves or its send
fails, the task is cancelled, a bug), the upstream reply is let go by the
one ``async with`` that holds it (:mod:`.upstream`), the client still there
gets its last message, and the breaker a result: a failure only when the
provider was at fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import msgspec

from tollway.asgi import Headers, Message, Receive, Send
from tollway.errors import (
    InternalError,
    TollwayError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejectedRequest,
    UpstreamTimeout,
    UpstreamUnavailable,
    spec_for,
)
from tollway.pipeline.call import Call
from tollway.pipeline.native import NOT_YET, TRIES, ClientLeft, NativeRelay, forget
from tollway.pipeline.plan import Deployment
from tollway.pipeline.prompt import prompt_tokens
from tollway.pipeline.surface import Wire
from tollway.pipeline.taps import Tap
from tollway.pipeline.upstream import HeldStream, holding
from tollway.pipeline.usage import Usage, count_text
from tollway.providers.http import Reply, StreamReply
from tollway.providers.openai import OpenAIProvider
from tollway.resilience import classify

if TYPE_CHECKING:
    from tollway.parts import GatewayParts

log = logging.getLogger("tollway.pipeline")

SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class _ErrorDetail(msgspec.Struct):
    message: str | None = None
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail | str | None = None


_error_body = msgspec.json.Decoder(_ErrorBody)


def upstream_error(provider: str, status: int, body: bytes,
                   headers: Mapping[str, str]) -> TollwayError:
    """A provider's non-2xx reply as the caller should see it."""
    exc = _error_for(provider, status, body, headers)
    if isinstance(exc, UpstreamError):
        exc.upstream_status = status
    return exc


def _error_for(provider: str, status: int, body: bytes,
               headers: Mapping[str, str]) -> TollwayError:
    detail = _ErrorDetail()
    try:
        parsed = _error_body.decode(body).error
        if isinstance(parsed, _ErrorDetail):
            detail = parsed
        elif isinstance(parsed, str):
            detail = _ErrorDetail(message=parsed)
    except msgspec.MsgspecError:
        pass
    retry_after = headers.get("retry-after")  # the client gives header names in lower case
    extra = {"Retry-After": retry_after} if retry_after else None
    if status == 429:
        return UpstreamRateLimited(f"{provider}: provider is rate limiting the gateway",
                                   headers=extra)
    if status in (400, 413, 422):
        # Passed back: the request itself is at fault, and only its sender can fix it.
        message = (detail.message or f"{provider} rejected the request")[:2000]
        code = str(detail.code) if detail.code is not None else None
        return UpstreamRejectedRequest(message, param=detail.param, code=code,
                                       status=413 if status == 413 else 400)
    if status in (401, 403):
        return UpstreamError(f"{provider}: provider refused the gateway's credentials "
                             f"(HTTP {status})")
    if status == 404:
        return UpstreamError(f"{provider}: provider does not know this model or path (HTTP 404)")
    if status in (408, 504):
        return UpstreamTimeout(f"{provider}: provider timed out (HTTP {status})")
    if status == 503:
        return UpstreamUnavailable(f"{provider}: provider unavailable (HTTP 503)", headers=extra)
    return UpstreamError(f"{provider}: provider failed (HTTP {status})")


def all_failed(errors: list[tuple[Deployment, UpstreamError]]) -> UpstreamError:
    """Every candidate failed: one error listing each, with the last one's status."""
    if len(errors) == 1:
        return errors[0][1]
    last = errors[-1][1]
    text = "; ".join(f"{d.model}: {e.message}" for d, e in errors)
    spec = spec_for(last)
    return type(last)(f"all {len(errors)} candidates failed: {text}", code=spec.code,
                      headers=last.headers, status=spec.status)


def cost_header(nano: int) -> bytes:
    return f"{nano / 1e9:.9f}".encode()


def served_headers(call: Call) -> Headers:
    """Which deployment served (or last failed) the call, and the output bound it was
    asked for when the call's money required one."""
    dep = call.deployment
    if dep is None:
        return []
    out = [(b"x-tollway-provider", dep.provider.encode()),
           (b"x-tollway-model", dep.model.encode())]
    if call.output_bound:
        out.append((b"x-tollway-max-tokens", b"%d" % call.output_bound))
    return out


_LAST_WORD_S = 1.0  # a cancelled relay waits this long, at most, to end the client's stream


class _ClientLeft(Exception):
    """The client cannot take more of the stream: it left, or sending to it failed."""


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _forward(send: Send, message: Message) -> None:
    try:
        await send(message)
    except OSError as exc:  # what ASGI servers raise for a client that is gone
        raise _ClientLeft from exc


async def _end(send: Send, body: bytes) -> None:
    """The stream's last message; a client that is gone needs none."""
    try:
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except OSError:
        pass  # the client is gone: nobody to tell
    except Exception:  # the relay's outcome stands; a broken send is logged, not raised
        log.exception("ending a stream failed")


def _broken(call: Call, exc: TollwayError, tap: Tap) -> bytes:
    """Record why the stream failed; the error event that ends it, unless the provider's
    own error event went out already."""
    call.error = exc
    spec = spec_for(exc)
    call.status = spec.status
    if tap.error:
        return b""
    return _wire(call).error_event(exc.message, spec.type, spec.code)


def _wire(call: Call) -> Wire:
    assert call.wire is not None
    return call.wire


class Dispatcher:
    def __init__(self, parts: GatewayParts) -> None:
        self.parts = parts
        self._relay_core: NativeRelay | None = None

    async def dispatch(self, call: Call, receive: Receive, send: Send) -> None:
        """Serve the call from the first candidate that answers; raise when none does."""
        assert call.plan is not None
        candidates = call.plan.candidates
        if not candidates:
            raise UpstreamUnavailable("no provider can serve this call right now")
        parts = self.parts
        clock, retry, breakers, latency = parts.clock, parts.retry, parts.breakers, parts.latency
        metrics = parts.metrics
        errors: list[tuple[Deployment, UpstreamError]] = []
        for i, dep in enumerate(candidates):
            provider = parts.providers[dep.provider]
            breaker = breakers[dep.provider]
            bound = call.plan.bound(dep) if call.plan is not None else 0
            # How this provider speaks the call's API (the plan holds only providers that
            # can), and the body it gets: an output bound ``bound`` (the plan's, 0 for none)
            # goes in the fields the caller sent, lowered, else in the one the model takes.
            wire = call.surface.wire(provider.kind, dep.responses)
            if wire is None:
                errors.append((dep, UpstreamError(
                    f"{dep.provider}: does not serve {call.endpoint}")))
                continue
            body = wire.body(call, dep, bound)
            tries = 0
            while True:
                if not breaker.allow(clock.monotonic()):
                    # Opened since the plan was made, or its one half-open probe is out.
                    wait = max(1, math.ceil(breaker.retry_after(clock.monotonic())))
                    errors.append((dep, UpstreamUnavailable(
                        f"{dep.provider}: circuit breaker open", headers={
                            "Retry-After": str(wait)})))
                    break
                tries += 1
                call.deployment = dep
                call.wire = wire
                call.output_bound = bound
                call.attempts += 1
                trace = call.trace  # its spans (tracing on): one per attempt
                if trace is not None:
                    trace.attempt(call, dep)
                t = clock.monotonic()
                try:
                    if call.stream:
                        async with holding(self._post_stream(call, provider, body)) as up:
                            first = await self._first(call, provider, up)
                            latency.observe(dep, dep.provider, clock.monotonic() - t)
                            fault: UpstreamError | None = None
                            try:
                                fault = await self._relay(call, up, first, receive, send)
                            finally:
                                # After the first byte nothing is retried. A stream the
                                # provider broke counts against it; one the client left,
                                # or a cancelled task, does not.
                                now = clock.monotonic()
                                if fault is not None:
                                    breaker.record_failure(now)
                                    metrics.upstream_errors.inc(
                                        (dep.provider, spec_for(fault).code or "error"))
                                else:
                                    breaker.record_success(now, now - t)
                        return  # its trace's attempt ends with the call (a finisher)
                    call.reply = await self._post(call, provider, body)
                    try:
                        call.usage = wire.usage(call.reply.body)
                    except msgspec.MsgspecError:
                        call.reply = None
                        raise UpstreamError(f"{provider.name}: provider sent an unreadable "
                                            "reply") from None
                    elapsed = clock.monotonic() - t
                    breaker.record_success(clock.monotonic(), elapsed)
                    latency.observe(dep, dep.provider, elapsed)
                    if trace is not None:
                        trace.attempt_end(None)
                    return
                except UpstreamRejectedRequest as exc:
                    if trace is not None:
                        trace.attempt_end(exc)
                    # The provider answered: healthy, whatever it thought of the request.
                    breaker.record_success(clock.monotonic(), clock.monotonic() - t)
                    metrics.upstream_errors.inc((dep.provider, "rejected"))
                    raise
                except UpstreamError as exc:
                    if trace is not None:
                        trace.attempt_end(exc)
                    now = clock.monotonic()
                    breaker.record_failure(now)
                    latency.observe_failure(
                        dep, dep.provider, now - t if isinstance(exc, UpstreamTimeout) else None)
                    metrics.upstream_errors.inc((dep.provider, spec_for(exc).code or "error"))
                    delay = None
                    if classify(exc, exc.upstream_status) == "retry":
                        delay = retry.delay(tries, exc, clock.time())
                    if delay is None:
                        errors.append((dep, exc))
                        break
                    await clock.sleep(delay)
            if i + 1 < len(candidates) and tries:
                call.fallbacks.append(dep.provider)
        raise all_failed(errors)

    async def _post(self, call: Call, provider: OpenAIProvider, body: bytes) -> Reply:
        info = call.info
        t = time.perf_counter()
        try:
            wire = _wire(call)
            extra = wire.headers(call)
            if call.trace is not None:
                extra = call.trace.headers(extra)  # the attempt's traceparent
            reply = await provider.post(wire.path, body, info.request_id, extra)
        finally:
            info.upstream_s += time.perf_counter() - t
        if reply.status >= 300:
            raise upstream_error(provider.name, reply.status, reply.body, reply.headers)
        return reply

    async def _post_stream(self, call: Call, provider: OpenAIProvider, body: bytes
                           ) -> StreamReply:
        info = call.info
        t = time.perf_counter()
        try:
            wire = _wire(call)
            extra = wire.headers(call)
            if call.trace is not None:
                extra = call.trace.headers(extra)  # the attempt's traceparent
            return await provider.post_stream(wire.path, body, info.request_id, extra)
        finally:
            info.upstream_s += time.perf_counter() - t

    async def _first(self, call: Call, provider: OpenAIProvider, up: HeldStream) -> bytes:
        """The stream's first chunk: until it has come, nothing was sent to the client and
        a failure may still be retried."""
        info = call.info
        t = time.perf_counter()
        try:
            reply = up.reply
            if reply.status >= 300:
                data = await up.read()
                raise upstream_error(provider.name, reply.status, data, reply.headers)
            first = await up.next()
        finally:
            info.upstream_s += time.perf_counter() - t
        if first is None:
            raise UpstreamError(f"{provider.name}: provider ended the stream before "
                                "sending anything")
        return first

    async def _relay(self, call: Call, up: HeldStream, first: bytes, receive: Receive,
                     send: Send) -> UpstreamError | None:
        """Relay the stream and end it on every path: the provider's fault, if it was one.

        The client gets a last message unless it is gone: ``[DONE]`` after a whole
        stream, else an error event (the provider's own, when it sent one)."""
        dep = call.deployment
        assert dep is not None
        tap = call.tap = _wire(call).tap(
            call, call.plan.relay_limit(dep) if call.plan is not None else 0, dep.upstream)
        # Before the send: whatever happens next, the pipeline must not answer again.
        call.response_started = True
        try:
            await _forward(send, {"type": "http.response.start", "status": 200,
                                  "headers": [*SSE_HEADERS, *served_headers(call),
                                              *call.headers]})
            tail = await self._raced(call, up, first, tap, receive, send)
        except _ClientLeft:
            call.client_cancelled = True
            return None
        except asyncio.CancelledError:
            # The server stops the call (shutdown; some servers on a disconnect): for the
            # record the client went away; a client still there learns it was cut.
            call.client_cancelled = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_LAST_WORD_S):
                    await _end(send, _wire(call).error_event(
                        "the gateway stopped this stream", "api_error", "stream_stopped"))
            raise
        except UpstreamError as exc:
            await _end(send, _broken(call, exc, tap))
            return exc
        except Exception:
            log.exception("stream relay failed", extra={"provider": dep.provider})
            await _end(send, _broken(call, InternalError("internal error"), tap))
            return None
        await _end(send, tail)
        return None

    async def _raced(self, call: Call, up: HeldStream, first: bytes, tap: Tap,
                     receive: Receive, send: Send) -> bytes:
        """The pump's result; :class:`_ClientLeft` when the client leaves first."""
        pump = asyncio.ensure_future(self._pump(call, up, first, tap, send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when we are cancelled: neither task may outlive the relay.
            watch.cancel()
            pump.cancel()
            await asyncio.gather(pump, watch, return_exceptions=True)
        if pump.cancelled():
            raise _ClientLeft
        return pump.result()

    async def _pump(self, call: Call, up: HeldStream, first: bytes, tap: Tap,
                    send: Send) -> bytes:
        """Forward the provider's events; the stream's last bytes once it ended whole.

        Raises UpstreamError when the provider broke the stream, _ClientLeft when the
        client cannot take more."""
        # The loop runs once for every read of the provider's socket (all that arrived
        # since the last one goes out in one send), so it calls as little as it can: the
        # reply's next() and the client's send, with no wrapper coroutine around either.
        info = call.info
        following = up.reply.next
        clock = time.perf_counter
        # Until the first token is out, then handed to the native relay when it can be.
        native = self._native() if call.relay_to is not None else None
        if native is None:
            forget(up)
        sent = False  # the head is out (it leaves with the first body message)
        tries = 0  # hand-offs not yet possible (see native.NOT_YET)
        data: bytes | None = first
        while data is not None:
            out = tap.feed(data)
            if out:
                try:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                except OSError as exc:  # what ASGI servers raise for a client that is gone
                    raise _ClientLeft from exc
                sent = True
            if tap.cut:  # at the output limit: the provider ignored max_tokens
                return _wire(call).cut(call, tap, lambda: self._counted(call, tap))
            if native is not None and sent and tap.first_token_at is not None:
                handle = native.take(call.relay_to, up, tap)
                if handle is NOT_YET:  # the loop writes at the end of its turn: let it
                    await asyncio.sleep(0)
                    handle = native.take(call.relay_to, up, tap)
                if handle is NOT_YET:  # tried again after the next read, a few times
                    tries += 1
                    if tries >= TRIES:
                        forget(up)
                        native = None  # relayed here to its end
                elif handle is not None:
                    name = call.deployment.provider if call.deployment is not None else ""
                    t = clock()
                    try:
                        await native.wait(handle, tap, name)
                    except ClientLeft:
                        raise _ClientLeft from None
                    finally:
                        info.upstream_s += clock() - t
                    break
                else:
                    native = None  # relayed here to its end
            t = clock()
            try:
                data = await following()
                if data is None:
                    up.ended = True  # read to its end: the connection may be reused
            except UpstreamError:
                if not tap.done:
                    raise
                data = None  # broken off after [DONE]: the client has it all
            finally:
                info.upstream_s += clock() - t
        name = call.deployment.provider if call.deployment is not None else ""
        if tap.error:
            raise UpstreamError(f"{name}: provider sent an error mid-stream")
        if not tap.done:
            raise UpstreamError(f"{name}: provider ended the stream early")
        return _wire(call).end(call, tap, lambda: self._counted(call, tap))

    def _native(self) -> NativeRelay | None:
        """This loop's native relay, when ``[streams] native_relay`` is on."""
        if not self.parts.config.streams.native_relay:
            return None
        relay = self._relay_core
        loop = asyncio.get_running_loop()
        if relay is None or relay.loop is not loop:
            if relay is not None:
                relay.close()
            relay = self._relay_core = NativeRelay(loop)
        return relay

    def close(self) -> None:
        """Stop the native relay's thread (streams it still has are cut)."""
        if self._relay_core is not None:
            self._relay_core.close()
            self._relay_core = None

    def _counted(self, call: Call, tap: Tap) -> Usage:
        dep = call.deployment
        assert dep is not None
        prompt = prompt_tokens(call, dep.upstream) or 0
        completion = count_text(tap.text(), dep.upstream)
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)



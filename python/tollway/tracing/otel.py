"""The spans: one per call, one per upstream attempt, exported over OTLP/HTTP.

Imported only when tracing is on (the ``tollway[otel]`` extra). The gateway
keeps a TracerProvider of its own (never the process-wide one, so several apps
in one process each trace to their own collector), with a ParentBased (or
plain) TraceIdRatioBased sampler and a BatchSpanProcessor: ending a span only
puts it on the processor's queue, and the processor's thread sends batches to
the collector, so the event loop never waits on it.

A call's span (kind SERVER) starts when the call reaches the pipeline, as the
child of the caller's ``traceparent`` when it sent one (W3C Trace Context), and
ends when the call is settled, just before its last bytes go out. It follows
the OpenTelemetry GenAI semantic conventions: named ``{gen_ai.operation.name}
{gen_ai.request.model}``, with ``gen_ai.system``, ``gen_ai.request.model`` (the
model or route the caller asked for), ``gen_ai.response.model`` (tollway's
model id that served), ``gen_ai.usage.input_tokens`` / ``output_tokens`` and
``error.type``, plus tollway's own as ``tollway.*``. Each upstream attempt is a
child span (kind CLIENT, named for the upstream model) whose context goes
upstream in the request's ``traceparent``: retries and failover are seen as
its siblings. No prompt or reply text is recorded.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tollway._version import __version__
from tollway.errors import TollwayError, UpstreamError, spec_for

if TYPE_CHECKING:
    from tollway.asgi import Scope
    from tollway.parts import GatewayParts
    from tollway.pipeline.call import Call
    from tollway.pipeline.plan import Deployment
    from tollway.tracing.settings import TracingSettings

__all__ = ["CallSpans", "Tracing"]

# gen_ai.operation.name of each surface (tollway.pipeline.surface endpoints).
OPERATIONS = {
    "chat.completions": "chat",
    "messages": "chat",
    "responses": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}
_TRACE_HEADERS = (b"traceparent", b"tracestate")


class Tracing:
    """The gateway's tracer: :meth:`start` is the pipeline's ``tracer`` hook and
    :meth:`finish` one of its finishers."""

    def __init__(self, settings: TracingSettings, parts: GatewayParts) -> None:
        resource = Resource.create({
            **settings.resource,
            "service.name": settings.service_name,
            "service.version": __version__,
            "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
        })
        sampler: Sampler = TraceIdRatioBased(settings.sample_ratio)
        if settings.parent_based:
            sampler = ParentBased(sampler)
        self.provider = TracerProvider(resource=resource, sampler=sampler,
                                       shutdown_on_exit=False)
        exporter = OTLPSpanExporter(endpoint=settings.endpoint, headers=settings.headers,
                                    timeout=settings.export_timeout_s)
        self.processor = BatchSpanProcessor(
            exporter, max_queue_size=settings.max_queue_size,
            schedule_delay_millis=settings.schedule_delay_ms,
            max_export_batch_size=settings.max_export_batch_size)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("tollway", __version__)
        self.propagator = TraceContextTextMapPropagator()
        # Per provider: (gen_ai.system, server.address, server.port).
        self.upstreams: dict[str, tuple[str, str, int]] = {}
        for name, provider in parts.providers.items():
            url = urlsplit(provider.base_url)
            port = url.port or (443 if url.scheme == "https" else 80)
            self.upstreams[name] = (provider.config.kind, url.hostname or "", port)

    def start(self, call: Call, scope: Scope) -> CallSpans:
        """The call's span, as the call reaches the pipeline; the caller's traceparent (if
        any) is its parent. It starts when the request arrived (``call.t0``)."""
        carrier: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in _TRACE_HEADERS:
                carrier[name.decode()] = value.decode("latin-1")
        parent = self.propagator.extract(carrier) if carrier else None
        operation = OPERATIONS.get(call.endpoint, call.endpoint)
        started = time.time_ns() - int((time.perf_counter() - call.t0) * 1e9)
        span = self.tracer.start_span(operation, context=parent, kind=SpanKind.SERVER,
                                      start_time=started, attributes={
                                          "gen_ai.operation.name": operation,
                                          "tollway.endpoint": call.endpoint,
                                          "tollway.request_id": call.info.request_id,
                                          "tollway.tenant": call.tenant.id,
                                      })
        return CallSpans(self, span, operation)

    def finish(self, call: Call) -> None:
        spans = call.trace
        if isinstance(spans, CallSpans):
            spans.end(call)

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Export what is queued and stop the processor's thread (blocks: run it in one)."""
        self.provider.shutdown()


class CallSpans:
    """A call's span and its open attempt's; the pipeline knows it as ``call.trace``."""

    __slots__ = ("attempt_span", "context", "operation", "recording", "span", "tracing")

    def __init__(self, tracing: Tracing, span: Span, operation: str) -> None:
        self.tracing = tracing
        self.span = span
        self.operation = operation
        self.context: Context = set_span_in_context(span)
        self.attempt_span: Span | None = None
        # Sampled out: the spans still carry the context upstream, but no attributes.
        self.recording = span.is_recording()

    def attempt(self, call: Call, dep: Deployment) -> None:
        """A child span for an upstream attempt (the call's ``call.attempts``-th)."""
        if self.attempt_span is not None:
            self.attempt_end(None)
        tracer = self.tracing.tracer
        if not self.recording:
            self.attempt_span = tracer.start_span(self.operation, context=self.context,
                                                  kind=SpanKind.CLIENT)
            return
        system, host, port = self.tracing.upstreams.get(dep.provider, ("", "", 0))
        self.attempt_span = tracer.start_span(
            f"{self.operation} {dep.upstream}", context=self.context, kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": self.operation,
                "gen_ai.system": system,
                "gen_ai.request.model": dep.upstream,
                "server.address": host,
                "server.port": port,
                "tollway.provider": dep.provider,
                "tollway.model": dep.model,
                "tollway.attempt": call.attempts,
            })

    def headers(self, extra: Mapping[str, str] | None) -> Mapping[str, str]:
        """``extra`` plus the open attempt's ``traceparent`` (and the caller's
        ``tracestate``), for the upstream request."""
        out = dict(extra) if extra else {}
        if self.attempt_span is not None:
            self.tracing.propagator.inject(out, context=set_span_in_context(self.attempt_span))
        return out

    def attempt_end(self, error: TollwayError | None) -> None:
        span, self.attempt_span = self.attempt_span, None
        if span is None:
            return
        if error is not None:
            spec = spec_for(error)
            attributes: dict[str, Any] = {"error.type": spec.code or spec.type}
            if isinstance(error, UpstreamError) and error.upstream_status:
                attributes["http.response.status_code"] = error.upstream_status
            span.set_attributes(attributes)
            span.set_status(Status(StatusCode.ERROR, error.message))
        span.end()

    def end(self, call: Call) -> None:
        """The call is settled: its outcome on its span (and an attempt still open, a
        stream's or one cut short), then both end."""
        error = call.error
        self.attempt_end(error)
        span = self.span
        if not self.recording:
            span.end()
            return
        request: Any = call.request
        route = call.plan.route if call.plan is not None else (
            getattr(request, "model", "") if request is not None else "")
        attributes: dict[str, Any] = {
            "http.response.status_code": call.status,
            "tollway.attempts": call.attempts,
            "tollway.stream": call.stream,
        }
        if route:
            span.update_name(f"{self.operation} {route}")
            attributes["gen_ai.request.model"] = route
            attributes["tollway.route"] = route
        dep = call.deployment
        if dep is not None:
            attributes["gen_ai.system"] = self.tracing.upstreams.get(dep.provider, ("",))[0]
            attributes["tollway.provider"] = dep.provider
            attributes["tollway.model"] = dep.model
            if error is None or call.tap is not None:  # served (a stream: in part)
                attributes["gen_ai.response.model"] = dep.model
                attributes["gen_ai.usage.input_tokens"] = call.prompt_tokens
                attributes["gen_ai.usage.output_tokens"] = call.completion_tokens
                attributes["tollway.cost_usd"] = call.cost_nanousd / 1e9
        if call.client_cancelled:
            attributes["tollway.client_cancelled"] = True
        if error is not None:
            spec = spec_for(error)
            attributes["error.type"] = spec.code or spec.type
            if call.status >= 500:
                span.set_status(Status(StatusCode.ERROR, error.message))
        span.set_attributes(attributes)
        span.end()

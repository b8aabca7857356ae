"""An OTLP/HTTP trace receiver: a real HTTP server on loopback, for tests and benchmarks.

It accepts what a collector's OTLP/HTTP receiver accepts for traces: ``POST
/v1/traces`` with an ``ExportTraceServiceRequest`` in protobuf
(``application/x-protobuf``, gzip'd or not), answers an empty
``ExportTraceServiceResponse``, and keeps every span it received, decoded with
``opentelemetry-proto`` (the ``tollway[otel]`` extra brings it), as a
:class:`ReceivedSpan`. It also keeps each export request's headers, and can be
made to hold its answers (:meth:`OtlpReceiver.hold`) as a stuck collector would.

In-process (tests)::

    with OtlpReceiver() as otlp:
        ...  # [tracing] endpoint = otlp.endpoint
        spans = otlp.wait_for(lambda spans: len(spans) >= 2)

As its own process (benchmarks; ``--discard`` answers without decoding)::

    python -m tollway.testing.otlp --port 4318 --discard
"""

from __future__ import annotations

import argparse
import gzip
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["OtlpReceiver", "ReceivedSpan", "main"]

PATH = "/v1/traces"


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as exported: ids in lower-case hex (``parent_span_id`` empty for a root)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str  # "SERVER", "CLIENT", "INTERNAL", ...
    attributes: dict[str, Any]
    status: str  # "UNSET", "OK", "ERROR"
    status_message: str
    start_ns: int
    end_ns: int
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def decode_spans(body: bytes) -> list[ReceivedSpan]:
    """The spans of one ``ExportTraceServiceRequest``."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out = []
    for rs in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(ReceivedSpan(
                    name=s.name,
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(),
                    kind=Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                    attributes={kv.key: _value(kv.value) for kv in s.attributes},
                    status=Status.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_"),
                    status_message=s.status.message,
                    start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano,
                    resource=resource,
                    scope=ss.scope.name,
                ))
    return out


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        receiver = self.server.receiver
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        if self.path != PATH:
            self._answer(404, b"")
            return
        if self.headers.get("content-encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        try:
            spans = [] if receiver.discard else decode_spans(body)
        except Exception:  # not an ExportTraceServiceRequest: what a collector says
            self._answer(400, b"")
            return
        receiver._wait_gate()
        receiver._add({k.lower(): v for k, v in self.headers.items()}, spans)
        # An empty ExportTraceServiceResponse is zero bytes of protobuf.
        self._answer(200, b"")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read what was received, not an access log


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: OtlpReceiver

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the exporter gave up waiting (a held answer): what a collector sees
        super().handle_error(request, client_address)


class OtlpReceiver:
    """A trace receiver on ``127.0.0.1`` (a free port unless ``port``), in a thread."""

    def __init__(self, port: int = 0, *, discard: bool = False) -> None:
        self.discard = discard
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.receiver = self
        self.port: int = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}{PATH}"
        self._spans: list[ReceivedSpan] = []
        self._requests: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._gate = threading.Event()
        self._gate.set()
        self._held = 0
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="otlp-receiver")

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._spans)

    @property
    def requests(self) -> list[dict[str, str]]:
        """The headers of each export request received (lower-case names)."""
        with self._cond:
            return list(self._requests)

    def _add(self, headers: dict[str, str], spans: list[ReceivedSpan]) -> None:
        with self._cond:
            self._requests.append(headers)
            self._spans.extend(spans)
            self._cond.notify_all()

    @property
    def held(self) -> int:
        """Export requests waiting for :meth:`release`."""
        with self._cond:
            return self._held

    def _wait_gate(self) -> None:
        if self._gate.is_set():
            return
        with self._cond:
            self._held += 1
        self._gate.wait()
        with self._cond:
            self._held -= 1

    def hold(self) -> None:
        """Answer no export until :meth:`release` (a collector that hangs)."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()
            self._requests.clear()

    def wait_for(self, check: Callable[[list[ReceivedSpan]], bool],
                 timeout: float = 60.0) -> list[ReceivedSpan]:
        """The spans received, once ``check`` holds for them; raises TimeoutError past
        ``timeout`` (a hang detector)."""
        with self._cond:
            if not self._cond.wait_for(lambda: check(self._spans), timeout):
                raise TimeoutError(f"{len(self._spans)} spans received: {self._spans!r}")
            return list(self._spans)

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._gate.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=4318)
    parser.add_argument("--discard", action="store_true",
                        help="answer without decoding or keeping the spans")
    args = parser.parse_args(argv)
    receiver = OtlpReceiver(args.port, discard=args.discard).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"OTLP receiver on {receiver.endpoint}", flush=True)
    started = time.monotonic()
    while not stop.wait(0.5):
        pass
    receiver.stop()
    print(f"{len(receiver.requests)} export requests in {time.monotonic() - started:.0f} s",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

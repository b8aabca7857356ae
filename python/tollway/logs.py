"""Logging: stdlib logging with one JSON object per line.

Every record carries the request id of the request that caused it (from a
context variable), so a request's lines can be found together. The access
log writes one line per request with a fixed set of fields, and nothing else:
no header, no body, no key.

The access line is on the hot path. With the handler :func:`configure_logging`
installs and nothing else in the way (no other handler, no filter), it is
encoded straight to bytes and written to the stream's buffer, which is flushed
once per turn of the event loop: one ``write`` for all the lines of that turn
instead of a ``LogRecord``, a formatter and a ``write`` each (the same line,
field for field). Otherwise it skips what ``Logger.log`` computes for every
record and a JSON line never shows (caller frame, module path, thread and
process names): :class:`AccessRecord` is a ``LogRecord`` with those filled by
constants, handed to the logger's handlers as usual, so any handler, filter or
formatter an operator configures still works.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from typing import IO, Any

import msgspec

from tollway.context import RequestInfo, request_id_var

access_logger = logging.getLogger("tollway.access")
logger = logging.getLogger("tollway")

_encode = msgspec.json.Encoder().encode

# LogRecord attributes that are not caller-supplied fields.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {
    "message", "asctime", "taskName", "fields"}


class AccessRecord(logging.LogRecord):
    """A LogRecord built without stack inspection; fields in ``.fields``."""

    def __init__(self, level: int, fields: dict[str, Any]) -> None:
        now = time.time()
        self.name = "tollway.access"
        self.msg = "request"
        self.args = None
        self.levelno = level
        self.levelname = logging.getLevelName(level)
        self.pathname = __file__
        self.filename = "logs.py"
        self.module = "logs"
        self.lineno = 0
        self.funcName = "log_request"
        self.exc_info = None
        self.exc_text = None
        self.stack_info = None
        self.created = now
        self.msecs = (now - int(now)) * 1000.0
        self.relativeCreated = (now - logging._startTime) * 1000.0  # type: ignore[attr-defined]
        self.thread = None
        self.threadName = None
        self.processName = None
        self.process = None
        self.taskName = None
        self.fields = fields
        self.__dict__.update(fields)  # also as attributes, like `extra=`


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker  # under `tollway serve --workers N`: this process's number

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _micros(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            out["worker"] = self.worker
        rid = request_id_var.get()
        if rid:
            out["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            for key, value in record.__dict__.items():
                if key not in _STANDARD:
                    out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encode(out).decode()


class JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs: :class:`JsonFormatter` lines, and
    :meth:`write_line` for the access log's own (:func:`log_request`)."""

    def __init__(self, stream: IO[str], worker: int | None = None) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter(worker))
        self.worker = worker
        self._flush_due = False
        self._warned = False

    def write_line(self, line: bytes) -> None:
        """One encoded JSON line (no newline), buffered; flushed at the end of this turn of
        the event loop (at once off the loop). Never raises: a line the stream cannot take
        (a closed pipe, a full disk) is dropped, as ``logging`` drops it."""
        stream = self.stream
        buffer = getattr(stream, "buffer", None)
        with self.lock:  # type: ignore[union-attr]
            try:
                if buffer is None:  # a text stream only (a StringIO)
                    stream.write(line.decode() + "\n")
                else:
                    buffer.write(line + b"\n")
            except Exception:
                self._unwritable()
                return
            if self._flush_due:
                return
            try:
                asyncio.get_running_loop().call_soon(self._flush_access)
            except RuntimeError:  # no loop in this thread: now
                self._flush_access()
                return
            self._flush_due = True

    def _flush_access(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._flush_due = False
            try:
                self.flush()
            except Exception:
                self._unwritable()

    def _unwritable(self) -> None:
        # What the stream held is gone with it; the next line tries again. Said once, on
        # stderr if that is another stream (logging's own handleError says it every time).
        if self._warned:
            return
        self._warned = True
        with contextlib.suppress(Exception):
            if sys.stderr is not self.stream:
                sys.stderr.write("tollway: the log stream cannot be written; access lines "
                                 "are dropped while it cannot\n")


_LEVELS = {logging.INFO: "info", logging.WARNING: "warning"}


def _direct_handler() -> JsonLinesHandler | None:
    """The handler the access line can be written to directly: the only one it reaches,
    with no filter on the way; else None (the line goes through logging)."""
    if access_logger.handlers or access_logger.filters or not access_logger.propagate:
        return None
    handlers = logger.handlers
    if len(handlers) != 1 or logger.filters or logger.propagate:
        return None
    handler = handlers[0]
    if type(handler) is not JsonLinesHandler or handler.filters:
        return None
    return handler


def configure_logging(level: str = "info", stream: IO[str] | None = None, *,
                      worker: int | None = None) -> None:
    """JSON lines on stderr for tollway (and uvicorn's own messages); ``worker``: the
    process's number under ``tollway serve --workers N``, on every line.

    Also turns off what the JSON lines never show and stdlib logging computes
    for every record (caller frame, thread, process names).
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = JsonLinesHandler(stream or sys.stderr, worker)
    for name in ("tollway", "uvicorn", "uvicorn.error"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level.upper())
        log.propagate = False
    logging.getLogger("uvicorn.access").disabled = True


def _micros(t: float) -> float:
    """``t`` to the microsecond (cut, not rounded: ``round`` costs ten times more)."""
    return int(t * 1e6) / 1e6


def _millis(seconds: float) -> float:
    """Milliseconds to the microsecond."""
    return int(seconds * 1e6) / 1e3


def log_request(info: RequestInfo, method: str, path: str, now: float) -> None:
    """The one access line of a request; builds nothing when disabled."""
    level = logging.INFO if info.status < 500 else logging.WARNING
    if access_logger.disabled or not access_logger.isEnabledFor(level):
        return
    direct = _direct_handler()
    if direct is not None and level >= direct.level:
        # JsonFormatter's line for an AccessRecord, built in place.
        line: dict[str, Any] = {"ts": _micros(time.time()), "level": _LEVELS[level],
                                "logger": "tollway.access", "msg": "request"}
        if direct.worker is not None:
            line["worker"] = direct.worker
        rid = request_id_var.get()
        if rid:
            line["request_id"] = rid
        _access_fields(line, info, method, path, now)
        direct.write_line(_encode(line))
        return
    fields: dict[str, Any] = {}
    _access_fields(fields, info, method, path, now)
    access_logger.handle(AccessRecord(level, fields))


def _access_fields(fields: dict[str, Any], info: RequestInfo, method: str, path: str,
                   now: float) -> None:
    latency = now - info.t0
    fields["method"] = method
    fields["path"] = path
    fields["status"] = info.status
    fields["latency_ms"] = _millis(latency)
    fields["overhead_ms"] = _millis(latency - info.upstream_s)
    fields["tenant"] = info.tenant_id
    if info.model:
        fields["route"] = info.route
        fields["model"] = info.model
        fields["provider"] = info.provider
        fields["prompt_tokens"] = info.prompt_tokens
        fields["completion_tokens"] = info.completion_tokens
        fields["cost_usd"] = info.cost_usd
        fields["stream"] = info.stream
        if info.client_cancelled:
            fields["client_cancelled"] = True
    elif info.route:
        fields["route"] = info.route
    if info.reason:
        fields["reason"] = info.reason
    if info.error:
        fields["error"] = info.error

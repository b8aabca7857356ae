"""Gateway processes for the fleet tests: ``tollway serve`` subprocesses on one NATS.

Each process gets its own data folder (outbox) and a config written as TOML; its
JSON log lines (stderr) are collected by a thread, so a test can look for a line
and read its time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from support import HANG_S, eventually, gateway_env, make_raw_config


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

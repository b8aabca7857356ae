"""Gateway overhead under load: the gateway vs the upstream it fronts, at the same request rates.

Starts the simulated upstream (``python -m tollway.testing.upstream``, zero
latency) and one gateway process per config *variant* (``tollway serve
--config <generated toml>``), then drives with an external load generator
(``oha``) both the upstream directly and each gateway, at fixed request rates
(with latency correction, so a stall is not hidden by coordinated omission)
and at full speed, non-streaming and streaming, with auth and metrics on.

Targets are run interleaved in one sitting: every round runs every target at
every load, rotating the order from round to round, so that the machine's
background noise hits all targets alike; a variant's overhead is the median
over rounds of (gateway - direct) measured in the same round.

Variants are config overlays on the ``base`` config (see ``VARIANTS``); later
features add theirs (guards on/off, events on/off, shadow 10 %) and compare:

    python benchmarks/load.py                         # base only, 3 rounds, ~5 min
    python benchmarks/load.py --variants base,noguards,events --rounds 5
    python benchmarks/load.py --quick                 # 1 round of 3 s legs: a smoke test

A variant may also run on another checkout's interpreter, to compare code
versions in one sitting: ``VARIANT@LABEL`` with ``--python LABEL=PATH``, e.g.

    python benchmarks/load.py --variants events,events@before \
        --python before=/path/to/old-checkout/venv/bin/python

Everything is bound in count and time (``--duration``, a request cap per leg,
a timeout per load-generator run) and only loopback addresses are driven.
Results go to ``benchmarks/results/load-<UTC timestamp>.json``, and a markdown
table for the README is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import ipaddress
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
TENANT_KEY = "tw-bench-0123456789abcdef0123456789abcdef"
ADMIN_KEY = "tw-admin-bench-0123456789abcdef"
UPSTREAM_KEY = "sk-upstream-bench"
MODEL = "gpt-4o-mini"
OHA_INSTALL = "cargo install oha --locked"

# The acceptance bar (issue 3): one gateway process, zero-latency upstream, non-streaming.
BAR_RATE = 500
BAR_P50_MS = 2.0
BAR_P99_MS = 10.0
BAR_MAX_RPS = 2000.0

# Limits high enough that the benchmark measures the gateway, not its refusals.
_UNLIMITED = {
    "per_minute": 100_000_000,
    "per_hour": 1_000_000_000,
    "per_day": 1_000_000_000,
    "expensive_per_hour": 1_000_000_000,
}

# The gateway config every variant starts from: one provider (the simulated
# upstream), one model, one tenant; auth, metrics and the access log on as shipped.
BASE_CONFIG: dict[str, Any] = {
    "server": {
        "host": HOST,
        "admin_key_env": "TOLLWAY_BENCH_ADMIN_KEY",
        "builtin_providers": False,
        "builtin_models": False,
    },
    "nats": {"enabled": False},
    "providers": [
        {"name": "sim", "kind": "openai", "base_url": "{upstream}", "api_key_env": "SIM_API_KEY"},
    ],
    "models": [
        {"id": MODEL, "provider": "sim", "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60},
    ],
    "tiers": {"premium": {"max_call_usd": 10.0, "daily_usd": 1_000_000_000.0}},
    "tenants": [
        {
            "id": "bench",
            "tier": "premium",
            "key_sha256": [hashlib.sha256(TENANT_KEY.encode()).hexdigest()],
            "limits": _UNLIMITED,
        },
    ],
}

# A variant's [tracing] endpoint: replaced by the OTLP receiver load.py starts.
OTLP = "http://{otlp}/v1/traces"

# name -> overlay, deep-merged into BASE_CONFIG (dicts merge, anything else replaces).
# `base` is the gateway as shipped (auth, metrics, access log, guards) minus the event
# log; a feature that can be switched in the config gets a variant here, e.g.
#   "shadow": {"shadow": {"fraction": 0.10, ...}},
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "noguards": {"guards": {"enabled": False}},
    "events": {"nats": {"enabled": True, "url": "embedded"}},
    # Issue 13: streams relayed in Python to their end (the native relay off).
    "eventspy": {"nats": {"enabled": True, "url": "embedded"},
                 "streams": {"native_relay": False}},
    "nolog": {"server": {"access_log": False}},
    "eventsnolog": {"nats": {"enabled": True, "url": "embedded"}, "server": {"access_log": False}},
    # Issue 16: OpenTelemetry on, every call traced (a call span and an attempt span),
    # exported to an OTLP receiver that load.py runs (python -m tollway.testing.otlp).
    "tracing": {"tracing": {"enabled": True, "endpoint": OTLP}},
    # ... and with one new trace in ten recorded (sample_ratio 0.1), as production often runs.
    "tracing10": {"tracing": {"enabled": True, "endpoint": OTLP, "sample_ratio": 0.1}},
    # Issue 6: 10 % of the primary calls shadowed to a second model on the same upstream.
    "shadow10": {
        "models": [
            *BASE_CONFIG["models"],
            {
                "id": "shadow-candidate",
                "provider": "sim",
                "upstream": MODEL,
                "input_usd_per_mtok": 0.05,
                "output_usd_per_mtok": 0.20,
            },
        ],
        "shadow": [
            {
                "route": MODEL,
                "candidates": ["shadow-candidate"],
                "fraction": 0.10,
                "max_in_flight": 256,
                "daily_usd": 1_000_000.0,
            },
        ],
    },
}

QUESTION = "Name three uses of a reverse proxy in one line each."
FILLER = "The gateway counts every token of this prompt before it calls the provider. "


def make_bodies(prompt_bytes: int = 0) -> tuple[str, str]:
    """(plain, stream) request bodies; ``prompt_bytes`` > 0 pads the user message to
    about that many bytes (issue 4 measures the guards with a ~2 KB prompt)."""
    content = QUESTION
    if prompt_bytes > len(content):
        pad = prompt_bytes - len(content) - 1
        content = (FILLER * (pad // len(FILLER) + 1))[:pad] + " " + content
    plain = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": content},
        ],
    }
    stream = {**plain, "stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(plain), json.dumps(stream)


PLAIN_BODY, STREAM_BODY = make_bodies()
# The API measured (--surface): its path under the gateway's /api/ai/v1 and the
# upstream's /v1, and the chat body made into its request.
PATH = "chat/completions"
SURFACES = {"chat": "chat/completions", "completions": "completions", "messages": "messages",
            "responses": "responses"}
# What the upstream is measured with directly (the "direct" target): the same API, but for
# Responses, which the simulated upstream does not serve (the gateway translates it to chat
# completions), the chat call the gateway makes of it.
DIRECT_PATH = PATH
DIRECT_PLAIN, DIRECT_STREAM = PLAIN_BODY, STREAM_BODY


def surface_bodies(surface: str, plain_json: str) -> tuple[str, str]:
    """(plain, stream) bodies of ``surface`` (completions, messages) with the chat body's
    prompt."""
    plain = json.loads(plain_json)
    if surface == "completions":
        plain = {"model": MODEL, "prompt": plain["messages"][-1]["content"]}
    elif surface == "messages":
        system, user = plain["messages"]
        plain = {"model": MODEL, "max_tokens": 256, "system": system["content"],
                 "messages": [user]}
    elif surface == "responses":
        system, user = plain["messages"]
        plain = {"model": MODEL, "instructions": system["content"], "input": user["content"]}
    stream = {**plain, "stream": True}
    if surface == "completions":
        stream["stream_options"] = {"include_usage": True}
    return json.dumps(plain), json.dumps(stream)


# ---------------------------------------------------------------- config and processes


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg: dict[str, Any]) -> str:
    """Enough TOML for a gateway config: scalars, [tables] and [[arrays of tables]]."""
    lines = [
        f"{k} = {_toml_value(v)}"
        for k, v in cfg.items()
        if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))
    ]
    for key, value in cfg.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(x)}" for k, x in value.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines += ["", f"[[{key}]]"] + [f"{k} = {_toml_value(x)}" for k, x in item.items()]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def check_loopback(url: str) -> None:
    host = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing to drive a non-loopback target: {url}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def start_upstream(workdir: Path, reply_words: int) -> tuple[Proc, str]:
    port = free_port()
    log = workdir / "upstream.log"
    popen = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tollway.testing.upstream",
            "--host",
            HOST,
            "--port",
            str(port),
            "--latency-ms",
            "0",
            "--reply-words",
            str(reply_words),
            "--api-key",
            UPSTREAM_KEY,
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    proc = Proc("upstream", popen, log)
    base = f"http://{HOST}:{port}/v1"
    wait_ready(proc, f"{base}/models", {"authorization": f"Bearer {UPSTREAM_KEY}"})
    return proc, base


# LABEL -> the interpreter of another checkout (``--python``), for ``VARIANT@LABEL``.
PYTHONS: dict[str, str] = {}


def split_variant(variant: str) -> tuple[str, str]:
    """``events@before`` -> (``events``, the interpreter labelled ``before``)."""
    name, _, label = variant.partition("@")
    return name, PYTHONS[label] if label else sys.executable


def start_otlp(workdir: Path) -> tuple[Proc, str]:
    """An OTLP/HTTP trace receiver (answers without decoding), for variants that trace."""
    port = free_port()
    log = workdir / "otlp.log"
    popen = subprocess.Popen(
        [sys.executable, "-m", "tollway.testing.otlp", "--port", str(port), "--discard"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    proc = Proc("otlp", popen, log)
    endpoint = f"http://{HOST}:{port}/v1/traces"
    deadline = time.monotonic() + 30
    while "OTLP receiver on" not in proc.tail(5):
        if popen.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            raise SystemExit(f"the OTLP receiver did not start:\n{proc.tail()}")
        time.sleep(0.05)
    return proc, endpoint


def start_gateway(workdir: Path, variant: str, upstream: str, *, wrap: list[str] | None = None,
                  timeout: float = 60.0, otlp: str | None = None) -> tuple[Proc, str]:
    """A gateway of ``variant`` on a free port; ``wrap``: a command it runs under (valgrind);
    ``otlp``: the trace receiver's endpoint, for a variant whose endpoint is ``OTLP``."""
    name, python = split_variant(variant)
    cfg = deep_merge(BASE_CONFIG, VARIANTS[name])
    cfg["providers"][0]["base_url"] = upstream
    tracing = cfg.get("tracing")
    if isinstance(tracing, dict) and tracing.get("endpoint") == OTLP:
        if otlp is None:
            raise SystemExit(f"variant {variant} needs an OTLP receiver (start_otlp)")
        tracing["endpoint"] = otlp
    port = free_port()
    cfg["server"]["port"] = port
    (workdir / variant).mkdir(exist_ok=True)
    if isinstance(cfg.get("nats"), dict):
        cfg["nats"].setdefault("data_dir", str(workdir / variant / "nats"))
    path = workdir / variant / "tollway.toml"
    path.write_text(to_toml(cfg))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENAI_API_KEY", "OPENROUTER_API_KEY", "LOCAL_OPENAI_URL", "LOCAL_API_KEY")
    }
    env |= {"SIM_API_KEY": UPSTREAM_KEY, "TOLLWAY_BENCH_ADMIN_KEY": ADMIN_KEY}
    cmd = [
        *(wrap or ()),
        python,
        "-c",
        "import sys; from tollway.cli import main; sys.exit(main())",
        "serve",
        "--config",
        str(path),
        "--host",
        HOST,
        "--port",
        str(port),
    ]
    log = workdir / variant / "gateway.log"
    popen = subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=workdir / variant
    )
    proc = Proc(f"gateway[{variant}]", popen, log)
    base = f"http://{HOST}:{port}/api/ai/v1"
    wait_ready(proc, f"http://{HOST}:{port}/api/ai/health", {}, timeout)
    return proc, base


def wait_ready(proc: Proc, url: str, headers: dict[str, str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise SystemExit(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        req = urllib.request.Request(url, headers=headers)
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(req, timeout=2),
        ):
            return
        time.sleep(0.1)
    proc.stop()
    raise SystemExit(f"{proc.name} not ready after {timeout:.0f} s:\n{proc.tail()}")


# ---------------------------------------------------------------- the load generator


def find_oha() -> str:
    found = shutil.which("oha") or (
        str(Path.home() / ".cargo/bin/oha") if (Path.home() / ".cargo/bin/oha").exists() else None
    )
    if found is None:
        raise SystemExit(
            "load.py needs the `oha` load generator (fixed request rates with latency "
            f"correction, JSON output). Install it with:\n\n    {OHA_INSTALL}\n\n"
            "(builds from crates.io; a few minutes on 2 cores). Then re-run."
        )
    return found


@dataclass
class Leg:
    round: int
    mode: str  # "plain" | "stream"
    load: str  # requests/s as a string, or "max"
    target: str  # "direct" or a variant name
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    first_byte_p50_ms: float = 0.0  # streams: time to the response head and first bytes
    # CPU time of the server process (upstream for direct, else the gateway) per request:
    # unlike latency, barely moved by what else runs on the machine.
    server_cpu_us: float = float("nan")
    server_sys_share: float = float("nan")  # of that CPU, the kernel's (syscalls, loopback TCP)
    # Median time in the server from a request's arrival to its last bytes, where the
    # benchmark times it (middleware.py).
    server_p50_ms: float = float("nan")
    requests: int = 0
    success_rate: float = 0.0
    status: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)


def run_oha(
    oha: str, url: str, key: str, body: str, *, rate: int | None, duration: float, connections: int
) -> dict[str, Any]:
    check_loopback(url)
    cmd = [
        oha,
        "--no-tui",
        "--output-format",
        "json",
        "-m",
        "POST",
        "-H",
        "content-type: application/json",
        "-H",
        f"authorization: Bearer {key}",
        "-d",
        body,
        "-c",
        str(connections),
    ]
    if rate is not None:
        # A fixed count at a fixed rate is bound in both count and time.
        cmd += ["-q", str(rate), "--latency-correction", "-n", str(max(1, int(rate * duration)))]
    else:
        # -w: requests in flight at the deadline finish instead of counting as errors.
        cmd += ["-z", f"{duration}s", "-w"]
    cmd.append(url)
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration * 3 + 30, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"oha failed ({out.returncode}): {out.stderr.strip()[:2000]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def parse_oha(doc: dict[str, Any], leg: Leg) -> Leg:
    summary = doc.get("summary", {})
    pct = doc.get("latencyPercentiles", {})

    def ms(v: Any) -> float:
        return float(v) * 1000.0 if v is not None else float("nan")

    leg.rps = float(summary.get("requestsPerSec") or 0.0)
    leg.success_rate = float(summary.get("successRate") or 0.0)
    leg.mean_ms = ms(summary.get("average"))
    leg.p50_ms, leg.p90_ms, leg.p99_ms = ms(pct.get("p50")), ms(pct.get("p90")), ms(pct.get("p99"))
    leg.first_byte_p50_ms = ms((doc.get("firstBytePercentiles") or {}).get("p50"))
    leg.status = {str(k): int(v) for k, v in (doc.get("statusCodeDistribution") or {}).items()}
    leg.errors = {str(k): int(v) for k, v in (doc.get("errorDistribution") or {}).items()}
    leg.requests = sum(leg.status.values()) + sum(leg.errors.values())
    return leg


def process_cpu_s(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a process so far (Linux /proc), None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def rotated(items: list[str], by: int) -> list[str]:
    by %= len(items)
    return items[by:] + items[:by]


def self_reported_overhead(base: str, n: int = 200) -> float | None:
    """Median X-Tollway-Overhead-Ms of sequential requests: the gateway's own account."""
    values = []
    for _ in range(n):
        req = urllib.request.Request(
            f"{base}/{PATH}",
            data=PLAIN_BODY.encode(),
            method="POST",
            headers={"content-type": "application/json", "authorization": f"Bearer {TENANT_KEY}"},
        )
        with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(req, timeout=5) as r:
            r.read()
            values.append(float(r.headers.get("x-tollway-overhead-ms", "nan")))
    values = [v for v in values if v == v]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- profiling


def attach_profiler(proc: Proc, out: Path) -> subprocess.Popen[bytes]:
    """py-spy samples the running gateway (no restart, warm-up excluded) until it exits."""
    return subprocess.Popen(
        [
            # Not --nonblocking: a stack read while Python runs fails more often than one
            # parked in a syscall, so non-blocking sampling over-counts the I/O lines.
            "py-spy",
            "record",
            "--pid",
            str(proc.popen.pid),
            "--rate",
            "200",
            "--format",
            "raw",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def hot_frames(
    collapsed: Path, top: int = 25
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Share of samples by frame and by package, counting each sample's innermost frame.

    Own time, not inclusive: under uvloop a coroutine's stack starts at the frame
    the C loop resumed, so inclusive counts would be cut short at every await.
    """
    own: dict[str, int] = {}
    packages: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frame = stack.rsplit(";", 1)[-1]
        own[frame] = own.get(frame, 0) + n
        where = frame.rpartition("(")[2].split(":")[0]
        package = where.split("/")[0] if "/" in where else where.removesuffix(".py")
        packages[package] = packages.get(package, 0) + n
    if not total:
        return [], []

    def rank(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(f, n / total) for f, n in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return rank(own), rank(packages)


# ---------------------------------------------------------------- summary


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(legs: list[Leg], variants: list[str]) -> dict[str, Any]:
    by: dict[tuple[int, str, str, str], Leg] = {
        (x.round, x.mode, x.load, x.target): x for x in legs
    }
    rounds = sorted({x.round for x in legs})
    out: dict[str, Any] = {}
    for mode in sorted({x.mode for x in legs}):
        out[mode] = {}
        loads = sorted(
            {x.load for x in legs if x.mode == mode},
            key=lambda s: float("inf") if s == "max" else float(s),
        )
        for load in loads:
            rows: dict[str, Any] = {}
            for target in ["direct", *variants]:
                sel = [by[(r, mode, load, target)] for r in rounds if (r, mode, load, target) in by]
                row: dict[str, Any] = {
                    "rps": median([x.rps for x in sel]),
                    "p50_ms": median([x.p50_ms for x in sel]),
                    "p99_ms": median([x.p99_ms for x in sel]),
                    "server_cpu_us": median([x.server_cpu_us for x in sel]),
                    "server_sys_share": median([x.server_sys_share for x in sel]),
                    "success_rate": min((x.success_rate for x in sel), default=0.0),
                    "non_200": sum(n for x in sel for code, n in x.status.items() if code != "200")
                    + sum(sum(x.errors.values()) for x in sel),
                }
                if target != "direct":
                    pairs = [
                        (by[(r, mode, load, target)], by[(r, mode, load, "direct")])
                        for r in rounds
                        if (r, mode, load, target) in by and (r, mode, load, "direct") in by
                    ]
                    row["overhead_p50_ms"] = median([g.p50_ms - d.p50_ms for g, d in pairs])
                    row["overhead_p99_ms"] = median([g.p99_ms - d.p99_ms for g, d in pairs])
                    row["rps_vs_direct"] = median([g.rps / d.rps for g, d in pairs if d.rps])
                rows[target] = row
            out[mode][load] = rows
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| mode | load (req/s) | target | achieved req/s | p50 ms | p99 ms "
        "| overhead p50 ms | overhead p99 ms | server CPU us/req (kernel) | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, loads in summary.items():
        for load, rows in loads.items():
            for target, row in rows.items():
                oh50 = f"{row['overhead_p50_ms']:.2f}" if "overhead_p50_ms" in row else ""
                oh99 = f"{row['overhead_p99_ms']:.2f}" if "overhead_p99_ms" in row else ""
                lines.append(
                    f"| {mode} | {'full speed' if load == 'max' else load} | {target} "
                    f"| {row['rps']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
                    f"| {oh50} | {oh99} "
                    f"| {row['server_cpu_us']:.0f} ({row['server_sys_share'] * 100:.0f}%) "
                    f"| {row['non_200']} |"
                )
    return "\n".join(lines)


def variant_deltas(summary: dict[str, Any], variants: list[str]) -> str:
    if "base" not in variants or len(variants) < 2:
        return ""
    lines = [
        "| mode | variant | load | overhead p50 vs base (ms) | full-speed req/s vs base |",
        "|---|---|---|---:|---:|",
    ]
    for mode, loads in summary.items():
        for v in variants:
            if v == "base":
                continue
            for load, rows in loads.items():
                b, x = rows.get("base"), rows.get(v)
                if not b or not x:
                    continue
                if load == "max":
                    lines.append(f"| {mode} | {v} | full speed | | {x['rps'] / b['rps']:.3f}x |")
                else:
                    d = x["overhead_p50_ms"] - b["overhead_p50_ms"]
                    lines.append(f"| {mode} | {v} | {load} | {d:+.2f} | |")
    return "\n".join(lines)


def acceptance(summary: dict[str, Any]) -> list[str]:
    plain = summary.get("plain", {})
    out = []
    at = plain.get(str(BAR_RATE), {}).get("base")
    if at:
        ok50, ok99 = at["overhead_p50_ms"] <= BAR_P50_MS, at["overhead_p99_ms"] <= BAR_P99_MS
        out.append(
            f"{'PASS' if ok50 else 'FAIL'} overhead p50 at {BAR_RATE} req/s: "
            f"{at['overhead_p50_ms']:.2f} ms (bar {BAR_P50_MS} ms)"
        )
        out.append(
            f"{'PASS' if ok99 else 'FAIL'} overhead p99 at {BAR_RATE} req/s: "
            f"{at['overhead_p99_ms']:.2f} ms (bar {BAR_P99_MS} ms)"
        )
    top = plain.get("max", {}).get("base")
    if top:
        ok = top["rps"] >= BAR_MAX_RPS
        out.append(
            f"{'PASS' if ok else 'FAIL'} full-speed throughput: {top['rps']:.0f} req/s "
            f"(bar {BAR_MAX_RPS:.0f})"
        )
    return out


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for p in reversed(procs):
            p.stop()


def run(
    args: argparse.Namespace,
    oha: str,
    workdir: Path,
    variants: list[str],
    modes: list[str],
    loads: list[str],
    stamp: str,
    also_surfaces: list[str] = [],  # noqa: B006 -- read only
) -> tuple[list[Leg], dict[str, float | None], dict[str, Path]]:
    legs: list[Leg] = []
    overhead_header: dict[str, float | None] = {}
    profiles: dict[str, Path] = {}
    profilers: list[subprocess.Popen[bytes]] = []
    with processes() as procs:
        upstream, upstream_base = start_upstream(workdir, args.reply_words)
        procs.append(upstream)
        otlp = None
        if any("tracing" in VARIANTS[split_variant(v)[0]] for v in variants):
            receiver, otlp = start_otlp(workdir)
            procs.append(receiver)
        targets: dict[str, tuple[str, str]] = {"direct": (upstream_base, UPSTREAM_KEY)}
        pids = {"direct": upstream.popen.pid}
        gateways: dict[str, Proc] = {}
        bodies = {"plain": PLAIN_BODY, "stream": STREAM_BODY}
        # target -> (path, {mode: body}): each gateway on --surface, and on each of
        # --also-surfaces as a target of its own ("base:messages"), same process.
        requests = {"direct": (DIRECT_PATH, {"plain": DIRECT_PLAIN, "stream": DIRECT_STREAM})}
        for v in variants:
            gw, gw_base = start_gateway(workdir, v, upstream_base, otlp=otlp)
            procs.append(gw)
            gateways[v] = gw
            pids[v] = gw.popen.pid
            targets[v] = (gw_base, TENANT_KEY)
            requests[v] = (PATH, bodies)
            for also in also_surfaces:
                plain, stream = surface_bodies(also, PLAIN_BODY)
                name = f"{v}:{also}"
                pids[name], targets[name] = pids[v], targets[v]
                requests[name] = (SURFACES[also], {"plain": plain, "stream": stream})

        def request_of(target: str, mode: str) -> tuple[str, str]:
            """(path, body) of a target's calls in ``mode``."""
            path, by_mode = requests[target]
            return path, by_mode[mode]
        # Warm-up: connection pools, first-call imports, allocator; discarded.
        for name, (base, key) in targets.items():
            for mode in modes:
                path, body = request_of(name, mode)
                run_oha(
                    oha,
                    f"{base}/{path}",
                    key,
                    body,
                    rate=None,
                    duration=1.5,
                    connections=args.max_connections,
                )
            print(f"warmed up {name}", file=sys.stderr)
        if args.profile:
            for v, gw in gateways.items():
                # Raw stacks are large: they stay in the work dir (kept with --workdir).
                profiles[v] = workdir / v / f"profile-{stamp}.txt"
                profilers.append(attach_profiler(gw, profiles[v]))
            time.sleep(1.0)  # py-spy attaches asynchronously
        order = list(targets)
        for rnd in range(args.rounds):
            for mode in modes:
                for load in loads:
                    for target in rotated(order, rnd):
                        base, key = targets[target]
                        rate = None if load == "max" else int(load)
                        conns = args.max_connections if rate is None else args.connections
                        cpu0 = process_cpu_s(pids[target])
                        path, body = request_of(target, mode)
                        doc = run_oha(
                            oha,
                            f"{base}/{path}",
                            key,
                            body,
                            rate=rate,
                            duration=args.duration,
                            connections=conns,
                        )
                        cpu1 = process_cpu_s(pids[target])
                        leg = parse_oha(doc, Leg(rnd, mode, load, target))
                        ok = leg.status.get("200", 0)
                        if cpu0 is not None and cpu1 is not None and ok:
                            user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
                            leg.server_cpu_us = (user + system) / ok * 1e6
                            leg.server_sys_share = system / (user + system or 1.0)
                        legs.append(leg)
                        print(
                            f"round {rnd + 1}/{args.rounds} {mode:6} {load:>4} {target:8} "
                            f"{leg.rps:8.0f} req/s p50 {leg.p50_ms:6.2f} ms "
                            f"p99 {leg.p99_ms:6.2f} ms cpu {leg.server_cpu_us:5.0f} us/req "
                            f"ok {leg.success_rate:.3f}",
                            file=sys.stderr,
                            flush=True,
                        )
        for v in variants:
            overhead_header[v] = self_reported_overhead(targets[v][0])
        for p in procs:
            if p.popen.poll() is not None:
                print(f"warning: {p.name} died during the run:\n{p.tail()}", file=sys.stderr)
    # The gateways are stopped now; py-spy writes its file when its target exits.
    for prof in profilers:
        try:
            prof.wait(60)
        except subprocess.TimeoutExpired:
            prof.kill()
    return legs, overhead_header, {v: p for v, p in profiles.items() if p.exists()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--variants", default="base", help=f"comma-separated, from: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--rates", default="100,500", help="fixed request rates, req/s")
    parser.add_argument("--modes", default="plain,stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per leg")
    parser.add_argument("--connections", type=int, default=16, help="at a fixed rate")
    parser.add_argument("--max-connections", type=int, default=32, help="at full speed")
    parser.add_argument("--no-max", action="store_true", help="skip the full-speed legs")
    parser.add_argument(
        "--reply-words",
        type=int,
        default=20,
        help="upstream reply length (stream events = words + 4)",
    )
    parser.add_argument(
        "--prompt-bytes",
        type=int,
        default=0,
        help="pad the user message to about this many bytes (0: a one-line question)",
    )
    parser.add_argument(
        "--surface",
        choices=sorted(SURFACES),
        default="chat",
        help="the API measured (messages: translated to the upstream's chat completions; "
        "responses: likewise, measured against the chat call it makes of the upstream)",
    )
    parser.add_argument(
        "--also-surfaces",
        default="",
        help="with --surface chat: also measure these (of messages, responses: translated to "
        "the upstream's chat completions, so the direct chat legs are their baseline too) as "
        "targets of their own on the same gateway processes, interleaved with the chat legs",
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s legs")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the gateways with py-spy during the measured legs; "
        "hot frames printed, raw stacks kept in --workdir",
    )
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="an interpreter of another checkout, for variants named VARIANT@LABEL",
    )
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--workdir", help="keep configs and logs here (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 3.0
    global PLAIN_BODY, STREAM_BODY, PATH, DIRECT_PATH, DIRECT_PLAIN, DIRECT_STREAM
    PLAIN_BODY, STREAM_BODY = make_bodies(args.prompt_bytes)
    DIRECT_PLAIN, DIRECT_STREAM = PLAIN_BODY, STREAM_BODY  # after --prompt-bytes
    if args.surface != "chat":
        PLAIN_BODY, STREAM_BODY = surface_bodies(args.surface, PLAIN_BODY)
    PATH = SURFACES[args.surface]
    DIRECT_PATH = "chat/completions" if args.surface == "responses" else PATH
    if DIRECT_PATH == PATH:
        DIRECT_PLAIN, DIRECT_STREAM = PLAIN_BODY, STREAM_BODY
    variants = [v for v in args.variants.split(",") if v]
    also = [s for s in args.also_surfaces.split(",") if s]
    if also and (args.surface != "chat" or not set(also) <= {"messages", "responses"}):
        raise SystemExit("--also-surfaces takes messages and responses, with --surface chat")
    for item in args.python:
        label, _, path = item.partition("=")
        PYTHONS[label] = path
    unknown = [v for v in variants if v.partition("@")[0] not in VARIANTS
               or v.partition("@")[2] not in ("", *PYTHONS)]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    rates = [int(r) for r in args.rates.split(",") if r]
    modes = [m for m in args.modes.split(",") if m]
    loads: list[str] = [str(r) for r in rates] + ([] if args.no_max else ["max"])
    oha = find_oha()
    if args.profile and shutil.which("py-spy") is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")

    started = datetime.now(UTC)
    load_avg = os.getloadavg()
    if load_avg[0] > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: the machine is busy (load average {load_avg[0]:.2f}); figures will be noisy",
            file=sys.stderr,
        )
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tollway-load-")))
        legs, overhead_header, profiles = run(args, oha, workdir, variants, modes, loads, stamp,
                                              also)
        for v, path in profiles.items():
            own, by_package = hot_frames(path)
            print(f"\nprofile of gateway[{v}] ({path}): top frames by own time")
            for frame, share in own:
                print(f"  {share * 100:5.1f}%  {frame}")
            print("own time by package")
            for package, share in by_package:
                print(f"  {share * 100:5.1f}%  {package}")

    names = [*variants, *(f"{v}:{s}" for v in variants for s in also)]
    summary = summarize(legs, names)
    print(
        f"\nGateway overhead, {os.cpu_count()} CPUs shared by upstream, gateway and oha; "
        f"median of {args.rounds} interleaved round(s), {args.duration:.0f} s per leg\n"
    )
    print(markdown(summary))
    deltas = variant_deltas(summary, names)
    if deltas:
        print("\n" + deltas)
    if any(ms is not None for ms in overhead_header.values()):
        print(
            "\nmedian X-Tollway-Overhead-Ms of 200 sequential requests (the gateway's own account):"
        )
        for v, ms in overhead_header.items():
            if ms is not None:
                print(f"  {v}: {ms:.3f} ms")
    verdicts = acceptance(summary)
    if verdicts:
        print("\n" + "\n".join(verdicts))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"load-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        doc = {
            "benchmark": "load",
            "started_at": started.isoformat(),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_avg_at_start": load_avg,
            },
            "load_generator": subprocess.run(
                [oha, "--version"], capture_output=True, text=True, check=False
            ).stdout.strip(),
            "config": {k: v for k, v in vars(args).items() if k not in ("no_write", "workdir")},
            "variants": {v: VARIANTS[v.partition("@")[0]] for v in variants},
            "pythons": PYTHONS,
            "base_config": BASE_CONFIG,
            "bar": {
                "rate": BAR_RATE,
                "p50_ms": BAR_P50_MS,
                "p99_ms": BAR_P99_MS,
                "max_rps": BAR_MAX_RPS,
            },
            "summary": summary,
            "acceptance": verdicts,
            "self_reported_overhead_ms": overhead_header,
            "legs": [vars(x) for x in legs],
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""Instructions per call: code versions compared by valgrind's callgrind, not by a clock.

On this shared 2-core machine, throughput and CPU time per call move by tens of percent
from one round to the next; the count of instructions a gateway process executes per call
does not (a second run of the same code lands within about 1 %). Each variant's gateway
(``load.py``'s configs and ``VARIANT@LABEL`` checkouts) runs under
``valgrind --tool=callgrind`` with instrumentation off while it starts and warms up; then
instrumentation is switched on, oha sends a fixed number of calls at a fixed concurrency,
and the count is dumped:

    python benchmarks/instructions.py --variants events@old,events \\
        --python old=/path/to/old-checkout/venv/bin/python --calls 2000

What it does not see: time in the kernel (system calls, the loopback's wake-ups) and the
embedded nats-server (a child process, not traced). What a gateway does per second rather
than per call (heartbeats, the fleet's rate-limit allotments) counts here per call in
proportion to how slowly the traced gateway runs (some 50 times slower): compare variants
that share it, or switch it off. ``load.py`` measures those with the
rest; this script tells which code costs more instructions, and by how much, with no noise.
Results go to ``benchmarks/results/instructions-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load

RESULTS = Path(__file__).resolve().parent / "results"
_TOTALS = re.compile(rb"^totals:\s+(\d+)", re.M)


def start_traced(workdir: Path, variant: str, upstream: str) -> tuple[load.Proc, str, Path]:
    """``load.start_gateway``'s gateway, under callgrind with instrumentation off."""
    out = workdir / variant.replace("@", "-") / "callgrind.out"
    out.parent.mkdir(parents=True, exist_ok=True)
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={out}.%p", "--"]
    proc, base = load.start_gateway(workdir, variant, upstream, wrap=valgrind, timeout=600.0)
    return proc, base, out


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True,
                   timeout=120)


def last_dump(out: Path, pid: int) -> Path:
    dumps = sorted(out.parent.glob(f"{out.name}.{pid}*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise SystemExit(f"no callgrind dump in {[p.name for p in out.parent.iterdir()]}")
    return dumps[-1]


def instructions(dump: Path) -> int:
    """Ir of a callgrind dump."""
    m = _TOTALS.search(dump.read_bytes())
    if m is None:
        raise SystemExit(f"no callgrind totals in {dump}")
    return int(m.group(1))


def drive(oha: str, base: str, calls: int, connections: int, body: str) -> dict[str, Any]:
    cmd = [oha, "--no-tui", "--output-format", "json", "-m", "POST",
           "-H", "content-type: application/json",
           "-H", f"authorization: Bearer {load.TENANT_KEY}", "-d", body,
           "-c", str(connections), "-n", str(calls), f"{base}/chat/completions"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(f"oha failed: {done.stderr[:2000]}")
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc.get("statusCodeDistribution") or {}


def measure(args: argparse.Namespace, oha: str, workdir: Path, variant: str, upstream: str,
            body: str) -> dict[str, Any]:
    proc, base, out = start_traced(workdir, variant, upstream)
    pid = proc.popen.pid
    try:
        statuses = drive(oha, base, args.warmup, args.connections, body)
        time.sleep(0.5)  # the publisher's last batch
        control(pid, "--zero")
        control(pid, "--instr=on")
        statuses = drive(oha, base, args.calls, args.connections, body)
        time.sleep(0.5)
        control(pid, "--instr=off")
        control(pid, "--dump")
        dump = last_dump(out, pid)
        ir = instructions(dump)
        if args.keep:
            shutil.copy(dump, Path(args.keep) / f"callgrind-{variant.replace('@', '-')}.out")
    finally:
        proc.stop()
    ok = int(statuses.get("200", 0))
    if ok != args.calls:
        raise SystemExit(f"{variant}: {statuses} of {args.calls} calls")
    return {"variant": variant, "calls": args.calls, "instructions": ir,
            "per_call": ir / args.calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="base,events")
    parser.add_argument("--python", action="append", default=[], metavar="LABEL=PATH")
    parser.add_argument("--mode", choices=("plain", "stream"), default="plain")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--prompt-bytes", type=int, default=0,
                        help="pad the user message to about this many bytes (load.py's)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant")
    parser.add_argument("--keep", metavar="DIR", help="copy each variant's callgrind dump here "
                        "(read it with callgrind_annotate)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    for item in args.python:
        label, _, path = item.partition("=")
        load.PYTHONS[label] = path
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (Debian: apt-get install valgrind)")
    oha = load.find_oha()
    plain, stream = load.make_bodies(args.prompt_bytes)
    body = plain if args.mode == "plain" else stream
    variants = [v for v in args.variants.split(",") if v]
    started = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tollway-ir-") as tmp:
        workdir = Path(tmp)
        upstream, upstream_base = load.start_upstream(workdir, 20)
        try:
            for r in range(args.repeat):
                for variant in variants:
                    row = measure(args, oha, workdir, variant, upstream_base, body)
                    row["run"] = r
                    rows.append(row)
                    print(f"{variant:24} {row['per_call']:12,.0f} instructions/call", flush=True)
        finally:
            upstream.stop()
    print(f"\n| variant | instructions per call ({args.mode}, {args.connections} connections) |")
    print("|---|---:|")
    first = None
    for variant in variants:
        counts = sorted(r["per_call"] for r in rows if r["variant"] == variant)
        mid = counts[len(counts) // 2]
        first = first or mid
        print(f"| {variant} | {mid:,.0f} ({mid / first:.3f}x) |")
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"instructions-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        path.write_text(json.dumps({
            "started": started.isoformat(), "argv": sys.argv[1:],
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "mode": args.mode, "connections": args.connections,
            "prompt_bytes": args.prompt_bytes, "rows": rows,
        }, indent=2))
        print(f"\nwritten {path}")


if __name__ == "__main__":
    main()

"""What the HTTP limits and deadlines (tollway.protocol) cost per request, against uvicorn's
own httptools protocol.

Two servers run the same trivial ASGI app (so the protocol is most of what a request
costs), one per protocol, each in its own process; oha drives them at full speed in turn
(the order alternating each round), and each server's CPU time per request is read from
/proc. Prints the medians and their difference, and writes
``benchmarks/results/protocol-<UTC timestamp>.json``.

    python benchmarks/protocol.py                  # 6 rounds of 2 s each, about 30 s
    python benchmarks/protocol.py --rounds 10 --duration 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BODY = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'

# The server: argv = protocol ("uvicorn" or "tollway"), port.
SERVER = """
import sys
import uvicorn
from tollway.config import ServerConfig
from tollway.server import uvicorn_config

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})

kind, port = sys.argv[1], int(sys.argv[2])
config = uvicorn_config(app, ServerConfig(), lifespan="off", log_level="warning", port=port)
if kind == "uvicorn":
    config = uvicorn.Config(app, loop="uvloop", http="httptools", lifespan="off",
                            log_config=None, access_log=False, log_level="warning", port=port)
uvicorn.Server(config).run()
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per leg")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    oha = shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha")
    if not os.path.exists(oha):
        sys.exit("needs oha: cargo install oha --locked")
    kinds = ("uvicorn", "tollway")
    servers = {kind: (subprocess.Popen([sys.executable, "-c", SERVER, kind, str(port)]), port)
               for kind, port in zip(kinds, (18931, 18932), strict=True)}
    try:
        time.sleep(2.0)
        us: dict[str, list[float]] = {kind: [] for kind in kinds}
        for r in range(args.rounds):
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                proc, port = servers[kind]
                before = cpu_seconds(proc.pid)
                out = subprocess.run(
                    [oha, "-z", f"{args.duration}s", "-c", str(args.connections), "-m", "POST",
                     "-d", BODY, "-H", "content-type: application/json", "--no-tui",
                     "--output-format", "json", f"http://127.0.0.1:{port}/v1/chat/completions"],
                    capture_output=True, text=True, check=True).stdout
                served = json.loads(out)["statusCodeDistribution"].get("200", 0)
                us[kind].append((cpu_seconds(proc.pid) - before) / served * 1e6)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
    medians = {kind: statistics.median(v) for kind, v in us.items()}
    print(f"server CPU per request, median of {args.rounds} interleaved rounds of "
          f"{args.duration:g} s (load average {os.getloadavg()[0]:.1f}):")
    for kind in kinds:
        print(f"  {kind:8} {medians[kind]:6.1f} us   ({', '.join(f'{x:.1f}' for x in us[kind])})")
    print(f"  difference {medians['tollway'] - medians['uvicorn']:+.1f} us per request")
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out_path = RESULTS / f"protocol-{stamp}.json"
        out_path.write_text(json.dumps({
            "benchmark": "protocol", "at": stamp, "argv": sys.argv[1:],
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "platform": platform.platform(), "load_avg": os.getloadavg()},
            "args": vars(args), "cpu_us_per_request": us, "median_us": medians,
        }, indent=2) + "\n")
        print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

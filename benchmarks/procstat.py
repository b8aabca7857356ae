"""What a running process holds, read from Linux's /proc: RSS, open fds, TCP connections.

For benchmarks that watch a gateway over time (``soak.py``): a leak of memory
shows in ``VmRSS``, a leak of sockets as fds that no established connection
accounts for (a socket left in CLOSE_WAIT after its peer hung up, or one
whose connection is gone from the kernel's table altogether).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from load import process_cpu_s


def rss_bytes(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def fd_targets(pid: int) -> list[str]:
    """What each open fd of ``pid`` points at (``socket:[123]``, a path, ``anon_inode:...``)."""
    out = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    return out


def find_child(pid: int, comm: str) -> int | None:
    for child in children(pid):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{child}/comm").read_text().strip() == comm:
                return child
    return None


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` (threads made later inherit it from their creator)."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


@dataclass(frozen=True)
class TcpSocket:
    local_port: int
    remote_port: int
    state: str  # /proc/net/tcp's hex code: 01 ESTABLISHED, 08 CLOSE_WAIT, 0A LISTEN


ESTABLISHED, CLOSE_WAIT, LISTEN = "01", "08", "0A"


def tcp_sockets() -> dict[str, TcpSocket]:
    """inode -> socket, for every TCP socket of this network namespace."""
    out: dict[str, TcpSocket] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                out[f[9]] = TcpSocket(
                    int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), f[3]
                )
    return out


def socket_inodes(targets: Iterable[str]) -> list[str]:
    return [t[8:-1] for t in targets if t.startswith("socket:[")]


def connections(
    inodes: list[str], table: dict[str, TcpSocket], peers: dict[str, set[int]]
) -> dict[str, int]:
    """Established TCP connections of a process by peer (``peers``: role -> ports that mark
    it: the local port for our own listener's clients, else the remote port), and how many
    of its sockets wait in CLOSE_WAIT (the peer closed, the process did not)."""
    out = {role: 0 for role in peers} | {"other": 0, "close_wait": 0}
    for inode in inodes:
        sock = table.get(inode)
        if sock is None:
            continue
        if sock.state == CLOSE_WAIT:
            out["close_wait"] += 1
        if sock.state != ESTABLISHED:
            continue
        role = next(
            (r for r, ports in peers.items() if {sock.local_port, sock.remote_port} & ports),
            "other",
        )
        out[role] += 1
    return out


def listening_ports(inodes: list[str], table: dict[str, TcpSocket]) -> set[int]:
    return {table[i].local_port for i in inodes if i in table and table[i].state == LISTEN}


@dataclass
class ProcState:
    rss_mb: float
    fds: int
    # fds not held by an established connection: files, pipes, the event loop's, listening
    # sockets, and any socket left behind after its connection ended. The connections
    # follow the load (clients, the upstream pool); these should not move.
    fixed_fds: int
    cpu_s: float  # user + system so far
    conns: dict[str, int]


def proc_state(
    pid: int, table: dict[str, TcpSocket], peers: dict[str, set[int]]
) -> ProcState | None:
    rss = rss_bytes(pid)
    cpu = process_cpu_s(pid)
    if rss is None or cpu is None:
        return None
    targets = fd_targets(pid)
    conns = connections(socket_inodes(targets), table, peers)
    established = sum(n for role, n in conns.items() if role != "close_wait")
    return ProcState(rss / 2**20, len(targets), len(targets) - established, sum(cpu), conns)


def idle(pid: int, table: dict[str, TcpSocket], peers: dict[str, set[int]]) -> dict[str, Any]:
    state = proc_state(pid, table, peers)
    return asdict(state) if state else {}


def machine_stalls_s() -> dict[str, float]:
    """Seconds so far that the whole machine spent stalled, to tell a stall of the machine
    (other work on the shared cores, a busy disk, the hypervisor) from one of the process:
    Linux pressure stall totals (``some``: at least one runnable task waited for a CPU, for
    I/O, for memory; ``full``: every one did) and the CPU time the hypervisor took (steal,
    summed over CPUs). Missing files are left out (pressure needs Linux 4.20+ with PSI)."""
    out: dict[str, float] = {}
    for resource in ("cpu", "io", "memory"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/pressure/{resource}").read_text().splitlines():
                kind, *fields = line.split()
                total = dict(f.split("=") for f in fields)["total"]
                out[f"{resource}_{kind}"] = int(total) / 1e6
    with contextlib.suppress(OSError, IndexError):
        cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        out["steal"] = int(cpu[8]) / os.sysconf("SC_CLK_TCK")
    return out


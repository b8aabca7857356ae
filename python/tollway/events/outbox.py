"""The durable local outbox: events that could not be published yet, in order.

One append-only file per gateway process, ``<dir>/events-<n>.log``, locked with
``flock`` while the process lives, so instances sharing a data folder never
write into one another's file, and a restarted process picks up (and sends)
what a crashed one left behind. Each line is one event::

    <subject> TAB <event_id> TAB <event JSON> LF

(msgspec escapes control characters inside JSON strings, so neither TAB nor
LF can occur in the JSON.) A side file ``<name>.offset`` holds how far the
file has been sent; when everything is sent the file is truncated to zero.
Resending a line twice is safe: the stream drops a second copy of an
``event_id`` (``Nats-Msg-Id``) within its duplicate window.

Durability (``fsync`` policy):

- ``interval`` (default): lines reach the OS (``write``) at the end of every
  publisher cycle, and the file is fsync'd at most every
  ``fsync_interval_s`` and at shutdown. A crash of the process loses nothing
  that reached the outbox; a crash of the machine can lose the last interval.
- ``always``: fsync at the end of every cycle that wrote (slow disks: slower
  drain, the response path is never affected).
- ``never``: leave it to the OS (and to shutdown).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import IO, Literal, NamedTuple

log = logging.getLogger("tollway.events")

FsyncPolicy = Literal["always", "interval", "never"]
_OFFSET_WIDTH = 20


class OutboxEntry(NamedTuple):
    subject: str
    event_id: str
    payload: bytes


def _lock(f: IO[bytes]) -> bool:
    try:
        import fcntl
    except ImportError:  # not POSIX: a single process per data folder is assumed
        return True
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


class Outbox:
    """An ordered, durable FIFO of encoded events backed by one locked file."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = "interval",
        fsync_interval_s: float = 1.0,
    ) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.path: Path | None = None
        self._w: IO[bytes] | None = None
        self._r: IO[bytes] | None = None
        self._offset_fd = -1
        self._read_offset = 0  # first byte not yet sent
        self._size = 0  # bytes written (incl. still buffered)
        self._pending = 0  # lines not yet sent
        self._dirty = False  # written since the last fsync
        self._last_sync = 0.0

    # ---- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for n in range(1024):
            path = self.directory / f"events-{n}.log"
            f = open(path, "a+b")  # noqa: SIM115 - held for the process lifetime
            if _lock(f):
                self.path, self._w = path, f
                break
            f.close()
        else:
            raise OSError(f"no free outbox file in {self.directory}")
        self._r = open(self.path, "rb")  # noqa: SIM115
        self._offset_fd = os.open(str(self.path) + ".offset", os.O_RDWR | os.O_CREAT, 0o644)
        raw = os.pread(self._offset_fd, _OFFSET_WIDTH, 0).strip()
        self._size = os.fstat(self._w.fileno()).st_size
        self._read_offset = min(int(raw or b"0"), self._size)
        self._repair_tail()
        self._pending = self._count_lines(self._read_offset)
        self._adopt_orphans()
        if self._pending:
            log.warning("outbox holds %d unsent events from an earlier run", self._pending,
                        extra={"outbox": str(self.path)})

    def close(self) -> None:
        if self._w is not None:
            self.flush(force_sync=True)
            self._w.close()
            self._w = None
        if self._r is not None:
            self._r.close()
            self._r = None
        if self._offset_fd >= 0:
            os.close(self._offset_fd)
            self._offset_fd = -1

    def _repair_tail(self) -> None:
        # A crash mid-write can leave half a line; it cannot be sent, so it is cut.
        if self._size == 0:
            return
        assert self._r is not None and self._w is not None
        self._r.seek(self._size - 1)
        if self._r.read(1) == b"\n":
            return
        self._r.seek(0)
        data = self._r.read()
        cut = data.rfind(b"\n") + 1
        log.error("outbox %s ends in a partial line (%d bytes); dropped", self.path,
                  len(data) - cut)
        os.ftruncate(self._w.fileno(), cut)
        self._size = cut
        self._read_offset = min(self._read_offset, cut)

    def _count_lines(self, start: int) -> int:
        assert self._r is not None
        self._r.seek(start)
        n = 0
        while chunk := self._r.read(1 << 20):
            n += chunk.count(b"\n")
        return n

    def _adopt_orphans(self) -> None:
        """Move unsent lines from outbox files no live process holds into ours."""
        for other in sorted(self.directory.glob("events-*.log")):
            if other == self.path:
                continue
            with open(other, "r+b") as f:
                if not _lock(f):
                    continue  # its process is alive and will send them
                off_path = Path(str(other) + ".offset")
                try:
                    start = int(off_path.read_bytes().strip() or b"0")
                except (OSError, ValueError):
                    start = 0
                f.seek(start)
                data = f.read()
                data = data[: data.rfind(b"\n") + 1]
                if data:
                    assert self._w is not None
                    self._w.write(data)
                    self._size += len(data)
                    self._pending += data.count(b"\n")
                    self.flush(force_sync=True)
                    log.warning("outbox adopted %d unsent events from %s",
                                data.count(b"\n"), other.name)
                f.truncate(0)
                off_path.unlink(missing_ok=True)

    # ---- writing -----------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Events in the outbox not yet sent (the ``tollway_events_outbox_depth`` gauge)."""
        return self._pending

    def append(self, subject: str, event_id: str, payload: bytes) -> None:
        """Buffered append; :meth:`flush` hands it to the OS. Raises OSError."""
        assert self._w is not None, "outbox not open"
        line = b"%s\t%s\t%s\n" % (subject.encode(), event_id.encode(), payload)
        self._w.write(line)
        self._size += len(line)
        self._pending += 1
        self._dirty = True

    def flush(self, *, force_sync: bool = False) -> None:
        if self._w is None:
            return
        self._w.flush()
        if not self._dirty:
            return
        now = time.monotonic()
        if force_sync or self.fsync == "always" or (
            self.fsync == "interval" and now - self._last_sync >= self.fsync_interval_s
        ):
            os.fsync(self._w.fileno())
            self._dirty = False
            self._last_sync = now

    @property
    def needs_sync(self) -> bool:
        return self._dirty and self.fsync != "never"

    # ---- reading -----------------------------------------------------------------------------
    def read_batch(self, max_entries: int) -> tuple[list[OutboxEntry], int]:
        """Up to ``max_entries`` unsent entries from the head, and the offset after them."""
        if not self._pending:
            return [], self._read_offset
        assert self._r is not None and self._w is not None
        self._w.flush()
        self._r.seek(self._read_offset)
        out: list[OutboxEntry] = []
        end = self._read_offset
        bad = 0
        while len(out) < max_entries:
            line = self._r.readline()
            if not line.endswith(b"\n"):
                break
            end += len(line)
            parts = line[:-1].split(b"\t", 2)
            if len(parts) != 3:
                bad += 1
                continue
            out.append(OutboxEntry(parts[0].decode(), parts[1].decode(), parts[2]))
        if bad:
            log.error("outbox: %d malformed lines skipped", bad)
            self._pending -= bad
        return out, end

    def commit(self, offset: int, count: int) -> None:
        """Mark everything before ``offset`` (``count`` entries) as sent."""
        assert self._w is not None
        self._read_offset = offset
        self._pending = max(0, self._pending - count)
        if self._pending == 0 and self._read_offset >= self._size:
            self._w.flush()
            os.ftruncate(self._w.fileno(), 0)
            self._size = self._read_offset = 0
        with contextlib.suppress(OSError):
            os.pwrite(self._offset_fd, b"%-*d" % (_OFFSET_WIDTH, self._read_offset), 0)

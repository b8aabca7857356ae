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

Every file operation may block on the disk, so none runs on the event loop
while the gateway serves: the publisher calls these methods from a thread
(:attr:`Outbox.lock` serialises them). Reads are bounded: the start-up scan,
the repair of a torn last line and the adoption of orphan files go through
the file in pieces of ``chunk_bytes``, and :meth:`Outbox.read_batch` reads
one batch of lines (each at most ``MAX_LINE``), whatever the file's size.

The byte cap (``max_bytes``, ``[events] outbox_max_bytes``) bounds the unsent
part of the file. An append that would pass it is refused: the newest events
are the ones given up on, so what is kept stays a gap-free prefix in order;
the caller counts and logs them (``tollway_events_dropped_total{reason=
"outbox_full"}``). What the file already holds (from an earlier run, or
adopted) is never dropped for the cap.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Literal, NamedTuple

log = logging.getLogger("tollway.events")

FsyncPolicy = Literal["always", "interval", "never"]
_OFFSET_WIDTH = 20
MAX_LINE = 8 << 20  # a longer line is no event this gateway wrote (nor one NATS would take)


class OutboxEntry(NamedTuple):
    subject: str
    event_id: str
    payload: bytes


class Appended(NamedTuple):
    """What became of the entries given to :meth:`Outbox.append_many`."""

    written: int
    refused: int  # beyond the byte cap
    lost: int  # not written because of ``error``
    error: OSError | None = None


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
        max_bytes: int = 1 << 30,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.max_bytes = max_bytes
        self.chunk_bytes = chunk_bytes
        self.path: Path | None = None
        # Held by every file operation: the publisher's writer thread and the loop
        # (open, close, a record settling after shutdown) share the file.
        self.lock = threading.Lock()
        self._counts = threading.Lock()  # pending and incoming move together
        self._w: IO[bytes] | None = None
        self._r: IO[bytes] | None = None
        self._offset_fd = -1
        self._read_offset = 0  # first byte not yet sent
        self._size = 0  # bytes written (incl. still buffered)
        self._pending = 0  # lines not yet sent
        self._incoming = 0  # events handed to the writer, not written yet (see reserve)
        self._dirty = False  # written since the last fsync
        self._last_sync = 0.0

    # ---- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:
        with self.lock:
            self._open()
        if self._pending:
            log.warning("outbox holds %d unsent events from an earlier run", self._pending,
                        extra={"outbox": str(self.path)})

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for n in range(1024):
            path = self.directory / f"events-{n}.log"
            # Unbuffered: a write the disk refuses fails here, whole, not in a later flush
            # that would keep failing with the line in its buffer (and half of it on disk).
            f = open(path, "a+b", buffering=0)  # noqa: SIM115 - held for the process lifetime
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

    def close(self) -> None:
        with self.lock:
            if self._w is not None:
                self._flush(force_sync=True)
                self._w.close()
                self._w = None
            if self._r is not None:
                self._r.close()
                self._r = None
            if self._offset_fd >= 0:
                os.close(self._offset_fd)
                self._offset_fd = -1

    def _end_of_last_line(self, f: IO[bytes], size: int) -> int:
        """The position after the last LF before ``size`` (0 if none), read backwards."""
        pos = size
        while pos > 0:
            start = max(0, pos - self.chunk_bytes)
            f.seek(start)
            cut = f.read(pos - start).rfind(b"\n")
            if cut >= 0:
                return start + cut + 1
            pos = start
        return 0

    def _repair_tail(self) -> None:
        # A crash mid-write can leave half a line; it cannot be sent, so it is cut.
        assert self._r is not None and self._w is not None
        cut = self._end_of_last_line(self._r, self._size)
        if cut == self._size:
            return
        log.error("outbox %s ends in a partial line (%d bytes); dropped", self.path,
                  self._size - cut)
        os.ftruncate(self._w.fileno(), cut)
        self._size = cut
        self._read_offset = min(self._read_offset, cut)

    def _count_lines(self, start: int) -> int:
        assert self._r is not None
        self._r.seek(start)
        n = 0
        while chunk := self._r.read(self.chunk_bytes):
            n += chunk.count(b"\n")
        return n

    def _adopt_orphans(self) -> None:
        """Move unsent lines from outbox files no live process holds into ours."""
        assert self._w is not None
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
                end = self._end_of_last_line(f, os.fstat(f.fileno()).st_size)
                f.seek(start)
                lines = 0
                while start < end:
                    chunk = f.read(min(self.chunk_bytes, end - start))
                    if not chunk:
                        break
                    self._w.write(chunk)
                    start += len(chunk)
                    self._size += len(chunk)
                    lines += chunk.count(b"\n")
                if lines:
                    self._pending += lines
                    self._dirty = True
                    self._flush(force_sync=True)
                    log.warning("outbox adopted %d unsent events from %s", lines, other.name)
                f.truncate(0)
                off_path.unlink(missing_ok=True)

    # ---- writing -----------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Events written to the outbox and not yet sent."""
        return self._pending

    @property
    def depth(self) -> int:
        """Events in the outbox or on their way into it (the ``tollway_events_outbox_depth``
        gauge): an event handed to the writer is counted from then on, without a gap."""
        with self._counts:
            return self._pending + self._incoming

    @property
    def unsent_bytes(self) -> int:
        """Bytes of unsent lines: what the cap ``max_bytes`` bounds."""
        return self._size - self._read_offset

    def reserve(self, n: int) -> None:
        """Count ``n`` events handed to the writer in :attr:`depth` until they are written
        (``append_many(..., reserved=n)``). Cheap: for the loop."""
        with self._counts:
            self._incoming += n

    def append_many(self, entries: Iterable[OutboxEntry], *, reserved: int = 0) -> Appended:
        """Buffered append, in order, of what fits under the cap; :meth:`flush` hands it to
        the OS. ``reserved``: how many of :meth:`reserve`'s events this settles."""
        written = refused = lost = 0
        error: OSError | None = None
        with self.lock:
            w = self._w
            unsent = self._size - self._read_offset
            for subject, event_id, payload in entries:
                if error is not None:
                    lost += 1
                    continue
                line = b"%s\t%s\t%s\n" % (subject.encode(), event_id.encode(), payload)
                if unsent + len(line) > self.max_bytes:
                    refused += 1
                    continue
                try:
                    if w is None:
                        raise OSError("outbox not open")
                    if w.write(line) != len(line):  # the disk filled up mid-line
                        raise OSError(errno.ENOSPC, "short write")
                except OSError as exc:
                    if w is not None:  # a torn line would garble the next whole one
                        with contextlib.suppress(OSError):
                            os.ftruncate(w.fileno(), self._size)
                    error = exc
                    lost += 1
                    continue
                unsent += len(line)
                self._size += len(line)
                written += 1
            if written:
                self._dirty = True
            with self._counts:
                self._pending += written
                self._incoming = max(0, self._incoming - reserved)
        return Appended(written, refused, lost, error)

    def flush(self, *, force_sync: bool = False) -> None:
        with self.lock:
            self._flush(force_sync=force_sync)

    def _flush(self, *, force_sync: bool) -> None:
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
        with self.lock:
            return self._read_batch(max_entries)

    def _read_batch(self, max_entries: int) -> tuple[list[OutboxEntry], int]:
        if not self._pending:
            return [], self._read_offset
        assert self._r is not None and self._w is not None
        self._w.flush()
        r = self._r
        r.seek(self._read_offset)
        out: list[OutboxEntry] = []
        end = self._read_offset
        bad = 0
        while len(out) < max_entries:
            line = r.readline(MAX_LINE)
            if not line:
                break
            end += len(line)
            if not line.endswith(b"\n"):
                if end >= self._size:
                    end -= len(line)  # a torn tail (cannot happen after open): left alone
                    break
                while not line.endswith(b"\n") and (line := r.readline(self.chunk_bytes)):
                    end += len(line)  # skip the rest of an oversized line in pieces
                bad += 1
                continue
            parts = line[:-1].split(b"\t", 2)
            if len(parts) != 3:
                bad += 1
                continue
            out.append(OutboxEntry(parts[0].decode(), parts[1].decode(), parts[2]))
        if bad:
            log.error("outbox: %d malformed lines skipped", bad)
            with self._counts:
                self._pending -= bad
        if not out and not bad and end >= self._size:
            log.error("outbox: %d events counted but none in the file; count reset",
                      self._pending)
            with self._counts:
                self._pending = 0
        if not out and end > self._read_offset:
            self._commit(end, 0)  # only skipped lines: not to be read (and counted) again
        return out, end

    def commit(self, offset: int, count: int) -> None:
        """Mark everything before ``offset`` (``count`` entries) as sent."""
        with self.lock:
            self._commit(offset, count)

    def _commit(self, offset: int, count: int) -> None:
        assert self._w is not None
        self._read_offset = offset
        with self._counts:
            self._pending = max(0, self._pending - count)
        if self._pending == 0 and self._read_offset >= self._size:
            self._w.flush()
            os.ftruncate(self._w.fileno(), 0)
            self._size = self._read_offset = 0
        with contextlib.suppress(OSError):
            os.pwrite(self._offset_fd, b"%-*d" % (_OFFSET_WIDTH, self._read_offset), 0)

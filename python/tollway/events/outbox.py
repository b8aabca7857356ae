"""The durable local outbox: every event, in order, from before its call answers until
JetStream has it (a write-ahead log).

One append-only file per gateway process, ``<dir>/events-<n>.log``, locked with
``flock`` while the process lives, so instances sharing a data folder never
write into one another's file, and a restarted process picks up (and sends)
what a crashed one left behind. Each line is one event::

    <subject> TAB <event_id> TAB <event JSON> LF

(msgspec escapes control characters inside JSON strings, so neither TAB nor
LF can occur in the JSON.) A side file ``<name>.offset`` holds how far the
file has been sent (and which file it speaks of: its inode); when everything
is sent and the file has grown past ``truncate_bytes`` (1 MiB) it is truncated
to zero, and when a long sent head piles up
behind a short unsent tail (a load that never lets it drain) the tail is
copied to a fresh file that replaces it. Resending a line twice is safe: the
stream drops a second copy of an ``event_id`` (``Nats-Msg-Id``) within its
duplicate window, and the views skip an id they folded.

The publisher appends each event with one ``write`` (:meth:`Outbox.append`)
as it is submitted, before the call's last bytes go out, and publishes it from
memory; the file is read back only when NATS fell behind or after a restart.

Durability (``fsync`` policy):

- Every line reaches the OS (``write``) before the call's response is
  complete, so a crash of the process (SIGKILL, OOM) loses nothing answered.
- ``interval`` (default): the file is fsync'd at most every
  ``fsync_interval_s`` (1 s) and at shutdown: a crash of the machine can lose
  the events of the last interval that were not yet in the stream.
- ``always``: fsync at the end of every publisher cycle that wrote (each
  batch: a machine crash loses at most the events of the last few ms).
- ``never``: leave it to the OS (and to shutdown).

``fsync`` runs in the publisher's writer thread and never holds
:attr:`Outbox.lock`, so an append never waits for the disk to sync, only for
the ``write`` itself (the page cache). Reads are bounded: the start-up scan,
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

import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, NamedTuple

log = logging.getLogger("tollway.events")

FsyncPolicy = Literal["always", "interval", "never"]
_OFFSET_WIDTH = 20
MAX_LINE = 8 << 20  # a longer line is no event this gateway wrote (nor one NATS would take)
_READ_BYTES = 64 << 10  # read_batch reads this much at a time


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


def line_of(entry: OutboxEntry) -> bytes:
    subject, event_id, payload = entry
    return b"".join((subject.encode(), b"\t", event_id.encode(), b"\t", payload, b"\n"))


def _lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # not POSIX: a single process per data folder is assumed
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _open_log(path: Path, flags: int = 0) -> int:
    # O_APPEND: every write lands at the end, also after a truncation.
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | flags, 0o644)


def _write_all(fd: int, data: bytes) -> None:
    done = os.write(fd, data)  # a regular file takes it whole, but for a full disk
    if done < len(data):
        view = memoryview(data)
        while done < len(data):
            done += os.write(fd, view[done:])


def _read_offset(path: Path, inode: int) -> int:
    """The sent offset stored for the file with ``inode``; 0 when it speaks of another file
    (a crash between a compaction's rename and the offset's update)."""
    try:
        fields = path.read_bytes().split()
        offset = int(fields[0]) if fields else 0
        if len(fields) > 1 and int(fields[1]) != inode:
            return 0
    except (OSError, ValueError):
        return 0
    return offset


def _end_of_last_line(fd: int, size: int, chunk: int) -> int:
    """The position after the last LF before ``size`` (0 if none), read backwards."""
    pos = size
    while pos > 0:
        start = max(0, pos - chunk)
        cut = os.pread(fd, pos - start, start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


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
        compact_bytes: int = 64 << 20,
        truncate_bytes: int = 1 << 20,
    ) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.max_bytes = max_bytes
        self.chunk_bytes = chunk_bytes
        # A sent head this long, with an unsent tail of at most chunk_bytes, is cut off.
        self.compact_bytes = compact_bytes
        # All sent and at least this long: truncated. Not at every drain: a truncation
        # after an fsync frees allocated blocks, kernel work each batch would pay.
        self.truncate_bytes = truncate_bytes
        self.path: Path | None = None
        # Held by every file operation but fsync: appends (the loop) wait only for writes.
        self.lock = threading.Lock()
        # Held by fsync, and by whatever closes or replaces the file under it.
        self._sync_lock = threading.Lock()
        self._fd = -1
        self._offset_fd = -1
        self._inode = 0
        self._read_offset = 0  # first byte not yet sent
        self._size = 0  # bytes written
        self._pending = 0  # lines not yet sent
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
            fd = _open_log(path)
            if _lock(fd):
                self.path, self._fd = path, fd
                break
            os.close(fd)
        else:
            raise OSError(f"no free outbox file in {self.directory}")
        self._tmp_path().unlink(missing_ok=True)  # a compaction cut short: the log is whole
        self._offset_fd = os.open(str(self.path) + ".offset", os.O_RDWR | os.O_CREAT, 0o644)
        st = os.fstat(self._fd)
        self._size, self._inode = st.st_size, st.st_ino
        self._read_offset = min(_read_offset(Path(str(self.path) + ".offset"), self._inode),
                                self._size)
        self._repair_tail()
        self._pending = self._count_lines(self._read_offset)
        self._adopt_orphans()

    def _tmp_path(self) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + ".tmp")

    def close(self) -> None:
        self.flush(force_sync=True)
        with self.lock, self._sync_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._offset_fd >= 0:
                os.close(self._offset_fd)
                self._offset_fd = -1

    def _repair_tail(self) -> None:
        # A crash mid-write can leave half a line; it cannot be sent, so it is cut.
        cut = _end_of_last_line(self._fd, self._size, self.chunk_bytes)
        if cut == self._size:
            return
        log.error("outbox %s ends in a partial line (%d bytes); dropped", self.path,
                  self._size - cut)
        os.ftruncate(self._fd, cut)
        self._size = cut
        self._read_offset = min(self._read_offset, cut)

    def _count_lines(self, start: int) -> int:
        n = 0
        while chunk := os.pread(self._fd, self.chunk_bytes, start):
            n += chunk.count(b"\n")
            start += len(chunk)
        return n

    def _adopt_orphans(self) -> None:
        """Move unsent lines from outbox files no live process holds into ours."""
        for other in sorted(self.directory.glob("events-*.log")):
            if other == self.path:
                continue
            fd = os.open(other, os.O_RDWR)
            try:
                if not _lock(fd):
                    continue  # its process is alive and will send them
                self._adopt(other, fd)
            finally:
                os.close(fd)

    def _adopt(self, other: Path, fd: int) -> None:
        off_path = Path(str(other) + ".offset")
        Path(str(other) + ".tmp").unlink(missing_ok=True)
        st = os.fstat(fd)
        start = _read_offset(off_path, st.st_ino)
        end = _end_of_last_line(fd, st.st_size, self.chunk_bytes)
        lines = 0
        while start < end:
            chunk = os.pread(fd, min(self.chunk_bytes, end - start), start)
            if not chunk:
                break
            _write_all(self._fd, chunk)
            start += len(chunk)
            self._size += len(chunk)
            lines += chunk.count(b"\n")
        if lines:
            self._pending += lines
            self._dirty = True
            self._fsync()  # before the orphan is emptied
            log.warning("outbox adopted %d unsent events from %s", lines, other.name)
        os.ftruncate(fd, 0)
        off_path.unlink(missing_ok=True)

    # ---- writing -----------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Events written to the outbox and not yet sent."""
        return self._pending

    @property
    def depth(self) -> int:
        return self._pending

    @property
    def unsent_bytes(self) -> int:
        """Bytes of unsent lines: what the cap ``max_bytes`` bounds."""
        return self._size - self._read_offset

    def append(self, line: bytes) -> int:
        """Write one encoded line (:func:`line_of`) with one ``write``: the bytes written,
        0 when it would pass the cap. Raises OSError when it cannot be written (nothing of
        it stays in the file)."""
        with self.lock:
            if self._size - self._read_offset + len(line) > self.max_bytes:
                return 0
            self._write(line)
            self._pending += 1
            return len(line)

    def _write(self, data: bytes) -> None:
        if self._fd < 0:
            raise OSError("outbox not open")
        try:
            _write_all(self._fd, data)
        except OSError:
            # A torn line followed by whole ones would be read as one garbled line.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                log.exception("outbox: a failed write could not be undone")
            raise
        self._size += len(data)
        self._dirty = True

    def append_many(self, entries: Iterable[OutboxEntry]) -> Appended:
        """Append, in order and with one ``write``, what fits under the cap."""
        lines: list[bytes] = []
        refused = 0
        with self.lock:
            unsent = self._size - self._read_offset
            for entry in entries:
                line = line_of(entry)
                if unsent + len(line) > self.max_bytes:
                    refused += 1
                    continue
                unsent += len(line)
                lines.append(line)
            if not lines:
                return Appended(0, refused, 0)
            try:
                self._write(b"".join(lines))
            except OSError as exc:
                return Appended(0, refused, len(lines), exc)
            self._pending += len(lines)
        return Appended(len(lines), refused, 0)

    def flush(self, *, force_sync: bool = False) -> None:
        """fsync as the policy says (``force_sync``: now). Lines reach the OS as they are
        appended; only the disk is waited for here, without holding :attr:`lock`."""
        if not self._dirty:
            return
        now = time.monotonic()
        if force_sync or self.fsync == "always" or (
            self.fsync == "interval" and now - self._last_sync >= self.fsync_interval_s
        ):
            self._fsync()
            self._last_sync = now

    def _fsync(self) -> None:
        with self._sync_lock:
            self._dirty = False  # before: a line written during the fsync stays dirty
            if self._offset_fd >= 0:
                # First: a log made durable after a truncation must not meet the offset
                # that stood before it.
                os.fsync(self._offset_fd)
            if self._fd >= 0:
                os.fsync(self._fd)

    @property
    def needs_sync(self) -> bool:
        return self._dirty and self.fsync != "never"

    @property
    def sync_in(self) -> float:
        """Seconds until :meth:`flush` would fsync under the ``interval`` policy."""
        return max(0.0, self._last_sync + self.fsync_interval_s - time.monotonic())

    @property
    def sync_due(self) -> bool:
        """:meth:`flush` would fsync now."""
        return self._dirty and (self.fsync == "always" or (
            self.fsync == "interval"
            and time.monotonic() - self._last_sync >= self.fsync_interval_s))

    # ---- reading -----------------------------------------------------------------------------
    def read_batch(self, max_entries: int) -> tuple[list[OutboxEntry], int]:
        """Up to ``max_entries`` unsent entries from the head, and the offset after them.

        The lines are read without :attr:`lock` (appends only add whole lines after them;
        the caller commits, truncates or compacts only after this returns), so appends on
        the response path do not wait for a batch to be read."""
        with self.lock:
            if not self._pending:
                return [], self._read_offset
            fd, size, start = self._fd, self._size, self._read_offset
        out, end, bad = self._read_lines(fd, start, size, max_entries)
        with self.lock:
            if bad:
                log.error("outbox: %d malformed lines skipped", bad)
                self._pending = max(0, self._pending - bad)
            if not out and not bad and end >= self._size:
                log.error("outbox: %d events counted but none in the file; count reset",
                          self._pending)
                self._pending = 0
            if not out and end > self._read_offset:
                self._commit(end, 0)  # only skipped lines: not to be read (and counted) again
        return out, end

    @staticmethod
    def _read_lines(fd: int, start: int, size: int, max_entries: int
                    ) -> tuple[list[OutboxEntry], int, int]:
        """(entries, the offset after the last whole line taken or skipped, lines skipped)."""
        out: list[OutboxEntry] = []
        end = start
        buf, i = b"", 0  # unread bytes from end on, and where in buf the next line starts
        skipping = False  # inside an oversized line
        bad = 0
        while len(out) < max_entries:
            nl = buf.find(b"\n", i)
            if nl < 0:
                if skipping or len(buf) - i > MAX_LINE:
                    bad += not skipping
                    skipping = True
                    end += len(buf) - i  # skipped in pieces
                    buf, i = b"", 0
                at = end + len(buf) - i
                if at >= size:
                    break  # no more whole lines (a torn tail cannot happen after open)
                chunk = os.pread(fd, min(_READ_BYTES, size - at), at)
                if not chunk:
                    break
                buf, i = buf[i:] + chunk, 0
                continue
            line = buf[i:nl]
            end += nl + 1 - i
            i = nl + 1
            if skipping:
                skipping = False
                continue
            parts = line.split(b"\t", 2)
            if len(parts) != 3:
                bad += 1
                continue
            out.append(OutboxEntry(parts[0].decode(), parts[1].decode(), parts[2]))
        return out, end, bad

    def commit(self, offset: int, count: int) -> None:
        """Mark everything before ``offset`` (``count`` entries) as sent."""
        with self.lock:
            self._commit(offset, count)

    def advance(self, nbytes: int, count: int) -> None:
        """Mark the next ``nbytes`` (``count`` entries) as sent: the publisher's batch from
        memory, whose lines are the file's unsent head."""
        if count:
            with self.lock:
                self._commit(self._read_offset + nbytes, count)

    def _commit(self, offset: int, count: int) -> None:
        if self._fd < 0:
            return
        self._read_offset = offset
        self._pending = max(0, self._pending - count)
        if (self._pending == 0 and self._read_offset >= self._size
                and self._size >= self.truncate_bytes):
            self._read_offset = 0
            self._store_offset()  # before the cut: a crash between them resends, never skips
            os.ftruncate(self._fd, 0)
            self._size = 0
            return
        if (self._read_offset >= self.compact_bytes
                and self._size - self._read_offset <= self.chunk_bytes):
            self._compact()
        self._store_offset()

    def _store_offset(self) -> None:
        try:
            os.pwrite(self._offset_fd, b"%-*d %-*d" % (
                _OFFSET_WIDTH, self._read_offset, _OFFSET_WIDTH, self._inode), 0)
        except OSError as exc:
            log.warning("outbox: cannot store the sent offset (%s); a restart resends "
                        "more (the stream drops the copies)", exc)

    def _compact(self) -> None:
        """Replace the file by its unsent tail: under a load that never lets it drain, the
        sent head would grow for ever. The new file takes the name by an atomic rename, and
        the offset names the inode it counts in, so a crash at any point resends or keeps."""
        assert self.path is not None
        tail = os.pread(self._fd, self._size - self._read_offset, self._read_offset)
        tmp = self._tmp_path()
        fd = _open_log(tmp, os.O_TRUNC)
        try:
            if not _lock(fd):
                raise OSError(f"{tmp} is locked")
            _write_all(fd, tail)
            os.replace(tmp, self.path)
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            log.warning("outbox: cannot compact %s (%s)", self.path, exc)
            return
        with self._sync_lock:
            os.close(self._fd)
            self._fd = fd
        self._inode = os.fstat(fd).st_ino
        self._size, self._read_offset = len(tail), 0
        self._dirty = True

"""The outbox file: order, resume after a crash, partial lines, orphans."""

from __future__ import annotations

import errno
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from tollway.events.outbox import MAX_LINE, Outbox, OutboxEntry, line_of


def _fill(ob: Outbox, start: int, n: int) -> None:
    ob.append_many([OutboxEntry(f"tollway.call.completed.t{i}", f"id{i}", b'{"i":%d}' % i)
                    for i in range(start, start + n)])
    ob.flush()


def test_fifo_commit_and_truncate(tmp_path: Path) -> None:
    ob = Outbox(tmp_path, truncate_bytes=200)
    ob.open()
    _fill(ob, 0, 10)
    assert ob.pending == 10
    batch, end = ob.read_batch(4)
    assert [e.event_id for e in batch] == ["id0", "id1", "id2", "id3"]
    assert batch[0].subject == "tollway.call.completed.t0" and batch[0].payload == b'{"i":0}'
    ob.commit(end, len(batch))
    assert ob.pending == 6
    batch, end = ob.read_batch(100)
    assert [e.event_id for e in batch] == [f"id{i}" for i in range(4, 10)]
    ob.commit(end, len(batch))
    assert ob.pending == 0
    assert ob.path is not None and ob.path.stat().st_size == 0, "drained: truncated"
    ob.close()


def test_a_small_drained_file_is_kept_and_nothing_is_resent(tmp_path: Path) -> None:
    ob = Outbox(tmp_path)  # truncated only past 1 MiB: not after every batch
    ob.open()
    _fill(ob, 0, 3)
    batch, end = ob.read_batch(10)
    ob.commit(end, len(batch))
    assert ob.pending == 0 and ob.path is not None and ob.path.stat().st_size == end
    _fill(ob, 3, 1)
    ob.close()
    again = Outbox(tmp_path)
    again.open()
    assert [e.event_id for e in again.read_batch(10)[0]] == ["id3"]
    again.close()


def _five_then_two_sent(tmp_path: Path) -> int:
    """An outbox closed with id0..id4 written and id0, id1 sent; the sent offset."""
    ob = Outbox(tmp_path)
    ob.open()
    _fill(ob, 0, 5)
    _, end = ob.read_batch(2)
    ob.commit(end, 2)
    ob.close()
    return end


def test_a_restart_resumes_after_what_was_sent(tmp_path: Path) -> None:
    _five_then_two_sent(tmp_path)
    again = Outbox(tmp_path)
    again.open()
    assert again.pending == 3
    assert [e.event_id for e in again.read_batch(10)[0]] == ["id2", "id3", "id4"]
    again.close()


def test_a_partial_last_line_is_cut(tmp_path: Path) -> None:
    ob = Outbox(tmp_path)
    ob.open()
    _fill(ob, 0, 3)
    ob.close()
    path = tmp_path / "events-0.log"
    with open(path, "ab") as f:
        f.write(b"tollway.call.completed.x\tid9\t{\"trunc")  # a crash mid-write
    again = Outbox(tmp_path)
    again.open()
    assert again.pending == 3
    assert [e.event_id for e in again.read_batch(10)[0]] == ["id0", "id1", "id2"]
    again.close()


def test_two_processes_never_share_a_file_and_orphans_are_adopted(tmp_path: Path) -> None:
    a, b = Outbox(tmp_path), Outbox(tmp_path)
    a.open()
    b.open()
    assert a.path != b.path, "each live process holds its own locked file"
    _fill(b, 0, 4)
    b.close()  # b's process is gone with 4 unsent events
    _fill(a, 10, 1)
    a.close()
    c = Outbox(tmp_path)
    c.open()  # takes events-0, adopts events-1
    assert c.pending == 5
    assert [e.event_id for e in c.read_batch(10)[0]] == ["id10", "id0", "id1", "id2", "id3"]
    c.close()


def _big_file(path: Path, mib: int, *, start: int = 0) -> int:
    """An outbox file of about ``mib`` MiB of lines, written a piece at a time; its lines."""
    lines = [b"tollway.call.completed.t\tid%d\t{\"pad\":\"%s\"}\n" % (i, b"x" * 200)
             for i in range(start, start + 4096)]
    piece = b"".join(lines)
    n = 0
    with open(path, "ab") as f:
        while f.tell() < mib << 20:
            f.write(piece)
            n += len(lines)
    return n


def _peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_large_outbox_is_read_in_pieces_at_start(tmp_path: Path) -> None:
    n = _big_file(tmp_path / "events-0.log", 24)
    with open(tmp_path / "events-0.log", "ab") as f:
        f.write(b"tollway.call.completed.x\tidz\t{\"torn")  # a crash mid-write, at the end
    orphan = _big_file(tmp_path / "events-1.log", 24)  # a dead process's file, to adopt
    ob = Outbox(tmp_path, chunk_bytes=256 << 10)
    peak = _peak(ob.open)
    assert ob.pending == n + orphan
    assert peak < 4 << 20, f"open() held {peak} bytes for 48 MiB of outbox"
    peak = _peak(lambda: ob.read_batch(256))
    assert peak < 1 << 20, f"a batch of 256 held {peak} bytes"
    batch, _ = ob.read_batch(3)
    assert [e.event_id for e in batch] == ["id0", "id1", "id2"]
    ob.close()


def test_the_cap_refuses_what_does_not_fit_and_keeps_the_order(tmp_path: Path) -> None:
    ob = Outbox(tmp_path, max_bytes=4096)
    ob.open()
    entries = [OutboxEntry("tollway.call.completed.t", f"id{i}", b"x" * 100)
               for i in range(100)]
    res = ob.append_many(entries)
    assert res.written + res.refused == 100 and res.refused > 0 and res.lost == 0
    assert ob.unsent_bytes <= 4096
    batch, end = ob.read_batch(1000)
    assert [e.event_id for e in batch] == [f"id{i}" for i in range(res.written)]
    ob.commit(end, len(batch))  # sent: room again
    assert ob.append_many(entries[:10]).written == 10
    ob.close()
    big = Outbox(tmp_path, max_bytes=4096)  # a file over the cap from an earlier run ...
    _big_file(tmp_path / "events-0.log", 1)
    big.open()
    kept = big.pending
    assert kept > 10, "... is kept whole"
    assert big.append_many(entries[:1]).refused == 1
    big.close()


def test_malformed_and_oversized_lines_are_skipped_once(tmp_path: Path) -> None:
    with open(tmp_path / "events-0.log", "wb") as f:
        f.write(b"tollway.call.completed.t\tid0\t{}\n" + b"no tabs here\n")
        f.write(b"x" * (MAX_LINE + 10) + b"\n")  # read and skipped in pieces
    ob = Outbox(tmp_path, chunk_bytes=64 << 10)
    ob.open()
    assert ob.pending == 3
    batch, end = ob.read_batch(1)
    assert [e.event_id for e in batch] == ["id0"]
    ob.commit(end, 1)
    assert ob.read_batch(10)[0] == [] and ob.pending == 0, "nothing but bad lines left"
    assert ob.path is not None and ob.path.stat().st_size == 0, "passed for good: truncated"
    _fill(ob, 1, 1)
    assert [e.event_id for e in ob.read_batch(10)[0]] == ["id1"] and ob.pending == 1
    ob.close()


def _entry(i: int) -> OutboxEntry:
    return OutboxEntry("tollway.call.completed.t", f"id{i}", b'{"i":%d}' % i)


def test_a_sent_head_that_never_drains_is_cut_off(tmp_path: Path) -> None:
    """Under a load that never lets the file drain, as the publisher uses it: each event
    appended as submitted, batches marked sent from memory while newer ones wait."""
    ob = Outbox(tmp_path, compact_bytes=4096, chunk_bytes=1024)
    ob.open()
    assert ob.path is not None
    sizes: list[int] = []
    for i in range(2000):
        sizes.append(ob.append(line_of(_entry(i))))
        if len(sizes) > 5:  # a batch of 3 goes out, 3 newer ones stay unsent
            ob.advance(sum(sizes[:3]), 3)
            del sizes[:3]
    assert ob.path.stat().st_size < 4096 + 1024, "the sent head does not grow for ever"
    assert ob.pending == len(sizes)
    ob.close()
    again = Outbox(tmp_path)
    again.open()
    assert [e.event_id for e in again.read_batch(100)[0]] == [
        f"id{i}" for i in range(2000 - len(sizes), 2000)], "a restart sends the unsent tail"
    again.close()


def test_an_offset_of_another_file_is_not_applied(tmp_path: Path) -> None:
    """A crash between a compaction's rename and the offset's update: the offset counts in
    the old file, and applying it to the new one would skip unsent lines."""
    end = _five_then_two_sent(tmp_path)
    path = tmp_path / "events-0.log"
    tail = path.read_bytes()[end:]
    new = tmp_path / "events-0.log.new"
    new.write_bytes(tail)
    new.replace(path)  # another inode under the name, as the compaction's rename leaves it
    again = Outbox(tmp_path)
    again.open()
    assert [e.event_id for e in again.read_batch(10)[0]] == ["id2", "id3", "id4"]
    again.close()


def test_a_write_the_disk_cuts_short_leaves_no_torn_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ob = Outbox(tmp_path)
    ob.open()
    ob.append(line_of(_entry(0)))
    real_write = os.write

    def half_then_full(fd: int, data: bytes | memoryview) -> int:
        n = real_write(fd, bytes(data)[: len(data) // 2])
        monkeypatch.setattr(os, "write", real_write)  # the next one is the ENOSPC
        raise OSError(errno.ENOSPC, f"No space left on device after {n} bytes")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space"):
        ob.append(line_of(_entry(1)))
    ob.append(line_of(_entry(2)))
    assert ob.pending == 2
    assert [e.event_id for e in ob.read_batch(10)[0]] == ["id0", "id2"]
    ob.close()

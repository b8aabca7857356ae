"""The outbox file: order, resume after a crash, partial lines, orphans."""

from __future__ import annotations

from pathlib import Path

from tollway.events.outbox import Outbox


def _fill(ob: Outbox, start: int, n: int) -> None:
    for i in range(start, start + n):
        ob.append(f"tollway.call.completed.t{i}", f"id{i}", b'{"i":%d}' % i)
    ob.flush()


def test_fifo_commit_and_truncate(tmp_path: Path) -> None:
    ob = Outbox(tmp_path)
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


def test_a_restart_resumes_after_what_was_sent(tmp_path: Path) -> None:
    ob = Outbox(tmp_path)
    ob.open()
    _fill(ob, 0, 5)
    _, end = ob.read_batch(2)
    ob.commit(end, 2)
    ob.close()
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

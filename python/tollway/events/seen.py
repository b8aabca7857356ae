"""Which events a view folds: each event id once, and only days the view still keeps.

Views skip stream sequences they have applied, but an outbox resent after
JetStream's duplicate window (an outage longer than ``duplicate_window_s``)
lands again under new sequences with the same ``event_id``. A :class:`Seen`
remembers every id its view has folded, in bounded memory, and is part of the
view's checkpoint, so it holds across restarts too.

The scheme leans on how gateways make ids (``EventIds``): 20 hex characters
of random prefix per process and a 12-hex-character counter. An id is
remembered as a run of counters under its prefix (``runs``: the prefix maps
to a flat sorted list ``[lo0, hi0, lo1, hi1, ...]`` of inclusive ranges), so
a process's events, which arrive mostly in order, cost no memory per event:
one run grows. Events out of order (a batch in flight when NATS failed, then
its outbox) open a gap that closes when the rest arrives. Any other id (not
32 hex characters) is a prefix of its own with the single counter 0; gateways
make none of those.

Every event pays for this, so the common case -- the next event of a process,
of a day kept -- is decided on strings and times: a counter above the last
one of its prefix (same width, so string order is number order) is new, and
joins the prefix's ``tails`` list unparsed. A tail is merged into the runs
every ``TAIL`` events, when a day begins or an event comes out of order; a
contiguous stretch (the usual) takes two ``int()`` calls. The projections
decide each event once for all the views at one sequence
(:func:`tollway.events.projections.fold_events`), so this costs about one
such check per event, not one per view.

Memory is bounded by retention, not by traffic: a prefix is forgotten once
the newest day of its events is no longer kept, and the view folds no event
of a day it no longer keeps (``oldest``). A resent event is therefore either
under a remembered prefix or of a day before ``oldest`` -- skipped either way.
A prefix's day is noted when its tail is merged (the newest day folded then:
never earlier than its events, at most a day later), so it may be kept a day
longer than needed, never shorter.

Memory per event (measured with tracemalloc): nothing, once merged, for a
process's events in order; about 70 bytes while in a tail (at most ``TAIL``
of them per process: 70 KB); 2 ints per gap that stays open (an event
dropped, a budget lease granted while NATS was down); about 170 bytes for an
id of any other shape. In the checkpoint: about 100 bytes per process and 13
per tail entry, before zlib.

The fold's clock is the events' time: the newest day folded decides which
days are kept (``keep_days`` of them, the newest included), except that an
event beyond the caller's horizon (a clock far ahead) moves no day on.
"""

from __future__ import annotations

import calendar
import math
from bisect import bisect_left, bisect_right
from datetime import date, timedelta

import msgspec

from tollway.events.schema import day_of

RETENTION_DAYS = 90  # days of rollups a view keeps by default ([events] retention_days)

FOLD, SKIP, PRUNE = 0, 1, 2  # PRUNE: fold it, then drop the view's days before ``oldest``

TAIL = 1024  # counters of a prefix kept as strings before they are merged into its runs
_PREFIX = 20  # hex characters of EventIds' per-process prefix; 12 of counter follow
_ID_LEN = 32


class Seen(msgspec.Struct, array_like=True):
    keep_days: int
    newest: str = ""  # newest day folded
    oldest: str = ""  # first day kept; events of earlier days are skipped
    kept_from: float = 0.0  # the same two as unix times (oldest's start, newest's end):
    kept_until: float = 0.0  # the fold compares an event's time, not its day
    runs: dict[str, list[int]] = msgspec.field(default_factory=dict)
    last_day: dict[str, str] = msgspec.field(default_factory=dict)  # prefix -> newest day
    # prefix -> [its highest counter merged, counters folded since], hex strings ascending
    tails: dict[str, list[str]] = msgspec.field(default_factory=dict)

    def admit(self, event_id: str, at: float, horizon: float = math.inf) -> int:
        """FOLD, PRUNE (fold, then prune the view) or SKIP (folded before, or too old), for
        the event ``event_id`` that occurred at unix time ``at``.

        An event later than ``horizon`` is folded but moves no day on: one from a clock
        years ahead must not prune the views and skip every event after it. The runner
        passes its own clock plus a day; a fold on its own has the events' time only.
        """
        prefix = event_id[:_PREFIX]
        tail = self.tails.get(prefix)
        if (tail is not None and len(event_id) == _ID_LEN
                and self.kept_from <= at < self.kept_until):
            counter = event_id[_PREFIX:]
            if counter > tail[-1]:
                tail.append(counter)
                if len(tail) > TAIL:
                    self._merge(prefix, tail)
                return FOLD
        return self._admit(event_id, at, horizon)

    def _admit(self, event_id: str, at: float, horizon: float) -> int:
        day = day_of(at)
        if day < self.oldest:
            return SKIP
        verdict = FOLD
        if day > self.newest and at <= horizon:
            self.compact()  # the tails' days are the old newest at most
            self.newest = day
            verdict = PRUNE if self._cut() else FOLD
        prefix, counter, n = _split(event_id)
        runs = self.runs.get(prefix)
        if runs is None:
            self.runs[prefix] = [n, n]
            if counter:
                self.tails[prefix] = [counter]
        else:
            tail = self.tails.get(prefix)
            if tail is not None and len(tail) > 1:
                self._merge(prefix, tail)
            if n == runs[-1] + 1:
                runs[-1] = n
            elif n > runs[-1]:
                runs += (n, n)
            elif not _insert(runs, n):
                return SKIP
            if tail is not None and counter > tail[-1]:
                tail[-1] = counter
        if day > self.last_day.get(prefix, ""):
            self.last_day[prefix] = day
        return verdict

    def has(self, event_id: str) -> bool:
        """Whether ``event_id`` was folded (while its process's days are kept); no change."""
        prefix, counter, n = _split(event_id)
        tail = self.tails.get(prefix)
        if tail is not None and counter:
            i = bisect_left(tail, counter, 1)
            if i < len(tail) and tail[i] == counter:
                return True
        runs = self.runs.get(prefix)
        if runs is None:
            return False
        i = bisect_right(runs, n)
        return bool(i & 1) or (i > 0 and runs[i - 1] == n)

    def _merge(self, prefix: str, tail: list[str]) -> None:
        """Move the tail's counters (ascending, all above the runs) into the runs."""
        runs = self.runs[prefix]
        try:
            lo, hi = int(tail[1], 16), int(tail[-1], 16)
            stretch = hi - lo == len(tail) - 2
        except ValueError:  # not hex after all (an id that only looks like ours)
            stretch = False
        if stretch:
            if lo == runs[-1] + 1:
                runs[-1] = hi
            else:
                runs += (lo, hi)
        else:
            for counter in tail[1:]:
                try:
                    n = int(counter, 16)
                except ValueError:
                    self.runs[prefix + counter] = [0, 0]
                    self.last_day[prefix + counter] = self.newest
                    continue
                if n == runs[-1] + 1:
                    runs[-1] = n
                else:
                    runs += (n, n)
        if self.newest > self.last_day.get(prefix, ""):
            self.last_day[prefix] = self.newest
        del tail[:-1]

    def compact(self) -> None:
        """Merge every tail into its runs (the form a test can read)."""
        for prefix, tail in self.tails.items():
            if len(tail) > 1:
                self._merge(prefix, tail)

    def retain(self, keep_days: int) -> bool:
        """Keep ``keep_days`` days from now on (the configuration may have changed); True
        when days are gone and the view must prune them. A longer retention brings no day
        back: what was pruned stays skipped."""
        self.keep_days = keep_days
        return bool(self.newest) and self._cut()

    def _cut(self) -> bool:
        oldest = (date.fromisoformat(self.newest) - timedelta(days=self.keep_days - 1)).isoformat()
        self.kept_until = _start(self.newest) + 86400
        if oldest <= self.oldest:
            return False
        self.oldest = oldest
        self.kept_from = _start(oldest)
        for p in [p for p, last in self.last_day.items() if last < oldest]:
            del self.runs[p], self.last_day[p]
            self.tails.pop(p, None)
        return True


def _start(day: str) -> float:
    return float(calendar.timegm(date.fromisoformat(day).timetuple()))


def _split(event_id: str) -> tuple[str, str, int]:
    """(prefix, counter as hex, counter) of one of our ids; (the id, "", 0) of any other."""
    if len(event_id) == _ID_LEN:
        counter = event_id[_PREFIX:]
        try:
            return event_id[:_PREFIX], counter, int(counter, 16)
        except ValueError:
            pass
    return event_id, "", 0


def _insert(runs: list[int], n: int) -> bool:
    """Add ``n`` to the ranges; False when it is already in one."""
    i = bisect_right(runs, n)
    if i & 1 or (i and runs[i - 1] == n):
        return False
    joins_left = i > 0 and runs[i - 1] == n - 1
    joins_right = i < len(runs) and runs[i] == n + 1
    if joins_left and joins_right:
        del runs[i - 1:i + 1]
    elif joins_left:
        runs[i - 1] = n
    elif joins_right:
        runs[i] = n
    else:
        runs[i:i] = (n, n)
    return True

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
a process's events, which arrive mostly in order, cost nothing per event: one
run grows. Events out of order (a batch in flight when NATS failed, then its
outbox) open a gap that closes when the rest arrives. Any other id (not 32
hex characters) is a prefix of its own with the single counter 0, about 200
bytes each; gateways make none of those.

Memory is bounded by retention, not by traffic: a prefix is forgotten once
the newest day of its events is no longer kept, and the view folds no event
of a day it no longer keeps (``oldest``). A resent event is therefore either
under a remembered prefix or of a day before ``oldest`` -- skipped either way.

The fold's only clock is the events' time: the newest day folded decides which
days are kept (``keep_days`` of them, the newest included).
"""

from __future__ import annotations

from bisect import bisect_right
from datetime import date, timedelta

import msgspec

RETENTION_DAYS = 90  # days of rollups a view keeps by default ([events] retention_days)

FOLD, SKIP, PRUNE = 0, 1, 2  # PRUNE: fold it, then drop the view's days before ``oldest``

_PREFIX = 20  # hex characters of EventIds' per-process prefix; 12 of counter follow
_ID_LEN = 32


class Seen(msgspec.Struct, array_like=True):
    keep_days: int
    newest: str = ""  # newest day folded
    oldest: str = ""  # first day kept; events of earlier days are skipped
    runs: dict[str, list[int]] = msgspec.field(default_factory=dict)
    last_day: dict[str, str] = msgspec.field(default_factory=dict)  # prefix -> newest day

    def admit(self, event_id: str, day: str) -> int:
        """FOLD, PRUNE (fold, then prune the view) or SKIP (folded before, or too old)."""
        if day < self.oldest:
            return SKIP
        if len(event_id) == _ID_LEN:
            prefix = event_id[:_PREFIX]
            try:
                n = int(event_id[_PREFIX:], 16)
            except ValueError:
                prefix, n = event_id, 0
        else:
            prefix, n = event_id, 0
        runs = self.runs.get(prefix)
        if runs is None:
            self.runs[prefix] = [n, n]
            self.last_day[prefix] = day
        else:
            if n == runs[-1] + 1:  # the common case: the next event of a process
                runs[-1] = n
            elif n > runs[-1]:
                runs += (n, n)
            elif not _insert(runs, n):
                return SKIP
            if day > self.last_day[prefix]:
                self.last_day[prefix] = day
        if day > self.newest:
            self.newest = day
            return PRUNE if self._cut() else FOLD
        return FOLD

    def retain(self, keep_days: int) -> bool:
        """Keep ``keep_days`` days from now on (the configuration may have changed); True
        when days are gone and the view must prune them. A longer retention brings no day
        back: what was pruned stays skipped."""
        self.keep_days = keep_days
        return bool(self.newest) and self._cut()

    def _cut(self) -> bool:
        oldest = (date.fromisoformat(self.newest) - timedelta(days=self.keep_days - 1)).isoformat()
        if oldest <= self.oldest:
            return False
        self.oldest = oldest
        for p in [p for p, last in self.last_day.items() if last < oldest]:
            del self.runs[p], self.last_day[p]
        return True


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

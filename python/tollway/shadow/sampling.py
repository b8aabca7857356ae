"""Which calls are shadowed (a seeded Bernoulli draw) and which A/B arm serves a caller.

The A/B arm is a pure function of (salt, route, sticky key): the first 8
bytes of a BLAKE2b digest read as a number in [0, 1) and placed on the
cumulative weights. It needs no state, is the same on every gateway process
and after restarts, and moves a caller only when the weights, the salt or
the route change. The candidates' shares come first, in config order, and the
primary arm is the rest: with one candidate, raising its weight only moves
callers from the primary arm into it, never back.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence

__all__ = ["AB_REASON", "Sampler", "ab_arm", "ab_point", "parse_arm", "sticky_key"]

_SCALE = float(1 << 64)


class Sampler:
    """``fraction`` of draws say yes; seeded, so a test (or a replayed experiment) repeats."""

    __slots__ = ("_random", "fraction")

    def __init__(self, fraction: float, seed: int | None = None) -> None:
        self.fraction = fraction
        self._random = random.Random(seed).random

    def __call__(self) -> bool:
        f = self.fraction
        if f <= 0.0:
            return False
        return f >= 1.0 or self._random() < f


def ab_point(salt: str, route: str, key: str) -> float:
    """Where ``key`` falls in [0, 1) for this route: uniform, deterministic, sticky."""
    digest = hashlib.blake2b(f"{salt}\x00{route}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def ab_arm(point: float, weights: Sequence[float]) -> int | None:
    """Index of the candidate whose share holds ``point``; None for the primary arm."""
    edge = 0.0
    for i, w in enumerate(weights):
        edge += w
        if point < edge:
            return i
    return None


def sticky_key(mode: str, tenant: str, user: str | None) -> str:
    """The identity an A/B arm sticks to: the tenant, or a user id within the tenant."""
    if mode == "user" and user:
        return f"u\x00{tenant}\x00{user}"
    return f"t\x00{tenant}"


# How a call's ``reason`` names its A/B arm (written by :mod:`tollway.shadow.ab`).
AB_REASON = re.compile(r"ab\[([^\]]+)\]=(candidate|primary)")


def parse_arm(reason: str) -> tuple[str, str] | None:
    """(route, arm) from a call's reason, or None for a call outside any A/B split."""
    if "ab[" not in reason:
        return None
    m = AB_REASON.search(reason)
    return (m.group(1), m.group(2)) if m else None

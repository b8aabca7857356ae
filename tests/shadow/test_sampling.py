"""Sampling fraction, A/B arms (sticky, weighted, deterministic), the spend cap."""

from __future__ import annotations

import math

from tollway.shadow.sampling import Sampler, ab_arm, ab_point, parse_arm, sticky_key
from tollway.shadow.spend import ShadowSpend


def test_sampled_fraction_within_binomial_bounds() -> None:
    for fraction, seed in ((0.1, 1), (0.1, 2), (0.37, 3), (0.9, 4)):
        draw = Sampler(fraction, seed)
        n = 20_000
        hits = sum(draw() for _ in range(n))
        sd = math.sqrt(n * fraction * (1 - fraction))
        assert abs(hits - n * fraction) < 5 * sd, (fraction, hits)


def test_sampler_edges_and_seed_repeat() -> None:
    assert not any(Sampler(0.0, 1)() for _ in range(1000))
    assert all(Sampler(1.0, 1)() for _ in range(1000))
    a, b = Sampler(0.3, 7), Sampler(0.3, 7)
    assert [a() for _ in range(200)] == [b() for _ in range(200)]


def test_ab_point_is_deterministic_uniform_and_route_specific() -> None:
    keys = [sticky_key("tenant", f"t{i}", None) for i in range(20_000)]
    points = [ab_point("", "auto", k) for k in keys]
    assert points == [ab_point("", "auto", k) for k in keys]  # sticky
    assert all(0.0 <= p < 1.0 for p in points)
    share = sum(p < 0.2 for p in points) / len(points)
    assert abs(share - 0.2) < 5 * math.sqrt(0.2 * 0.8 / len(points))
    # another salt or route reshuffles
    moved = sum((p < 0.5) != (ab_point("s2", "auto", k) < 0.5) for p, k in zip(points, keys,
                                                                            strict=True))
    assert 0.4 < moved / len(keys) < 0.6


def test_ab_arm_weights() -> None:
    w = [0.1, 0.25]
    assert ab_arm(0.05, w) == 0
    assert ab_arm(0.1, w) == 1
    assert ab_arm(0.3499, w) == 1
    assert ab_arm(0.35, w) is None
    assert ab_arm(0.0, []) is None
    # raising a single candidate's weight only pulls callers in, never pushes any out
    keys = [sticky_key("user", "acme", f"user-{i}") for i in range(2000)]
    pts = [ab_point("", "r", k) for k in keys]
    small = {k for k, p in zip(keys, pts, strict=True) if ab_arm(p, [0.1]) == 0}
    big = {k for k, p in zip(keys, pts, strict=True) if ab_arm(p, [0.3]) == 0}
    assert small < big


def test_sticky_key() -> None:
    assert sticky_key("user", "acme", "u1") != sticky_key("user", "globex", "u1")
    assert sticky_key("user", "acme", None) == sticky_key("tenant", "acme", "ignored")
    assert sticky_key("tenant", "acme", "u1") == sticky_key("tenant", "acme", "u2")


def test_parse_arm() -> None:
    assert parse_arm("auto: -> fake/m; ab[auto]=candidate -> m2") == ("auto", "candidate")
    assert parse_arm("x; ab[chat]=primary (fallback: breaker open: p)") == ("chat", "primary")
    assert parse_arm("auto: -> fake/m") is None


class Clock:
    def __init__(self) -> None:
        self.t = 1_767_225_600.0  # 2026-01-01T00:00:00Z

    def __call__(self) -> float:
        return self.t


def test_spend_cap_holds_settles_and_rolls_over() -> None:
    clock = Clock()
    others = {"2026-01-01": 100}
    spend = ShadowSpend(1000, clock, lambda day: others.get(day, 0))
    h1 = spend.reserve(500)
    assert h1 is not None
    assert spend.reserve(401) is None  # 100 others + 500 held + 401 > 1000
    h2 = spend.reserve(400)
    assert h2 is not None
    assert spend.used() == 1000
    spend.settle(h1, 120)  # the hold shrinks to the actual cost
    assert spend.used() == 100 + 120 + 400
    spend.release(h2)
    spend.release(h2)  # twice is harmless
    assert spend.used() == 220
    assert spend.reserve(781) is None
    assert spend.reserve(780) is not None
    clock.t += 86400  # a new UTC day: the cap is whole again
    assert spend.used() == 0
    assert spend.reserve(1000) is not None


def test_zero_cap_still_runs_free_candidates() -> None:
    spend = ShadowSpend(0, Clock())
    assert spend.reserve(0) is not None
    assert spend.reserve(1) is None

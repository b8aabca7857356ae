"""A/B split through a real gateway: sticky arms, live rules, fallbacks, the arms' report."""

from __future__ import annotations

from collections import Counter

from tollway.shadow.sampling import ab_point, sticky_key
from tollway.testing.upstream import Fault

from .rig import GLOBEX_KEY, rig

AB = {"route": "auto", "mode": "ab", "candidates": ["small"], "weights": [0.5],
      "sticky": "user"}


def test_arms_are_sticky_per_user_and_follow_the_hash() -> None:
    with rig([AB]) as r:
        arms: dict[str, str] = {}
        for u in range(40):
            user = f"user-{u}"
            served = {r.chat(f"q{k}", user=user).headers["x-tollway-model"] for k in range(3)}
            assert len(served) == 1, user  # sticky
            arms[user] = served.pop()
        # The header names the user too, and wins over the body's field.
        resp = r.chat(user="user-0", headers={"X-Tollway-User": "user-1"})
        assert resp.headers["x-tollway-model"] == arms["user-1"]
        records = r.recorder.wait(121)
        doc = r.report()
    for user, model in arms.items():
        point = ab_point("", "auto", sticky_key("user", "acme", user))
        assert model == ("small" if point < 0.5 else "big")
    on_candidate = sum(m == "small" for m in arms.values())
    assert 8 <= on_candidate <= 32  # 40 users, p = 0.5: far inside 4 sigma
    reasons = Counter(("ab[auto]=candidate" in rec.reason, rec.model) for rec in records)
    assert set(reasons) == {(True, "small"), (False, "big")}
    rows = {(row["arm"], row["model"]): row for row in doc["ab"]}
    expected_small = 3 * on_candidate + (arms["user-1"] == "small")
    assert rows[("candidate", "small")]["calls"] == expected_small
    assert rows[("primary", "big")]["calls"] == 121 - expected_small
    assert rows[("candidate", "small")]["cost_ratio"] is not None
    assert doc["data"] == []  # an A/B route makes no shadow calls
    assert r.candidate.requests and all("stream" not in q.body for q in r.candidate.requests)


def test_sticky_per_tenant_ignores_the_user() -> None:
    with rig([{**AB, "sticky": "tenant"}]) as r:
        acme = {r.chat(user=f"u{i}").headers["x-tollway-model"] for i in range(10)}
        globex = {r.chat(user=f"u{i}", key=GLOBEX_KEY).headers["x-tollway-model"]
                  for i in range(10)}
    assert len(acme) == 1 and len(globex) == 1
    for tenant, served in (("acme", acme), ("globex", globex)):
        point = ab_point("", "auto", sticky_key("tenant", tenant, None))
        assert served == {"small" if point < 0.5 else "big"}


def test_candidate_arm_keeps_the_live_rules() -> None:
    with rig([{**AB, "weights": [1.0]}]) as r:
        assert r.chat().headers["x-tollway-model"] == "small"
        # Confidential data stays on a local provider: the primary arm serves it.
        resp = r.chat(headers={"X-Tollway-Sensitivity": "confidential"})
        assert resp.status_code == 200 and resp.headers["x-tollway-model"] == "big"
        # A failing candidate fails over to the primary's candidates behind it.
        r.candidate.add_fault(Fault(status=500, times=None))
        resp = r.chat()
        assert resp.status_code == 200 and resp.headers["x-tollway-model"] == "big"
        records = r.recorder.wait(3)
    assert "ab[auto]=primary (fallback: confidential data, small is not local)" in (
        records[1].reason)
    assert "ab[auto]=candidate" in records[2].reason and records[2].fallbacks == ("cand",)

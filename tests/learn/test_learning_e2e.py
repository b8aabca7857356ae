"""Learning routing through a gateway: shadow samples promote the cheaper candidate, its
checks against the primary demote it when its answers go wrong; the decisions are
events in the shadow report."""

from __future__ import annotations

import io
from typing import Any

from shadow.rig import rig
from support import eventually
from tollway.shadow.cli import render

SHADOW = [{"route": "auto", "candidates": ["small"], "fraction": 1.0, "seed": 1,
           "max_in_flight": 100}]
LEARN = {"enabled": True, "min_samples": 4, "window": 6, "min_agreement": 0.95,
         "hysteresis": 0.0, "verify_fraction": 1.0}


def _classify(r: Any, i: int) -> Any:
    return r.chat(f"label {i}", messages=[{"role": "system", "content": "task: classify"},
                                          {"role": "user", "content": f"label {i}"}],
                  headers={"x-tollway-task": "classify"}, max_tokens=20)


def test_a_cheaper_candidate_takes_the_traffic_and_backs_off_when_it_goes_wrong() -> None:
    with rig(SHADOW, learn=LEARN) as r:
        served = []
        for i in range(4):  # primary serves, each call shadowed to "small": 4 agreeing
            resp = _classify(r, i)
            assert resp.status_code == 200, resp.text
            served.append(resp.headers["x-tollway-model"])
            assert eventually(lambda i=i: len(r.shadow.base.events) >= i + 1)  # type: ignore[attr-defined]
        assert served == ["big"] * 4
        learner = r.shadow.learner
        assert learner is not None
        assert learner.learning.choice("auto", "classify") == "small"
        # Another task has its own evidence: still the primary.
        assert r.chat("free text here", headers={"x-tollway-task": "draft"}).headers[
            "x-tollway-model"] == "big"

        resp = _classify(r, 10)
        assert resp.headers["x-tollway-model"] == "small"
        assert "learn[auto/classify] -> small" in r.recorder.records[-1].reason

        # The candidate starts answering wrong; its checks against the primary demote it.
        r.candidate.replies.quality = {"gpt-4o-mini": {"classify": 0.0}}
        n = 0
        while learner.learning.choice("auto", "classify") == "small":
            n += 1
            assert n <= 20, "never demoted"
            before = len(r.shadow.base.events)  # type: ignore[attr-defined]
            _classify(r, 100 + n)
            assert eventually(lambda b=before: len(r.shadow.base.events) > b)  # type: ignore[attr-defined]
        assert _classify(r, 500).headers["x-tollway-model"] == "big"

        report = r.report()
        actions = [(d["action"], d["model"]) for d in report["learning"]["decisions"]]
        assert actions == [("promoted", "small"), ("demoted", None)]
        assert report["learning"]["decisions"][1]["agreement_rate"] < 0.95
        out = io.StringIO()
        render(report, out)  # tollway shadow report
        assert "promoted  auto/classify: primary -> small" in out.getvalue()
        assert "demoted  auto/classify: small -> primary" in out.getvalue()
        verify = [e for e in r.shadow.base.events if getattr(e, "verify", False)]  # type: ignore[attr-defined]
        assert verify and all(e.primary_model == "big" and e.candidate_model == "small"
                              for e in verify)

"""A panic in the Rust core: an Exception at the binding, the internal error for the caller."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

import tollway.pipeline.prompt
import tollway.pipeline.usage
from policy_rig import Rig, rig
from support import panics_once
from tollway import _core
from tollway.testing.upstream import Fault
from tollway.tokens import CoreError


def test_a_panic_raises_core_error_an_ordinary_exception() -> None:
    with pytest.raises(CoreError, match="tollway core panicked: boom") as info:
        _core._panic("boom")
    assert isinstance(info.value, Exception)  # pyo3's PanicException is not one
    assert _core.count_tokens("hello world") == 2  # the core keeps working after it


class PanickingLimiter:
    """The gateway's rate limiter, whose first ``check`` panics inside the core."""

    def __init__(self, real: Any) -> None:
        self.check = panics_once(real.check)


def prompt_count_panics(r: Rig, mp: pytest.MonkeyPatch) -> None:
    """The policy's estimate (before dispatch): counting the prompt panics."""
    mp.setattr(tollway.pipeline.prompt, "count_prompt",
               panics_once(tollway.pipeline.prompt.count_prompt))


def rate_limit_panics(r: Rig, mp: pytest.MonkeyPatch) -> None:
    """The rate-limit guard: the Rust limiter's check panics."""
    guard = r.gateway.rate_guard
    mp.setattr(guard, "limiter", PanickingLimiter(guard.limiter))


def settle_count_panics(r: Rig, mp: pytest.MonkeyPatch) -> None:
    """Settle, after the provider answered without usage: counting the reply panics."""
    r.ups["primary"].add_fault(Fault(status=200, body={
        "id": "x", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "a reply"},
                     "finish_reason": "stop"}]}))
    mp.setattr(tollway.pipeline.usage, "count_tokens",
               panics_once(tollway.pipeline.usage.count_tokens))


@pytest.mark.parametrize("inject", [prompt_count_panics, rate_limit_panics, settle_count_panics])
def test_a_panic_in_a_call_is_an_internal_error_recorded_once_and_the_next_call_is_served(
        inject: Callable[[Rig, pytest.MonkeyPatch], None], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    with rig(("primary",)) as r, caplog.at_level(logging.ERROR, logger="tollway"):
        inject(r, monkeypatch)
        resp = r.chat()
        assert resp.status_code == 500
        assert resp.json() == {"error": {"message": "internal error", "type": "api_error",
                                         "param": None, "code": "internal_error"}}
        recs = r.recorder.wait(1)
        assert [(x.outcome, x.status, x.error_code) for x in recs] == [
            ("failed", 500, "internal_error")]
        assert any(rec.exc_info and "tollway core panicked: injected into" in str(rec.exc_info[1])
                   for rec in caplog.records)
        again = r.chat()
        assert again.status_code == 200, again.text
        recs = r.recorder.wait(2)
        assert [x.outcome for x in recs] == ["failed", "completed"]

"""A call's prompt is counted once, and a large one in a worker thread (off the event loop)."""

from __future__ import annotations

from typing import Any

import pytest

from policy_rig import CHAT, rig
from support import auth, chat_body, spy_counts
from tollway.pipeline.prompt import THREAD_MIN_BYTES
from tollway.testing.upstream import Fault
from tollway.tokens import count_chat_tokens

NO_USAGE = {  # a provider that sends no usage: settle needs the prompt's count too
    "id": "x", "object": "chat.completion", "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}]}


def words(n_bytes: int) -> str:
    return ("lorem ipsum dolor sit amet " * (n_bytes // 27 + 1))[:n_bytes]


@pytest.mark.parametrize(("size", "on_loop"), [(200, True), (THREAD_MIN_BYTES + 1000, False)])
@pytest.mark.parametrize("guards", [True, False])
def test_the_prompt_is_counted_once_and_off_the_loop_when_large(
        size: int, on_loop: bool, guards: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # With guards the policy's estimate counts it; without, only the settle does.
    extra: dict[str, Any] = {} if guards else {"guards": {"enabled": False}}
    with rig(("primary",), **extra) as r:
        counts = spy_counts(monkeypatch)
        r.ups["primary"].add_fault(Fault(status=200, body=NO_USAGE))
        content = words(size)
        resp = r.http.post(CHAT, headers=auth(), json=chat_body(content, model="auto"))
        assert resp.status_code == 200, resp.text
        rec = r.recorder.wait(1)[0]
        assert counts == [on_loop]
        messages = [{"role": "user", "content": content}]
        assert rec.prompt_tokens == count_chat_tokens(messages, "gpt-4o-mini")
        assert (rec.estimated_cost_nanousd > 0) is guards

"""Through a running gateway, with the default client, an unusual but legal upstream.

Each prompt is unique and the scripted upstream answers with it, so a caller
given another caller's reply shows. The 3 MB tests carry a pytest timeout: it
detects the hang of the old client (reading paused at 1 MiB inside a whole-body
request), it is not a speed assertion.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import pytest

from support import ListRecorder, Server, auth, chat_body, eventually, gateway_env, make_config
from tollway.app import create_app
from tollway.testing.scripted import CLOSE, Request, ScriptedUpstream, Step, chunked, ok

CHAT = "/api/ai/v1/chat/completions"
_n = itertools.count()


def completion(req: Request, pad: int = 0) -> bytes:
    prompt = json.loads(req.body)["messages"][-1]["content"]
    return json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": prompt + "x" * pad}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }).encode()


class Rig:
    def __init__(self, up: ScriptedUpstream, gateway: Server, recorder: ListRecorder) -> None:
        self.up = up
        self.gateway = gateway
        self.recorder = recorder
        self.http = httpx.Client(base_url=gateway.url, timeout=30)

    def chat(self) -> tuple[str, httpx.Response]:
        prompt = f"prompt-{next(_n)}"
        return prompt, self.http.post(CHAT, json=chat_body(prompt), headers=auth())

    def own(self) -> httpx.Response:
        prompt, r = self.chat()
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].startswith(prompt)
        assert r.json()["choices"][0]["message"]["content"].rstrip("x") == prompt
        return r


Answer = Callable[[Request], Sequence[Step]]


@pytest.fixture
def answers() -> list[Answer]:
    return []


@pytest.fixture
def retry() -> dict[str, Any]:
    return {"attempts": 1}


@pytest.fixture
def rig(answers: list[Answer], retry: dict[str, Any]) -> Iterator[Rig]:
    def play(req: Request) -> Sequence[Step]:
        return answers.pop(0)(req) if answers else [ok(completion(req))]

    recorder = ListRecorder()
    with ScriptedUpstream(play) as up:
        config = make_config(up.url("/v1"), retry={**retry, "initial_backoff_s": 0.0})
        app = create_app(config, env=gateway_env(), recorder=recorder)
        with Server(app) as gateway:
            r = Rig(up, gateway, recorder)
            yield r
            r.http.close()


def test_every_call_gets_its_own_reply_after_1xx(rig: Rig, answers: list[Answer]) -> None:
    answers += [lambda req: [b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n",
                             ok(completion(req))]] * 6
    for _ in range(8):
        rig.own()
    assert len({r.connection for r in rig.up.requests}) == 1  # one pooled connection


def test_every_call_gets_its_own_reply_after_a_408_on_an_idle_connection(
        rig: Rig, answers: list[Answer]) -> None:
    answers += [lambda req: [ok(completion(req)), 0.05,
                             b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n", CLOSE]] * 3
    for i in range(5):
        rig.own()
        # The 408 lands while the connection sits in the pool: once the upstream sent it, the
        # gateway's loop (another thread) has 0.2 s to take it in.
        assert eventually(lambda n=i + 1: rig.up.played >= n)
        time.sleep(0.2)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("framing", ["plain", "chunked"])
def test_3_mb_replies_arrive(rig: Rig, answers: list[Answer], framing: str) -> None:
    if framing == "plain":
        answers += [lambda req: [ok(completion(req, pad=3 << 20))]] * 2
    else:
        answers += [lambda req: [chunked(completion(req, pad=3 << 20), size=1 << 15)]] * 2
    sizes = [len(rig.own().content) for _ in range(3)]
    assert sizes[0] > 3 << 20 and sizes[1] > 3 << 20 and sizes[2] < 1000


@pytest.mark.parametrize("retry", [{"attempts": 1}, {"attempts": 2}])
def test_a_reused_connection_closed_after_the_write_is_the_dispatchers_decision(
        rig: Rig, answers: list[Answer], retry: dict[str, Any]) -> None:
    """The client writes the request once; whether to send it again is the dispatcher's
    call (the upstream may have run it), and the call event counts each attempt."""
    answers += [lambda req: [ok(completion(req))], lambda req: [CLOSE]]
    rig.own()
    prompt, r = rig.chat()
    records = rig.recorder.wait(2)
    rec = records[-1]
    sent = [r_ for r_ in rig.up.requests if prompt.encode() in r_.body]
    if retry["attempts"] == 1:
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_connect_failed"
        assert len(sent) == 1 and rec.attempts == 1 and rec.outcome == "failed"
    else:
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == prompt
        assert len(sent) == 2 and rec.attempts == 2 and rec.outcome == "completed"

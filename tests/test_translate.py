"""Messages -> chat -> Messages and Responses -> chat -> Responses, property-based: an
assistant turn (text, tool calls with their arguments, a stop reason, usage) turned into
the chat completion an OpenAI-compatible provider would send for it (by the request
translator), then back by the reply translator, whole and streamed (the stream split at
arbitrary points), is the same turn."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from tollway.pipeline.anthropic import InputMessage
from tollway.pipeline.responses import ChatToResponses, ResponsesRequest, response_of
from tollway.pipeline.responses import chat_messages as responses_chat_messages
from tollway.pipeline.translate import ChatToMessages, chat_messages, message_of
from tollway.pipeline.usage import Usage

_FINISH = {"end_turn": "stop", "max_tokens": "length", "tool_use": "tool_calls"}

texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
                max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8)
tool_uses = st.builds(
    lambda i, name, args: {"type": "tool_use", "id": f"toolu_{i}", "name": name,
                           "input": args},
    st.integers(0, 10**6), st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
    st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), json_values, max_size=4))


@st.composite
def turns(draw: st.DrawFn) -> dict[str, Any]:
    text = draw(texts)
    uses = draw(st.lists(tool_uses, max_size=3, unique_by=lambda u: u["id"]))
    content = ([{"type": "text", "text": text}] if text else []) + uses
    stop = "tool_use" if uses else draw(st.sampled_from(["end_turn", "max_tokens"]))
    usage = {"input_tokens": draw(st.integers(0, 10**6)),
             "output_tokens": draw(st.integers(0, 10**6))}
    return {"content": content, "stop_reason": stop, "usage": usage}


def as_chat(turn: dict[str, Any]) -> dict[str, Any]:
    """The chat message the request translator makes of the assistant turn."""
    (msg,) = chat_messages(None, [InputMessage(role="assistant", content=turn["content"])])
    return msg


def chat_completion(turn: dict[str, Any]) -> bytes:
    u = turn["usage"]
    return msgspec.json.encode({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": as_chat(turn),
                     "finish_reason": _FINISH[turn["stop_reason"]]}],
        "usage": {"prompt_tokens": u["input_tokens"], "completion_tokens": u["output_tokens"],
                  "total_tokens": u["input_tokens"] + u["output_tokens"]}})


def same_turn(message: dict[str, Any], turn: dict[str, Any]) -> None:
    assert message["content"] == turn["content"]
    assert message["stop_reason"] == turn["stop_reason"]
    assert {k: message["usage"][k] for k in turn["usage"]} == turn["usage"]


@settings(max_examples=200, deadline=None)
@given(turns())
def test_whole_reply_round_trip(turn: dict[str, Any]) -> None:
    same_turn(json.loads(message_of(chat_completion(turn), "claude")), turn)


def chat_stream(turn: dict[str, Any]) -> bytes:
    msg = as_chat(turn)
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    text = msg["content"] or ""
    deltas += [{"content": text[i:i + 3]} for i in range(0, len(text), 3)]
    for i, call in enumerate(msg.get("tool_calls", [])):
        deltas.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                       "function": {"name": call["function"]["name"],
                                                    "arguments": ""}}]})
        args = call["function"]["arguments"]
        deltas += [{"tool_calls": [{"index": i, "function": {"arguments": args[j:j + 5]}}]}
                   for j in range(0, len(args), 5)]
    chunks = [{**head, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
              for d in deltas]
    chunks.append({**head, "choices": [{"index": 0, "delta": {},
                                        "finish_reason": _FINISH[turn["stop_reason"]]}]})
    u = turn["usage"]
    chunks.append({**head, "choices": [], "usage": {
        "prompt_tokens": u["input_tokens"], "completion_tokens": u["output_tokens"],
        "total_tokens": 0}})
    return b"".join(b"data: " + msgspec.json.encode(c) + b"\n\n" for c in chunks) + \
        b"data: [DONE]\n\n"


def accumulate(stream: bytes) -> dict[str, Any]:
    """A message from Anthropic's events, as the SDKs build one."""
    message: dict[str, Any] = {}
    partial: dict[int, str] = {}
    for raw in stream.split(b"\n\n"):
        if not raw:
            continue
        name_line, data_line = raw.split(b"\n")
        ev = json.loads(data_line.removeprefix(b"data: "))
        assert name_line == b"event: " + ev["type"].encode()
        if ev["type"] == "message_start":
            message = ev["message"]
        elif ev["type"] == "content_block_start":
            assert ev["index"] == len(message["content"])
            message["content"].append(ev["content_block"])
        elif ev["type"] == "content_block_delta":
            block, delta = message["content"][ev["index"]], ev["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                partial[ev["index"]] = partial.get(ev["index"], "") + delta["partial_json"]
        elif ev["type"] == "content_block_stop":
            if ev["index"] in partial:
                message["content"][ev["index"]]["input"] = json.loads(partial[ev["index"]])
        elif ev["type"] == "message_delta":
            message["stop_reason"] = ev["delta"]["stop_reason"]
            message["usage"].update(ev["usage"])
        elif ev["type"] == "message_stop":
            message["stopped"] = True
    return message


@settings(max_examples=200, deadline=None)
@given(turns(), st.lists(st.integers(1, 4000), max_size=12))
def test_streamed_reply_round_trip_split_anywhere(turn: dict[str, Any],
                                                  cuts: list[int]) -> None:
    data = chat_stream(turn)
    tap = ChatToMessages(0, "gpt-4o-mini", "claude", 7)
    out = []
    start = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        out.append(tap.feed(data[start:cut]))
        start = cut
    assert tap.done
    usage = tap.usage
    assert isinstance(usage, Usage)
    out.append(tap.end(usage))
    message = accumulate(b"".join(out))
    assert message.pop("stopped") is True
    same_turn(message, turn)


# ---- Responses -> chat -> Responses ----------------------------------------------------
@st.composite
def response_turns(draw: st.DrawFn) -> dict[str, Any]:
    text = draw(texts)
    calls = draw(st.lists(tool_uses, max_size=3, unique_by=lambda u: u["id"]))
    output: list[dict[str, Any]] = []
    if text:
        output.append({"type": "message", "role": "assistant",
                       "content": [{"type": "output_text", "text": text}]})
    output += [{"type": "function_call", "call_id": c["id"], "name": c["name"],
                "arguments": msgspec.json.encode(c["input"]).decode()} for c in calls]
    finish = "tool_calls" if calls else draw(st.sampled_from(["stop", "length"]))
    usage = (draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6)))
    return {"output": output, "finish": finish, "usage": usage}


def responses_as_chat(turn: dict[str, Any]) -> dict[str, Any]:
    """The chat message the request translator makes of the turn's output items (as the
    input of a next call would hold them)."""
    req = ResponsesRequest(model="m", input=[
        {**item, "role": "assistant"} if item["type"] == "message" else item
        for item in turn["output"]] or [{"role": "assistant", "content": ""}])
    msgs = responses_chat_messages(req)
    merged: dict[str, Any] = {"role": "assistant", "content": None}
    for m in msgs:
        if m.get("content"):
            merged["content"] = m["content"]
        if m.get("tool_calls"):
            merged["tool_calls"] = m["tool_calls"]
    return merged


def responses_completion(turn: dict[str, Any]) -> bytes:
    p, c = turn["usage"]
    return msgspec.json.encode({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": responses_as_chat(turn),
                     "finish_reason": turn["finish"]}],
        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})


def same_response(resp: dict[str, Any], turn: dict[str, Any]) -> None:
    got = []
    for item in resp["output"]:
        assert item["status"] == "completed"
        if item["type"] == "message":
            got.append({"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": item["content"][0]["text"]}]})
        else:
            got.append({k: item[k] for k in ("type", "call_id", "name", "arguments")})
    assert got == turn["output"]
    assert resp["status"] == ("incomplete" if turn["finish"] == "length" else "completed")
    usage = resp["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == turn["usage"]


@settings(max_examples=200, deadline=None)
@given(response_turns())
def test_responses_whole_reply_round_trip(turn: dict[str, Any]) -> None:
    req = ResponsesRequest(model="m", input="hi")
    same_response(json.loads(response_of(req, responses_completion(turn))), turn)


@settings(max_examples=200, deadline=None)
@given(response_turns(), st.lists(st.integers(1, 4000), max_size=12))
def test_responses_streamed_round_trip_split_anywhere(turn: dict[str, Any],
                                                      cuts: list[int]) -> None:
    p, c = turn["usage"]
    data = chat_stream_of(responses_as_chat(turn), turn["finish"], p, c)
    tap = ChatToResponses(ResponsesRequest(model="m", input="hi"), 0, "gpt-4o-mini")
    out = []
    start = 0
    for cut in [*sorted({x % (len(data) + 1) for x in cuts}), len(data)]:
        out.append(tap.feed(data[start:cut]))
        start = cut
    assert tap.done and tap.usage is not None
    out.append(tap.end(tap.usage))
    events = [json.loads(raw.split(b"\ndata: ", 1)[1])
              for raw in b"".join(out).split(b"\n\n") if raw]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    final = events[-1]
    assert final["type"] in ("response.completed", "response.incomplete")
    same_response(final["response"], turn)
    # The deltas add up to what the final response holds.
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "".join(i["content"][0]["text"] for i in final["response"]["output"]
                           if i["type"] == "message")


def chat_stream_of(msg: dict[str, Any], finish: str, p: int, c: int) -> bytes:
    turn = {"content": [], "stop_reason": {"stop": "end_turn", "length": "max_tokens",
                                           "tool_calls": "tool_use"}[finish],
            "usage": {"input_tokens": p, "output_tokens": c}}
    if msg.get("content"):
        turn["content"].append({"type": "text", "text": msg["content"]})
    for call in msg.get("tool_calls", []):
        turn["content"].append({"type": "tool_use", "id": call["id"],
                                "name": call["function"]["name"],
                                "input": json.loads(call["function"]["arguments"])})
    return chat_stream(turn)

"""OpenAI's Responses API (``POST /v1/responses``): passed through to providers that
serve it (``responses = true``; OpenAI's built-in provider), translated to chat
completions for the other OpenAI-compatible ones, plain and streamed (its typed
events, ``response.created`` to ``response.completed`` / ``response.incomplete``).

What crosses: ``instructions``, ``input`` as text or items (messages with
``input_text`` / ``output_text`` / ``input_image`` parts, ``function_call`` and
``function_call_output``), function tools and ``tool_choice``, ``text.format``
(json_schema, json_object: chat's ``response_format``),
``max_output_tokens``, ``temperature``, ``top_p``, ``parallel_tool_calls``, ``user``;
back: output text, function calls with their arguments, ``status`` (``incomplete``
with ``max_output_tokens`` when the output was cut) and usage. tollway keeps no
response state of its own: ``previous_response_id`` and ``store: true`` go only to
providers that keep it (pass-through), and are a 400 when the model has none; built-in
tools (web search, file search, computer use) are not translated.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from tollway.errors import InvalidRequest
from tollway.pipeline.decode import Count, ModelName, _decode, rewrite
from tollway.pipeline.stream import NO_FUNCTION, SseTap, _Chunk
from tollway.pipeline.surface import CallState, Counted, Surface, Wire
from tollway.pipeline.taps import EventTap
from tollway.pipeline.translate import (
    ChatFunction,
    ChatInside,
    ChatMessage,
    chat_reply,
)
from tollway.pipeline.usage import CachedUsage, Usage
from tollway.tokens import count_chat_tokens

if TYPE_CHECKING:
    from tollway.pipeline.plan import Deployment
    from tollway.pipeline.taps import Tap

__all__ = ["RESPONSES", "RESPONSES_SURFACE", "ResponsesRequest"]

RESPONSES = "responses"
_encode = msgspec.json.encode


class ResponsesRequest(msgspec.Struct):
    model: ModelName
    input: str | Annotated[list[dict[str, Any]], Meta(min_length=1)]
    instructions: str | None = None
    stream: bool | None = None
    max_output_tokens: Count | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    user: str | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    text: dict[str, Any] | None = None  # {"format": ...}: structured output

    @property
    def max_tokens(self) -> int | None:  # the output bound, as the policy reads it
        return self.max_output_tokens

    def count_prompt(self, upstream: str) -> int:
        return int(count_chat_tokens(chat_messages(self), upstream, chat_tools(self.tools)))


_request = msgspec.json.Decoder(ResponsesRequest)


def decode_responses(body: bytes) -> ResponsesRequest:
    return _decode(_request, body)


def _stateful(req: ResponsesRequest) -> InvalidRequest | None:
    """Why ``req`` needs a provider that keeps response state; None when it does not."""
    if req.previous_response_id is not None:
        return InvalidRequest(
            f"previous_response_id needs a provider that keeps response state, and "
            f"`{req.model}` has none (tollway keeps none): send the whole conversation as "
            "`input`", param="previous_response_id", code="unsupported_parameter")
    if req.store:
        return InvalidRequest(
            f"store: true needs a provider that keeps response state, and `{req.model}` "
            "has none (tollway keeps none): send store: false", param="store",
            code="unsupported_parameter")
    return None


# ---- request: Responses -> chat completions -------------------------------------------
def _part(p: dict[str, Any]) -> dict[str, Any] | None:
    kind = p.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": str(p.get("text", ""))}
    if kind == "input_image" and isinstance(p.get("image_url"), str):
        return {"type": "image_url", "image_url": {"url": p["image_url"]}}
    return None


def chat_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.instructions:
        out.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        out.append({"role": "user", "content": req.input})
        return out
    for item in req.input:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role", "user")
            role = "system" if role == "developer" else role
            content = item.get("content")
            if isinstance(content, str):
                out.append({"role": role, "content": content})
                continue
            parts = [q for p in content or () if isinstance(p, dict) and (q := _part(p))]
            text_only = all(p["type"] == "text" for p in parts)
            out.append({"role": role, "content": "".join(p["text"] for p in parts)
                        if text_only else parts})
        elif kind == "function_call":
            call = {"id": item.get("call_id", ""), "type": "function",
                    "function": {"name": item.get("name", ""),
                                 "arguments": item.get("arguments", "")}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            out.append({"role": "tool", "tool_call_id": item.get("call_id", ""),
                        "content": output if isinstance(output, str) else _encode(
                            output).decode()})
    return out


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    out = [{"type": "function", "function": {
        "name": t.get("name", ""), "description": t.get("description") or "",
        "parameters": t.get("parameters") or {"type": "object"},
        **({"strict": t["strict"]} if isinstance(t.get("strict"), bool) else {})}}
        for t in tools or () if t.get("type") == "function"]
    return out or None


def _tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name", "")}}
    return choice if choice in ("auto", "required", "none") else None


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` (json_schema, json_object) as chat's ``response_format``."""
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    return None


def chat_request(req: ResponsesRequest, model: str, max_tokens: int, field: str,
                 stream: bool) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": chat_messages(req)}
    if max_tokens:
        body[field] = max_tokens
    tools = chat_tools(req.tools)
    if tools:
        body["tools"] = tools
        choice = _tool_choice(req.tool_choice)
        if choice is not None:
            body["tool_choice"] = choice
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    response_format = _response_format(req.text)
    if response_format is not None:
        body["response_format"] = response_format
    for name in ("temperature", "top_p", "user"):
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return _encode(body)


# ---- reply: chat completions -> Responses ---------------------------------------------
_ids = itertools.count(1)


def _usage(u: Usage | None) -> dict[str, Any]:
    u = u or Usage()
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _text_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [],
                         "logprobs": []}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str,
               status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id,
            "name": name, "arguments": arguments}


def _echo(req: ResponsesRequest) -> bytes:
    """The response object's members that echo the request, encoded (no braces): the
    same in every snapshot of one call, so encoded once."""
    return _encode({
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "model": req.model, "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": None, "store": False,
        "temperature": req.temperature, "top_p": req.top_p,
        "tool_choice": req.tool_choice or "auto", "tools": _echoed(req.tools),
        "text": req.text or {"format": {"type": "text"}}, "truncation": "disabled",
        "metadata": req.metadata or {},
        **({"user": req.user} if req.user is not None else {})})[1:-1]


def _response(echo: bytes, rid: str, created: int, output: bytes, status: str,
              usage: Usage | None) -> bytes:
    """A response object, encoded: ``echo`` from :func:`_echo`, ``output`` the encoded
    list of output items, ``status`` completed, incomplete or in_progress."""
    return (b'{"id":%b,"object":"response","created_at":%d,"status":"%b","error":null,'
            b'"incomplete_details":%b,"output":%b,%b%b}' % (
                _encode(rid), created, status.encode(),
                b'{"reason":"max_output_tokens"}' if status == "incomplete" else b"null",
                output, echo,
                b"" if usage is None else b',"usage":' + _encode(_usage(usage))))


def _echoed(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The tools as the response echoes them: a function's ``strict`` is what was asked
    (False when not: tollway did not ask the provider to enforce the schema)."""
    return [{**t, "strict": t.get("strict") is True} if t.get("type") == "function" else t
            for t in tools or ()]


def response_of(req: ResponsesRequest, body: bytes) -> bytes:
    done = chat_reply.decode(body)
    rid = "resp_" + (done.id or f"tollway{next(_ids)}")
    output: list[dict[str, Any]] = []
    finish = None
    if done.choices:
        choice = done.choices[0]
        finish = choice.finish_reason
        msg = choice.message or ChatMessage()
        if msg.content:
            output.append(_text_item(f"msg_{rid[5:]}", msg.content))
        for i, call in enumerate(msg.tool_calls or ()):
            fn = call.function or ChatFunction()
            call_id = call.id or f"call_{i}"
            output.append(_call_item(f"fc_{call_id}", call_id, fn.name or "",
                                     fn.arguments or ""))
    return _response(_echo(req), rid, int(time.time()), _encode(output),
                     "incomplete" if finish == "length" else "completed", done.usage or Usage())


class ChatToResponses(ChatInside):
    """A chat completions stream as the Responses API's typed events (see
    :class:`tollway.pipeline.translate.ChatToMessages`, its Messages twin).

    The events of a message item (its opening, its text deltas and its closing), and the
    response object, are written from bytes: the request's echo and each text are
    encoded once, however many events carry them."""

    def __init__(self, req: ResponsesRequest, limit: int, upstream: str) -> None:
        self.inner = SseTap(True, limit, upstream, sink=self)
        self.req = req
        self.seq = 0
        self.rid = ""
        self.created = int(time.time())
        self.items: list[bytes] = []  # the output items closed so far, encoded
        # The item being streamed: a function call's fields, or {"type": "message"}.
        self.open: dict[str, Any] | None = None
        self.calls: dict[int, int] = {}  # chat tool call index -> output index
        self.finish: str | None = None
        self.texts: list[str] = []  # the open message's text, joined when it closes
        self._echo = b""  # the response object's members that echo the request
        self._item_id = b""  # the open message's id, encoded
        self._delta_at = b""  # a text delta event from its item id on (see feed)

    def _event(self, name: str, data: dict[str, Any]) -> bytes:
        self.seq += 1
        return b"event: %b\ndata: %b\n\n" % (name.encode(), _encode(
            {"type": name, "sequence_number": self.seq - 1, **data}))

    def _snapshot(self, status: str, usage: Usage | None = None) -> bytes:
        return _response(self._echo, self.rid, self.created, b"[%b]" % b",".join(self.items),
                         status, usage)

    def template(self) -> tuple[bytes, bytes, bytes, int] | None:
        if self.open is None or self.open["type"] != "message":
            return None
        return (b'event: response.output_text.delta\ndata: {"type":'
                b'"response.output_text.delta","sequence_number":',
                b"," + self._delta_at + b'"content_index":0,"delta":',
                b',"logprobs":[]}\n\n', self.seq)

    def took(self, events: bytes, text: str, finish: str | None, count: int) -> None:
        self._out.append(events)
        self.seq += count
        if text:
            self.texts.append(text)
        if finish:
            self.finish = finish

    def chunk(self, payload: bytes, chunk: _Chunk) -> None:
        out = self._out
        if not self.rid:
            out.append(self._start(chunk.id))
        if chunk.error is not None and not chunk.choices:
            out.append(self._event("error", {"code": "upstream_error", "message":
                                             "provider sent an error mid-stream",
                                             "param": None}))
            return
        for choice in chunk.choices or ():
            if choice.finish_reason:
                self.finish = choice.finish_reason
            delta = choice.delta
            if delta is None:
                continue
            if delta.content:
                if self.open is None or self.open["type"] != "message":
                    out.append(self._open_message())
                self.texts.append(delta.content)
                # The commonest event of all, written from bytes: _event would build
                # and encode two dicts for it.
                self.seq += 1
                out.append(b'event: response.output_text.delta\ndata: {"type":'
                           b'"response.output_text.delta","sequence_number":%d,%b'
                           b'"content_index":0,"delta":%b,"logprobs":[]}\n\n' % (
                               self.seq - 1, self._delta_at, _encode(delta.content)))
            for call in delta.tool_calls or ():
                fn = call.function or NO_FUNCTION
                if call.index not in self.calls:
                    call_id = call.id or f"call_{call.index}"
                    out.append(self._open(_call_item(f"fc_{call_id}", call_id,
                                                     fn.name or "", "", "in_progress")))
                    self.calls[call.index] = len(self.items)
                if fn.arguments and self.open is not None and \
                        self.calls[call.index] == len(self.items):
                    self.open["arguments"] += fn.arguments
                    out.append(self._event("response.function_call_arguments.delta", {
                        "item_id": self.open["id"], "output_index": len(self.items),
                        "delta": fn.arguments}))

    def _start(self, chunk_id: str) -> bytes:
        self.rid = "resp_" + (chunk_id or f"tollway{next(_ids)}")
        self._echo = _echo(self.req)
        # The same snapshot in both events, encoded once.
        response = self._snapshot("in_progress")
        self.seq += 2
        return (b'event: response.created\ndata: {"type":"response.created",'
                b'"sequence_number":%d,"response":%b}\n\n'
                b'event: response.in_progress\ndata: {"type":"response.in_progress",'
                b'"sequence_number":%d,"response":%b}\n\n'
                % (self.seq - 2, response, self.seq - 1, response))

    def _open_message(self) -> bytes:
        out = self._close()
        index = len(self.items)
        self.open = {"type": "message"}
        item_id = self._item_id = _encode(f"msg_{self.rid[5:]}_{index}")
        self._delta_at = b'"item_id":%b,"output_index":%d,' % (item_id, index)
        self.seq += 2
        return out + (
            b'event: response.output_item.added\ndata: {"type":"response.output_item.added",'
            b'"sequence_number":%d,"output_index":%d,"item":{"id":%b,"type":"message",'
            b'"role":"assistant","status":"in_progress","content":[]}}\n\n'
            b'event: response.content_part.added\ndata: {"type":"response.content_part.added",'
            b'"sequence_number":%d,%b"content_index":0,"part":{"type":"output_text",'
            b'"text":"","annotations":[],"logprobs":[]}}\n\n'
            % (self.seq - 2, index, item_id, self.seq - 1, self._delta_at))

    def _open(self, item: dict[str, Any]) -> bytes:
        """A function call item opened."""
        out = self._close()
        self.open = item
        return out + self._event("response.output_item.added", {
            "output_index": len(self.items), "item": item})

    def _close(self) -> bytes:
        item, self.open = self.open, None
        if item is None:
            return b""
        index = len(self.items)
        if item["type"] == "message":
            text = _encode("".join(self.texts))
            self.texts = []
            part = b'{"type":"output_text","text":%b,"annotations":[],"logprobs":[]}' % text
            encoded = (b'{"id":%b,"type":"message","role":"assistant","status":"completed",'
                       b'"content":[%b]}' % (self._item_id, part))
            self.seq += 3
            out = (b'event: response.output_text.done\ndata: {"type":'
                   b'"response.output_text.done","sequence_number":%d,%b"content_index":0,'
                   b'"text":%b,"logprobs":[]}\n\n'
                   b'event: response.content_part.done\ndata: {"type":'
                   b'"response.content_part.done","sequence_number":%d,%b"content_index":0,'
                   b'"part":%b}\n\n'
                   % (self.seq - 3, self._delta_at, text, self.seq - 2, self._delta_at, part))
        else:
            item["status"] = "completed"
            encoded = _encode(item)
            out = self._event("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": index, "name": item["name"],
                "arguments": item["arguments"]})
            self.seq += 1
        self.items.append(encoded)
        return out + (b'event: response.output_item.done\ndata: {"type":'
                      b'"response.output_item.done","sequence_number":%d,"output_index":%d,'
                      b'"item":%b}\n\n' % (self.seq - 1, index, encoded))

    def end(self, usage: Usage, cut: bool = False) -> bytes:
        out = b"" if self.rid else self._start("")
        out += self._close()
        if cut:
            self.finish = "length"
        status = b"incomplete" if self.finish == "length" else b"completed"
        self.seq += 1
        return out + (b'event: response.%b\ndata: {"type":"response.%b","sequence_number":%d,'
                      b'"response":%b}\n\n' % (status, status, self.seq - 1,
                                                 self._snapshot(status.decode(), usage)))


class _Translated(Wire):
    path = "chat"

    def body(self, call: CallState, dep: Deployment, bound: int) -> bytes:
        req = call.request
        asked = req.max_output_tokens or 0
        out = min(asked, bound) if bound and asked else (bound or asked)
        return chat_request(req, dep.upstream, out, dep.max_tokens_field, call.stream)

    def reply(self, call: CallState, body: bytes) -> bytes:
        return response_of(call.request, body)

    def tap(self, call: CallState, limit: int, upstream: str) -> Tap:
        return ChatToResponses(call.request, limit, upstream)

    def end(self, call: CallState, tap: Tap, counted: Counted) -> bytes:
        assert isinstance(tap, ChatToResponses)
        return tap.end(tap.usage or counted())

    def cut(self, call: CallState, tap: Tap, counted: Counted) -> bytes:
        assert isinstance(tap, ChatToResponses)
        return tap.end(counted(), cut=True)

    def error_event(self, message: str, type_: str, code: str | None) -> bytes:
        return b"event: error\ndata: %b\n\n" % _encode({
            "type": "error", "code": code, "message": message, "param": None,
            "sequence_number": 0})


# ---- pass-through: a provider that serves the Responses API ---------------------------
class _Details(msgspec.Struct):
    cached_tokens: int | None = None


class _RUsage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    input_tokens_details: _Details | None = None


class _Item(msgspec.Struct):
    type: str = ""
    name: str | None = None
    arguments: str | None = None
    content: list[dict[str, Any]] | None = None


class _Response(msgspec.Struct):
    id: str = ""
    usage: _RUsage | None = None
    output: list[_Item] = []


class _Event(msgspec.Struct):
    type: str = ""
    delta: str | None = None
    item: _Item | None = None
    response: _Response | None = None
    sequence_number: int | None = None


_passed = msgspec.json.Decoder(_Response)
_event = msgspec.json.Decoder(_Event)
_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _usage_of(u: _RUsage) -> CachedUsage:
    cached = (u.input_tokens_details.cached_tokens or 0) if u.input_tokens_details else 0
    return CachedUsage(prompt_tokens=u.input_tokens, completion_tokens=u.output_tokens,
                       total_tokens=u.input_tokens + u.output_tokens,
                       cache_read_tokens=min(cached, u.input_tokens))


def _item_text(item: _Item) -> list[str]:
    if item.type == "function_call":
        return [item.name or "", item.arguments or ""]
    return [str(p.get("text", "")) for p in item.content or () if isinstance(p, dict)]


class ResponsesTap(EventTap):
    """The Responses API's own events: text and argument deltas counted, a function
    call's name; the usage and the end from response.completed / .incomplete / .failed."""

    __slots__ = ("rid", "seq")

    def __init__(self, limit: int = 0, upstream: str = "") -> None:
        super().__init__(limit, upstream)
        self.rid = ""
        self.seq = -1

    def read(self, name: bytes, payload: bytes) -> bytes | None:
        if not payload:
            return None
        try:
            ev = _event.decode(payload)
        except msgspec.MsgspecError:
            return None
        if ev.sequence_number is not None:
            self.seq = ev.sequence_number
        kind = ev.type
        if kind in ("response.output_text.delta", "response.function_call_arguments.delta"):
            if ev.delta:
                self.parts.append(ev.delta)
        elif kind == "response.output_item.added" and ev.item is not None and ev.item.name:
            self.parts.append(ev.item.name)
        elif kind == "response.created" and ev.response is not None:
            self.rid = ev.response.id
        elif kind in _ENDS:
            self.done = True
            if ev.response is not None and ev.response.usage is not None:
                self.usage = _usage_of(ev.response.usage)
        elif kind == "error":
            self.error = True
        return None


class _PassThrough(_Translated):
    path = "responses"

    def body(self, call: CallState, dep: Deployment, bound: int) -> bytes:
        req = call.request
        model = dep.upstream if dep.upstream != req.model else None
        asked = req.max_output_tokens
        if model is None and not bound:
            return call.body
        numbers = {"max_output_tokens": min(asked, bound) if asked else bound} if bound else {}
        return rewrite(call.body, model=model, include_usage=False, numbers=numbers)

    def usage(self, body: bytes) -> Usage | None:
        done = _passed.decode(body)
        return _usage_of(done.usage) if done.usage is not None else None

    def text(self, body: bytes) -> str:
        try:
            done = _passed.decode(body)
        except msgspec.MsgspecError:
            return ""
        return "".join(t for item in done.output for t in _item_text(item))

    def reply(self, call: CallState, body: bytes) -> bytes:
        return body

    def tap(self, call: CallState, limit: int, upstream: str) -> Tap:
        return ResponsesTap(limit, upstream)

    def end(self, call: CallState, tap: Tap, counted: Counted) -> bytes:
        return b""  # the provider's response.completed went out with the rest

    def cut(self, call: CallState, tap: Tap, counted: Counted) -> bytes:
        assert isinstance(tap, ResponsesTap)
        response = _response(_echo(call.request), tap.rid, int(time.time()), b"[]",
                             "incomplete", counted())
        return (b'event: response.incomplete\ndata: {"type":"response.incomplete",'
                b'"sequence_number":%d,"response":%b}\n\n' % (tap.seq + 1, response))


class _ResponsesSurface(Surface):
    def wire(self, kind: str, responses: bool = False) -> Wire | None:
        if kind != "openai":
            return None
        return _PASS_THROUGH if responses else _TRANSLATED

    def serves(self, call: CallState, dep: Deployment) -> InvalidRequest | None:
        refusal = super().serves(call, dep)
        if refusal is None and not dep.responses:
            return _stateful(call.request)
        return refusal

    def shadow_body(self, call: CallState) -> bytes | None:
        req = call.request
        if _stateful(req) is not None:
            return None  # a conversation kept by the provider: the candidate lacks it
        return chat_request(req, req.model, req.max_output_tokens or 0, "max_tokens", False)


_TRANSLATED = _Translated()
_PASS_THROUGH = _PassThrough()
RESPONSES_SURFACE = _ResponsesSurface(RESPONSES, decode_responses, {"openai": _TRANSLATED})

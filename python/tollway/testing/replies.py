"""The OpenAI side of the simulated upstream: deterministic replies, independent of HTTP.

``Replies.route`` turns (method, path, decoded JSON body) into either a whole
JSON reply or the list of SSE events of a stream; the server in
``tollway.testing.upstream`` decides when and how the bytes go out (latency,
chunk delays, faults). Content is an echo of the last user message (or a fixed
number of filler words), usage is counted with ``tollway.count_tokens`` so the
gateway's own counts can be compared with it.
"""

from __future__ import annotations

import array
import base64
import functools
import hashlib
import itertools
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import msgspec

__all__ = [
    "DEFAULT_MODELS",
    "Full",
    "Replies",
    "Stream",
    "count_tokens",
    "default_error_code",
    "error",
]

DEFAULT_MODELS: tuple[str, ...] = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
)
# What a reply says when `reply_words` asks for a fixed length instead of an echo.
# OpenAI's reasoning models: they refuse max_tokens and take max_completion_tokens.
REASONING_MODELS = re.compile(r"^(o\d|gpt-5)")
_FILLER = "the quick brown fox jumps over the lazy dog".split()  # noqa: SIM905
# Characters of tool-call arguments per stream event: OpenAI sends them in small deltas too.
_ARGUMENT_PIECE = 8


def _whitespace_count(text: str) -> int:
    return len(text.split())


def _load_counter() -> Callable[[str], int]:
    # count_tokens lives in the Rust core; the upstream must keep working without it
    # (e.g. before the extension is built), so a whitespace count stands in.
    try:
        import tollway
    except ImportError:
        return _whitespace_count
    fn = getattr(tollway, "count_tokens", None)
    if not callable(fn):
        return _whitespace_count
    counter: Callable[[str], int] = fn
    return counter


# Benchmarks send the same prompts again and again; counting is deterministic, so cache it.
count_tokens: Callable[[str], int] = functools.lru_cache(maxsize=4096)(_load_counter())


class Full:
    """A whole reply: status, body bytes, content type and extra headers."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


class Stream:
    """A 200 SSE reply, as its complete events; the server frames and paces them."""

    __slots__ = ("events",)

    def __init__(self, events: list[bytes]) -> None:
        self.events = events  # complete SSE events, "data: ...\n\n"


_encode = msgspec.json.encode


def error(
    status: int,
    message: str,
    *,
    type_: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Full:
    if type_ is None:
        type_ = _default_error_type(status)
    envelope = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Full(status, _encode(envelope), headers=headers)


def _default_error_type(status: int) -> str:
    if status == 429:
        return "requests"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def default_error_code(status: int) -> str | None:
    return {401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded"}.get(status)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p.get("text", "")
            for p in content
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return b"event: %b\ndata: %b\n\n" % (name.encode(), _encode({"type": name, **data}))


def _anthropic_error(status: int, type_: str, message: str) -> Full:
    return Full(status, _encode({"type": "error", "error": {"type": type_, "message": message}}))


def _placeholder(schema: Any, prompt: str) -> Any:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind == "string":
        enum = schema.get("enum")
        return enum[0] if isinstance(enum, list) and enum else prompt
    if kind in ("number", "integer"):
        return 1
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        required = schema.get("required")
        names = required if isinstance(required, list) else list(props)
        return {n: _placeholder(props.get(n), prompt) for n in names if isinstance(n, str)}
    return None


def _tool_to_call(tools: list[Any], tool_choice: Any) -> tuple[str, dict[str, Any]] | None:
    functions = [
        t["function"]
        for t in tools
        if isinstance(t, dict)
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]
    if not functions:
        return None
    if isinstance(tool_choice, dict):
        forced = (tool_choice.get("function") or {}).get("name")
        for fn in functions:
            if fn["name"] == forced:
                return fn["name"], fn
    first: dict[str, Any] = functions[0]
    return first["name"], first


@functools.lru_cache(maxsize=2048)
def _vector(key: str, dims: int) -> tuple[float, ...]:
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    rng = random.Random(seed)
    raw = [rng.uniform(-1.0, 1.0) for _ in range(dims)]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    # Round-trip through float32 as the real API's vectors are float32 values.
    return tuple(array.array("f", (x / norm for x in raw)))


class Replies:
    """Builds OpenAI-shaped replies; ``reply_words`` and ``models`` may be changed at any time."""

    def __init__(
        self, name: str, models: Sequence[str] = DEFAULT_MODELS, reply_words: int | None = None
    ) -> None:
        self.name = name
        self.models = list(models)
        self.reply_words = reply_words  # None: echo the last user message
        # Real providers stop at max_tokens; a test may make this one ignore it.
        self.honour_max_tokens = True
        # When set, chat replies refuse with this text (``refusal`` instead of ``content``).
        self.refusal: str | None = None
        # Per model, the most output tokens a request may ask for (OpenAI's 400 past it).
        self.output_limits: dict[str, int] = {}
        self._ids = itertools.count(1)
        self.prompt_cache: set[str] = set()  # texts marked cache_control seen so far
        self.stored: set[str] = set()  # ids of the responses kept (store not false)
        # Tool-call arguments to send, one per tool call, instead of the placeholder built
        # from the tool's schema (to test what checks them): taken from the front.
        self.tool_arguments: list[str] = []
        # Simulated quality (benchmarks/routing.py): model -> task -> the share of prompts
        # it answers as the reference does (the echo); the others get a wrong answer. The
        # task is a system message "task: <name>" (none: "chat"); which prompts a model
        # gets wrong is fixed by a hash of model and prompt, so asking again answers the
        # same. A model or task not listed answers every prompt right.
        self.quality: dict[str, dict[str, float]] = {}

    def route(self, method: str, path: str, body: Any) -> Full | Stream:
        """The reply to one request that passed auth and faults."""
        path = path.rstrip("/")
        if path == "/v1/chat/completions":
            return self._chat(body) if method == "POST" else self._not_allowed(method, path)
        if path == "/v1/responses":
            return self._responses(body) if method == "POST" else self._not_allowed(method, path)
        if path == "/v1/messages":
            return self._messages(body) if method == "POST" else self._not_allowed(method, path)
        if path == "/v1/completions":
            return self._legacy(body) if method == "POST" else self._not_allowed(method, path)
        if path == "/v1/embeddings":
            return self._embeddings(body) if method == "POST" else self._not_allowed(method, path)
        if path == "/v1/rerank":
            return self._rerank(body) if method == "POST" else self._not_allowed(method, path)
        if path == "/v1/models":
            return self._model_list() if method == "GET" else self._not_allowed(method, path)
        if path.startswith("/v1/models/") and method == "GET":
            model_id = path[len("/v1/models/") :]
            if model_id in self.models:
                return Full(200, _encode(self._model_obj(model_id)))
            return error(404, f"The model '{model_id}' does not exist", code="model_not_found")
        return error(404, f"Invalid URL ({method} {path})")

    def _not_allowed(self, method: str, path: str) -> Full:
        return error(405, f"Method {method} not allowed on {path}")

    def _model_obj(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 1700000000, "owned_by": self.name}

    def _model_list(self) -> Full:
        return Full(
            200, _encode({"object": "list", "data": [self._model_obj(m) for m in self.models]})
        )

    # ---- chat
    def _chat(self, body: Any) -> Full | Stream:
        if not isinstance(body, dict):
            return error(400, "We could not parse the JSON body of your request.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return error(
                400,
                "'messages' is a required property and must be a non-empty array",
                param="messages",
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return error(400, "you must provide a model parameter", param="model")
        refused = self._refuse_bound(model, body)
        if refused is not None:
            return refused
        prompt = ""
        prompt_tokens = 3  # OpenAI's reply priming
        for m in messages:
            if not isinstance(m, dict):
                return error(400, "each message must be an object", param="messages")
            text = _text_of(m.get("content"))
            prompt_tokens += 3 + count_tokens(text)
            if m.get("role") == "user":
                prompt = text
        tools = body.get("tools")
        call = None
        if isinstance(tools, list) and tools and body.get("tool_choice") != "none":
            prompt_tokens += count_tokens(_encode(tools).decode())
            call = _tool_to_call(tools, body.get("tool_choice"))
        cid = f"chatcmpl-{next(self._ids):012x}"
        created = int(time.time())
        stream = body.get("stream") is True
        options = body.get("stream_options")
        include_usage = (
            stream and isinstance(options, dict) and options.get("include_usage") is True
        )
        if call is not None:
            name, fn = call
            args = self.tool_arguments.pop(0) if self.tool_arguments else _encode(
                _placeholder(fn.get("parameters") or {"type": "object"}, prompt)
            ).decode()
            completion_tokens = count_tokens(name) + count_tokens(args)
            usage = self._usage(prompt_tokens, completion_tokens)
            call_id = (
                "call_" + hashlib.blake2b(f"{name}|{prompt}".encode(), digest_size=12).hexdigest()
            )
            if stream:
                return self._tool_stream(
                    cid, created, model, call_id, name, args, usage if include_usage else None
                )
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": args},
                    }
                ],
            }
            return Full(
                200, _encode(self._completion(cid, created, model, message, "tool_calls", usage))
            )
        words, finish = self._reply_words(prompt, body)
        if self.quality:
            words = self._simulated(model, messages, prompt, words)
        field = "content"
        if self.refusal is not None:
            words, finish, field = self.refusal.split(), "stop", "refusal"
        text = " ".join(words)
        fmt = body.get("response_format")
        if field == "content" and isinstance(fmt, dict) and fmt.get("type") in (
                "json_object", "json_schema"):
            text = _encode({"echo": text}).decode()
            words = [text]
        # n choices, each the same answer (OpenAI's n > 1: one chunk per choice and step).
        n = body.get("n")
        n = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1
        usage = self._usage(prompt_tokens, n * count_tokens(text))
        if stream:
            return self._text_stream(
                cid, created, model, words, finish, usage if include_usage else None, field, n
            )
        message = {"role": "assistant", "content": text, "refusal": None}
        if field == "refusal":
            message = {"role": "assistant", "content": None, "refusal": text}
        done = self._completion(cid, created, model, message, finish, usage)
        done["choices"] = [{**done["choices"][0], "index": i} for i in range(n)]
        return Full(200, _encode(done))

    def _refuse_bound(self, model: str, body: dict[str, Any]) -> Full | None:
        """OpenAI's 400s for an output bound the model does not take: max_tokens to a
        reasoning model, or more than the model can output."""
        if body.get("max_tokens") is not None and REASONING_MODELS.match(model):
            return error(400, "Unsupported parameter: 'max_tokens' is not supported with "
                         "this model. Use 'max_completion_tokens' instead.",
                         type_="invalid_request_error", param="max_tokens",
                         code="unsupported_parameter")
        limit = self.output_limits.get(model)
        for field in ("max_tokens", "max_completion_tokens"):
            asked = body.get(field)
            if limit is not None and isinstance(asked, int) and asked > limit:
                return error(400, f"{field} is too large: {asked}. This model supports at "
                             f"most {limit} completion tokens, whereas you provided "
                             f"{asked}.", param=field, code="invalid_value")
        return None

    def _reply_words(self, prompt: str, body: dict[str, Any]) -> tuple[list[str], str]:
        if self.reply_words is not None:
            words = [_FILLER[i % len(_FILLER)] for i in range(self.reply_words)]
        else:
            words = prompt.split() or ["ok"]
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if self.honour_max_tokens and isinstance(limit, int) and 0 < limit < len(words):
            return words[:limit], "length"
        return words, "stop"

    def _simulated(self, model: str, messages: list[Any], prompt: str,
                   words: list[str]) -> list[str]:
        """The reference answer, or (for the share the model's quality leaves) a wrong
        one: another label for a short answer, half the words changed for a long one."""
        by_task = self.quality.get(model)
        if not by_task:
            return words
        task = "chat"
        for m in messages:
            text = _text_of(m.get("content")) if isinstance(m, dict) else ""
            if isinstance(m, dict) and m.get("role") == "system" and text.startswith("task:"):
                task = text[5:].strip()
        q = by_task.get(task, 1.0)
        digest = hashlib.blake2b(f"{model}|{prompt}".encode(), digest_size=8).digest()
        if int.from_bytes(digest, "big") / 2**64 < q:
            return words
        if len(words) <= 8:
            return [f"wrong-{digest.hex()[:6]}"]
        return [w if i % 2 else _FILLER[i % len(_FILLER)] for i, w in enumerate(words)]

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    @staticmethod
    def _completion(
        cid: str,
        created: int,
        model: str,
        message: dict[str, Any],
        finish: str,
        usage: dict[str, int],
    ) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_tollway",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "usage": usage,
        }

    @staticmethod
    def _events(
        cid: str,
        created: int,
        model: str,
        deltas: Iterable[tuple[dict[str, Any], str | None]],
        usage: dict[str, int] | None,
        choices: int = 1,
    ) -> Stream:
        base = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_tollway",
        }
        # The chunks differ only in their delta and finish_reason: encode the frame once
        # and splice (the zero-latency upstream must stream far faster than the gateway).
        head = b"data: " + _encode(base)[:-1] + b',"choices":[{"index":'
        tail = b',"usage":null}\n\n' if usage is not None else b"}\n\n"
        events = [
            b'%b%d,"delta":%b,"logprobs":null,"finish_reason":%b}]%b'
            % (head, index, _encode(delta), _encode(finish), tail)
            for delta, finish in deltas
            for index in range(choices)
        ]
        if usage is not None:
            events.append(b"data: " + _encode({**base, "choices": [], "usage": usage}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return Stream(events)

    def _text_stream(
        self,
        cid: str,
        created: int,
        model: str,
        words: list[str],
        finish: str,
        usage: dict[str, int] | None,
        field: str = "content",
        choices: int = 1,
    ) -> Stream:
        first = {"role": "assistant", "content": "", "refusal": None}
        if field == "refusal":
            first = {"role": "assistant", "content": None, "refusal": ""}
        deltas: list[tuple[dict[str, Any], str | None]] = [(first, None)]
        deltas.extend(({field: w if i == 0 else " " + w}, None) for i, w in enumerate(words))
        deltas.append(({}, finish))
        return self._events(cid, created, model, deltas, usage, choices)

    def _tool_stream(
        self,
        cid: str,
        created: int,
        model: str,
        call_id: str,
        name: str,
        args: str,
        usage: dict[str, int] | None,
    ) -> Stream:
        deltas: list[tuple[dict[str, Any], str | None]] = [
            (
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }
                    ],
                },
                None,
            )
        ]
        for i in range(0, len(args), _ARGUMENT_PIECE):
            piece = args[i : i + _ARGUMENT_PIECE]
            deltas.append(({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, None))
        deltas.append(({}, "tool_calls"))
        return self._events(cid, created, model, deltas, usage)

    # ---- OpenAI's Responses API
    def _responses(self, body: Any) -> Full | Stream:
        """``/v1/responses`` as OpenAI serves it: the chat reply to the same conversation,
        in the Responses API's shapes and events (made by tollway's own translator, which
        tests/test_translate.py checks on its own). It keeps the ids of the responses it
        stored, so ``previous_response_id`` works for those and is a 400 for others."""
        from tollway.pipeline.responses import (
            ChatToResponses,
            ResponsesRequest,
            chat_request,
            response_of,
        )

        if not isinstance(body, dict):
            return error(400, "We could not parse the JSON body of your request.")
        prev = body.get("previous_response_id")
        if prev is not None and prev not in self.stored:
            return error(400, f"Previous response with id '{prev}' not found.",
                         param="previous_response_id")
        fields = ResponsesRequest.__struct_fields__
        try:
            req = msgspec.convert({k: v for k, v in body.items() if k in fields},
                                  ResponsesRequest)
        except msgspec.ValidationError as exc:
            return error(400, str(exc))
        chat = self._chat(msgspec.json.decode(chat_request(
            req, req.model, req.max_output_tokens or 0, "max_tokens", req.stream is True)))
        keep = body.get("store") is not False
        if isinstance(chat, Full):
            if chat.status != 200:
                return chat
            out = response_of(req, chat.body)
            if keep:
                self.stored.add(msgspec.json.decode(out)["id"])
            return Full(200, out)
        tap = ChatToResponses(req, 0, req.model)
        data = tap.feed(b"".join(chat.events))
        usage = tap.usage
        assert usage is not None  # the chat stream above was asked for it
        data += tap.end(usage)
        if keep:
            self.stored.add(tap.rid)
        return Stream([e + b"\n\n" for e in data.split(b"\n\n") if e])

    # ---- Anthropic's Messages API
    def _messages(self, body: Any) -> Full | Stream:
        """``/v1/messages`` in Anthropic's shapes: text echoes the last user turn, a tool
        (unless tool_choice is none) gets a ``tool_use``; blocks marked ``cache_control``
        are written to the prompt cache the first time and read from it after."""
        if not isinstance(body, dict):
            return _anthropic_error(400, "invalid_request_error", "body must be an object")
        model, messages, limit = body.get("model"), body.get("messages"), body.get("max_tokens")
        if not isinstance(model, str) or not model:
            return _anthropic_error(400, "invalid_request_error", "model: Field required")
        if not isinstance(limit, int) or limit < 1:
            return _anthropic_error(400, "invalid_request_error", "max_tokens: Field required")
        if not isinstance(messages, list) or not messages:
            return _anthropic_error(400, "invalid_request_error",
                                    "messages: at least one message is required")
        fresh = cached = plain = 0
        prompt = ""

        def take(block: Any) -> None:
            nonlocal fresh, cached, plain
            if isinstance(block, str):
                text = block
            elif isinstance(block, dict) and isinstance(block.get("text"), str):
                text = block["text"]
            else:
                text = _encode(block).decode()
            tokens = count_tokens(text)
            if isinstance(block, dict) and block.get("cache_control"):
                if text in self.prompt_cache:
                    cached += tokens
                else:
                    self.prompt_cache.add(text)
                    fresh += tokens
            else:
                plain += tokens

        system = body.get("system")
        for block in [system] if isinstance(system, str) else system or []:
            take(block)
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
                return _anthropic_error(400, "invalid_request_error",
                                        "messages: each needs a role user or assistant")
            content = m.get("content")
            for block in [content] if isinstance(content, str) else content or []:
                take(block)
            if m.get("role") == "user":
                prompt = _text_of(content)
        tools = body.get("tools")
        for tool in tools if isinstance(tools, list) else []:
            take(tool)
        usage_in = {"input_tokens": plain, "cache_creation_input_tokens": fresh,
                    "cache_read_input_tokens": cached}
        choice = body.get("tool_choice")
        use = None
        if isinstance(tools, list) and tools and not (
                isinstance(choice, dict) and choice.get("type") == "none"):
            named = choice.get("name") if isinstance(choice, dict) else None
            use = next((t for t in tools if isinstance(t, dict) and t.get("name") == named),
                       tools[0])
        mid = f"msg_{next(self._ids):012x}"
        if use is not None:
            args = _placeholder(use.get("input_schema") or {"type": "object"}, prompt)
            block = {"type": "tool_use", "id": "toolu_" + hashlib.blake2b(
                f"{use.get('name')}|{prompt}".encode(), digest_size=12).hexdigest(),
                "name": use.get("name", ""), "input": args}
            out_tokens = count_tokens(str(use.get("name", ""))) + count_tokens(
                _encode(args).decode())
            content_out: list[dict[str, Any]] = [block]
            stop = "tool_use"
        else:
            words, finish = self._reply_words(prompt, {"max_tokens": limit})
            text = " ".join(words)
            out_tokens = count_tokens(text)
            content_out = [{"type": "text", "text": text}]
            stop = "max_tokens" if finish == "length" else "end_turn"
        usage = {**usage_in, "output_tokens": out_tokens}
        message = {"id": mid, "type": "message", "role": "assistant", "model": model,
                   "content": content_out, "stop_reason": stop, "stop_sequence": None,
                   "usage": usage}
        if body.get("stream") is not True:
            return Full(200, _encode(message))
        start = {**message, "content": [], "stop_reason": None,
                 "usage": {**usage_in, "output_tokens": 1}}
        events = [_sse("message_start", {"message": start})]
        for index, block in enumerate(content_out):
            if block["type"] == "tool_use":
                events.append(_sse("content_block_start", {
                    "index": index, "content_block": {**block, "input": {}}}))
                args_json = _encode(block["input"]).decode()
                events.extend(_sse("content_block_delta", {"index": index, "delta": {
                    "type": "input_json_delta",
                    "partial_json": args_json[i:i + _ARGUMENT_PIECE]}})
                    for i in range(0, len(args_json), _ARGUMENT_PIECE))
            else:
                events.append(_sse("content_block_start", {
                    "index": index, "content_block": {"type": "text", "text": ""}}))
                events.append(_sse("ping", {}))
                pieces = block["text"].split(" ")
                events.extend(_sse("content_block_delta", {"index": index, "delta": {
                    "type": "text_delta", "text": w if i == 0 else " " + w}})
                    for i, w in enumerate(pieces))
            events.append(_sse("content_block_stop", {"index": index}))
        events.append(_sse("message_delta", {
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": out_tokens}}))
        events.append(_sse("message_stop", {}))
        return Stream(events)

    # ---- legacy completions
    def _legacy(self, body: Any) -> Full | Stream:
        """``/v1/completions`` as OpenAI and vLLM answer it: the reply echoes the prompt
        (or filler words); ``suffix`` counts as prompt; ``echo`` repeats the prompt."""
        if not isinstance(body, dict):
            return error(400, "We could not parse the JSON body of your request.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return error(400, "you must provide a model parameter", param="model")
        raw = body.get("prompt")
        given = 0  # token ids, as vLLM takes them
        if isinstance(raw, str):
            prompt = raw
        elif isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
            prompt = " ".join(raw)
        elif isinstance(raw, list) and raw and all(isinstance(p, int) for p in raw):
            prompt, given = "", len(raw)
        elif isinstance(raw, list) and raw and all(
                isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in raw):
            prompt, given = "", sum(len(p) for p in raw)
        else:
            return error(400, "'prompt' must be a string, strings, token ids or arrays of "
                         "token ids", param="prompt")
        suffix = body.get("suffix")
        prompt_tokens = given + count_tokens(prompt) + (
            count_tokens(suffix) if isinstance(suffix, str) else 0)
        words, finish = self._reply_words(prompt, body)
        text = " ".join(words)
        if body.get("echo") is True:
            text = prompt + text
        usage = self._usage(prompt_tokens, count_tokens(text))
        cid = f"cmpl-{next(self._ids):012x}"
        created = int(time.time())
        base = {"id": cid, "object": "text_completion", "created": created, "model": model}
        if body.get("stream") is not True:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
            return Full(200, _encode({**base, "choices": [choice], "usage": usage}))
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        events = []
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            choice = {"text": piece, "index": 0, "logprobs": None,
                      "finish_reason": finish if last else None}
            chunk: dict[str, Any] = {**base, "choices": [choice]}
            if include_usage:
                chunk["usage"] = None
            events.append(b"data: " + _encode(chunk) + b"\n\n")
        if include_usage:
            events.append(b"data: " + _encode({**base, "choices": [], "usage": usage})
                          + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return Stream(events)

    # ---- rerank (vLLM's /v1/rerank)
    def _rerank(self, body: Any) -> Full:
        """vLLM's rerank: each document scored by the share of the query's words it holds
        (deterministic), best first, ``top_n`` of them (0 or absent: all)."""
        if not isinstance(body, dict):
            return error(400, "We could not parse the JSON body of your request.")
        model, query, docs = body.get("model"), body.get("query"), body.get("documents")
        if not isinstance(model, str) or not model:
            return error(400, "you must provide a model parameter", param="model")
        if not isinstance(query, str) or not isinstance(docs, list) or not docs or not all(
                isinstance(d, str) for d in docs):
            return error(400, "'query' must be a string and 'documents' a non-empty array "
                         "of strings", param="documents")
        top_n = body.get("top_n")
        if top_n is None or top_n == 0:
            top_n = len(docs)
        if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0:
            return error(400, "'top_n' must be a non-negative integer", param="top_n")
        words = set(query.lower().split())
        scores = [len(words & set(d.lower().split())) / (len(words) or 1) for d in docs]
        order = sorted(range(len(docs)), key=lambda i: (-scores[i], i))[:top_n]
        query_tokens = count_tokens(query)
        tokens = sum(query_tokens + count_tokens(d) for d in docs)
        return Full(200, _encode({
            "id": f"rerank-{next(self._ids):012x}", "model": model,
            "usage": {"total_tokens": tokens},
            "results": [{"index": i, "document": {"text": docs[i]},
                         "relevance_score": scores[i]} for i in order],
        }))

    # ---- embeddings
    def _embeddings(self, body: Any) -> Full:
        if not isinstance(body, dict):
            return error(400, "We could not parse the JSON body of your request.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return error(400, "you must provide a model parameter", param="model")
        raw = body.get("input")
        items: list[str | list[int]]
        if isinstance(raw, str) or (
            isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw)
        ):
            items = [raw]
        elif (
            isinstance(raw, list)
            and raw
            and all(
                isinstance(x, str) or (isinstance(x, list) and all(isinstance(t, int) for t in x))
                for x in raw
            )
        ):
            items = raw
        else:
            return error(
                400,
                "'input' must be a string, an array of strings or of token arrays",
                param="input",
            )
        dims = body.get("dimensions")
        if dims is None:
            dims = 3072 if model.endswith("-large") else 1536
        if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 8192:
            return error(400, "'dimensions' must be a positive integer", param="dimensions")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        tokens = 0
        for i, item in enumerate(items):
            if isinstance(item, str):
                key, tokens = item, tokens + count_tokens(item)
            else:
                key, tokens = ",".join(map(str, item)), tokens + len(item)
            vec = _vector(key, dims)
            embedding: Any = (
                base64.b64encode(array.array("f", vec).tobytes()).decode() if as_base64 else vec
            )
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        return Full(
            200,
            _encode(
                {
                    "object": "list",
                    "data": data,
                    "model": model,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                }
            ),
        )

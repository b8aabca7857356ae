"""Token usage: the provider's ``usage`` when it sends one, counted tokens otherwise.

Counting uses tollway's token counter (``tollway.tokens``, the Rust core),
with the encoding of the provider's model name.
Only the fields needed are decoded from a reply, so reading ``usage`` from a
large completion costs little.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tollway.tokens import count_chat_tokens, count_tokens, encoding_for_model


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CachedUsage(Usage):
    """A usage whose ``prompt_tokens`` include tokens read from and written to the
    provider's prompt cache, which are priced apart (Anthropic's)."""

    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


class _UsageOnly(msgspec.Struct):
    usage: Usage | None = None


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    function: _Function | None = None


class _Message(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct):
    message: _Message | None = None


class _Completion(msgspec.Struct):
    choices: list[_Choice] = []


_usage_only = msgspec.json.Decoder(_UsageOnly)
_completion = msgspec.json.Decoder(_Completion)
# A whole chat reply as far as the gateway reads it: each choice's text and tool calls.
read_reply = _completion.decode


def reply_usage(body: bytes) -> Usage | None:
    """The reply's ``usage``; raises msgspec.MsgspecError when the reply is not a JSON object.

    Decoding checks the whole document, so this is also the check that the
    provider's 200 is readable at all.
    """
    return _usage_only.decode(body).usage


def reply_text(body: bytes) -> str:
    """Generated text of a non-streamed completion (content and tool-call arguments)."""
    try:
        done = _completion.decode(body)
    except msgspec.MsgspecError:
        return ""
    parts: list[str] = []
    for choice in done.choices:
        msg = choice.message
        if msg is None:
            continue
        if msg.content:
            parts.append(msg.content)
        for call in msg.tool_calls or ():
            if call.function is not None:
                parts.append(call.function.name or "")
                parts.append(call.function.arguments or "")
    return "".join(parts)


def count_text(text: str, model: str) -> int:
    return count_tokens(text, encoding_of(model))


def encoding_of(model: str) -> str:
    """The token encoding of a provider's model name (cached: asked on every call)."""
    encoding = _ENCODINGS.get(model)
    if encoding is None:
        encoding = _ENCODINGS[model] = encoding_for_model(model)
    return encoding


_ENCODINGS: dict[str, str] = {}


class _Prompt(msgspec.Struct):
    messages: list[dict[str, Any]] = []
    tools: list[dict[str, Any]] | None = None


_prompt = msgspec.json.Decoder(_Prompt)


def count_prompt(body: bytes, model: str) -> int:
    """Prompt tokens of a chat request body (messages with every field, plus tools)."""
    prompt = _prompt.decode(body)
    return count_chat_tokens(prompt.messages, model, prompt.tools)


def count_input(value: str | list[Any], model: str) -> int:
    """Tokens of an embeddings `input`: text, texts, or token id arrays."""
    if isinstance(value, str):
        return count_text(value, model)
    total = 0
    for item in value:
        if isinstance(item, str):
            total += count_text(item, model)
        elif isinstance(item, int):
            total += 1
        elif isinstance(item, list):
            total += len(item)
    return total

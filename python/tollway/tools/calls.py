"""The pipeline's side of the tool registry: inline the tools a request names, check the
arguments of the calls the reply makes to them.

Request shape (chat completions): an entry of ``tools`` may be
``{"type": "registry", "name": "get_weather"}``; the gateway replaces it by the
registry's ``{"type": "function", "function": {"name", "description", "parameters"}}``
before anything counts or plans the call, so the provider, the prompt count and the
cost estimate all see the inlined tool. A name the registry lacks, or one the tenant
may not use, is a 400 ``tool_not_found`` naming ``tools[i]``.

Checks: the calls a reply makes to those tools (other tools are the caller's own and
not checked) have their ``arguments`` checked against the tool's JSON Schema.

- a whole reply: before the client has it. The answer carries
  ``X-Tollway-Tool-Arguments: valid`` or ``invalid``, and with ``invalid``
  ``X-Tollway-Tool-Invalid`` lists the tools whose arguments failed (names only). With
  ``[tool_calls] retry_invalid = true`` the reply is asked for once more, the second
  reply is the one the client gets and checked, and the call costs both.
- a stream: at its end, from the arguments the relay's tap collected (it decodes the
  stream's text once, when the stream ends; nothing is done per chunk). The headers left
  with the first chunk, so the verdict goes in an SSE comment before ``data: [DONE]``
  (``: tollway tool-arguments invalid get_weather``; clients skip comments) and in the
  call event.

Either way the call event lists the calls (``tool_calls``) and the invalid ones
(``tool_calls_invalid``), which the usage view counts per tool.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

import msgspec

from tollway.errors import InvalidRequest, TollwayError
from tollway.pipeline.call import CHAT, Call
from tollway.pipeline.decode import ChatRequest, decode_chat, invalid_request
from tollway.pipeline.hooks import Redispatch
from tollway.pipeline.prompt import prompt_tokens
from tollway.pipeline.stream import SseTap
from tollway.pipeline.surface import CallState, Counted, Surface, Wire
from tollway.pipeline.usage import Usage, count_text, read_reply

if TYPE_CHECKING:
    from tollway.config import ToolCallsConfig
    from tollway.pipeline.plan import Deployment
    from tollway.pipeline.taps import Tap
    from tollway.tools.registry import Tool, ToolRegistry

__all__ = ["TOOLS_CHAT_SURFACE", "ToolCalls", "check"]

log = logging.getLogger("tollway.tools")

_top_level = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encode = msgspec.json.Encoder().encode


def check(tools: dict[str, Tool], calls: list[tuple[str, str | None]]
          ) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(registry tools called, those with invalid arguments, the first reason) of
    ``calls`` (name, arguments); calls to other tools are left out."""
    called: list[str] = []
    invalid: list[str] = []
    why = ""
    for name, arguments in calls:
        tool = tools.get(name)
        if tool is None:
            continue
        called.append(name)
        reason = tool.validator.check(arguments)
        if reason is not None:
            invalid.append(name)
            why = why or f"{name}: {reason}"
    return tuple(called), tuple(invalid), why


def reply_calls(body: bytes) -> list[tuple[str, str | None]]:
    """(name, arguments) of every tool call in a whole chat completion."""
    try:
        done = read_reply(body)
    except msgspec.MsgspecError:
        return []
    out: list[tuple[str, str | None]] = []
    for choice in done.choices:
        msg = choice.message
        for call in (msg.tool_calls if msg is not None else None) or ():
            fn = call.function
            if fn is not None and fn.name:
                out.append((fn.name, fn.arguments))
    return out


def stream_calls(tap: SseTap) -> list[tuple[str, str | None]]:
    """(name, arguments) of every tool call the stream made, from its tap."""
    tap.text()  # decodes what the tap still holds, which fills tap.tool_calls
    return [(acc[0], "".join(acc[1:])) for _, acc in sorted((tap.tool_calls or {}).items())
            if acc[0]]


class _ToolsWire(Wire):
    """Chat completions for a request that named registry tools: the stream's tap collects
    the tool calls, and its end checks them."""

    def tap(self, call: CallState, limit: int, upstream: str) -> Tap:
        tap = SseTap(call.include_usage, limit, upstream)
        tap.tool_calls = {}
        return tap

    def end(self, call: CallState, tap: Tap, counted: Counted) -> bytes:
        tail = super().end(call, tap, counted)
        c = cast(Call, call)
        if not c.tools or not isinstance(tap, SseTap):
            return tail
        try:
            _note(c, check(c.tools, stream_calls(tap)))
        except Exception:  # a check must not cost the client its stream's end
            log.exception("checking a stream's tool calls failed")
            return tail
        if not c.tool_calls:
            return tail
        verdict = b"invalid " + ",".join(c.tool_calls_invalid).encode() if (
            c.tool_calls_invalid) else b"valid"
        return b": tollway tool-arguments " + verdict + b"\n\n" + tail


TOOLS_CHAT_SURFACE = Surface(CHAT, decode_chat, {"openai": _ToolsWire()})


def _note(call: Call, result: tuple[tuple[str, ...], tuple[str, ...], str]) -> None:
    call.tool_calls, call.tool_calls_invalid, why = result
    if why:
        log.info("tool call arguments invalid", extra={"tool_error": why})


class ToolCalls:
    """The pipeline's hooks: :meth:`inline` (a decode hook) and :meth:`checked` (a reply
    hook)."""

    def __init__(self, registry: ToolRegistry, settings: ToolCallsConfig) -> None:
        self.registry = registry
        self.validate = settings.validate
        self.retry = settings.retry_invalid

    def inline(self, call: Call) -> None:
        if call.endpoint != CHAT:
            return
        req: ChatRequest = call.request
        tools = req.tools
        if not tools:
            return
        named: dict[str, Tool] = {}
        out: list[Any] = []
        for i, entry in enumerate(tools):
            if not isinstance(entry, dict) or entry.get("type") != "registry":
                out.append(msgspec.Raw(_encode(entry)))
                continue
            name = entry.get("name")
            tool = self.registry.get(name) if isinstance(name, str) else None
            if tool is None or not tool.allows(call.tenant.id):
                raise InvalidRequest(f"no registry tool {name!r} for this tenant",
                                     param=f"tools[{i}]", code="tool_not_found")
            named[name] = tool  # type: ignore[index]
            out.append(tool.function)
        if not named:
            return
        try:
            data = _top_level.decode(call.body)
        except msgspec.MsgspecError as exc:  # decoded once already: not expected
            raise invalid_request(exc) from None
        data["tools"] = msgspec.Raw(_encode(out))
        call.body = _encode(data)
        call.request = decode_chat(call.body)
        call.prompt_counts.clear()
        if self.validate:
            call.tools = named
            call.surface = TOOLS_CHAT_SURFACE
            if self.retry and not call.stream:  # the budget holds for the retry too
                call.budget_replies = 2

    async def checked(self, call: Call, again: Redispatch) -> None:
        tools = call.tools
        if not tools or call.reply is None:
            return
        try:
            result = check(tools, reply_calls(call.reply.body))
        except Exception:  # a check must not cost the client a good reply
            log.exception("checking a reply's tool calls failed")
            return
        if result[1] and self.retry:
            first = _usage(call)
            kept = (call.reply, call.usage, call.deployment, call.wire, call.output_bound)
            call.tool_retried = True
            log.info("tool call arguments invalid: asking again",
                     extra={"tool_error": result[2]})
            try:
                await again()
            except TollwayError as exc:  # the first reply stands, flagged
                log.warning("tool call retry failed: %s", exc.message)
                call.reply, call.usage, call.deployment, call.wire, call.output_bound = kept
                call.usage = first
            else:
                call.usage = _sum(first, _usage(call))
                if call.reply is not None:
                    result = check(tools, reply_calls(call.reply.body))
        _note(call, result)
        if call.tool_calls:
            if call.tool_calls_invalid:
                call.headers.append((b"x-tollway-tool-arguments", b"invalid"))
                call.headers.append((b"x-tollway-tool-invalid",
                                     ",".join(dict.fromkeys(call.tool_calls_invalid)).encode()))
            else:
                call.headers.append((b"x-tollway-tool-arguments", b"valid"))


def _usage(call: Call) -> Usage:
    """The reply's usage: the provider's, else counted (as settle would count it)."""
    if call.usage is not None:
        return call.usage
    dep: Deployment | None = call.deployment
    if dep is None or call.reply is None or call.wire is None:
        return Usage()
    prompt = prompt_tokens(call, dep.upstream) or 0
    completion = count_text(call.wire.text(call.reply.body), dep.upstream)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


def _sum(a: Usage, b: Usage) -> Usage:
    return Usage(prompt_tokens=a.prompt_tokens + b.prompt_tokens,
                 completion_tokens=a.completion_tokens + b.completion_tokens,
                 total_tokens=a.total_tokens + b.total_tokens)

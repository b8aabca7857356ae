"""What the OpenAI-compatible routes answer, as structs: the document's response schemas.

The gateway relays the provider's own bytes rather than building these, so
they name the fields OpenAI documents as always present and leave every
other field open (no struct forbids unknown fields): a provider that adds
fields still conforms.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class Usage(msgspec.Struct):
    """Token counts of a call; tollway bills from these."""

    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletionMessage(msgspec.Struct):
    role: str
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    refusal: str | None = None


class ChatCompletionChoice(msgspec.Struct):
    index: int
    message: ChatCompletionMessage
    finish_reason: str | None = None


class ChatCompletion(msgspec.Struct):
    """A chat completion, as the provider sent it (the gateway does not rewrite it)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage | None = None


class ChatCompletionChunkChoice(msgspec.Struct):
    index: int
    delta: dict[str, Any]
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct):
    """One `data:` event of a streamed chat completion.

    The stream ends with `data: [DONE]` after a whole stream, or with one
    event holding an error envelope when the provider broke it off. With
    `stream_options.include_usage` the last chunk before `[DONE]` has no
    choices and carries `usage` (counted by the gateway when the provider
    sent none).
    """

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class Completion(msgspec.Struct):
    """A legacy completion, as the provider sent it; streamed, each `data:` event is one
    of these (`choices[].text` a piece of the text) and the stream ends as a chat stream
    does (`data: [DONE]`, usage only when `stream_options.include_usage` asked)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(msgspec.Struct):
    index: int
    embedding: list[float] | str  # a string when encoding_format is base64
    object: Literal["embedding"] = "embedding"


class EmbeddingList(msgspec.Struct):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage | None = None


class RerankDocument(msgspec.Struct):
    text: str


class RerankResult(msgspec.Struct):
    index: int  # the document's place in the request's `documents`
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(msgspec.Struct):
    total_tokens: int


class RerankResponse(msgspec.Struct):
    """vLLM's rerank answer: the documents best first, `top_n` of them."""

    results: list[RerankResult]
    id: str | None = None
    model: str | None = None
    usage: RerankUsage | None = None


class AnthropicUsage(msgspec.Struct):
    """Anthropic's usage: input tokens not from the prompt cache, and those read from and
    written to it, each billed at its own price."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class AnthropicMessage(msgspec.Struct):
    """A message of Anthropic's Messages API: the provider's own (anthropic providers) or
    translated from a chat completion (OpenAI-compatible ones)."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]  # text, tool_use (and thinking) blocks
    stop_reason: str | None
    usage: AnthropicUsage
    stop_sequence: str | None = None


class AnthropicStreamEvent(msgspec.Struct):
    """One event of a streamed message (`event:` names its `type`): message_start,
    content_block_start / _delta / _stop, message_delta (stop reason, usage),
    message_stop, ping, or error."""

    type: str


class AnthropicErrorDetail(msgspec.Struct):
    type: str
    message: str


class AnthropicError(msgspec.Struct):
    """Anthropic's error shape: every error on the Messages API has this body."""

    type: Literal["error"]
    error: AnthropicErrorDetail


class ResponseUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, Any] | None = None
    output_tokens_details: dict[str, Any] | None = None


class ResponseObject(msgspec.Struct):
    """A response of OpenAI's Responses API, translated from a provider's chat completion:
    `output` holds message items (`output_text` parts) and function calls."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed", "queued", "cancelled"]
    model: str
    output: list[dict[str, Any]]
    usage: ResponseUsage | None = None
    incomplete_details: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class ResponseStreamEvent(msgspec.Struct):
    """One typed event of a streamed response (`event:` names its `type`):
    response.created, response.in_progress, response.output_item.added / .done,
    response.content_part.added / .done, response.output_text.delta / .done,
    response.function_call_arguments.delta / .done, then response.completed or
    response.incomplete; `error` when the provider broke the stream."""

    type: str
    sequence_number: int

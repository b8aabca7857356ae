"""Rerank (``POST /v1/rerank``) in the shape vLLM serves, passed to local providers only.

The request is vLLM's (and Jina's, Cohere's v2): ``model``, ``query``, ``documents``
(strings), optional ``top_n`` (0 or absent: every document); the reply is the
provider's, ``results`` of ``index``, ``relevance_score`` and ``document``
(``{"text"}``) with ``usage.total_tokens``. Unknown fields pass through.

Only providers marked ``local = true`` serve it (a reranker runs beside the gateway, on
vLLM or another local server): a route's remote candidates are left out, and a call
with none left is a 400 ``model_not_supported``. Guards, budget, breakers, retries and
failover, metrics and the call event are the pipeline's, as for embeddings: the prompt
is the query read once per document plus the documents (a cross-encoder reads each
pair), billed at the model's input price; there is no output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, ClassVar

import msgspec
from msgspec import Meta

from tollway.errors import InvalidRequest
from tollway.pipeline.decode import MAX_INT32, ModelName, _decode
from tollway.pipeline.surface import CallState, Surface, Wire, rewritten
from tollway.pipeline.usage import Usage, count_text

if TYPE_CHECKING:
    from tollway.pipeline.plan import Deployment

__all__ = ["RERANK", "RERANK_SURFACE", "RerankRequest"]

RERANK = "rerank"


class RerankRequest(msgspec.Struct):
    # No output tokens: the policy bounds its cost by the prompt alone.
    generates: ClassVar[bool] = False

    model: ModelName
    query: Annotated[str, Meta(min_length=1)]
    documents: Annotated[list[str], Meta(min_length=1, max_length=10_000)]
    top_n: Annotated[int, Meta(ge=0, le=MAX_INT32)] | None = None
    user: str | None = None

    def count_prompt(self, upstream: str) -> int:
        query = count_text(self.query, upstream)
        return sum(query + count_text(d, upstream) for d in self.documents)


_request = msgspec.json.Decoder(RerankRequest)


def decode_rerank(body: bytes) -> RerankRequest:
    return _decode(_request, body)


class _RerankUsage(msgspec.Struct):
    prompt_tokens: int | None = None
    total_tokens: int = 0


class _Reply(msgspec.Struct):
    usage: _RerankUsage | None = None


_reply = msgspec.json.Decoder(_Reply)


class _RerankWire(Wire):
    path = "rerank"

    def body(self, call: CallState, dep: Deployment, bound: int) -> bytes:
        return rewritten(call, dep, 0, False)

    def usage(self, body: bytes) -> Usage | None:
        usage = _reply.decode(body).usage
        if usage is None:
            return None
        prompt = usage.prompt_tokens if usage.prompt_tokens is not None else usage.total_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=0, total_tokens=prompt)

    def text(self, body: bytes) -> str:
        return ""


class _RerankSurface(Surface):
    def serves(self, call: CallState, dep: Deployment) -> InvalidRequest | None:
        if not dep.local:
            return InvalidRequest(f"`{call.request.model}` is not served on the rerank API: "
                                  "rerank goes to local providers (local = true) only",
                                  param="model", code="model_not_supported")
        return super().serves(call, dep)


RERANK_SURFACE: Surface = _RerankSurface(RERANK, decode_rerank, {"openai": _RerankWire()})

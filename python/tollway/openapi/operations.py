"""Every operation the app serves, as data: the one table the OpenAPI document is built from.

A route added to the app without a row here fails
``tests/openapi/test_document.py`` (it walks the app's routes), so the
document cannot fall behind the code. Bodies are named by their structs;
the errors an operation can answer by their statuses, each of which carries
OpenAI's error envelope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tollway.openapi import views, wire
from tollway.pipeline import LATENCIES, SENSITIVITIES, TASKS
from tollway.pipeline.anthropic import Conversation, MessagesRequest, TokenCount
from tollway.pipeline.completions import CompletionRequest
from tollway.pipeline.decode import ChatRequest, EmbeddingsRequest
from tollway.pipeline.rerank import RerankRequest
from tollway.pipeline.responses import ResponsesRequest
from tollway.routes import dashboard
from tollway.routes import directory as admin_api
from tollway.routes import tools as tools_api
from tollway.routes.health import Health, Readiness
from tollway.routes.openai import PREFIX, AnthropicModelList, ModelList

# Who may call: nobody needs a key / a tenant key / a tenant key or the admin key / the
# admin key only.
Access = Literal["public", "tenant", "key", "admin"]

OPENAPI_PATH = "/api/ai/openapi.json"


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    where: Literal["query", "header", "path"]
    schema: dict[str, Any]
    description: str
    required: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful answer: its status, and its body as a struct (JSON) or a media type."""

    status: int
    description: str
    body: type | None = None
    media: str = "application/json"
    events: type | None = None  # an SSE alternative: the struct each `data:` event holds
    served: bool = False  # a provider's answer: the headers name it, the cost and the limits
    also: type | None = None  # another body the same answer may have (one or the other)


@dataclass(frozen=True, slots=True)
class Operation:
    method: Literal["get", "post", "put", "patch", "delete"]
    path: str
    summary: str
    tag: str
    access: Access
    replies: tuple[Reply, ...]
    errors: tuple[int, ...] = ()  # statuses answered with the error envelope
    request: type | None = None
    params: tuple[Param, ...] = ()
    # The body of its errors (and a broken stream's last event); None: OpenAI's envelope.
    error_body: type | None = None


_DAY = {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}
_TENANT = Param("tenant", "query", {"type": "string", "minLength": 1},
                "another tenant's figures: only with the admin key")
_DAYS = (
    Param("days", "query", {"type": "integer", "minimum": 1, "maximum": 3660},
          "the last N days, today included"),
    Param("since", "query", _DAY, "first day (YYYY-MM-DD, UTC)"),
    Param("until", "query", _DAY, "last day (YYYY-MM-DD, UTC)"),
)


def _choice(name: str, values: frozenset[str], description: str) -> Param:
    return Param(name, "header", {"type": "string", "enum": sorted(values)}, description)


HINTS = (
    _choice("X-Tollway-Task", TASKS, "what the call is for; the routing policy reads it"),
    _choice("X-Tollway-Sensitivity", SENSITIVITIES,
            "how sensitive the prompt is; confidential and restricted data stay local"),
    _choice("X-Tollway-Latency", LATENCIES, "how long the caller can wait"),
    Param("X-Tollway-Budget-Tier", "header", {"type": "string"},
          "a budget tier at most the tenant's own (may only lower it)"),
    Param("X-Tollway-User", "header", {"type": "string"}, "the caller's own user id"),
)

# What a call to a provider can answer besides 200: refusals (400 cost cap, 403 policy,
# 404 unknown model, 413 body, 429 rate limit or budget) and upstream failures.
_CALL_ERRORS = (400, 401, 403, 404, 413, 429, 502, 503, 504)

# Tenant ids and key ids alike (a key's is "key_" and 16 hex digits).
_ID = Param("id", "path", {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "the tenant's or the key's id", required=True)
_FLAG = Param("name", "path", {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
              "the flag's name", required=True)
_TOOL = Param("name", "path", {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
              "the tool's name", required=True)
_ADMIN_ERRORS = (400, 401, 403, 404, 409, 429, 503)
_ADMIN = "/api/ai/admin"

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "post", f"{PREFIX}/chat/completions", "Create a chat completion (OpenAI schema)",
        "openai", "tenant",
        (Reply(200, "the provider's completion; with `stream: true` a server-sent event "
               "stream of chunks ending in `data: [DONE]`", wire.ChatCompletion,
               events=wire.ChatCompletionChunk, served=True),),
        _CALL_ERRORS, ChatRequest, HINTS),
    Operation(
        "post", f"{PREFIX}/completions",
        "Create a legacy completion (OpenAI schema; `suffix` for fill-in-the-middle)",
        "openai", "tenant",
        (Reply(200, "the provider's completion, passed through; with `stream: true` a "
               "server-sent event stream ending in `data: [DONE]`", wire.Completion,
               events=wire.Completion, served=True),),
        _CALL_ERRORS, CompletionRequest, HINTS),
    Operation(
        "post", f"{PREFIX}/messages",
        "Create a message (Anthropic's Messages API; key as x-api-key or bearer)",
        "anthropic", "tenant",
        (Reply(200, "the message: an Anthropic provider's, passed through, or an "
               "OpenAI-compatible provider's completion translated; with `stream: true` "
               "Anthropic's server-sent events, message_start to message_stop",
               wire.AnthropicMessage, events=wire.AnthropicStreamEvent, served=True),),
        _CALL_ERRORS, MessagesRequest,
        (*HINTS,
         Param("anthropic-version", "header", {"type": "string"},
               "passed on to Anthropic providers"),
         Param("anthropic-beta", "header", {"type": "string"},
               "passed on to Anthropic providers")),
        error_body=wire.AnthropicError),
    Operation(
        "post", f"{PREFIX}/messages/count_tokens",
        "Count a message's input tokens (Anthropic's count_tokens), without calling a provider",
        "anthropic", "tenant",
        (Reply(200, "the prompt's tokens as the gateway counts them for the model the name "
               "resolves to first (for Claude models an estimate: their tokenizer is not "
               "public)", TokenCount),),
        (400, 401, 403, 404), Conversation, error_body=wire.AnthropicError),
    Operation(
        "post", f"{PREFIX}/responses",
        "Create a response (OpenAI's Responses API; previous_response_id and store: true "
        "only to providers that keep state)", "openai", "tenant",
        (Reply(200, "the provider's response, passed through, or its chat completion "
               "translated; with `stream: true` the Responses API's typed server-sent events",
               wire.ResponseObject, events=wire.ResponseStreamEvent, served=True),),
        _CALL_ERRORS, ResponsesRequest, HINTS),
    Operation(
        "post", f"{PREFIX}/embeddings", "Create embeddings (OpenAI schema)", "openai", "tenant",
        (Reply(200, "the provider's embeddings", wire.EmbeddingList, served=True),),
        _CALL_ERRORS, EmbeddingsRequest, HINTS),
    Operation(
        "post", f"{PREFIX}/rerank", "Rerank documents by relevance to a query (vLLM's shape; "
        "local providers only)", "openai", "tenant",
        (Reply(200, "the provider's ranking, best first", wire.RerankResponse, served=True),),
        _CALL_ERRORS, RerankRequest, HINTS),
    Operation(
        "get", f"{PREFIX}/models", "List the models and route aliases this tenant may use",
        "openai", "tenant", (Reply(200, "OpenAI's list shape; Anthropic's (`data` of "
                                  "`type: model`, `has_more`) when the caller sends "
                                  "`anthropic-version`", ModelList, also=AnthropicModelList),),
        (401, 403), params=(Param("anthropic-version", "header", {"type": "string"},
                                  "answer in Anthropic's list shape"),)),
    Operation(
        "get", "/api/ai/usage", "The caller's usage from the projections", "usage", "key",
        (Reply(200, "totals and breakdowns by day, model and provider", views.UsageReport),),
        (400, 401, 403, 503), params=(_TENANT, *_DAYS)),
    Operation(
        "get", "/api/ai/budget", "The caller's budget today", "usage", "key",
        (Reply(200, "spend and open reservations against the daily budget", views.Budget),),
        (400, 401, 403, 503), params=(_TENANT, Param(
            "key_id", "query", {"type": "string", "minLength": 1},
            "a key of the tenant with a daily budget of its own: that budget's figures"))),
    Operation(
        "get", "/api/ai/health", "Liveness", "operations", "public",
        (Reply(200, "the process answers", Health),), (401,)),
    Operation(
        "get", "/api/ai/ready", "Readiness", "operations", "public",
        (Reply(200, "ready to serve", Readiness),
         Reply(503, "not ready: the reasons say why", Readiness)), (401,)),
    Operation(
        "get", "/api/ai/metrics", "Prometheus metrics (text exposition format)", "operations",
        "public", (Reply(200, "the metrics", media="text/plain"),), (401,)),
    Operation(
        "get", OPENAPI_PATH, "This document (OpenAPI 3.1)", "operations", "public",
        (Reply(200, "tollway's own OpenAPI document", media="application/json"),), (401,)),
    Operation(
        "get", "/api/ai/providers", "Per provider: breaker, error rate, latency", "admin",
        "admin", (Reply(200, "every configured provider", views.ProviderList),), (401, 403)),
    Operation(
        "post", "/api/ai/providers/{name}/test", "Live connection test against a provider",
        "admin", "admin", (Reply(200, "the test's outcome", views.ProviderTest),),
        (401, 403, 404), params=(Param("name", "path", {"type": "string"},
                                       "the provider's name", required=True),)),
    Operation(
        "get", "/api/ai/shadow", "Shadow comparisons and A/B arms, per route", "admin", "admin",
        (Reply(200, "the report over the chosen days", views.ShadowReport),), (400, 401, 403),
        params=(Param("route", "query", {"type": "string"}, "one route alias only"), *_DAYS)),
    Operation(
        "get", f"{_ADMIN}/tenants", "Every tenant: the config file's and the directory's",
        "admin", "admin", (Reply(200, "the tenants", admin_api.TenantList),), (401, 403, 429)),
    Operation(
        "post", f"{_ADMIN}/tenants", "Create a tenant (an admin event every gateway folds)",
        "admin", "admin", (Reply(201, "the tenant", admin_api.TenantView),), _ADMIN_ERRORS,
        admin_api.TenantCreate),
    Operation(
        "get", f"{_ADMIN}/tenants/{{id}}", "One tenant", "admin", "admin",
        (Reply(200, "the tenant", admin_api.TenantView),), (401, 403, 404, 429),
        params=(_ID,)),
    Operation(
        "patch", f"{_ADMIN}/tenants/{{id}}", "Change a tenant's tier, limits, budget, models, "
        "sensitivity, or disable it", "admin", "admin",
        (Reply(200, "the tenant after the change", admin_api.TenantView),), _ADMIN_ERRORS,
        admin_api.TenantPatch, (_ID,)),
    Operation(
        "delete", f"{_ADMIN}/tenants/{{id}}", "Disable a tenant (its keys are refused)",
        "admin", "admin", (Reply(200, "the tenant, disabled", admin_api.TenantView),),
        _ADMIN_ERRORS, params=(_ID,)),
    Operation(
        "get", f"{_ADMIN}/keys", "The directory's keys (never the keys themselves)", "admin",
        "admin", (Reply(200, "the keys", admin_api.KeyList),), (401, 403, 429),
        params=(Param("tenant", "query", {"type": "string"}, "one tenant's keys only"),)),
    Operation(
        "post", f"{_ADMIN}/keys", "Create a key for a tenant: the answer shows it, once",
        "admin", "admin", (Reply(201, "the key", admin_api.NewKey),), _ADMIN_ERRORS,
        admin_api.KeyCreate),
    Operation(
        "delete", f"{_ADMIN}/keys/{{id}}", "Revoke a key, on every gateway", "admin", "admin",
        (Reply(200, "the key, revoked", admin_api.KeyView),), _ADMIN_ERRORS, params=(_ID,)),
    Operation(
        "post", f"{_ADMIN}/keys/{{id}}/rotate", "A new key in place of this one, which works "
        "for the overlap", "admin", "admin", (Reply(201, "the new key", admin_api.NewKey),),
        _ADMIN_ERRORS, admin_api.KeyRotate, (_ID,)),
    Operation(
        "get", f"{_ADMIN}/flags", "Feature flags: gradual rollouts of a route's candidates",
        "admin", "admin", (Reply(200, "the flags", admin_api.FlagList),), (401, 403, 429)),
    Operation(
        "get", f"{_ADMIN}/flags/{{name}}", "One flag", "admin", "admin",
        (Reply(200, "the flag", admin_api.FlagView),), (400, 401, 403, 404, 429),
        params=(_FLAG,)),
    Operation(
        "put", f"{_ADMIN}/flags/{{name}}", "Make or change a flag (its settings whole)",
        "admin", "admin", (Reply(200, "the flag", admin_api.FlagView),), _ADMIN_ERRORS,
        admin_api.FlagPut, (_FLAG,)),
    Operation(
        "get", f"{_ADMIN}/tools", "The tool registry: the config file's tools and the "
        "directory's", "admin", "admin", (Reply(200, "the tools", tools_api.ToolList),),
        (401, 403, 429)),
    Operation(
        "get", f"{_ADMIN}/tools/{{name}}", "One registry tool", "admin", "admin",
        (Reply(200, "the tool", tools_api.ToolView),), (400, 401, 403, 404, 429),
        params=(_TOOL,)),
    Operation(
        "put", f"{_ADMIN}/tools/{{name}}", "Make or change a registry tool (its settings "
        "whole; an admin event every gateway folds)", "admin", "admin",
        (Reply(200, "the tool", tools_api.ToolView),), _ADMIN_ERRORS, tools_api.ToolPut,
        (_TOOL,)),
    Operation(
        "delete", f"{_ADMIN}/tools/{{name}}", "Take a registry tool out", "admin", "admin",
        (Reply(200, "the tool as it was", tools_api.ToolView),), _ADMIN_ERRORS,
        params=(_TOOL,)),
    Operation(
        "get", f"{_ADMIN}/events", "The newest events on the stream (the dashboard's tail)",
        "admin", "admin", (Reply(200, "events after `after`, oldest first", dashboard.Tail),),
        (400, 401, 403, 429, 503),
        params=(Param("after", "query", {"type": "integer", "minimum": 0},
                      "only events after this stream sequence"),
                Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 200},
                      "at most this many (100)"))),
    Operation(
        "get", dashboard.PAGE, "The operators' dashboard (sign in with the admin key)",
        "operations", "public", (Reply(200, "the page", media="text/html"),), (401,)),
    Operation(
        "get", f"{dashboard.PAGE}/app.js", "The dashboard's script", "operations", "public",
        (Reply(200, "the script", media="text/javascript"),), (401,)),
    Operation(
        "get", f"{dashboard.PAGE}/app.css", "The dashboard's style sheet", "operations",
        "public", (Reply(200, "the style sheet", media="text/css"),), (401,)),
)

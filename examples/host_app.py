"""A FastAPI service with tollway inside it: the three ways in, in one app, on one gateway.

1. ``/svc/api/ai/v1/...``: tollway's OpenAI-compatible API mounted in the service, for
   other services (and the official ``openai`` SDK, ``base_url=".../svc/api/ai/v1"``).
2. ``GET /search``: the service's own route behind ``tollway.GuardMiddleware``: the
   caller's tenant gets its rate limits, its daily budget (0.001 USD a search) and a
   call event per request, as tollway's own routes do.
3. ``POST /ask``: the service's own code calling a model in process with
   ``tollway.Gateway.chat``: the same policy, guards, retries, breakers and events as
   an HTTP call, without the socket.

One gateway serves all three (one set of limits, one budget, one event stream); the
host's lifespan runs it. Run it:

    python examples/host_app.py                    # a simulated model, nothing to configure
    TOLLWAY_CONFIG=tollway.toml python examples/host_app.py

With no config it starts tollway's simulated OpenAI-compatible upstream and a tenant
``demo`` whose key it prints. The service names the tenant from its own users (here a
header ``x-user``, which a real service would take from its session or token).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import tollway

SEARCH_USD = 0.001
USERS = {"alice": "demo", "bob": "demo"}  # the service's users -> tollway tenants


def tenant_of(scope: Any) -> str | None:
    """The tenant of a request: here its ``x-user`` header's user's."""
    for name, value in scope["headers"]:
        if name == b"x-user":
            return USERS.get(bytes(value).decode("latin-1"))
    return None


def build_app(gw: tollway.Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with gw:  # NATS, publisher, projections, providers: up before the first call
            yield

    app = FastAPI(lifespan=lifespan)
    app.mount("/svc", gw.app)  # 1: the HTTP API under a prefix
    app.add_middleware(tollway.GuardMiddleware, gateway=gw, tenant=tenant_of,  # 2
                       cost=lambda scope: SEARCH_USD, paths=["/search"], endpoint="search")

    @app.get("/search")
    async def search(q: str = "") -> dict[str, Any]:
        return {"query": q, "hits": []}

    @app.post("/ask")
    async def ask(request: Request) -> Any:
        tenant = tenant_of(request.scope)
        if tenant is None:
            return JSONResponse({"error": "who are you?"}, status_code=401)
        question = (await request.json()).get("question", "")
        try:  # 3: in process
            reply = await gw.chat(model="auto", tenant=tenant, task="summarize",
                                  messages=[{"role": "user", "content": question}])
        except tollway.APIError as exc:  # a refusal or a failure, as HTTP would answer it
            return JSONResponse({"error": exc.message, "code": exc.code},
                                status_code=exc.status, headers=exc.headers)
        return {"answer": reply.choices[0].message.content}

    return app


def main() -> None:
    import uvicorn

    from tollway.auth import new_key
    from tollway.config import parse_config
    from tollway.demo import demo_config
    from tollway.testing.upstream import FakeUpstream

    path = os.environ.get("TOLLWAY_CONFIG")
    if path:
        uvicorn.run(build_app(tollway.Gateway(path)), host="127.0.0.1", port=8000)
        return
    with FakeUpstream(name="simulated", require_auth=False, record=False) as upstream, \
            tempfile.TemporaryDirectory(prefix="tollway-example-") as data:
        key = new_key()
        config = parse_config(demo_config(upstream.base_url, key, "127.0.0.1", 8000, data),
                              source="<example>", env={})
        print(f"tenant demo's key (for /svc/api/ai/v1): {key}\n"
              "try: curl -s 127.0.0.1:8000/search?q=x -H 'x-user: alice'\n"
              "     curl -s 127.0.0.1:8000/ask -H 'x-user: alice' -d '{\"question\": \"hi\"}'",
              flush=True)
        uvicorn.run(build_app(tollway.Gateway(config, env={})), host="127.0.0.1", port=8000)


if __name__ == "__main__":
    main()

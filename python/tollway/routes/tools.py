"""The admin API of the tool registry (admin key only): ``/api/ai/admin/tools``.

``PUT /api/ai/admin/tools/{name}`` makes or changes a tool (its settings whole), ``GET``
lists them or reads one, ``DELETE`` takes one out. Each change is an admin event
(``tollway.admin.tool.changed.<name>``, ``tool.removed``) that every gateway folds into
its directory, as tenants, keys and flags are (:mod:`tollway.directory`). A tool of the
config file (``[[tools]]``) is the config's: it is listed, and cannot be changed here.
A schema that is not a usable JSON Schema of an object is a 400 naming ``parameters``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, cast

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tollway.config import TenantId
from tollway.context import info_of
from tollway.directory import event_id
from tollway.errors import Conflict, InvalidRequest, NotFound
from tollway.events.schema import ToolChanged, ToolRemoved, ToolSettings
from tollway.gateway import Gateway
from tollway.pipeline.decode import invalid_request
from tollway.routes.directory import _answer, _error
from tollway.tools.schema import ToolSchemaError, compile_schema

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolPut(msgspec.Struct, forbid_unknown_fields=True):
    """A registry tool: what a request naming it gets inlined as, and who may name it."""

    parameters: dict[str, Any]  # a JSON Schema of "type": "object" (refs inside it only)
    description: Annotated[str, Meta(max_length=4096)] = ""
    # the tenants that may use it; null: every tenant
    tenants: Annotated[list[TenantId], Meta(max_length=10_000)] | None = None


class ToolView(msgspec.Struct):
    name: str
    object: Literal["tool"]
    source: Literal["config", "admin"]
    description: str
    parameters: dict[str, Any]
    tenants: list[str] | None
    changed_at: float | None = None
    changed_by: str | None = None


class ToolList(msgspec.Struct):
    object: Literal["list"]
    data: list[ToolView]


def routes(gateway: Gateway) -> list[Route]:
    directory = gateway.directory
    registry = gateway.tools

    def tool_name(request: Request) -> str:
        name: str = request.path_params["name"]
        if not TOOL_NAME.fullmatch(name):
            raise InvalidRequest("a tool name is 1-64 letters, digits, '_' or '-'",
                                 param="name")
        return name

    def view_of(name: str) -> dict[str, Any]:
        tool = registry.config_tools.get(name)
        if tool is not None:
            return tool.json()
        entry = registry.entries().get(name)
        if entry is None or entry.removed:
            raise NotFound(f"no tool {name!r}", code="tool_not_found")
        s = entry.settings
        return {"name": name, "object": "tool", "source": "admin",
                "description": s.description, "parameters": s.parameters,
                "tenants": list(s.tenants) if s.tenants is not None else None,
                "changed_at": entry.changed_at, "changed_by": entry.changed_by}

    def own(name: str) -> None:
        if name in registry.config_tools:
            raise Conflict(f"tool {name!r} is defined in the config file, which wins: "
                           "change it there", code="tool_in_config")

    def admin_of(request: Request) -> str:
        principal = info_of(cast(dict[str, Any], request.scope)).principal
        return principal.admin_id if principal is not None else ""

    async def list_tools(request: Request) -> Response:
        names = sorted({*registry.config_tools,
                        *(n for n, e in registry.entries().items() if not e.removed)})
        return _answer({"object": "list", "data": [view_of(n) for n in names]})

    async def get_tool(request: Request) -> Response:
        try:
            return _answer(view_of(tool_name(request)))
        except Exception as exc:
            return _error(exc)

    async def put_tool(request: Request) -> Response:
        try:
            name = tool_name(request)
            raw = await request.body()
            try:
                body = msgspec.json.decode(raw or b"{}", type=ToolPut)
            except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
                raise invalid_request(exc) from None
            try:
                compile_schema(body.parameters)
            except ToolSchemaError as exc:
                raise InvalidRequest(str(exc), param="parameters",
                                     code="invalid_tool_schema") from None
            own(name)
            settings = ToolSettings(
                description=body.description, parameters=body.parameters,
                tenants=tuple(body.tenants) if body.tenants is not None else None)
            entry = registry.entries().get(name)
            if entry is None or entry.removed or entry.settings != settings:
                await directory.change_tool(ToolChanged(
                    event_id=event_id(), occurred_at=directory.clock(),
                    admin=admin_of(request), tool=name, settings=settings))
            return _answer(view_of(name))
        except Exception as exc:
            return _error(exc)

    async def remove_tool(request: Request) -> Response:
        try:
            name = tool_name(request)
            own(name)
            gone = view_of(name)  # 404 when there is none
            await directory.change_tool(ToolRemoved(
                event_id=event_id(), occurred_at=directory.clock(), admin=admin_of(request),
                tool=name))
            return _answer(gone)
        except Exception as exc:
            return _error(exc)

    base = "/api/ai/admin/tools"
    return [
        Route(base, list_tools, methods=["GET"]),
        Route(f"{base}/{{name}}", get_tool, methods=["GET"]),
        Route(f"{base}/{{name}}", put_tool, methods=["PUT"]),
        Route(f"{base}/{{name}}", remove_tool, methods=["DELETE"]),
    ]

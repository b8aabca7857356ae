"""The registry's tools, as the calls read them: the config's ``[[tools]]`` and the admin
API's (``tool.changed`` / ``tool.removed`` events folded into the directory view).

A config tool wins over an admin one of the same name (the admin API refuses to change
it, as it refuses config tenants). What the calls need is rebuilt only when the
directory's view changes, and a tool's schema is compiled only when its settings do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from tollway.config import Config, ToolConfig
from tollway.events.schema import ToolSettings
from tollway.tools.schema import ToolSchemaError, ToolValidator, compile_schema

if TYPE_CHECKING:
    from tollway.events.projections import Projection
    from tollway.events.projections.directory import DirectoryView, ToolEntry

__all__ = ["Tool", "ToolRegistry"]

_encode = msgspec.json.Encoder().encode


class Tool:
    """One registry tool, ready for the calls: its inlined form and its compiled schema."""

    __slots__ = ("description", "function", "name", "parameters", "source", "tenants",
                 "validator")

    def __init__(self, name: str, description: str, parameters: dict[str, Any],
                 tenants: tuple[str, ...] | None, source: str) -> None:
        self.name = name
        self.description = description
        self.parameters = parameters
        self.tenants = frozenset(tenants) if tenants is not None else None
        self.source = source  # "config" or "admin"
        self.validator: ToolValidator = compile_schema(parameters)
        # What a request's {"type": "registry", "name": ...} becomes (OpenAI's shape).
        function: dict[str, Any] = {"name": name, "parameters": parameters}
        if description:
            function["description"] = description
        self.function = msgspec.Raw(_encode({"type": "function", "function": function}))

    def allows(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "object": "tool", "source": self.source,
                "description": self.description, "parameters": self.parameters,
                "tenants": sorted(self.tenants) if self.tenants is not None else None}


def _config_tool(t: ToolConfig) -> Tool:
    return Tool(t.name, t.description, t.parameters,
                tuple(t.tenants) if t.tenants is not None else None, "config")


class ToolRegistry:
    """Name -> :class:`Tool`, the config's and the directory's."""

    def __init__(self, config: Config) -> None:
        self.config_tools: dict[str, Tool] = {t.name: _config_tool(t) for t in config.tools}
        # The directory view's projection, while the events layer runs (set by the gateway).
        self.projection: Projection[DirectoryView] | None = None
        self._view: DirectoryView | None = None
        self._version = -1
        self._tools: dict[str, Tool] = dict(self.config_tools)
        self._compiled: dict[str, tuple[ToolSettings, Tool]] = {}

    def tools(self) -> dict[str, Tool]:
        p = self.projection
        if p is not None:
            view = p.view
            if view is not self._view or view.version != self._version:
                self._rebuild(view)
        return self._tools

    def get(self, name: str) -> Tool | None:
        return self.tools().get(name)

    def entries(self) -> dict[str, ToolEntry]:
        """The directory's entries (removed ones included), for the admin API."""
        p = self.projection
        return p.view.tools if p is not None else {}

    def _rebuild(self, view: DirectoryView) -> None:
        tools = dict(self.config_tools)
        compiled: dict[str, tuple[ToolSettings, Tool]] = {}
        for name, entry in view.tools.items():
            if entry.removed or name in tools:
                continue
            s = entry.settings
            hit = self._compiled.get(name)
            if hit is None or hit[0] != s:
                try:
                    hit = (s, Tool(name, s.description, s.parameters, s.tenants, "admin"))
                except ToolSchemaError:  # checked when made; an event from elsewhere
                    continue
            compiled[name] = hit
            tools[name] = hit[1]
        self._compiled = compiled
        self._tools = tools
        self._view, self._version = view, view.version

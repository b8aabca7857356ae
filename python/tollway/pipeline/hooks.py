"""The pipeline's extension points, as types: what guards, finishers and plan hooks are.

Guards (:mod:`tollway.guards`) and shadow mode (:mod:`tollway.shadow`) plug
into the pipeline through these; they import this module, not the pipeline,
so nothing below the pipeline depends on it. It imports nothing of the
package at run time (the names below are for the type checker only).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from tollway.asgi import Scope
    from tollway.pipeline.call import Call, CallTrace
    from tollway.pipeline.plan import RoutePlan

__all__ = ["CallTracer", "Finisher", "Guard", "PlanHook"]

# A guard may refuse a call by raising a TollwayError (rate limit, budget, cost cap).
Guard: TypeAlias = "Callable[[Call, RoutePlan], Awaitable[None]]"
# Runs once per call after settle and before record (e.g. a budget hold replaced by the
# actual cost); must not raise, and cannot be skipped by a disconnect.
Finisher: TypeAlias = "Callable[[Call], None]"
# Runs after the policy and may replace the plan (the A/B split puts a candidate first).
PlanHook: TypeAlias = "Callable[[Call, RoutePlan], RoutePlan]"
# Starts a call's trace as it reaches the pipeline (tollway.tracing); the pipeline's hook is
# None when tracing is off, so a call then does no tracing work at all.
CallTracer: TypeAlias = "Callable[[Call, Scope], CallTrace]"


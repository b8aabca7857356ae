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
    from tollway.asgi import Scope, Send
    from tollway.pipeline.call import Call, CallTrace
    from tollway.pipeline.plan import RoutePlan

__all__ = ["CallTracer", "DecodeHook", "Finisher", "Guard", "PlanHook", "Redispatch", "ReplyHook",
           "Responder"]

# A guard may refuse a call by raising a TollwayError (rate limit, budget, cost cap).
Guard: TypeAlias = "Callable[[Call, RoutePlan], Awaitable[None]]"
# Runs once per call after settle and before record (e.g. a budget hold replaced by the
# actual cost); must not raise, and cannot be skipped by a disconnect.
Finisher: TypeAlias = "Callable[[Call], None]"
# Runs after the policy and may replace the plan (the A/B split puts a candidate first).
PlanHook: TypeAlias = "Callable[[Call, RoutePlan], RoutePlan]"
# Runs once the body is decoded, before anything counts or plans it; may rewrite the body
# and request (registry tools inlined) or refuse the call by raising a TollwayError.
DecodeHook: TypeAlias = "Callable[[Call], None]"
# Dispatches the call once more (same plan); the new reply replaces the old one.
Redispatch: TypeAlias = "Callable[[], Awaitable[None]]"
# Runs on a whole (non-streamed) reply before the client has any of it: may add response
# headers, set what the record says, or ask for the reply again.
ReplyHook: TypeAlias = "Callable[[Call, Redispatch], Awaitable[None]]"
# Runs after the guards, before dispatch, with the send the reply goes out by: answers
# the call itself (the response cache) and returns None, or returns the send dispatch
# is to use (the same, or one that also keeps what goes out, e.g. a stream to store).
Responder: TypeAlias = "Callable[[Call, Send], Awaitable[Send | None]]"
# Starts a call's trace as it reaches the pipeline (tollway.tracing); the pipeline's hook is
# None when tracing is off, so a call then does no tracing work at all.
CallTracer: TypeAlias = "Callable[[Call, Scope], CallTrace]"


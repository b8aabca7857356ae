"""The parts of a gateway that the pipeline, the dispatcher and shadow mode work with.

:class:`~tollway.gateway.Gateway` builds them and hands them down; the layers
below take these parts, never the gateway itself (nothing they import leads
back to it). This module imports nothing of the package at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tollway.clock import Clock
    from tollway.config import Config
    from tollway.metrics import Metrics
    from tollway.pipeline.plan import Catalog
    from tollway.policy import Policy
    from tollway.providers import OpenAIProvider
    from tollway.resilience import Breakers, LatencyTracker, RetryPolicy
    from tollway.tokens import CachePrices, CostEstimator

__all__ = ["GatewayParts"]


@dataclass(frozen=True, slots=True, eq=False)
class GatewayParts:
    config: Config
    clock: Clock  # the one clock of policy, guards and resilience
    catalog: Catalog
    metrics: Metrics
    providers: dict[str, OpenAIProvider]
    estimator: CostEstimator
    breakers: Breakers
    latency: LatencyTracker
    retry: RetryPolicy
    policy: Policy
    cache_prices: CachePrices  # prompt-cache reads and writes, per model

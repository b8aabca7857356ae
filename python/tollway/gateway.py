"""The Gateway: every long-lived object of one app, owned by its lifespan."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from tollway.auth import KeyIndex
from tollway.breaker import BreakerOptions, BreakerTransition
from tollway.clock import Clock, SystemClock
from tollway.config import Config, ConfigError, TenantConfig, missing_secrets
from tollway.directory import Directory
from tollway.guards import BudgetBook, LocalBudget, build_guards
from tollway.metrics import BudgetGauges, Metrics
from tollway.parts import GatewayParts
from tollway.pipeline import Pipeline
from tollway.pipeline.plan import Catalog
from tollway.policy import Policy
from tollway.providers import OpenAIProvider, build_providers
from tollway.record import Recorder
from tollway.resilience import Breakers, LatencyTracker, RetryPolicy
from tollway.tokens import CachePrices, CostEstimator, load_cache_prices
from tollway.tools.calls import ToolCalls
from tollway.tools.registry import ToolRegistry
from tollway.tracing.settings import TracingSettings, tracing_settings

if TYPE_CHECKING:
    from tollway.cache.store import ResponseCache
    from tollway.events.service import EventsService
    from tollway.shadow.service import ShadowService


class Gateway:
    """Built by ``create_app`` (or ``tollway.Gateway``, the in-process API); started and
    stopped by ``tollway.app.running``: the app's lifespan, a host app's, or the in-process
    API's ``async with``."""

    def __init__(self, config: Config, env: Mapping[str, str] | None = None,
                 recorder: Recorder | None = None, clock: Clock | None = None) -> None:
        env = dict(os.environ if env is None else env)
        missing = missing_secrets(config, env)
        if missing:
            # Refuse to start half-configured: a provider without its key fails every call.
            raise ConfigError(f"environment variables not set: {', '.join(missing)}",
                              source="<environment>")
        self.config = config
        # The one clock of policy, guards and resilience (tests pass a manual one).
        self.clock: Clock = clock or SystemClock()
        self.keys = KeyIndex(config, env)
        self.catalog = Catalog(config)
        self.metrics = Metrics()
        self.providers: dict[str, OpenAIProvider] = build_providers(config.providers, env)
        # Prices by tollway model id (the config's, which override the built-in table).
        self.estimator = CostEstimator({
            m.id: {"input_usd_per_mtok": m.input_usd_per_mtok,
                   "output_usd_per_mtok": m.output_usd_per_mtok}
            for m in config.models
        })
        self.cache_prices = cache_prices_of(config)
        # Policy, guards and resilience: breakers and latency per provider/deployment,
        # retries, the routing policy, and the guards in front of dispatch.
        bc, rc = config.breaker, config.retry
        options: BreakerOptions = {
            "failure_threshold": bc.failure_threshold, "window_s": bc.window_s,
            "recovery_s": bc.recovery_s, "recovery_multiplier": bc.recovery_multiplier,
            "max_recovery_s": bc.max_recovery_s, "half_open_max_calls": bc.half_open_max_calls,
            "success_threshold": bc.success_threshold}
        self.breakers = Breakers([p.name for p in config.providers], self.clock, options)
        self.breakers.hooks.append(self._breaker_changed)
        self.metrics.registry.register(self.breakers)
        self.latency = LatencyTracker(alpha=config.policy.latency_ewma_alpha)
        self.retry = RetryPolicy(rc.attempts, rc.initial_backoff_s, rc.max_backoff_s,
                                 rc.max_retry_after_s)
        self.policy = Policy(config, self.catalog, self.estimator, self.breakers, self.latency,
                             self.clock)
        # The optional layers, attached by their lifespans while the app runs (None when
        # off): the events service ([nats] enabled) and shadow mode.
        self.events: EventsService | None = None
        self.shadow: ShadowService | None = None
        self.cache: ResponseCache | None = None  # the response cache layer's store
        # OpenTelemetry ([tracing] and OTEL_*): decided once, here; None: off.
        self.tracing: TracingSettings | None = tracing_settings(config.tracing, env)
        self.local_budget = LocalBudget(self.clock)
        guards, finishers, self.rate_guard, self.budget_guard = build_guards(
            config, self.clock, self.budget_book)
        if self.budget_guard is not None:
            self.metrics.registry.register(BudgetGauges(
                self.budget_guard.daily, lambda tenant: self.budget_book().spent_today(tenant)))
        # What the pipeline, the dispatcher and shadow mode use: they never see the gateway.
        self.parts = GatewayParts(
            config=config, clock=self.clock, catalog=self.catalog, metrics=self.metrics,
            providers=self.providers, estimator=self.estimator, breakers=self.breakers,
            latency=self.latency, retry=self.retry, policy=self.policy,
            cache_prices=self.cache_prices)
        self.pipeline = Pipeline(self.parts)
        self.pipeline.guards[:] = guards
        self.pipeline.finishers[:] = finishers
        if recorder is not None:
            self.pipeline.recorders.append(recorder)
        # Run-time tenants and keys (the admin API), read while the events layer runs.
        self.directory = Directory(config, self.clock.time)
        self.keys.directory = self.directory
        self.directory.catalog = self.catalog
        self.policy.rollouts = self.directory.rollout
        self.policy.call_caps = self.directory.call_cap
        for guard in (self.rate_guard, self.budget_guard):
            if guard is not None:
                self.directory.listeners.append(guard.set_tenant)
        if self.rate_guard is not None:
            self.directory.limits_listeners.append(self.rate_guard.set_limits)
        if self.budget_guard is not None:
            self.directory.budget_listeners.append(self.budget_guard.set_scope)
        # The tool registry: the config's tools and the directory's (admin API); requests
        # name them, replies' calls to them are checked (tollway.tools).
        self.tools = ToolRegistry(config)
        self.directory.tools = self.tools
        tool_calls = ToolCalls(self.tools, config.tool_calls)
        self.pipeline.decode_hooks.append(tool_calls.inline)
        self.pipeline.reply_hooks.append(tool_calls.checked)
        self.ready = False
        self.running = False  # inside tollway.app.running (the app's or a host's lifespan)
        # Each returns None when fine, else why the gateway is not ready (e.g. NATS down).
        self.ready_checks: list[Callable[[], Awaitable[str | None]]] = []
        self.started_at = time.time()

    def tenant(self, tenant_id: str) -> TenantConfig | None:
        """A tenant of the config file or of the directory."""
        return self.directory.tenant(tenant_id)

    def budget_book(self) -> BudgetBook:
        """Where budget holds go: the events layer's shared view when it runs (every
        gateway on the NATS sees every other's spend), else this process's own book."""
        return self.local_budget if self.events is None else self.events.budget

    def _breaker_changed(self, t: BreakerTransition, failures: int) -> None:
        # The events layer, when running, publishes breaker changes (breaker.changed). A
        # change applied from another process's event (reason "peer") is not news: sent
        # again, every peer would echo it back.
        if self.events is not None and t.reason != "peer":
            recovery = 0.0
            if t.to_state == "open":
                recovery = self.breakers[t.breaker].snapshot(t.at).recovery_timeout
            self.events.recorder.breaker_changed(t.breaker, t.from_state, t.to_state,
                                                 failures=failures, reason=t.reason,
                                                 recovery_s=recovery)

    async def not_ready_reasons(self) -> list[str]:
        if not self.ready:
            return ["starting"]
        reasons = []
        for check in self.ready_checks:
            try:
                reason = await check()
            except Exception as exc:  # a failing check means not ready, not a 500
                reason = f"check failed: {type(exc).__name__}"
            if reason:
                reasons.append(reason)
        return reasons

    async def start(self) -> None:
        for provider in self.providers.values():
            await provider.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        self.pipeline.dispatcher.close()  # the native relay's thread
        for provider in self.providers.values():
            await provider.aclose()


def cache_prices_of(config: Config) -> CachePrices:
    """Each model's prompt-cache prices: the config's, else the built-in table's for its
    id or upstream name, else none (its input price)."""
    table = load_cache_prices()
    prices: dict[str, tuple[float | None, float | None]] = {}
    for m in config.models:
        known = table.get(m.id) or table.get(m.upstream) or (None, None)
        prices[m.id] = (known[0] if m.cache_read_usd_per_mtok is None
                        else m.cache_read_usd_per_mtok,
                        known[1] if m.cache_write_usd_per_mtok is None
                        else m.cache_write_usd_per_mtok)
    return CachePrices(prices)

"""Step 3: which deployments may serve a call, in order.

Today the plan resolves ``model`` (a concrete model id or a route alias such
as ``auto``) to the configured candidates and checks the tenant may use it.
Routing policy (task, sensitivity, tier, latency hints; breaker state) is
issue 4 and plugs in here, returning the same :class:`RoutePlan`.
"""

from __future__ import annotations

from tollway.config import Config, ModelConfig, TenantConfig
from tollway.errors import ModelNotFound, PermissionDenied
from tollway.tokens import DEFAULT_MODEL_OUTPUT_TOKENS, OutputLimit, load_output_limits


class Deployment:
    """One way to serve a model: a provider and that provider's name for it."""

    __slots__ = ("input_usd_per_mtok", "kind", "local", "max_output_tokens",
                 "max_tokens_field", "model", "output_usd_per_mtok", "provider",
                 "provider_kind", "responses", "upstream")

    def __init__(self, model: str, provider: str, upstream: str, input_usd_per_mtok: float,
                 output_usd_per_mtok: float, kind: str, local: bool,
                 max_output_tokens: int = DEFAULT_MODEL_OUTPUT_TOKENS,
                 max_tokens_field: str = "max_tokens", provider_kind: str = "openai",
                 responses: bool = False) -> None:
        self.model = model
        self.provider = provider
        self.upstream = upstream
        self.input_usd_per_mtok = input_usd_per_mtok
        self.output_usd_per_mtok = output_usd_per_mtok
        self.kind = kind
        self.local = local
        self.max_output_tokens = max_output_tokens  # per choice
        self.max_tokens_field = max_tokens_field  # the request field that bounds the output
        self.provider_kind = provider_kind  # the provider's wire format (openai, anthropic)
        self.responses = responses  # the provider serves OpenAI's Responses API itself


def deployment_of(m: ModelConfig, local: bool, provider_kind: str = "openai",
                  responses: bool = False) -> Deployment:
    """``m`` as a deployment; an output limit or field the config leaves out comes from the
    built-in table (by id, then by upstream name), else from the defaults."""
    table = load_output_limits()
    known = table.get(m.id) or table.get(m.upstream) or OutputLimit(None, None)
    return Deployment(m.id, m.provider, m.upstream, m.input_usd_per_mtok,
                      m.output_usd_per_mtok, m.kind, local,
                      m.max_output_tokens or known.max_output_tokens
                      or DEFAULT_MODEL_OUTPUT_TOKENS,
                      m.max_tokens_field or known.max_tokens_field or "max_tokens",
                      provider_kind, responses)


class RoutePlan:
    __slots__ = ("candidates", "reason", "route")

    def __init__(self, route: str, candidates: tuple[Deployment, ...], reason: str = "") -> None:
        self.route = route
        self.candidates = candidates
        self.reason = reason

    def bound(self, dep: Deployment) -> int:
        """Output tokens per choice the gateway asks ``dep`` for, in its
        ``max_tokens_field``, because the call's cap or budget cannot pay more (0: the
        request's own bound, or none, stands). See :class:`tollway.policy.PolicyPlan`."""
        return 0

    def relay_limit(self, dep: Deployment) -> int:
        """Output tokens (every choice) a stream from ``dep`` is relayed at most: what the
        budget held, when that is less than the model's full output (0: no limit)."""
        return 0


class Catalog:
    """Models and route aliases, resolved once at startup."""

    def __init__(self, config: Config) -> None:
        local = {p.name: p.local for p in config.providers}
        kinds = {p.name: p.kind for p in config.providers}
        native = {p.name for p in config.providers if p.responses}
        self.models: dict[str, Deployment] = {
            m.id: deployment_of(m, local.get(m.provider, False),
                                kinds.get(m.provider, "openai"), m.provider in native)
            for m in config.models
        }
        self.routes: dict[str, tuple[Deployment, ...]] = {
            r.alias: tuple(self.models[c] for c in r.candidates) for r in config.routes
        }
        self._plans: dict[str, tuple[Deployment, ...]] = {
            **{mid: (d,) for mid, d in self.models.items()}, **self.routes
        }

    @staticmethod
    def allowed(tenant: TenantConfig, name: str) -> bool:
        """Whether the tenant (as its key sees it: a directory key may allow fewer models)
        may use a model id or alias."""
        allow = tenant.models
        return allow is None or name in allow

    def listing(self, tenant: TenantConfig) -> list[tuple[str, str]]:
        """(id, owned_by) of every model and alias the tenant may use."""
        out = [(d.model, d.provider) for d in self.models.values() if self.allowed(tenant, d.model)]
        out += [(alias, "tollway") for alias in self.routes if self.allowed(tenant, alias)]
        return out

    def plan(self, tenant: TenantConfig, name: str) -> RoutePlan:
        candidates = self._plans.get(name)
        if candidates is None:
            raise ModelNotFound(
                f"The model `{name}` does not exist or you do not have access to it.",
                param="model")
        if not self.allowed(tenant, name):
            raise PermissionDenied(f"tenant may not use model `{name}`", param="model",
                                   code="model_not_allowed")
        return RoutePlan(name, candidates)


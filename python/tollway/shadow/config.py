"""``[[shadow]]``: which routes are shadowed (or A/B split), to which candidates, within which caps.

One table per route alias (or concrete model id) as the caller names it in
``model``::

    [[shadow]]
    route = "auto"                  # calls asking for this alias (or model id)
    candidates = ["llama-3.1-8b"]   # model ids, each compared on the same sampled calls
    fraction = 0.10                 # share of the route's completed calls that are shadowed
    daily_usd = 1.00                # shadow spend cap per UTC day, all candidates together
    max_in_flight = 4               # shadow calls of this route running at once
    # timeout_s = 120, agreement_threshold = 0.8, seed = <int> (reproducible sampling)

    [[shadow]]
    route = "chat"
    mode = "ab"                     # live A/B split instead of shadowing
    candidates = ["gpt-4o-mini"]
    weights = [0.2]                 # share of callers each candidate serves; the rest: primary
    sticky = "user"                 # same arm per X-Tollway-User / `user` field (else tenant)
    # salt = "exp-2"                # a new salt reshuffles who lands in which arm

The struct is :class:`tollway.config.ShadowRouteConfig` (the config's shape
lives in one module); :func:`check_shadow` is the cross-check that
``parse_config`` runs against the models and routes.
"""

from __future__ import annotations

from tollway.config import ShadowRouteConfig

__all__ = ["ShadowRouteConfig", "check_shadow"]


def check_shadow(entries: list[ShadowRouteConfig], models: dict[str, bool],
                 routes: set[str]) -> list[tuple[str, str]]:
    """Problems as (msgspec path, message); ``models`` maps model id -> is a chat model."""
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, e in enumerate(entries):
        at = f"$.shadow[{i}]"
        if e.route in seen:
            problems.append((f"{at}.route", f"route {e.route!r} has two [[shadow]] tables"))
        seen.add(e.route)
        if e.route not in routes and e.route not in models:
            problems.append((f"{at}.route", f"{e.route!r} is neither a route alias nor a model"))
        if len(set(e.candidates)) != len(e.candidates):
            problems.append((f"{at}.candidates", "a candidate is named twice"))
        for j, c in enumerate(e.candidates):
            if c not in models:
                problems.append((f"{at}.candidates[{j}]", f"model {c!r} is not configured "
                                 "(or its provider is not enabled)"))
            elif not models[c]:
                problems.append((f"{at}.candidates[{j}]",
                                 f"model {c!r} is not a chat model (only chat calls are shadowed)"))
        if e.mode == "ab":
            if len(e.weights) != len(e.candidates):
                problems.append((f"{at}.weights", "mode = \"ab\" needs one weight per candidate"))
            elif sum(e.weights) > 1.0 + 1e-9:
                problems.append((f"{at}.weights", "the weights add up to more than 1"))
        elif e.weights:
            problems.append((f"{at}.weights", "weights are for mode = \"ab\"; shadow mode "
                             "samples with `fraction`"))
    return problems

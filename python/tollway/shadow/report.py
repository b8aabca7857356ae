"""The shadow report: per route and candidate, how the candidate did against the primary.

Figures, over the samples of the chosen days:

- ``samples``; ``error_rate`` = candidate failures / samples
- ``agreement_mean`` = mean score over the samples the candidate answered;
  ``agreement_rate`` = share of those at or above the route's threshold
- latency p50/p95 of each side (histogram percentiles, within 2 %; see
  :mod:`tollway.shadow.projection`), and the primary's time to first token
- ``cost_ratio`` = candidate cost / primary cost, summed over the samples
  the candidate answered (None when the primary cost nothing)
- ``shadow_spend_usd``: everything the candidate calls cost, failures included

The learning part (:func:`query_learned`): learning routing's decisions
(``route.learned``), newest last, each with the evidence it was made on, and the
model serving each route and task now, per gateway process.

The A/B part (:func:`query_ab`), per route, arm and serving model, over live
calls: count, failure rate, latency p50/p95, mean cost per completed call
and its ratio to the primary arm's.
"""

from __future__ import annotations

from typing import Any

from tollway.shadow.projection import ArmRow, Row, ShadowView, percentile

__all__ = ["format_ab_table", "format_learned", "format_table", "query", "query_ab",
           "query_learned"]

NANO = 1_000_000_000


def _merge(into: Row, row: Row) -> None:
    for name in ("samples", "errors", "scored", "agreement_sum", "agreed",
                 "primary_cost_nanousd", "candidate_cost_nanousd", "shadow_spend_nanousd",
                 "primary_tokens", "candidate_tokens"):
        setattr(into, name, getattr(into, name) + getattr(row, name))
    for name in ("primary_latency", "candidate_latency", "primary_ttft", "primary_models",
                 "errors_by_code", "methods"):
        acc: dict[Any, int] = getattr(into, name)
        for k, v in getattr(row, name).items():
            acc[k] = acc.get(k, 0) + v
    into.candidate_provider = into.candidate_provider or row.candidate_provider


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def query(view: ShadowView, *, route: str | None = None, since: str = "",
          until: str = "9999-12-31") -> list[dict[str, Any]]:
    merged: dict[tuple[str, str], Row] = {}
    for (r, cand, day), row in view.rows.items():
        if (route is not None and r != route) or not since <= day <= until:
            continue
        acc = merged.get((r, cand))
        if acc is None:
            acc = merged[(r, cand)] = Row()
        _merge(acc, row)
    out = []
    for (r, cand), row in sorted(merged.items()):
        answered = row.samples - row.errors
        out.append({
            "route": r,
            "candidate": cand,
            "candidate_provider": row.candidate_provider,
            "primary_models": dict(sorted(row.primary_models.items())),
            "samples": row.samples,
            "errors": row.errors,
            "error_rate": row.errors / row.samples if row.samples else None,
            "errors_by_code": dict(sorted(row.errors_by_code.items())),
            "scored": row.scored,
            "agreement_mean": row.agreement_sum / row.scored if row.scored else None,
            "agreement_rate": row.agreed / row.scored if row.scored else None,
            "agreement_methods": dict(sorted(row.methods.items())),
            "primary_latency_p50_ms": _ms(percentile(row.primary_latency, 0.50)),
            "primary_latency_p95_ms": _ms(percentile(row.primary_latency, 0.95)),
            "primary_ttft_p50_ms": _ms(percentile(row.primary_ttft, 0.50)),
            "candidate_latency_p50_ms": _ms(percentile(row.candidate_latency, 0.50)),
            "candidate_latency_p95_ms": _ms(percentile(row.candidate_latency, 0.95)),
            "answered": answered,
            "primary_cost_usd": row.primary_cost_nanousd / NANO,
            "candidate_cost_usd": row.candidate_cost_nanousd / NANO,
            "cost_ratio": (row.candidate_cost_nanousd / row.primary_cost_nanousd
                           if row.primary_cost_nanousd else None),
            "primary_tokens": row.primary_tokens,
            "candidate_tokens": row.candidate_tokens,
            "shadow_spend_usd": row.shadow_spend_nanousd / NANO,
        })
    return out


def query_ab(view: ShadowView, *, route: str | None = None, since: str = "",
             until: str = "9999-12-31") -> list[dict[str, Any]]:
    merged: dict[tuple[str, str, str], ArmRow] = {}
    for (r, arm, model, day), row in view.arms.items():
        if (route is not None and r != route) or not since <= day <= until:
            continue
        acc = merged.setdefault((r, arm, model), ArmRow())
        acc.calls += row.calls
        acc.failed += row.failed
        acc.rejected += row.rejected
        acc.cost_nanousd += row.cost_nanousd
        acc.tokens += row.tokens
        for mine, theirs in ((acc.latency, row.latency), (acc.ttft, row.ttft)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
    # Mean cost per completed call of each route's primary arm: the ratios' denominator.
    base: dict[str, list[int]] = {}
    for (r, arm, _), row in merged.items():
        if arm == "primary":
            acc2 = base.setdefault(r, [0, 0])
            acc2[0] += row.cost_nanousd
            acc2[1] += row.calls - row.failed - row.rejected
    out = []
    for (r, arm, model), row in sorted(merged.items()):
        done = row.calls - row.failed - row.rejected
        mean = row.cost_nanousd / done if done else None
        b = base.get(r)
        base_mean = b[0] / b[1] if b and b[1] else None
        out.append({
            "route": r,
            "arm": arm,
            "model": model,
            "calls": row.calls,
            "completed": done,
            "failed": row.failed,
            "rejected": row.rejected,
            "error_rate": row.failed / (row.calls - row.rejected)
            if row.calls - row.rejected else None,
            "latency_p50_ms": _ms(percentile(row.latency, 0.50)),
            "latency_p95_ms": _ms(percentile(row.latency, 0.95)),
            "ttft_p50_ms": _ms(percentile(row.ttft, 0.50)),
            "cost_usd": row.cost_nanousd / NANO,
            "mean_cost_usd": mean / NANO if mean is not None else None,
            "cost_ratio": mean / base_mean if mean is not None and base_mean else None,
            "tokens": row.tokens,
        })
    return out


def query_learned(view: ShadowView, *, route: str | None = None) -> dict[str, Any]:
    decisions = [
        {"at": d.at, "route": d.route, "task": d.task, "model": d.model or None,
         "previous": d.previous or None, "action": d.action, "samples": d.samples,
         "agreement_rate": d.agreement_rate, "why": d.why, "instance": d.instance}
        for d in view.learned if route is None or d.route == route]
    serving = [{"route": r, "task": t, "instance": i, "model": m or None}
               for (r, t, i), m in sorted(view.serving.items())
               if route is None or r == route]
    return {"decisions": decisions, "serving": serving}


def format_learned(learned: dict[str, Any]) -> str:
    lines = [f"{d['action']:>8}  {d['route']}/{d['task']}: {d['previous'] or 'primary'} -> "
             f"{d['model'] or 'primary'}  ({d['why']})" for d in learned["decisions"]]
    return "\n".join(lines)


_COLUMNS = (
    ("route", "route", "{}"),
    ("candidate", "candidate", "{}"),
    ("n", "samples", "{}"),
    ("err%", "error_rate", "{:.1%}"),
    ("agree", "agreement_mean", "{:.3f}"),
    ("agree%", "agreement_rate", "{:.1%}"),
    ("p50 ms", "primary_latency_p50_ms", "{:.1f}"),
    ("p95 ms", "primary_latency_p95_ms", "{:.1f}"),
    ("cand p50", "candidate_latency_p50_ms", "{:.1f}"),
    ("cand p95", "candidate_latency_p95_ms", "{:.1f}"),
    ("cost x", "cost_ratio", "{:.3f}"),
    ("spend $", "shadow_spend_usd", "{:.4f}"),
)


_AB_COLUMNS = (
    ("route", "route", "{}"),
    ("arm", "arm", "{}"),
    ("model", "model", "{}"),
    ("calls", "calls", "{}"),
    ("err%", "error_rate", "{:.1%}"),
    ("p50 ms", "latency_p50_ms", "{:.1f}"),
    ("p95 ms", "latency_p95_ms", "{:.1f}"),
    ("ttft p50", "ttft_p50_ms", "{:.1f}"),
    ("$/call", "mean_cost_usd", "{:.6f}"),
    ("cost x", "cost_ratio", "{:.3f}"),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: ``p50 ms``/``p95 ms`` are the primary's, ``cand`` the candidate's."""
    if not rows:
        return "no shadow samples yet"
    return _table(rows, _COLUMNS, 2)


def format_ab_table(rows: list[dict[str, Any]]) -> str:
    return _table(rows, _AB_COLUMNS, 3) if rows else ""


def _table(rows: list[dict[str, Any]], columns: tuple[tuple[str, str, str], ...],
           left: int) -> str:
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else f.format(r[k]) for _, k, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.ljust(w) if i < left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)

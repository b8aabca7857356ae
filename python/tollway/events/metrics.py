"""Prometheus metrics of the events layer, registered on the app's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class EventMetrics:
    """Nothing is dropped, spilled or duplicated without one of these moving."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # A private registry by default: two publishers in one process (tests,
        # benchmarks) must not collide on the global one.
        reg = registry if registry is not None else CollectorRegistry()
        self.registry = reg
        self.published = Counter(
            "tollway_events_published_total",
            "Events acknowledged by JetStream (including resends it recognised as duplicates).",
            registry=reg,
        )
        self.duplicates = Counter(
            "tollway_events_duplicates_total",
            "Publishes JetStream acknowledged as duplicates of an earlier Nats-Msg-Id.",
            registry=reg,
        )
        self.dropped = Counter(
            "tollway_events_dropped_total",
            "Events given up on (never stored), by reason.",
            ["reason"],
            registry=reg,
        )
        self.not_journaled = Counter(
            "tollway_events_not_journaled_total",
            "Events the outbox refused (full, or not writable): not durable; published from "
            "memory while NATS keeps up, else dropped (tollway_events_dropped_total).",
            ["reason"],
            registry=reg,
        )
        self.spilled = Counter(
            "tollway_events_spilled_total",
            "Events sent from the local outbox file instead of from memory (NATS failing, "
            "the queue full).",
            ["reason"],
            registry=reg,
        )
        self.outbox_depth = Gauge(
            "tollway_events_outbox_depth",
            "Events waiting in the local outbox file for NATS (0 while they are published "
            "from memory).",
            registry=reg,
        )
        self.outbox_bytes = Gauge(
            "tollway_events_outbox_bytes",
            "Bytes of unsent events in the local outbox (bounded by outbox_max_bytes).",
            registry=reg,
        )
        self.outbox_max_bytes = Gauge(
            "tollway_events_outbox_max_bytes",
            "The outbox's cap: events that would take it past this are dropped and counted "
            "(tollway_events_dropped_total{reason=\"outbox_full\"}).",
            registry=reg,
        )
        self.queue_depth = Gauge(
            "tollway_events_queue_depth",
            "Events in the in-memory queue waiting for the publisher task.",
            registry=reg,
        )
        self.connected = Gauge(
            "tollway_events_nats_connected",
            "1 while the gateway is connected to NATS.",
            registry=reg,
        )
        self.projection_lag = Gauge(
            "tollway_projection_last_sequence",
            "Last stream sequence folded into each projection.",
            ["projection"],
            registry=reg,
        )
        self.projection_pending = Gauge(
            "tollway_projection_pending_events",
            "Events in the stream the projections have not folded yet (the server's count at "
            "the last delivery); -1 while they do not follow the stream.",
            registry=reg,
        )
        self.projection_pending.set(-1)
        self.budget_leases = Counter(
            "tollway_budget_leases_total",
            "Budget leases taken through the stream (each one compare-and-set publish).",
            registry=reg,
        )
        self.budget_degraded = Counter(
            "tollway_budget_local_reservations_total",
            "Budget leases granted from the local view only, because NATS was unreachable.",
            registry=reg,
        )

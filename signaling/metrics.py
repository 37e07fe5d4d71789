"""Prometheus metrics of one signaling app, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connected_sites = Gauge(
            "telehealth_connected_sites", "Sites with at least one connection",
            registry=self.registry,
        )
        self.connections = Gauge(
            "telehealth_connections", "Open socket.io connections", registry=self.registry
        )
        self.queue_length = Gauge(
            "telehealth_queue_length", "Waiting consult requests", ["priority"],
            registry=self.registry,
        )
        self.pairing_seconds = Histogram(
            "telehealth_pairing_seconds",
            "Time to handle an accept: claim, consultation created, both sides notified",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.wait_seconds = Histogram(
            "telehealth_request_wait_seconds", "Time a request waited before it was accepted",
            ["priority"], buckets=_WAIT_BUCKETS, registry=self.registry,
        )
        self.requests = Counter(
            "telehealth_requests", "Consult requests by outcome", ["outcome"],
            registry=self.registry,
        )
        self.rejected_events = Counter(
            "telehealth_rejected_events", "Events answered with an error", ["event", "code"],
            registry=self.registry,
        )
        self.live_consultations = Gauge(
            "telehealth_live_consultations", "Consultations not yet ended", registry=self.registry
        )
        self.relay_moves = Counter(
            "telehealth_relay_moves",
            "Consultations that changed relay (reason: relay_lost, relay_drained, "
            "signaling_restart; outcome: placed on a relay, or waiting for one)",
            ["reason", "outcome"], registry=self.registry,
        )
        self.waiting_for_relay = Gauge(
            "telehealth_consultations_waiting_for_relay",
            "Open consultations that no relay carries at the moment", registry=self.registry,
        )
        self.malformed_requests = Counter(
            "telehealth_http_malformed_requests",
            "HTTP request heads refused 400 before routing (malformed, too long)",
            registry=self.registry,
        )

    def set_queue(self, counts: dict[str, int]) -> None:
        for priority, count in counts.items():
            self.queue_length.labels(priority=priority).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics of PROTOCOL.md §6, on a registry owned by one server.

Request-path counters live here as prometheus-client instruments. Everything
a service knows (rate-limit rejects, push outcomes, audit queue, pool
connections, nursery tasks) is read from its ``statistics()`` at scrape time
by :class:`StatisticsCollector`, so services never touch the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pqmsg.loopwatch import StepStatistics

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
AUTH_REJECT_REASONS = ("malformed", "skew", "unknown_device", "revoked", "signature", "replay")
LIMITERS = ("registration", "provisioning", "bundle", "send")
POOL_STATES = ("idle", "in_use")


@attrs.frozen
class ScrapeView:
    """What the collector reads at scrape time: statistics by service name."""

    services: Mapping[str, Any]
    in_flight: int
    in_flight_limit: int
    long_polls: int
    loop: StepStatistics


class StatisticsCollector(Collector):
    """Turns services' ``statistics()`` into metric families on each scrape."""

    def __init__(self, view: Callable[[], ScrapeView]) -> None:
        self._view = view

    def collect(self) -> Iterator[Any]:
        view = self._view()
        stats = view.services
        yield _gauge("pqmsg_http_in_flight_requests", "Requests being served now.", view.in_flight)
        yield _gauge("pqmsg_http_in_flight_limit", "Requests served at once before 503.", view.in_flight_limit)
        yield _gauge("pqmsg_long_polls_waiting", "Long polls parked on new messages.", view.long_polls)
        notifier = stats.get("notifier")
        yield _gauge("pqmsg_streams_open", "Open WebSocket streams.", notifier.streams if notifier else 0)
        yield CounterMetricFamily(
            "pqmsg_event_loop_slow_steps", "Task steps that held the event loop over 10 ms.",
            value=view.loop.slow_steps,
        )
        yield _gauge(
            "pqmsg_event_loop_max_step_seconds", "Longest single task step since start.", view.loop.max_step_s
        )
        tasks = GaugeMetricFamily("pqmsg_nursery_tasks", "Tasks in each service nursery.", labels=["nursery"])
        for name, stat in sorted(stats.items()):
            tasks.add_metric([name], getattr(stat, "tasks", 0))
        yield tasks
        yield from _storage_families(stats.get("storage"))
        yield from _limiter_families(stats.get("limiter"))
        yield from _push_families(stats.get("push"))
        yield from _audit_families(stats.get("audit"))
        yield from _verifier_families(stats.get("verifier"))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _storage_families(stat: Any) -> Iterator[Any]:
    pool = GaugeMetricFamily("pqmsg_db_pool_connections", "Database connections by state.", labels=["state"])
    stale = 0
    if stat is not None:
        pool.add_metric(["idle"], stat.pool.idle)
        pool.add_metric(["in_use"], stat.pool.in_use)
        stale = stat.stale_signed_prekey_devices
    yield pool
    yield _gauge(
        "pqmsg_signed_prekey_stale_devices",
        "Active devices whose signed prekey is older than the rotation limit.",
        stale,
    )


def _verifier_families(stat: Any) -> Iterator[Any]:
    checks = CounterMetricFamily(
        "pqmsg_signature_checks", "Request signature checks, by where they ran.", labels=["where"]
    )
    checks.add_metric(["helper"], stat.helper_checks_total if stat else 0)
    checks.add_metric(["in_process"], stat.in_process_checks_total if stat else 0)
    yield checks
    yield _gauge(
        "pqmsg_signature_helpers_running", "Signature-check helper processes up.", stat.running if stat else 0
    )
    yield CounterMetricFamily(
        "pqmsg_signature_helper_failures",
        "Signature-check helpers replaced after failing (their checks ran in process).",
        value=stat.helper_failures_total if stat else 0,
    )


def _limiter_families(stat: Any) -> Iterator[Any]:
    rejects = CounterMetricFamily(
        "pqmsg_rate_limit_rejects", "Requests refused by a rate limiter.", labels=["limiter"]
    )
    counts = dict.fromkeys(LIMITERS, 0)
    if stat is not None:
        counts.update(stat.rejects)
    for limiter, count in sorted(counts.items()):
        rejects.add_metric([limiter], count)
    yield rejects


def _push_families(stat: Any) -> Iterator[Any]:
    requests = CounterMetricFamily(
        "pqmsg_push_requests", "Push wake-ups by provider and outcome.", labels=["provider", "outcome"]
    )
    state = GaugeMetricFamily(
        "pqmsg_push_circuit_state", "Push circuit breaker (0 closed, 1 half-open, 2 open).", labels=["provider"]
    )
    skipped = CounterMetricFamily(
        "pqmsg_push_skipped", "Wake-ups not sent, by reason (coalesced, streaming, ...).", labels=["reason"]
    )
    overflow = 0
    if stat is not None:
        for (provider, outcome), count in sorted(stat.requests.items()):
            requests.add_metric([provider, outcome], count)
        for provider, pstat in sorted(stat.providers.items()):
            state.add_metric([provider], pstat.state_value)
        for reason, count in sorted(stat.skipped.items()):
            skipped.add_metric([reason], count)
        overflow = stat.overflow_total
    yield requests
    yield state
    yield skipped
    yield CounterMetricFamily(
        "pqmsg_push_queue_overflow", "Wake-ups dropped because the push queue was full.", value=overflow
    )


def _audit_families(stat: Any) -> Iterator[Any]:
    depth = events = dropped = 0
    if stat is not None:
        depth, events, dropped = stat.queue_depth, stat.events_total, stat.dropped_total
    yield _gauge("pqmsg_audit_queue_depth", "Audit events waiting to be written.", depth)
    yield CounterMetricFamily("pqmsg_audit_events", "Audit events written.", value=events)
    yield CounterMetricFamily("pqmsg_audit_dropped", "Audit events dropped (queue full).", value=dropped)


class Metrics:
    """The server's instruments on a registry of its own (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.http_requests = Counter(
            "pqmsg_http_requests", "HTTP requests by route template and status.",
            ["method", "route", "status"], registry=reg,
        )
        self.http_duration = Histogram(
            "pqmsg_http_request_duration_seconds", "HTTP request latency by route template.",
            ["method", "route"], buckets=LATENCY_BUCKETS_S, registry=reg,
        )
        self.auth_rejects = Counter(
            "pqmsg_auth_rejects", "Authentication rejects by reason.", ["reason"], registry=reg
        )
        for reason in AUTH_REJECT_REASONS:
            self.auth_rejects.labels(reason)
        self.registrations = Counter("pqmsg_registrations", "Accounts registered.", registry=reg)
        self.revocations = Counter("pqmsg_device_revocations", "Devices revoked.", registry=reg)
        self.stored = Counter("pqmsg_messages_stored", "Message copies stored.", registry=reg)
        self.delivered = Counter("pqmsg_messages_delivered", "Message copies delivered.", registry=reg)
        self.acked = Counter("pqmsg_messages_acked", "Message copies acknowledged.", registry=reg)
        self.ratchet_advances = Counter(
            "pqmsg_pq_ratchet_advances", "Sender/recipient device pairs whose PQ epoch grew.", registry=reg
        )
        self.last_resort_served = Counter(
            "pqmsg_pq_last_resort_served", "Bundles served with the last-resort PQ key.", registry=reg
        )

    def bind(self, view: Callable[[], ScrapeView]) -> None:
        """Export the services' statistics, read through ``view`` at each scrape."""
        self.registry.register(StatisticsCollector(view))

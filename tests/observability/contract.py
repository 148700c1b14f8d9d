"""The metric contract of PROTOCOL.md section 6, as data, and checks against it.

The alert rules, the dashboard and the runbook may only use these names.
``contract_violations`` checks a real ``/metrics`` exposition against the
contract (names, types, label names, histogram buckets), so the server
tests can feed it the text of a running server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

LATENCY_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class MetricSpec:
    """One contract metric: its full exposed name, type and label names."""

    name: str
    kind: str
    labels: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        """The family name as the text parser reports it (counters lose ``_total``)."""
        if self.kind == "counter":
            return self.name.removesuffix("_total")
        return self.name

    @property
    def series_names(self) -> tuple[str, ...]:
        """Every sample name a query may use for this metric."""
        if self.kind == "histogram":
            return tuple(f"{self.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        return (self.name,)


CONTRACT: Final = (
    MetricSpec("pqmsg_http_requests_total", "counter", ("method", "route", "status")),
    MetricSpec("pqmsg_http_request_duration_seconds", "histogram", ("method", "route")),
    MetricSpec("pqmsg_http_in_flight_requests", "gauge"),
    # Not in PROTOCOL.md section 6 yet: the configured PQMSG_MAX_IN_FLIGHT,
    # which the in-flight pressure alert divides by (issue 6).
    MetricSpec("pqmsg_http_in_flight_limit", "gauge"),
    MetricSpec("pqmsg_auth_rejects_total", "counter", ("reason",)),
    MetricSpec("pqmsg_rate_limit_rejects_total", "counter", ("limiter",)),
    MetricSpec("pqmsg_registrations_total", "counter"),
    MetricSpec("pqmsg_device_revocations_total", "counter"),
    MetricSpec("pqmsg_messages_stored_total", "counter"),
    MetricSpec("pqmsg_messages_delivered_total", "counter"),
    MetricSpec("pqmsg_messages_acked_total", "counter"),
    MetricSpec("pqmsg_pq_ratchet_advances_total", "counter"),
    MetricSpec("pqmsg_pq_last_resort_served_total", "counter"),
    MetricSpec("pqmsg_signed_prekey_stale_devices", "gauge"),
    MetricSpec("pqmsg_push_requests_total", "counter", ("provider", "outcome")),
    MetricSpec("pqmsg_push_circuit_state", "gauge", ("provider",)),
    MetricSpec("pqmsg_audit_queue_depth", "gauge"),
    MetricSpec("pqmsg_audit_events_total", "counter"),
    MetricSpec("pqmsg_audit_dropped_total", "counter"),
    MetricSpec("pqmsg_nursery_tasks", "gauge", ("nursery",)),
    MetricSpec("pqmsg_db_pool_connections", "gauge", ("state",)),
)

#: Every series name a PromQL expression may select from the contract.
CONTRACT_SERIES: Final = frozenset(name for spec in CONTRACT for name in spec.series_names)

#: Plausible label values for the sample exposition.
SAMPLE_LABEL_VALUES: Final[Mapping[str, tuple[str, ...]]] = {
    "method": ("GET", "PUT"),
    "route": ("/v1/messages", "/v1/keys/{account}/{device}", "/health"),
    "status": ("200", "401", "503"),
    "reason": ("malformed", "skew", "unknown_device", "revoked", "signature", "replay"),
    "limiter": ("registration", "provisioning", "bundle", "send"),
    "provider": ("fcm", "apns"),
    "outcome": ("ok", "error"),
    "nursery": ("audit", "push", "cleanup"),
    "state": ("idle", "in_use"),
}


def _make_metric(spec: MetricSpec, registry: CollectorRegistry) -> MetricWrapperBase:
    """Register one contract metric with prometheus_client."""
    doc = f"{spec.name} (PROTOCOL.md section 6)"
    if spec.kind == "counter":
        return Counter(spec.name, doc, spec.labels, registry=registry)
    if spec.kind == "histogram":
        return Histogram(spec.name, doc, spec.labels, registry=registry, buckets=LATENCY_BUCKETS_S)
    return Gauge(spec.name, doc, spec.labels, registry=registry)


def _children(metric: MetricWrapperBase, labels: tuple[str, ...]) -> list[MetricWrapperBase]:
    """One child per combination of the sample label values (or the metric itself)."""
    if not labels:
        return [metric]
    combos: list[tuple[str, ...]] = [()]
    for label in labels:
        combos = [(*combo, value) for combo in combos for value in SAMPLE_LABEL_VALUES[label]]
    return [metric.labels(*combo) for combo in combos]


def _touch(child: MetricWrapperBase, kind: str) -> None:
    """Give one child a plausible value."""
    if kind == "counter":
        child.inc(3)  # type: ignore[attr-defined]
    elif kind == "histogram":
        child.observe(0.042)  # type: ignore[attr-defined]
    else:
        child.set(1)  # type: ignore[attr-defined]


def sample_exposition() -> str:
    """A Prometheus text exposition of every contract metric, as a server would serve it."""
    registry = CollectorRegistry(auto_describe=True)
    for spec in CONTRACT:
        metric = _make_metric(spec, registry)
        for child in _children(metric, spec.labels):
            _touch(child, spec.kind)
    return generate_latest(registry).decode("utf-8")


def _label_names(samples: Iterable[Sample], spec: MetricSpec) -> set[frozenset[str]]:
    """The distinct label-name sets of a family's primary samples (``le`` removed)."""
    primary = {spec.name, f"{spec.name}_bucket", f"{spec.name}_count", f"{spec.name}_sum"}
    return {frozenset(s.labels) - {"le"} for s in samples if s.name in primary}


def _bucket_violations(samples: Iterable[Sample], spec: MetricSpec) -> list[str]:
    """Bucket boundaries that differ from the documented latency buckets."""
    wanted = {float(b) for b in LATENCY_BUCKETS_S} | {float("inf")}
    seen = {float(s.labels["le"]) for s in samples if s.name == f"{spec.name}_bucket"}
    if seen == wanted:
        return []
    return [f"{spec.name}: buckets {sorted(seen)} differ from the contract {sorted(wanted)}"]


def _spec_violations(spec: MetricSpec, kind: str, samples: list[Sample]) -> list[str]:
    """What is wrong with one exposed family, compared with its contract entry."""
    if kind != spec.kind:
        return [f"{spec.name}: type {kind}, contract says {spec.kind}"]
    label_sets = _label_names(samples, spec)
    if not label_sets:
        return [f"{spec.name}: no samples (initialise its label children at start-up)"]
    problems = [
        f"{spec.name}: labels {sorted(found)}, contract says {sorted(spec.labels)}"
        for found in label_sets
        if found != frozenset(spec.labels)
    ]
    if spec.kind == "histogram":
        problems += _bucket_violations(samples, spec)
    return problems


def contract_violations(text: str) -> list[str]:
    """Every way the exposition ``text`` breaks the metric contract (empty when it conforms)."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    problems: list[str] = []
    for spec in CONTRACT:
        family = families.get(spec.family)
        if family is None:
            problems.append(f"{spec.name}: missing")
            continue
        problems += _spec_violations(spec, family.type, list(family.samples))
    return problems

"""Latency samples per endpoint, summarised as counts, throughput and percentiles.

A sample is ``(start, latency, status)`` with times on the trio clock,
``start`` relative to the measured window's beginning. Status 0 is a
transport error (no HTTP answer). Samples that start before the window
(warm-up) are kept apart and reported as such, never mixed in.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import attrs

# Endpoints, named as the report shows them.
SEND = "send"
POLL = "poll"  # long-poll fetch: its latency includes the wait, so it is no service time
FETCH = "fetch"
ACK = "ack"
BUNDLE = "bundle"
STREAM_ACK = "stream_ack"  # an ack frame on a stream, until the server's "acked"
STREAM_CLOSED = "stream_closed"  # a stream the server closed (status: the close code)
E2E = "e2e_delivery"
# Everything authenticated whose latency is service time (long polls are not).
SERVICE_ENDPOINTS = (SEND, FETCH, ACK, BUNDLE, STREAM_ACK)
TRANSPORT_ERROR = 0
BIN_S = 1.0


@attrs.define
class Recorder:
    """Collects samples during a run; the window starts at ``start``."""

    start: float = 0.0
    end: float = 0.0
    samples: dict[str, list[tuple[float, float, int]]] = attrs.field(factory=lambda: defaultdict(list))
    dropped: int = 0  # open loop: arrivals skipped because the concurrency cap was reached

    def add(self, endpoint: str, started: float, latency_s: float, status: int) -> None:
        if started >= self.start and (self.end == 0.0 or started < self.end):
            self.samples[endpoint].append((started - self.start, latency_s, status))

    def count(self) -> int:
        return sum(len(v) for k, v in self.samples.items() if k != E2E)

    def errors(self) -> int:
        return sum(1 for k, v in self.samples.items() if k != E2E for s in v if not _ok(s[2]))


def _ok(status: int) -> bool:
    return 200 <= status < 300


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (``q`` in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_ms(values: Iterable[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    return {
        "p50": round(percentile(ordered, 50) * 1000, 3),
        "p95": round(percentile(ordered, 95) * 1000, 3),
        "p99": round(percentile(ordered, 99) * 1000, 3),
        "max": round(ordered[-1] * 1000, 3),
        "mean": round(sum(ordered) / len(ordered) * 1000, 3),
    }


def summarise(samples: Sequence[tuple[float, float, int]], window_s: float) -> dict[str, object]:
    """Requests, errors by status, throughput of successes, latency of successes."""
    errors: dict[str, int] = defaultdict(int)
    ok = [lat for _, lat, status in samples if _ok(status)]
    for _, _, status in samples:
        if not _ok(status):
            errors["transport" if status == TRANSPORT_ERROR else str(status)] += 1
    return {
        "requests": len(samples),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "throughput_rps": round(len(ok) / window_s, 2) if window_s > 0 else 0.0,
        "latency_ms": latency_ms(ok),
    }


def summarise_all(rec: Recorder) -> dict[str, dict[str, object]]:
    window = rec.end - rec.start
    out = {name: summarise(s, window) for name, s in sorted(rec.samples.items()) if name != E2E}
    service = [s for name in SERVICE_ENDPOINTS for s in rec.samples.get(name, [])]
    if service:
        out["authenticated"] = summarise(service, window)
    return out


def e2e_summary(rec: Recorder) -> dict[str, object]:
    values = [lat for _, lat, _ in rec.samples.get(E2E, [])]
    return {"count": len(values), "latency_ms": latency_ms(values)}


def timeline(rec: Recorder) -> list[dict[str, object]]:
    """Per second of the window: successes and p50/p95/p99 latency by endpoint."""
    bins: dict[tuple[str, int], list[float]] = defaultdict(list)
    for name, samples in rec.samples.items():
        for started, lat, status in samples:
            if _ok(status):
                bins[(name, int(started // BIN_S))].append(lat)
    rows = []
    for (name, index), values in sorted(bins.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ordered = sorted(values)
        rows.append({
            "t_s": index * BIN_S,
            "endpoint": name,
            "ok": len(ordered),
            "p50_ms": round(percentile(ordered, 50) * 1000, 3),
            "p95_ms": round(percentile(ordered, 95) * 1000, 3),
            "p99_ms": round(percentile(ordered, 99) * 1000, 3),
        })
    return rows

#!/usr/bin/env python3
"""Build the Grafana dashboard observability/grafana/dashboards/pqmsg.json.

The panels are declared below as short specs; the JSON Grafana provisions
is generated from them, so a change is reviewed here, not in 1000 lines of
JSON. After editing, regenerate and commit both:

    python observability/grafana/build_dashboard.py          # rewrite pqmsg.json
    python observability/grafana/build_dashboard.py --check  # exit 1 if stale

Prometheus queries use only the metric contract (PROTOCOL.md section 6) and
the recording rules of observability/prometheus/recording-rules.yml.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).with_name("dashboards") / "pqmsg.json"
PROMETHEUS = {"type": "prometheus", "uid": "pqmsg-prometheus"}
LOKI = {"type": "loki", "uid": "pqmsg-loki"}
RATE = "$__rate_interval"
GRID_WIDTH = 24
PANEL_HEIGHT = 8


@dataclass(frozen=True)
class Target:
    """One query of a panel."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """One panel: what it shows, in which unit, and where it turns red."""

    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    red_from: float | None = None
    mappings: tuple[tuple[int, str, str], ...] = ()  # value, text, colour
    stacked: bool = False
    datasource: dict[str, str] = field(default_factory=lambda: PROMETHEUS)


BREAKER_STATES = ((0, "closed", "green"), (1, "half-open", "orange"), (2, "open", "red"))

ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    ("Traffic and objectives", (
        Panel("Request rate by route", "Requests per second per route template.", (
            Target(f"sum by (route) (rate(pqmsg_http_requests_total[{RATE}]))", "{{route}}"),
            Target("pqmsg:http_requests:rate5m", "all routes (5m)"),
        ), unit="reqps"),
        Panel("Responses by status", "4xx and 5xx responses per second.", (
            Target(
                f'sum by (status) (rate(pqmsg_http_requests_total{{status=~"4..|5.."}}[{RATE}]))',
                "{{status}}",
            ),
        ), unit="reqps"),
        Panel("API 5xx share", "Share of /v1/ responses that are 5xx; PqmsgHighErrorRate pages above 2%.", (
            Target("pqmsg:http_api_requests_5xx:ratio_rate5m", "5xx share (5m)"),
        ), unit="percentunit", red_from=0.02),
        Panel("API latency p50 / p95 / p99",
              "Authenticated /v1/ routes without long polls and streams; objective p95 <= 250 ms.", (
                  Target("pqmsg:http_api_request_duration_seconds:p50_5m", "p50"),
                  Target("pqmsg:http_api_request_duration_seconds:p95_5m", "p95"),
                  Target("pqmsg:http_api_request_duration_seconds:p99_5m", "p99"),
              ), unit="s", red_from=0.25),
        Panel("Requests in flight vs limit", "At the limit (PQMSG_MAX_IN_FLIGHT) the server sheds with 503.", (
            Target("sum by (instance) (pqmsg_http_in_flight_requests)", "{{instance}} in flight"),
            Target("max by (instance) (pqmsg_http_in_flight_limit)", "{{instance}} limit"),
        ), width=24),
    )),
    ("Security signals", (
        Panel("Auth rejects by reason", "401s per second by reason (PROTOCOL.md section 3).", (
            Target(f"sum by (reason) (rate(pqmsg_auth_rejects_total[{RATE}]))", "{{reason}}"),
        ), unit="reqps", width=8),
        Panel("Rate-limit rejects by limiter", "429s per second by limiter.", (
            Target(f"sum by (limiter) (rate(pqmsg_rate_limit_rejects_total[{RATE}]))", "{{limiter}}"),
        ), unit="reqps", width=8),
        Panel("Registrations and revocations", "Accounts registered and devices revoked per second.", (
            Target(f"sum(rate(pqmsg_registrations_total[{RATE}]))", "registrations"),
            Target(f"sum(rate(pqmsg_device_revocations_total[{RATE}]))", "revocations"),
        ), unit="ops", width=8),
    )),
    ("Delivery and push", (
        Panel("Push breaker state", "Circuit breaker per provider and instance.", (
            Target("max by (provider, instance) (pqmsg_push_circuit_state)", "{{provider}} {{instance}}"),
        ), kind="state-timeline", width=8, mappings=BREAKER_STATES),
        Panel("Push requests", "Wake-ups per second by provider and outcome.", (
            Target(
                f"sum by (provider, outcome) (rate(pqmsg_push_requests_total[{RATE}]))",
                "{{provider}} {{outcome}}",
            ),
        ), unit="ops", width=8),
        Panel("Message flow", "Ciphertexts stored, delivered and acknowledged per second.", (
            Target(f"sum(rate(pqmsg_messages_stored_total[{RATE}]))", "stored"),
            Target(f"sum(rate(pqmsg_messages_delivered_total[{RATE}]))", "delivered"),
            Target(f"sum(rate(pqmsg_messages_acked_total[{RATE}]))", "acked"),
        ), unit="ops", width=8),
    )),
    ("Key health", (
        Panel("Devices with a stale signed prekey", "Older than PQMSG_SIGNED_PREKEY_MAX_AGE_S.", (
            Target("max(pqmsg_signed_prekey_stale_devices)", "stale devices"),
        ), width=8, red_from=1),
        Panel("Last-resort PQ prekeys served", "Per 30 minutes; PqmsgPqPrekeyDepletion pages above 10.", (
            Target("sum(increase(pqmsg_pq_last_resort_served_total[30m]))", "served / 30m"),
        ), width=8, red_from=10),
        Panel("PQ ratchet advances", "Epoch advances per second next to messages stored.", (
            Target(f"sum(rate(pqmsg_pq_ratchet_advances_total[{RATE}]))", "ratchet advances"),
            Target(f"sum(rate(pqmsg_messages_stored_total[{RATE}]))", "messages stored"),
        ), unit="ops", width=8),
    )),
    ("Internals", (
        Panel("Audit queue depth", "Events waiting to be written to the audit log.", (
            Target("max by (instance) (pqmsg_audit_queue_depth)", "{{instance}}"),
        ), width=8),
        Panel("Audit events and drops", "Any drop means audit events were lost.", (
            Target(f"sum(rate(pqmsg_audit_events_total[{RATE}]))", "written"),
            Target(f"sum(rate(pqmsg_audit_dropped_total[{RATE}]))", "dropped"),
        ), unit="ops", width=8),
        Panel("Database pool", "PostgreSQL pool connections by state.", (
            Target("sum by (state) (pqmsg_db_pool_connections)", "{{state}}"),
        ), width=8, stacked=True),
        Panel("Nursery tasks", "Tasks running in each supervised service.", (
            Target("sum by (nursery) (pqmsg_nursery_tasks)", "{{nursery}}"),
        ), width=24),
    )),
    ("Audit log", (
        Panel("Audit events", "The audit JSONL shipped by promtail; filter with | json.", (
            Target('{job="pqmsg-audit"}'),
        ), kind="logs", width=24, datasource=LOKI),
    )),
)


def _field_config(panel: Panel) -> dict[str, Any]:
    """Unit, thresholds and value mappings of a panel."""
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if panel.red_from is not None:
        steps.append({"color": "red", "value": panel.red_from})
    custom: dict[str, Any] = {}
    if panel.kind == "timeseries":
        custom = {
            "lineWidth": 1,
            "fillOpacity": 30 if panel.stacked else 10,
            "stacking": {"mode": "normal" if panel.stacked else "none"},
            "thresholdsStyle": {"mode": "line" if panel.red_from is not None else "off"},
        }
    mappings = [
        {"type": "value", "options": {str(v): {"text": text, "color": colour, "index": i}}}
        for i, (v, text, colour) in enumerate(panel.mappings)
    ]
    if panel.mappings:
        steps = [{"color": colour, "value": None if v == 0 else v} for v, _, colour in panel.mappings]
    return {
        "defaults": {
            "unit": panel.unit,
            "custom": custom,
            "mappings": mappings,
            "thresholds": {"mode": "absolute", "steps": steps},
        },
        "overrides": [],
    }


def _options(panel: Panel) -> dict[str, Any]:
    if panel.kind == "logs":
        return {"showTime": True, "wrapLogMessage": True, "sortOrder": "Descending"}
    return {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }


def _targets(panel: Panel) -> list[dict[str, Any]]:
    return [
        {"refId": chr(ord("A") + i), "datasource": panel.datasource, "expr": t.expr,
         "legendFormat": t.legend, "range": True}
        for i, t in enumerate(panel.targets)
    ]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": panel.datasource,
        "gridPos": {"h": PANEL_HEIGHT, "w": panel.width, "x": x, "y": y},
        "fieldConfig": _field_config(panel),
        "options": _options(panel),
        "targets": _targets(panel),
    }


def _row_json(title: str, panel_id: int, y: int) -> dict[str, Any]:
    return {"id": panel_id, "type": "row", "title": title, "collapsed": False,
            "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}, "panels": []}


def panels() -> list[dict[str, Any]]:
    """Every row and panel, laid out left to right, top to bottom."""
    out: list[dict[str, Any]] = []
    y = 0
    for title, row in ROWS:
        out.append(_row_json(title, len(out) + 1, y))
        y, x = y + 1, 0
        for panel in row:
            if x + panel.width > GRID_WIDTH:
                y, x = y + PANEL_HEIGHT, 0
            out.append(_panel_json(panel, len(out) + 1, x, y))
            x += panel.width
        y += PANEL_HEIGHT
    return out


def dashboard() -> dict[str, Any]:
    """The whole dashboard model as Grafana provisions it."""
    return {
        "id": None,
        "uid": "pqmsg-overview",
        "title": "pqmsg relay",
        "description": "Generated by observability/grafana/build_dashboard.py; edit that file.",
        "tags": ["pqmsg"],
        "timezone": "utc",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "links": [],
        "panels": panels(),
    }


def render() -> str:
    """The dashboard as the JSON text that is committed."""
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write the dashboard, or with --check report whether the committed one is current."""
    parser = argparse.ArgumentParser(description="Build observability/grafana/dashboards/pqmsg.json.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.name} is out of date: run build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

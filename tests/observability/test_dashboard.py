"""The Grafana dashboard: current, provisionable, and querying only what exists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from tests.observability.contract import CONTRACT
from tests.observability.promql import metric_names, promtool_check_exprs
from tests.observability.tools import REPO_ROOT

GRAFANA: Final = REPO_ROOT / "observability" / "grafana"
DASHBOARD: Final = GRAFANA / "dashboards" / "pqmsg.json"
RECORDING_RULES: Final = REPO_ROOT / "observability" / "prometheus" / "recording-rules.yml"
PROMTAIL: Final = REPO_ROOT / "observability" / "promtail" / "promtail.yml"


def _panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return [p for p in panels if p["type"] != "row"]


def _targets(datasource_type: str) -> list[dict[str, Any]]:
    return [t for p in _panels() for t in p["targets"] if t["datasource"]["type"] == datasource_type]


def _recording_rules() -> dict[str, str]:
    groups = yaml.safe_load(RECORDING_RULES.read_text())["groups"]
    return {r["record"]: r["expr"] for g in groups for r in g["rules"]}


def _contract_names() -> set[str]:
    return {name for spec in CONTRACT for name in spec.series_names}


def test_committed_dashboard_matches_its_generator() -> None:
    result = subprocess.run(
        [sys.executable, str(GRAFANA / "build_dashboard.py"), "--check"],
        capture_output=True, text=True, timeout=30, check=False,
    )

    assert result.returncode == 0, result.stderr


def test_every_panel_has_queries_on_a_provisioned_datasource() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "pqmsg.yml").read_text())
    uids = {d["uid"] for d in provisioned["datasources"]}

    for panel in _panels():
        assert panel["targets"], panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert {t["datasource"]["uid"] for t in panel["targets"]} <= uids, panel["title"]


def test_panel_ids_and_ref_ids_are_unique() -> None:
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]

    assert len(ids) == len(set(ids))
    for panel in _panels():
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))


def test_prometheus_queries_use_only_contract_metrics_and_recording_rules() -> None:
    allowed = _contract_names() | set(_recording_rules())
    used = {name for t in _targets("prometheus") for name in metric_names(t["expr"])}

    assert used
    assert used - allowed == set()


def test_prometheus_queries_parse(tmp_path: Path) -> None:
    exprs = [t["expr"] for t in _targets("prometheus")]

    assert promtool_check_exprs(exprs, tmp_path) == ""


def test_promtool_expression_check_rejects_bad_promql(tmp_path: Path) -> None:
    assert promtool_check_exprs(["sum(rate(pqmsg_http_requests_total[5m])"], tmp_path) != ""


def _expand(names: set[str], rules: dict[str, str]) -> set[str]:
    """``names`` plus every series the recording rules among them read, transitively."""
    pending, seen = list(names), set()
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending.extend(metric_names(rules.get(name, "")))
    return seen


def test_dashboard_shows_every_contract_metric() -> None:
    used = {name for t in _targets("prometheus") for name in metric_names(t["expr"])}
    shown = _expand(used, _recording_rules())

    missing = [spec.name for spec in CONTRACT if not set(spec.series_names) & shown]
    assert missing == []


def test_audit_log_panel_selects_what_promtail_ships() -> None:
    promtail = yaml.safe_load(PROMTAIL.read_text())
    job = promtail["scrape_configs"][0]["static_configs"][0]["labels"]["job"]

    (audit,) = _targets("loki")
    assert audit["expr"] == f'{{job="{job}"}}'


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (route) (rate(pqmsg_http_requests_total{status=~"5.."}[$__rate_interval]))',
         {"pqmsg_http_requests_total"}),
        ("histogram_quantile(0.95, pqmsg:bucket:rate5m) > bool 1e-9", {"pqmsg:bucket:rate5m"}),
        ("a / on (instance) group_left (x) b offset 5m and c", {"a", "b", "c"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names

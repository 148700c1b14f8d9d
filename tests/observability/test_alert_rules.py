"""The alert and recording rules: valid, complete, documented and unit-tested by promtool."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from tests.observability.contract import CONTRACT_SERIES
from tests.observability.promql import metric_names
from tests.observability.tools import REPO_ROOT, output_of, run_tool

RULES_DIR: Final = REPO_ROOT / "observability" / "prometheus"
ALERT_RULES: Final = RULES_DIR / "alert-rules.yml"
RECORDING_RULES: Final = RULES_DIR / "recording-rules.yml"
RULES_TEST: Final = RULES_DIR / "alert-rules.test.yml"

EXPECTED_SEVERITIES: Final = {
    "PqmsgHighErrorRate": "critical",
    "PqmsgAuthRejectSpike": "high",
    "PqmsgRateLimitRejectSpike": "high",
    "PqmsgInFlightPressure": "medium",
    "PqmsgPushCircuitOpen": "critical",
    "PqmsgSignedPrekeyStale": "high",
    "PqmsgPqPrekeyDepletion": "high",
    "PqmsgDeviceRevocationSpike": "high",
    "PqmsgPqRatchetStall": "high",
    "PqmsgNonceReplayBurst": "critical",
    "PqmsgRegistrationSpike": "medium",
}


def _rules(path: Path) -> list[dict[str, Any]]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in _rules(ALERT_RULES)}


def _recording_names() -> set[str]:
    return {rule["record"] for rule in _rules(RECORDING_RULES)}


def _rule_tests() -> list[dict[str, Any]]:
    tests: list[dict[str, Any]] = yaml.safe_load(RULES_TEST.read_text())["tests"]
    return tests


def test_promtool_check_rules_passes() -> None:
    result = run_tool("promtool", ["check", "rules", str(ALERT_RULES), str(RECORDING_RULES)])

    assert result.returncode == 0, output_of(result)
    assert "SUCCESS: 11 rules found" in result.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    result = run_tool("promtool", ["test", "rules", str(RULES_TEST)])

    assert result.returncode == 0, output_of(result)


def test_exactly_the_eleven_alerts_with_their_severities() -> None:
    severities = {name: rule["labels"]["severity"] for name, rule in _alerts().items()}

    assert severities == EXPECTED_SEVERITIES


@pytest.mark.parametrize("name", sorted(EXPECTED_SEVERITIES))
def test_alert_carries_labels_and_annotations(name: str) -> None:
    rule = _alerts()[name]

    assert rule["labels"]["service"] == "pqmsg"
    assert set(rule["annotations"]) == {"summary", "description", "runbook"}
    assert rule["annotations"]["runbook"] == f"docs/OPERATIONS.md#{name.lower()}"


def test_every_alert_documents_its_tunables() -> None:
    lines = ALERT_RULES.read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"\s*- alert: (\w+)", line)
        if match:
            comments = []
            for previous in reversed(lines[:i]):
                if not previous.strip().startswith("#"):
                    break
                comments.append(previous)
            if not any("TUNE" in c for c in comments):
                undocumented.append(match.group(1))

    assert undocumented == []


def test_rules_use_only_contract_metrics_and_recorded_series() -> None:
    allowed = CONTRACT_SERIES | _recording_names()
    used = {
        name
        for rule in _rules(ALERT_RULES) + _rules(RECORDING_RULES)
        for name in metric_names(rule["expr"])
    }

    assert used - allowed == set()


@pytest.mark.parametrize("name", sorted(EXPECTED_SEVERITIES))
def test_each_alert_has_a_firing_and_a_silent_case(name: str) -> None:
    cases = [
        case
        for test in _rule_tests()
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == name
    ]

    assert any(case["exp_alerts"] for case in cases), f"{name} never fires in a test"
    assert any(not case["exp_alerts"] for case in cases), f"{name} is never tested silent"


def test_ratchet_stall_is_tested_silent_when_no_messages_flow() -> None:
    def silent_without_messages(test: dict[str, Any]) -> bool:
        stored = [s for s in test["input_series"] if s["series"].startswith("pqmsg_messages_stored_total")]
        flat = bool(stored) and all("+" not in s["values"] for s in stored)
        return flat and any(
            case["alertname"] == "PqmsgPqRatchetStall" and not case["exp_alerts"]
            for case in test.get("alert_rule_test", [])
        )

    assert any(silent_without_messages(test) for test in _rule_tests())


def test_latency_quantiles_are_recorded_and_tested() -> None:
    quantiles = {f"pqmsg:http_api_request_duration_seconds:{q}_5m" for q in ("p50", "p95", "p99")}
    tested = {
        name
        for test in _rule_tests()
        for case in test.get("promql_expr_test", [])
        for name in metric_names(case["expr"])
    }

    assert quantiles <= _recording_names()
    assert quantiles <= tested


def test_rule_tests_catch_a_ratchet_rule_that_ignores_message_flow(tmp_path: Path) -> None:
    for path in (ALERT_RULES, RECORDING_RULES, RULES_TEST):
        shutil.copy(path, tmp_path / path.name)
    broken = tmp_path / ALERT_RULES.name
    text = broken.read_text()
    guard = "sum(rate(pqmsg_messages_stored_total[30m])) > 0\n          and on ()\n"
    assert guard in text
    broken.write_text(text.replace(guard, ""))

    result = run_tool("promtool", ["test", "rules", str(tmp_path / RULES_TEST.name)])

    assert result.returncode != 0
    assert "no messages flow, so a quiet ratchet is no stall" in result.stdout + result.stderr

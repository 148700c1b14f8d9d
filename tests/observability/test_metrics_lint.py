"""The contract exposition passes ``promtool check metrics`` and the contract check."""

from __future__ import annotations

from tests.observability.contract import CONTRACT, contract_violations, sample_exposition
from tests.observability.tools import promtool_check_metrics


def test_sample_exposition_is_lint_clean() -> None:
    assert promtool_check_metrics(sample_exposition()) == ""


def test_promtool_reports_a_counter_without_total_suffix() -> None:
    bad = "# HELP pqmsg_bad Bad.\n# TYPE pqmsg_bad counter\npqmsg_bad 1\n"

    problems = promtool_check_metrics(bad)

    assert 'counter metrics should have "_total" suffix' in problems


def test_sample_exposition_meets_the_contract() -> None:
    assert contract_violations(sample_exposition()) == []


def test_contract_check_names_a_missing_metric() -> None:
    text = sample_exposition().replace("pqmsg_registrations_total", "pqmsg_signups_total")

    assert "pqmsg_registrations_total: missing" in contract_violations(text)


def test_contract_check_names_wrong_labels() -> None:
    text = sample_exposition().replace('limiter="', 'bucket="')

    problems = contract_violations(text)

    assert any(p.startswith("pqmsg_rate_limit_rejects_total: labels") for p in problems)


def test_contract_check_names_wrong_buckets() -> None:
    text = sample_exposition().replace('le="0.25"', 'le="0.3"')

    problems = contract_violations(text)

    assert any("buckets" in p for p in problems)


def test_contract_check_wants_labelled_metrics_initialised() -> None:
    lines = sample_exposition().splitlines(keepends=True)
    text = "".join(
        line
        for line in lines
        if line.startswith("#") or not line.startswith("pqmsg_push_circuit_state")
    )

    assert contract_violations(text) == [
        "pqmsg_push_circuit_state: no samples (initialise its label children at start-up)"
    ]


def test_contract_lists_every_protocol_metric_once() -> None:
    names = [spec.name for spec in CONTRACT]

    assert len(names) == len(set(names)) == 21

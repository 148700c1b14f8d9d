"""docs/OPERATIONS.md: every link into it resolves, every alert has its first steps."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

import pytest
import yaml

from tests.observability.markdown import anchors, github_anchor, headings, section
from tests.observability.tools import REPO_ROOT

RUNBOOK: Final = REPO_ROOT / "docs" / "OPERATIONS.md"
ALERT_RULES: Final = REPO_ROOT / "observability" / "prometheus" / "alert-rules.yml"
LINK_RE: Final = re.compile(r"docs/OPERATIONS\.md#([\w-]+)")
#: Our files that may link into the runbook.
LINKING_FILES: Final = (
    *sorted((REPO_ROOT / "observability").rglob("*.y*ml")),
    *sorted((REPO_ROOT / "observability").rglob("*.tmpl")),
    *sorted((REPO_ROOT / "observability").rglob("*.py")),
    REPO_ROOT / "docker-compose.observability.yml",
)


def _runbook() -> str:
    return RUNBOOK.read_text()


def _alert_runbooks() -> dict[str, str]:
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return {r["alert"]: r["annotations"]["runbook"] for g in groups for r in g["rules"]}


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("PqmsgHighErrorRate", "pqmsghigherrorrate"),
        ("Backup and restore (planned)", "backup-and-restore-planned"),
        ("SQLite/SQLCipher key rotation (planned)", "sqlitesqlcipher-key-rotation-planned"),
        ("Service-level objectives", "service-level-objectives"),
        ("The `render.py` step", "the-renderpy-step"),
    ],
)
def test_github_anchor_rules(heading: str, anchor: str) -> None:
    assert github_anchor(heading) == anchor


def test_repeated_headings_get_numbered_anchors() -> None:
    assert anchors("# Notes\n## Notes\n```\n# not a heading\n```\n") == {"notes", "notes-1"}


@pytest.mark.parametrize(("alert", "runbook"), sorted(_alert_runbooks().items()))
def test_runbook_annotation_points_at_a_heading(alert: str, runbook: str) -> None:
    path, _, anchor = runbook.partition("#")

    assert path == "docs/OPERATIONS.md"
    assert anchor in anchors(_runbook()), f"{alert}: no heading for #{anchor}"


@pytest.mark.parametrize("path", LINKING_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_links_from_config_files_resolve(path: Path) -> None:
    missing = set(LINK_RE.findall(path.read_text())) - anchors(_runbook())

    assert missing == set()


def test_links_inside_the_runbook_resolve() -> None:
    targets = set(re.findall(r"\]\(#([\w-]+)\)", _runbook()))

    assert targets
    assert targets - anchors(_runbook()) == set()


@pytest.mark.parametrize("alert", sorted(_alert_runbooks()))
def test_each_alert_section_gives_three_first_steps(alert: str) -> None:
    body = section(_runbook(), alert)

    steps = re.findall(r"^(\d)\. ", body, flags=re.MULTILINE)
    assert steps[:3] == ["1", "2", "3"]


def test_threshold_table_lists_every_alert() -> None:
    table = section(_runbook(), "Alert thresholds")

    assert all(f"| {alert} |" in table for alert in _alert_runbooks())


@pytest.mark.parametrize(
    ("heading", "phrases"),
    [
        ("Service-level objectives", ("99.9%", "30 days", "250 ms", "p95")),
        ("Receivers and how to bind them", (
            "ALERT_EMAIL_SMARTHOST", "ALERT_EMAIL_FROM", "ALERT_EMAIL_CRITICAL_TO",
            "ALERT_EMAIL_HIGH_TO", "ALERT_EMAIL_STANDARD_TO", "render.py")),
        ("Incident severity and response targets", ("SEV-1", "SEV-2", "SEV-3", "15 minutes")),
        ("Escalation drill", ("alert_drill.sh", "alert_drill.ps1", "evidence")),
        ("Backup and restore (planned)", ("RPO", "15 minutes", "RTO", "60 minutes", "Planned")),
        ("SQLite/SQLCipher key rotation (planned)", ("offline", "Planned")),
    ],
)
def test_runbook_covers(heading: str, phrases: tuple[str, ...]) -> None:
    assert heading in headings(_runbook())
    body = section(_runbook(), heading)

    assert [p for p in phrases if p not in body] == []

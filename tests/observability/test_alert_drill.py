"""The escalation drill, for real: alert_drill.sh -> Alertmanager -> SMTP -> mailbox API.

Also shows inhibition working in a running Alertmanager: a critical alert
holds back a lesser one of the same service, but not of another service,
and a drill's critical holds back nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from functools import partial
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import yaml

from tests.observability.conftest import MAILBOXES, Alertmanager, MailSink
from tests.observability.processes import wait_until
from tests.observability.tools import REPO_ROOT

DRILL_SH: Final = REPO_ROOT / "scripts" / "security" / "alert_drill.sh"
DRILL_PS1: Final = REPO_ROOT / "scripts" / "security" / "alert_drill.ps1"
COMPOSE: Final = REPO_ROOT / "docker-compose.observability.yml"
DRILL_TIMEOUT_S: Final = 90
RECEIVERS: Final = {
    "critical": ("oncall-critical", MAILBOXES["ALERT_EMAIL_CRITICAL_TO"]),
    "high": ("oncall-high", MAILBOXES["ALERT_EMAIL_HIGH_TO"]),
    "medium": ("oncall-standard", MAILBOXES["ALERT_EMAIL_STANDARD_TO"]),
    "low": ("oncall-standard", MAILBOXES["ALERT_EMAIL_STANDARD_TO"]),
}


def _drill_env(alertmanager: Alertmanager, mailsink: MailSink, **overrides: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", ""), "ALERTMANAGER_URL": alertmanager.url,
           "MAILPIT_URL": mailsink.api_url, **MAILBOXES}
    return {**env, **overrides}


def _run_drill(
    args: list[str], env: dict[str, str], evidence: Path, deadline_s: int
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run a drill script to completion and read its evidence file."""
    result = subprocess.run(
        [*args, "--out" if args[0] == "bash" else "-Out", str(evidence),
         "--deadline" if args[0] == "bash" else "-DeadlineSeconds", str(deadline_s)],
        env=env, capture_output=True, text=True, timeout=DRILL_TIMEOUT_S, check=False,
        cwd=evidence.parent,
    )
    assert evidence.exists(), f"no evidence written:\n{result.stdout}{result.stderr}"
    return result, json.loads(evidence.read_text())


def _assert_delivered(evidence: dict[str, Any]) -> None:
    alerts = {a["severity"]: a for a in evidence["alerts"]}
    assert sorted(alerts) == sorted(RECEIVERS)
    for severity, (receiver, mailbox) in RECEIVERS.items():
        alert = alerts[severity]
        assert alert["delivered"] is True, alert
        assert alert["receiver"] == receiver
        assert alert["alertmanager_receivers"] == [receiver]
        assert alert["recipient"] == mailbox
        assert alert["message_id"] and alert["received_at"]
        assert f"{evidence['drill_id']}-{severity}" in alert["subject"]


def test_shell_drill_delivers_every_severity_to_its_receiver(
    alertmanager: Alertmanager, mailsink: MailSink, tmp_path: Path
) -> None:
    evidence_path = tmp_path / "evidence.json"

    result, evidence = _run_drill(
        ["bash", str(DRILL_SH)], _drill_env(alertmanager, mailsink), evidence_path, 45
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert evidence["result"] == "pass"
    _assert_delivered(evidence)


def test_shell_drill_fails_and_names_the_missing_receiver(
    alertmanager: Alertmanager, mailsink: MailSink, tmp_path: Path
) -> None:
    env = _drill_env(alertmanager, mailsink, ALERT_EMAIL_HIGH_TO="nobody@oncall.pqmsg.test")

    result, evidence = _run_drill(["bash", str(DRILL_SH)], env, tmp_path / "evidence.json", 6)

    assert result.returncode == 1, result.stdout + result.stderr
    assert evidence["result"] == "fail"
    missing = [a["severity"] for a in evidence["alerts"] if not a["delivered"]]
    assert missing == ["high"]
    assert "MISSING" in result.stdout


def test_shell_drill_exits_2_when_alertmanager_is_unreachable(
    mailsink: MailSink, tmp_path: Path
) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "ALERTMANAGER_URL": "http://127.0.0.1:9",
           "MAILPIT_URL": mailsink.api_url}

    result = subprocess.run(
        ["bash", str(DRILL_SH), "--out", str(tmp_path / "e.json"), "--deadline", "1"],
        env=env, capture_output=True, text=True, timeout=DRILL_TIMEOUT_S, check=False,
    )

    assert result.returncode == 2
    assert "refused" in result.stderr


@pytest.mark.skipif(shutil.which("pwsh") is None, reason="PowerShell (pwsh) is not installed")
def test_powershell_drill_delivers_every_severity(
    alertmanager: Alertmanager, mailsink: MailSink, tmp_path: Path
) -> None:
    args = ["pwsh", "-NoProfile", "-NonInteractive", "-File", str(DRILL_PS1)]

    result, evidence = _run_drill(args, _drill_env(alertmanager, mailsink), tmp_path / "e.json", 45)

    assert result.returncode == 0, result.stdout + result.stderr
    _assert_delivered(evidence)


def _defaults(text: str, pattern: str) -> dict[str, str]:
    return dict(re.findall(pattern, text))


def test_drill_scripts_default_to_the_compose_stack() -> None:
    compose_env = yaml.safe_load(COMPOSE.read_text())["services"]["alertmanager-config"]["environment"]
    compose = {k: m.group(1) for k, v in compose_env.items() if (m := re.match(r"\$\{\w+:-(.*)\}$", v))}
    shell = _defaults(DRILL_SH.read_text(), r"\$\{(ALERT_EMAIL_\w+_TO):-([^}]+)\}")
    ps1 = _defaults(DRILL_PS1.read_text(), r"Get-Setting '(ALERT_EMAIL_\w+_TO)' '([^']+)'")

    assert shell == ps1 == {k: compose[k] for k in shell}
    assert set(shell) == set(MAILBOXES)


def _post(alertmanager: Alertmanager, alerts: list[dict[str, dict[str, str]]]) -> None:
    httpx.post(f"{alertmanager.url}/api/v2/alerts", json=alerts, timeout=10).raise_for_status()


def _state(alertmanager: Alertmanager, alertname: str) -> str | None:
    response = httpx.get(f"{alertmanager.url}/api/v2/alerts",
                         params={"filter": f'alertname="{alertname}"'}, timeout=10)
    states = [a["status"]["state"] for a in response.json()]
    return states[0] if states else None


def _mailed(mailsink: MailSink, alertname: str) -> bool:
    listing = httpx.get(f"{mailsink.api_url}/api/v1/messages", timeout=10).json()
    return any(alertname in m["Subject"] for m in listing["messages"])


def test_critical_inhibits_same_service_only_and_drills_inhibit_nothing(
    alertmanager: Alertmanager, mailsink: MailSink
) -> None:
    run = uuid.uuid4().hex[:8]
    names = {key: f"Inhibit{key}{run}" for key in ("Page", "Echo", "Other", "DrillPage", "DrillEcho")}
    _post(alertmanager, [
        {"labels": {"alertname": names["Page"], "severity": "critical", "service": f"a{run}"}},
        {"labels": {"alertname": names["Echo"], "severity": "high", "service": f"a{run}"}},
        {"labels": {"alertname": names["Other"], "severity": "high", "service": f"b{run}"}},
        {"labels": {"alertname": names["DrillPage"], "severity": "critical", "service": f"c{run}",
                    "drill": "true"}},
        {"labels": {"alertname": names["DrillEcho"], "severity": "medium", "service": f"c{run}"}},
    ])

    wait_until(lambda: _state(alertmanager, names["Echo"]) == "suppressed", "inhibition")
    for key in ("Page", "Other", "DrillPage", "DrillEcho"):
        wait_until(partial(_mailed, mailsink, names[key]), f"the mail of {names[key]}")
    assert not _mailed(mailsink, names["Echo"])

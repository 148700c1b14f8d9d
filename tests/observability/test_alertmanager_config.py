"""Rendering alertmanager.yml from its template, and what amtool says about the result."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from tests.observability.conftest import MAILBOXES, render_config, render_env
from tests.observability.tools import output_of, run_tool

REQUIRED: Final = (
    "ALERT_EMAIL_SMARTHOST",
    "ALERT_EMAIL_FROM",
    "ALERT_EMAIL_CRITICAL_TO",
    "ALERT_EMAIL_HIGH_TO",
    "ALERT_EMAIL_STANDARD_TO",
)
ROUTES: Final = {
    "critical": "oncall-critical",
    "high": "oncall-high",
    "medium": "oncall-standard",
    "low": "oncall-standard",
}


@pytest.fixture
def rendered(tmp_path: Path) -> Path:
    """A config rendered for a loopback sink."""
    out = tmp_path / "alertmanager.yml"
    result = render_config(out, render_env("127.0.0.1:1025"))
    assert result.returncode == 0, output_of(result)
    return out


def _config(path: Path) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    return config


def test_render_names_every_missing_variable_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "alertmanager.yml"
    env = {k: v for k, v in render_env("127.0.0.1:1025").items() if k not in REQUIRED}

    result = render_config(out, env)

    assert result.returncode == 2
    assert all(name in result.stderr for name in REQUIRED), result.stderr
    assert not out.exists()


def test_render_treats_an_empty_variable_as_missing(tmp_path: Path) -> None:
    env = {**render_env("127.0.0.1:1025"), "ALERT_EMAIL_HIGH_TO": ""}

    result = render_config(tmp_path / "alertmanager.yml", env)

    assert result.returncode == 2
    assert "missing required environment variables: ALERT_EMAIL_HIGH_TO" in result.stderr


def test_render_rejects_malformed_values(tmp_path: Path) -> None:
    env = {**render_env("smtp.example.org"), "ALERT_GROUP_WAIT": "soon",
           "ALERT_EMAIL_REQUIRE_TLS": "yes"}

    result = render_config(tmp_path / "alertmanager.yml", env)

    assert result.returncode == 2
    for name in ("ALERT_EMAIL_SMARTHOST", "ALERT_GROUP_WAIT", "ALERT_EMAIL_REQUIRE_TLS"):
        assert name in result.stderr


def test_rendered_values_survive_yaml_quoting(tmp_path: Path) -> None:
    out = tmp_path / "alertmanager.yml"
    env = {**render_env("127.0.0.1:1025"), "ALERT_EMAIL_AUTH_PASSWORD": "it's: #secret"}

    assert render_config(out, env).returncode == 0

    assert _config(out)["global"]["smtp_auth_password"] == "it's: #secret"


def test_rendered_file_is_private(rendered: Path) -> None:
    assert stat.S_IMODE(rendered.stat().st_mode) == 0o600


def test_rendered_receivers_mail_the_bound_mailboxes(rendered: Path) -> None:
    receivers = {r["name"]: r["email_configs"] for r in _config(rendered)["receivers"]}
    wanted = {
        "oncall-critical": MAILBOXES["ALERT_EMAIL_CRITICAL_TO"],
        "oncall-high": MAILBOXES["ALERT_EMAIL_HIGH_TO"],
        "oncall-standard": MAILBOXES["ALERT_EMAIL_STANDARD_TO"],
    }

    assert {name: [c["to"] for c in configs] for name, configs in receivers.items()} == {
        name: [to] for name, to in wanted.items()
    }
    assert all(c["send_resolved"] is True for configs in receivers.values() for c in configs)
    assert _config(rendered)["global"]["smtp_require_tls"] is False


def test_critical_inhibits_lesser_alerts_of_the_same_service(rendered: Path) -> None:
    (rule,) = _config(rendered)["inhibit_rules"]

    assert rule["source_matchers"] == ['severity="critical"', 'drill!="true"']
    assert rule["target_matchers"] == ['severity=~"high|medium|low"']
    assert rule["equal"] == ["service"]


def test_amtool_check_config_passes(rendered: Path) -> None:
    result = run_tool("amtool", ["check-config", str(rendered)])

    assert result.returncode == 0, output_of(result)
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(("severity", "receiver"), sorted(ROUTES.items()))
def test_each_severity_reaches_its_receiver(rendered: Path, severity: str, receiver: str) -> None:
    result = run_tool(
        "amtool",
        ["config", "routes", "test", f"--config.file={rendered}",
         f"--verify.receivers={receiver}", f"severity={severity}", "service=pqmsg"],
    )

    assert result.returncode == 0, output_of(result)
    assert result.stdout.strip() == receiver


def test_an_unknown_severity_still_reaches_a_human(rendered: Path) -> None:
    result = run_tool(
        "amtool", ["config", "routes", "test", f"--config.file={rendered}", "severity=crit"]
    )

    assert result.stdout.strip() == "oncall-standard", output_of(result)

"""Fixtures of the observability tests: the mail sink and a real Alertmanager.

``promtool_check_metrics(text)`` for linting a real server's ``/metrics``
lives in :mod:`tests.observability.tools`; the metric contract check in
:mod:`tests.observability.contract`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from tests.observability.processes import running, wait_ready
from tests.observability.tools import REPO_ROOT, free_port, output_of, require_binary

RENDER_PY: Final = REPO_ROOT / "observability" / "alertmanager" / "render.py"
MAILSINK_PY: Final = REPO_ROOT / "observability" / "mailsink.py"

#: The mailbox of each receiver in the drill tests.
MAILBOXES: Final = {
    "ALERT_EMAIL_CRITICAL_TO": "critical@oncall.pqmsg.test",
    "ALERT_EMAIL_HIGH_TO": "high@oncall.pqmsg.test",
    "ALERT_EMAIL_STANDARD_TO": "standard@oncall.pqmsg.test",
}


@dataclass(frozen=True)
class MailSink:
    """A running observability/mailsink.py."""

    smtp_port: int
    api_url: str


@dataclass(frozen=True)
class Alertmanager:
    """A running Alertmanager whose mail goes to a MailSink."""

    url: str
    config: Path


def render_env(smarthost: str) -> dict[str, str]:
    """Environment for render.py: loopback sink, plain SMTP, one-second grouping."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "ALERT_EMAIL_SMARTHOST": smarthost,
        "ALERT_EMAIL_FROM": "alertmanager@pqmsg.test",
        **MAILBOXES,
        "ALERT_EMAIL_REQUIRE_TLS": "false",
        "ALERT_GROUP_WAIT": "1s",
        "ALERT_GROUP_INTERVAL": "1s",
        "ALERT_REPEAT_INTERVAL": "1h",
    }


def render_config(out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``render.py --out`` as an operator would."""
    return subprocess.run(
        [sys.executable, str(RENDER_PY), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )


@pytest.fixture(scope="module")
def mailsink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailSink]:
    """observability/mailsink.py on free loopback ports."""
    log = tmp_path_factory.mktemp("mailsink") / "mailsink.log"
    smtp_port, http_port = free_port(), free_port()
    args = [sys.executable, str(MAILSINK_PY), "--smtp", f"127.0.0.1:{smtp_port}",
            "--http", f"127.0.0.1:{http_port}"]
    with running(args, log) as proc:
        api_url = f"http://127.0.0.1:{http_port}"
        wait_ready(f"{api_url}/readyz", proc, log)
        yield MailSink(smtp_port=smtp_port, api_url=api_url)


@pytest.fixture(scope="module")
def alertmanager(
    tmp_path_factory: pytest.TempPathFactory, mailsink: MailSink
) -> Iterator[Alertmanager]:
    """Debian's prometheus-alertmanager with the rendered config, mailing the sink."""
    binary = require_binary("prometheus-alertmanager")
    workdir = tmp_path_factory.mktemp("alertmanager")
    config = workdir / "alertmanager.yml"
    rendered = render_config(config, render_env(f"127.0.0.1:{mailsink.smtp_port}"))
    assert rendered.returncode == 0, output_of(rendered)
    port = free_port()
    args = [binary, f"--config.file={config}", f"--storage.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
            "--log.level=debug"]
    log = workdir / "alertmanager.log"
    with running(args, log) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/-/ready", proc, log)
        yield Alertmanager(url=url, config=config)

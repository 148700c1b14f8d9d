"""Bounded runs of the Prometheus and Alertmanager command-line tools.

The tools are Debian's ``promtool``, ``amtool`` and
``prometheus-alertmanager``. CI installs them; when one is missing the test
fails with a message saying which package to install, it never skips.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import pytest

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
TOOL_TIMEOUT_S: Final = 60.0

#: Binary name -> the Debian package that provides it.
PACKAGES: Final = {
    "promtool": "prometheus",
    "amtool": "prometheus-alertmanager",
    "prometheus-alertmanager": "prometheus-alertmanager",
}


def require_binary(name: str) -> str:
    """The absolute path of ``name``; fails the test clearly when it is not installed."""
    path = shutil.which(name)
    if path is None:
        package = PACKAGES.get(name, name)
        pytest.fail(f"{name} is not installed: `apt-get install {package}` (CI installs it)")
    return path


def run_tool(
    name: str,
    args: Sequence[str],
    *,
    stdin: str | None = None,
    timeout_s: float = TOOL_TIMEOUT_S,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one tool to completion within ``timeout_s`` (killed beyond it)."""
    return subprocess.run(
        [require_binary(name), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=cwd,
        check=False,
    )


def output_of(result: subprocess.CompletedProcess[str]) -> str:
    """stdout and stderr of a finished run, for assertion messages."""
    return f"exit {result.returncode}\n{result.stdout}{result.stderr}".strip()


def promtool_check_metrics(text: str) -> str:
    """The problems ``promtool check metrics`` finds in an exposition; empty when clean.

    Feed it the body of a real server's ``GET /metrics``.
    """
    result = run_tool("promtool", ["check", "metrics"], stdin=text)
    if result.returncode == 0:
        return ""
    problems = f"{result.stdout}{result.stderr}".strip()
    return problems or f"promtool check metrics exited {result.returncode}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port

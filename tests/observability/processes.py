"""Background processes for the drill tests: started, awaited, and always stopped.

Every wait is bounded; a process that dies or never becomes ready fails
the test with the tail of its log.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import httpx
import pytest

READY_TIMEOUT_S: Final = 20.0
STOP_GRACE_S: Final = 5.0
POLL_S: Final = 0.1
LOG_TAIL_CHARS: Final = 3000


def log_tail(log: Path) -> str:
    """The end of a process log, for failure messages."""
    return log.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log.exists() else "(no log)"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc``, killing it when it ignores the request for STOP_GRACE_S."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_GRACE_S)


@contextmanager
def running(
    args: Sequence[str], log: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` in the background with output to ``log``; stop it on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc
        finally:
            stop(proc)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``url`` until it answers 200; fail if ``proc`` exits or READY_TIMEOUT_S passes."""
    give_up = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(POLL_S)
    pytest.fail(f"{url} not ready after {READY_TIMEOUT_S}s:\n{log_tail(log)}")


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll ``check`` until it returns true; fail after ``timeout_s``."""
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        if check():
            return
        time.sleep(POLL_S)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")

"""The load harness still runs end to end: a tiny mixed run plus its baseline.

This checks that ``python -m bench`` works and reports what it should; the
performance figures themselves come from benchmark runs (bench/RESULTS.md),
never from timed tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

pytestmark = pytest.mark.slow

ENDPOINT_KEYS = {"requests", "ok", "errors", "throughput_rps", "latency_ms"}
LATENCY_KEYS = {"p50", "p95", "p99", "max", "mean"}


def check_endpoint(name: str, summary: dict[str, object]) -> None:
    assert set(summary) == ENDPOINT_KEYS, name
    assert summary["errors"] == {}, (name, summary["errors"])
    assert summary["ok"] == summary["requests"], name
    latency = summary["latency_ms"]
    assert isinstance(latency, dict) and set(latency) == LATENCY_KEYS, name


# A tiny mixed run.
MIXED = (
    "--scenario", "mixed", "--duration", "2", "--warmup", "0.5", "--accounts", "3",
    "--concurrency", "2", "--connections", "1",
)


async def run_bench(tmp_path: Path, *args: str) -> tuple[str, str, dict[str, Any]]:
    """``python -m bench --spawn`` with ``args``: its stdout, stderr and JSON result."""
    out = tmp_path / "result.json"
    argv = [
        sys.executable, "-m", "bench", "--spawn", "--signers", "1", *args,
        "--json", str(out), "--out-dir", str(tmp_path / "bench-out"),
    ]
    with trio.fail_after(180):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    return done.stdout.decode(), done.stderr.decode(), json.loads(out.read_text())


async def test_mixed_run_with_baseline_reports_every_endpoint(tmp_path: Path) -> None:
    stdout, stderr, result = await run_bench(tmp_path, *MIXED, "--poll-wait", "1", "--baseline")
    assert "ratio: " in stdout
    # The progress bar (on unless --no-progress) is drawn on stderr, for both targets.
    assert "pqmsg [" in stderr and "baseline [" in stderr and " ops " in stderr

    endpoints = result["endpoints"]
    assert {"send", "bundle", "poll", "ack", "authenticated"} <= set(endpoints)
    for name, summary in endpoints.items():
        check_endpoint(name, summary)
    assert endpoints["send"]["ok"] > 0 and endpoints["bundle"]["ok"] > 0
    assert result["e2e_delivery"]["count"] > 0
    assert set(result["cpu"]) >= {"harness_loop_pct", "harness_signers_pct", "server_pct", "cores"}
    assert isinstance(result["warnings"], list)
    assert result["timeline"] and set(result["timeline"][0]) >= {"t_s", "endpoint", "p95_ms"}

    baseline = result["baseline"]
    check_endpoint("baseline send", baseline["endpoints"]["send"])
    assert isinstance(result["ratio"], float) and result["ratio"] > 0


async def test_mixed_run_receiving_by_stream(tmp_path: Path) -> None:
    """``--receive stream``: every recipient holds an RFC 8441 stream and acks on it."""
    _, _, result = await run_bench(tmp_path, *MIXED, "--receive", "stream", "--no-progress")
    endpoints = result["endpoints"]
    assert {"send", "bundle", "stream_ack", "authenticated"} <= set(endpoints)
    assert "poll" not in endpoints and "ack" not in endpoints and "stream_closed" not in endpoints
    for name, summary in endpoints.items():
        check_endpoint(name, summary)
    assert result["receive"] == "stream" and result["streams_reopened"] == 0
    # Every delivered message was matched to its send and acked on the stream.
    assert result["e2e_delivery"]["count"] > 0
    assert endpoints["stream_ack"]["ok"] > 0


def test_receive_stream_is_refused_where_nobody_receives(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.options import parse

    assert parse(["--url", "http://x", "--receive", "stream"]).streaming
    assert parse(["--url", "http://x"]).polling
    with pytest.raises(SystemExit):
        parse(["--url", "http://x", "--scenario", "send", "--receive", "stream"])
    assert "--receive stream applies to the mixed scenario" in capsys.readouterr().err


async def test_idle_streams_mode_reports_the_servers_memory_per_stream(tmp_path: Path) -> None:
    stdout, _, result = await run_bench(tmp_path, "--idle-streams", "5", "--no-progress")
    assert "idle streams: 5 open of 5" in stdout
    assert result["mode"] == "idle_streams"
    assert result["streams_opened"] == 5 and result["streams_failed"] == 0 and result["streams_open"] == 5
    # Five streams are too few to read in RSS (it may even shrink); only that it was read.
    assert result["rss_before_mib"] > 0 and result["rss_after_mib"] > 0

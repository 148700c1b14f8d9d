"""Medians over repeated runs: ``python -m bench.medians bench/out/r/send-sqlite-*.json``.

Prints one line per figure with the median and every run's value, so a
table in RESULTS.md can be filled from it and checked against it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Getter = Callable[[dict[str, Any]], Any]


def _get(*path: str) -> Getter:
    def getter(result: dict[str, Any]) -> Any:
        value: Any = result
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    return getter


def _ops_rps(result: dict[str, Any]) -> float:
    eps = result.get("endpoints", {})
    return float(sum(eps.get(k, {}).get("throughput_rps", 0.0) for k in ("send", "bundle", "fetch")))


def _cost_ratio(result: dict[str, Any]) -> float | None:
    """Server CPU per request of the floor over the server's: steadier than rps on a busy machine."""
    floor = _get("baseline", "server_cpu_ms_per_request")(result)
    mine = result.get("server_cpu_ms_per_request")
    return round(floor / mine, 3) if floor and mine else None


FIGURES: dict[str, Getter] = {
    "send rps": _get("endpoints", "send", "throughput_rps"),
    "send p50 ms": _get("endpoints", "send", "latency_ms", "p50"),
    "send p95 ms": _get("endpoints", "send", "latency_ms", "p95"),
    "fetch p50 ms": _get("endpoints", "fetch", "latency_ms", "p50"),
    "fetch p95 ms": _get("endpoints", "fetch", "latency_ms", "p95"),
    "ack p50 ms": _get("endpoints", "ack", "latency_ms", "p50"),
    "ack p95 ms": _get("endpoints", "ack", "latency_ms", "p95"),
    "bundle p95 ms": _get("endpoints", "bundle", "latency_ms", "p95"),
    "ops rps (send+bundle+fetch)": _ops_rps,
    "authenticated rps": _get("endpoints", "authenticated", "throughput_rps"),
    "authenticated p95 ms": _get("endpoints", "authenticated", "latency_ms", "p95"),
    "authenticated p99 ms": _get("endpoints", "authenticated", "latency_ms", "p99"),
    "e2e p50 ms": _get("e2e_delivery", "latency_ms", "p50"),
    "e2e p95 ms": _get("e2e_delivery", "latency_ms", "p95"),
    "open-loop dropped": _get("open_loop", "dropped"),
    "baseline send rps": _get("baseline", "endpoints", "send", "throughput_rps"),
    "baseline send p95 ms": _get("baseline", "endpoints", "send", "latency_ms", "p95"),
    "ratio": _get("ratio"),
    "harness loop %": _get("cpu", "harness_loop_pct"),
    "harness signers %": _get("cpu", "harness_signers_pct"),
    "server cpu %": _get("cpu", "server_pct"),
    "server cpu ms/request": _get("server_cpu_ms_per_request"),
    "others cpu %": _get("cpu", "others_pct"),
    "baseline server cpu ms/request": _get("baseline", "server_cpu_ms_per_request"),
    "cpu cost ratio (floor ms / server ms)": _cost_ratio,
    "baseline harness loop %": _get("baseline", "cpu", "harness_loop_pct"),
    "baseline server cpu %": _get("baseline", "cpu", "server_pct"),
    "errors": lambda r: sum(
        sum(s["errors"].values()) for k, s in r.get("endpoints", {}).items() if k != "authenticated"
    ),
    "warnings": lambda r: len(r.get("warnings", [])),
    "polls parked": _get("polls_parked"),
    "rss before MiB": _get("rss_before_mib"),
    "rss after MiB": _get("rss_after_mib"),
    "rss per poll KiB": _get("rss_per_poll_kib"),
}


def medians(paths: Sequence[Path]) -> list[str]:
    results = [json.loads(p.read_text()) for p in paths]
    lines = [f"{len(results)} runs: {', '.join(p.name for p in paths)}"]
    for name, getter in FIGURES.items():
        values = [getter(r) for r in results]
        numbers = [float(v) for v in values if isinstance(v, int | float)]
        if not numbers:
            continue
        runs = ", ".join(f"{v:g}" for v in numbers)
        lines.append(f"  {name:<30} median {statistics.median(numbers):>10.4g}   runs: {runs}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.medians")
    parser.add_argument("results", nargs="+", type=Path)
    print("\n".join(medians(parser.parse_args(argv).results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

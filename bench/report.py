"""The results: a table on stdout, the same as JSON, and a latency-over-time PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

HEADER = f"{'endpoint':<14}{'requests':>9}{'ok':>9}{'rps':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}  errors"


def _ms(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def table(endpoints: dict[str, dict[str, Any]], e2e: dict[str, Any] | None = None) -> str:
    lines = [HEADER]
    for name, s in endpoints.items():
        lat = s["latency_ms"]
        errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "-"
        lines.append(
            f"{name:<14}{s['requests']:>9}{s['ok']:>9}{s['throughput_rps']:>9.1f}"
            f"{_ms(lat['p50']):>9}{_ms(lat['p95']):>9}{_ms(lat['p99']):>9}{_ms(lat['max']):>9}  {errors}"
        )
    if e2e and e2e["count"]:
        lat = e2e["latency_ms"]
        lines.append(
            f"{'e2e delivery':<14}{e2e['count']:>9}{'':>9}{'':>9}"
            f"{_ms(lat['p50']):>9}{_ms(lat['p95']):>9}{_ms(lat['p99']):>9}{_ms(lat['max']):>9}"
        )
    return "\n".join(lines)


def print_result(result: dict[str, Any]) -> None:
    print(f"\n{result['target']}: scenario {result['scenario']}, {result['load']}, window {result['window_s']:.1f} s")
    print(table(result["endpoints"], result.get("e2e_delivery")))
    cpu = result["cpu"]
    server = "-" if cpu["server_pct"] is None else f"{cpu['server_pct']}%"
    print(
        f"cpu: harness loop {cpu['harness_loop_pct']}%, signers {cpu['harness_signers_pct']}%, "
        f"server {server}, others {cpu.get('others_pct')}% (of {cpu['cores'] * 100}%); "
        f"loop lag p99 {cpu['loop_lag_p99_ms']} ms; "
        f"signed in window {result['signing']['signed_in_window']}, starved {result['signing']['starved']}"
    )
    for warning in result["warnings"]:
        print(f"WARNING: {warning}")


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


def write_plot(path: Path, result: dict[str, Any]) -> bool:
    """Latency percentiles per second by endpoint, and throughput; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["timeline"]
    names = sorted({r["endpoint"] for r in rows})
    fig, (ax_lat, ax_rps) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for k, name in enumerate(names):
        mine = [r for r in rows if r["endpoint"] == name]
        t = [r["t_s"] for r in mine]
        color = f"C{k}"  # one colour per endpoint: p95 solid, p50 dashed
        ax_lat.plot(t, [r["p95_ms"] for r in mine], color=color, label=f"{name} p95")
        ax_lat.plot(t, [r["p50_ms"] for r in mine], color=color, linestyle="--", label=f"{name} p50")
        ax_rps.plot(t, [r["ok"] for r in mine], color=color, label=name)
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_yscale("log")
    ax_lat.legend(fontsize="small", ncol=2)
    ax_lat.set_title(f"{result['target']} - {result['scenario']} - {result['load']}")
    ax_rps.set_ylabel("successes per second")
    ax_rps.set_xlabel("seconds into the measured window")
    ax_rps.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True

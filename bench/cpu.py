"""Who used the CPU during the window: the harness's event loop, its signers, the server.

CPU time comes from psutil (the ``bench`` extra) and, without it, from
``/proc`` directly. The harness's event loop is one thread: when it runs
at about a full core, or its scheduling lag grows, the harness and not the
server sets the pace, and :func:`warnings` says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import attrs
import trio

try:
    import psutil
except ImportError:  # pragma: no cover - the bench extra brings it
    psutil = None

LAG_TICK_S = 0.02
LOOP_SATURATED_PCT = 85.0
LAG_SATURATED_MS = 50.0
OTHERS_NOISY_PCT = 25.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int, *, children: bool) -> float:
    """User+system seconds of ``pid`` (and, if asked, of its live descendants)."""
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            procs = [proc, *(proc.children(recursive=True) if children else [])]
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            return total
        except psutil.NoSuchProcess:
            return 0.0
    try:  # /proc fallback: no descendants
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except OSError:
        return 0.0


@attrs.frozen
class CpuSample:
    wall: float
    main: float
    signers: float
    server: float
    machine: float  # busy seconds of every process on the machine (0.0 without psutil)


def _machine_busy_s() -> float:
    if psutil is None:
        return 0.0
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def sample(server_pids: Sequence[int]) -> CpuSample:
    """CPU so far; a server spawned by the harness is its child, counted as server only."""
    me = os.getpid()
    main = _proc_cpu_s(me, children=False)
    server = sum(_proc_cpu_s(p, children=True) for p in server_pids)
    everything = _proc_cpu_s(me, children=True)
    spawned = sum(_proc_cpu_s(p, children=True) for p in server_pids if _is_descendant(p, me))
    return CpuSample(trio.current_time(), main, everything - main - spawned, server, _machine_busy_s())


def _is_descendant(pid: int, ancestor: int) -> bool:
    if psutil is None:
        return False
    try:
        return any(p.pid == ancestor for p in psutil.Process(pid).parents())
    except psutil.NoSuchProcess:
        return False


@attrs.define
class LoopLag:
    """How late the event loop wakes a sleeper: a saturated loop wakes it late."""

    lags: list[float] = attrs.field(factory=list)

    async def run(self) -> None:
        while True:
            before = trio.current_time()
            await trio.sleep(LAG_TICK_S)
            self.lags.append(max(0.0, trio.current_time() - before - LAG_TICK_S))

    def p99_ms(self) -> float:
        ordered = sorted(self.lags)
        return round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 2) if ordered else 0.0


def usage(first: CpuSample, last: CpuSample, lag: LoopLag) -> dict[str, float | int | None]:
    wall = last.wall - first.wall
    pct = (lambda a, b: round(100 * (b - a) / wall, 1)) if wall > 0 else (lambda a, b: 0.0)
    machine = pct(first.machine, last.machine)
    own = pct(first.main, last.main) + pct(first.signers, last.signers)
    own += pct(first.server, last.server) if last.server else 0.0
    return {
        "cores": os.cpu_count() or 1,
        "harness_loop_pct": pct(first.main, last.main),
        "harness_signers_pct": max(0.0, pct(first.signers, last.signers)),
        "server_pct": pct(first.server, last.server) if last.server else None,
        "server_cpu_s": round(last.server - first.server, 3) if last.server else None,
        "loop_lag_p99_ms": lag.p99_ms(),
        # Everything else running on the machine meanwhile (other users' tests, databases):
        "others_pct": round(max(0.0, machine - own), 1),
    }


def warnings(cpu: dict[str, float | int | None], *, open_loop_shortfall: bool) -> list[str]:
    out = []
    loop = float(cpu["harness_loop_pct"] or 0)
    if loop >= LOOP_SATURATED_PCT:
        out.append(
            f"harness saturated: its event loop used {loop:.0f}% of a core; the figures "
            "are the harness's limit, not the server's"
        )
    if float(cpu["loop_lag_p99_ms"] or 0) >= LAG_SATURATED_MS:
        out.append(f"harness event loop lag p99 {cpu['loop_lag_p99_ms']} ms: latencies include harness delay")
    total = loop + float(cpu["harness_signers_pct"] or 0) + float(cpu["server_pct"] or 0)
    cores = int(cpu["cores"] or 1)
    if total >= 90 * cores:
        out.append(
            f"the machine is saturated ({total:.0f}% of {cores * 100}%): harness and server "
            "compete for the cores"
        )
    others = float(cpu.get("others_pct") or 0)
    if others >= OTHERS_NOISY_PCT:
        out.append(
            f"other processes used {others:.0f}% CPU during the window (databases included): "
            "the figures are disturbed, compare with care"
        )
    if open_loop_shortfall:
        out.append("open loop fell short of its rate: arrivals were dropped at the concurrency cap")
    return out

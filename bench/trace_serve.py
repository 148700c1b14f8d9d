"""An experiment, not a server: ``pqmsg serve`` under ``tracemalloc``, for memory breakdowns.

``python bench/trace_serve.py serve --bind ... --data-dir ...``; each SIGUSR1
takes a snapshot, and from the second one on writes, next to ``--out``
(default ``bench/out/trace``), the allocation growth since the first by
source line (``lineno-N.txt``). Used for section 4 of ``bench/RESULTS.md``:
SIGUSR1 once the server is live, run ``python -m bench --url ...
--server-pid PID --idle-polls 1000``, SIGUSR1 again when
``pqmsg_long_polls_waiting`` reaches 1000. Tracing slows the server a lot;
no timing from such a run means anything.
"""

from __future__ import annotations

import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

FRAMES = 4
TOP = 40


def main() -> int:
    out = Path(os.environ.get("BENCH_TRACE_OUT", "bench/out/trace"))
    out.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(FRAMES)
    snapshots: list[tracemalloc.Snapshot] = []

    def dump(signum: int, frame: FrameType | None) -> None:
        snapshots.append(tracemalloc.take_snapshot())
        if len(snapshots) < 2:
            return
        stats = snapshots[-1].compare_to(snapshots[0], "lineno")
        total = sum(s.size_diff for s in stats)
        lines = [f"total growth {total / 2**20:.1f} MiB"]
        lines += [f"{s.size_diff / 1024:10.1f} KiB {s.count_diff:8d}  {s.traceback[0]}" for s in stats[:TOP]]
        (out / f"lineno-{len(snapshots) - 1}.txt").write_text("\n".join(lines) + "\n")

    signal.signal(signal.SIGUSR1, dump)
    from pqmsg.cli import main as pqmsg_main

    return pqmsg_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())

"""Wait (bounded) until the machine is quiet: ``python -m bench.quiet [--below 40] [--max-wait 120]``.

On a small machine shared with other work (test suites, CI), a window
that overlaps a burst of someone else's CPU measures them too. This waits
until the whole machine's busy share, over ``SAMPLE_S``, is below
``--below`` percent of all cores, or ``--max-wait`` seconds have passed
(then it says so and returns anyway: the run's ``others_pct`` records it).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

SAMPLE_S = 2.0


def _busy_and_total() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def busy_pct() -> float:
    b0, t0 = _busy_and_total()
    time.sleep(SAMPLE_S)
    b1, t1 = _busy_and_total()
    return 100.0 * (b1 - b0) / max(1, t1 - t0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quiet")
    parser.add_argument("--below", type=float, default=40.0, help="percent of all cores")
    parser.add_argument("--max-wait", type=float, default=120.0, help="seconds")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.max_wait
    while True:
        busy = busy_pct()
        if busy < args.below:
            return 0
        if time.monotonic() >= deadline:
            print(f"bench.quiet: machine still {busy:.0f}% busy after {args.max_wait:.0f} s; going on")
            return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Summarise a py-spy speedscope profile: top functions by inclusive and self samples.

``python -m bench.profile_summary PROFILE.speedscope.json [--top 25] [--thread NAME]``

py-spy records non-idle samples only (without ``--idle``), per thread; the
percentages here are of all samples of the chosen threads, so they read as
"share of the server's busy CPU time".
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path


def summarise(path: Path, top: int, thread: str | None) -> str:
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    total = 0
    lines = []
    for profile in data["profiles"]:
        if thread and thread not in profile["name"]:
            continue
        n = sum(profile["weights"])
        lines.append(f"thread {profile['name']}: {n} samples")
        total += n
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            names = [f"{frames[i]['name']} ({Path(frames[i].get('file', '?')).name}:{frames[i].get('line', '?')})" for i in stack]
            for name in set(names):
                inclusive[name] += weight
            if names:
                self_time[names[-1]] += weight
    lines.append(f"\ntop {top} inclusive (% of {total} samples)")
    lines += [f"{100 * w / total:6.1f}%  {name}" for name, w in inclusive.most_common(top)]
    lines.append(f"\ntop {top} self")
    lines += [f"{100 * w / total:6.1f}%  {name}" for name, w in self_time.most_common(top)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_summary")
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--thread", help="only threads whose name contains this")
    args = parser.parse_args(argv)
    print(summarise(args.profile, args.top, args.thread))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

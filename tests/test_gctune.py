"""The server process's collector settings (in a child, as they are process-wide)."""

from __future__ import annotations

import subprocess
import sys

from pqmsg import gctune

PROBE = """
import gc
from pqmsg.gctune import tune_for_serving
before = gc.get_freeze_count()
tune_for_serving()
print(*gc.get_threshold(), gc.get_freeze_count() > before)
"""


def test_serving_raises_the_thresholds_and_freezes_what_exists() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    thresholds = [gctune.GEN0_THRESHOLD, gctune.GEN1_THRESHOLD, gctune.GEN2_THRESHOLD]
    assert out == [*map(str, thresholds), "True"]

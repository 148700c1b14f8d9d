"""Which metric names a PromQL expression selects, and a promtool syntax check for many.

Good enough for the expressions we write (no PromQL parser exists for
Python): string literals, label matchers, ranges and grouping clauses are
removed, then every remaining identifier that is not a function call or a
keyword is a metric name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import yaml

from tests.observability.tools import output_of, run_tool

KEYWORDS: Final = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
     "offset", "bool", "inf", "nan", "atan2"}
)
#: Grafana's interval variables, replaced by a fixed range before checking.
GRAFANA_VARIABLES_RE: Final = re.compile(r"\$__(rate_)?interval|\$__range")

_STRINGS_RE: Final = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS_RE: Final = re.compile(r"\{[^}]*\}")
_RANGES_RE: Final = re.compile(r"\[[^\]]*\]")
_GROUPING_RE: Final = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER_RE: Final = re.compile(r"(?<![\w.:])[a-zA-Z_:][\w:]*(?![\w:])(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric (or recording-rule) names ``expr`` selects."""
    text = _STRINGS_RE.sub(" ", expr)
    for pattern in (_MATCHERS_RE, _RANGES_RE, _GROUPING_RE):
        text = pattern.sub(" ", text)
    return {name for name in _IDENTIFIER_RE.findall(text) if name.lower() not in KEYWORDS}


def promtool_check_exprs(exprs: Iterable[str], workdir: Path) -> str:
    """``promtool check rules`` output for the expressions as recording rules; empty when valid."""
    rules = [
        {"record": f"check:expr_{i}", "expr": GRAFANA_VARIABLES_RE.sub("5m", expr)}
        for i, expr in enumerate(exprs)
    ]
    path = workdir / "exprs.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    result = run_tool("promtool", ["check", "rules", str(path)])
    return "" if result.returncode == 0 else output_of(result)

#!/usr/bin/env python3
"""Render alertmanager.yml from alertmanager.yml.tmpl and environment variables.

Alertmanager does not expand environment variables in its configuration,
so the receivers are bound here, before it starts:

    ALERT_EMAIL_SMARTHOST=smtp.example.org:587 ... \\
        python observability/alertmanager/render.py --out alertmanager.yml

Every ``${NAME}`` in the template is replaced with the variable ``NAME``.
Required variables that are unset or empty make the render fail (exit
status 2) with one message naming all of them; invalid values are reported
the same way. Standard library only: it runs in any Python 3.8+ image.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

TEMPLATE_PATH = Path(__file__).with_name("alertmanager.yml.tmpl")
EXIT_USAGE = 2

REQUIRED = (
    "ALERT_EMAIL_SMARTHOST",
    "ALERT_EMAIL_FROM",
    "ALERT_EMAIL_CRITICAL_TO",
    "ALERT_EMAIL_HIGH_TO",
    "ALERT_EMAIL_STANDARD_TO",
)
OPTIONAL_DEFAULTS = {
    "ALERT_EMAIL_REQUIRE_TLS": "true",
    "ALERT_EMAIL_AUTH_USERNAME": "",
    "ALERT_EMAIL_AUTH_PASSWORD": "",
    "ALERT_GROUP_WAIT": "30s",
    "ALERT_GROUP_INTERVAL": "5m",
    "ALERT_REPEAT_INTERVAL": "4h",
}

PLACEHOLDER_RE = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
DURATION_RE = re.compile(r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")
ADDRESS_RE = re.compile(r"^[^@\s,<>]+@[^@\s,<>]+$")
NAMED_ADDRESS_RE = re.compile(r"^[^<>]*<([^<>]+)>$")


class RenderError(Exception):
    """The template cannot be rendered with this environment; the message says why."""


def _check_hostport(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"must be HOST:PORT, got {value!r}"
    return None


def _check_address(value: str) -> str | None:
    named = NAMED_ADDRESS_RE.match(value.strip())
    address = named.group(1) if named else value.strip()
    if not ADDRESS_RE.match(address):
        return f"must be an e-mail address, got {value!r}"
    return None


def _check_address_list(value: str) -> str | None:
    problems = [_check_address(part) for part in value.split(",")]
    return next((p for p in problems if p), None)


def _check_bool(value: str) -> str | None:
    return None if value in ("true", "false") else f"must be true or false, got {value!r}"


def _check_duration(value: str) -> str | None:
    if value and DURATION_RE.match(value):
        return None
    return f"must be a duration such as 30s, 5m or 4h, got {value!r}"


CHECKS: Mapping[str, Callable[[str], str | None]] = {
    "ALERT_EMAIL_SMARTHOST": _check_hostport,
    "ALERT_EMAIL_FROM": _check_address,
    "ALERT_EMAIL_CRITICAL_TO": _check_address_list,
    "ALERT_EMAIL_HIGH_TO": _check_address_list,
    "ALERT_EMAIL_STANDARD_TO": _check_address_list,
    "ALERT_EMAIL_REQUIRE_TLS": _check_bool,
    "ALERT_GROUP_WAIT": _check_duration,
    "ALERT_GROUP_INTERVAL": _check_duration,
    "ALERT_REPEAT_INTERVAL": _check_duration,
}


def placeholders(template: str) -> list[str]:
    """The distinct variable names of the template, in order of first use."""
    return list(dict.fromkeys(PLACEHOLDER_RE.findall(template)))


def _problem(name: str, value: str) -> str | None:
    """Why ``value`` is not acceptable for ``name``, or None."""
    if any(ch in value for ch in "\r\n\0"):
        return f"{name}: must be a single line"
    check = CHECKS.get(name)
    problem = check(value) if check else None
    return f"{name}: {problem}" if problem else None


def resolve(names: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The value of each name; raises RenderError naming every missing or invalid one."""
    unknown = [n for n in names if n not in REQUIRED and n not in OPTIONAL_DEFAULTS]
    if unknown:
        raise RenderError(f"the template uses unknown variables: {', '.join(unknown)}")
    missing = [n for n in REQUIRED if not environ.get(n)]
    if missing:
        raise RenderError(f"missing required environment variables: {', '.join(missing)}")
    values = {n: environ.get(n) or OPTIONAL_DEFAULTS.get(n, "") for n in names}
    invalid = [p for p in (_problem(n, v) for n, v in values.items()) if p]
    if invalid:
        raise RenderError("invalid environment variables:\n  " + "\n  ".join(invalid))
    return values


def render(template: str, environ: Mapping[str, str]) -> str:
    """The template with every placeholder replaced (values escaped for single quotes)."""
    values = resolve(placeholders(template), environ)
    return PLACEHOLDER_RE.sub(lambda m: values[m.group(1)].replace("'", "''"), template)


def write_private(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` atomically with permissions ``mode`` (it may hold a password)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # already gone after a successful replace


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write here instead of standard output")
    parser.add_argument("--template", type=Path, default=TEMPLATE_PATH, help="template to render")
    parser.add_argument(
        "--mode", type=lambda s: int(s, 8), default=0o600, help="octal file mode of --out (600)"
    )
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        text = render(args.template.read_text(encoding="utf-8"), os.environ if environ is None else environ)
    except RenderError as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_private(args.out, text, args.mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())

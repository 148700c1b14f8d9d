"""Developer sessions: ``nox -l`` lists them; ``nox`` runs tests, lint and typecheck."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite (needs PostgreSQL and Redis on loopback, promtool and amtool)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff: style, imports, async pitfalls (ASYNC), bugbear (B)."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "pqmsg", "tests", "bench", "noxfile.py")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """Mypy in strict mode on the package and the load harness."""
    session.install("-e", ".[typecheck,bench]")
    session.run("mypy")


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """Load-test a running server: ``nox -s bench -- --url http://127.0.0.1:8080``."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "bench", *session.posargs)

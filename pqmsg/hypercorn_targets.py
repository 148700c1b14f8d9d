"""What the multi-function Hypercorn patches share: the list of functions a
patch replaces, and the checks that keep it off code it was not written for.

A patch module (``hypercorn_drain``, ``hypercorn_leaks``,
``hypercorn_h2_errors``) lists its :class:`Target`\\ s and calls
:func:`apply`, which refuses, and patches nothing, unless the installed
Hypercorn is :data:`HYPERCORN_VERSION` and every target is either upstream's
function (same home, and its body still uses the names the patch relies on)
or already the patch. Either refusal needs a human to read the code again.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Final, NamedTuple

__all__ = ["HYPERCORN_VERSION", "Target", "apply", "is_applied", "revert"]

HYPERCORN_VERSION: Final = "0.18.0"


class Target(NamedTuple):
    """One replaced function, and what upstream's version must look like."""

    owner: type | ModuleType
    name: str
    upstream: Callable[..., object]
    replacement: Callable[..., object]
    # Attribute names the upstream body uses, and so must still use.
    uses: frozenset[str]
    # Where upstream's function is defined, "module.qualname"; by default the
    # owner class's own method.
    home: str | None = None

    @property
    def where(self) -> str:
        if self.home is not None:
            return self.home
        return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}"


def is_applied(targets: Iterable[Target]) -> bool:
    """Whether every target is currently the patched version."""
    return all(vars(target.owner)[target.name] is target.replacement for target in targets)


def apply(targets: Iterable[Target], *, patch: str, error: type[Exception], symptom: str) -> None:
    """Install every replacement, or none (raising ``error``). Idempotent.

    ``patch`` names the module in messages; ``symptom`` says what to check
    on a new Hypercorn before updating or dropping the patch.
    """
    targets = tuple(targets)
    if is_applied(targets):
        return
    installed = importlib.metadata.version("hypercorn")
    if installed != HYPERCORN_VERSION:
        raise error(
            f"{patch} targets hypercorn {HYPERCORN_VERSION}, found {installed}: "
            f"check whether {symptom}, then update or drop the patch"
        )
    for target in targets:
        current = vars(target.owner)[target.name]
        if current is not target.replacement and (
            current is not target.upstream or not _is_upstream(target)
        ):
            raise error(
                f"{target.where} is not the function this patch replaces "
                f"(found {current!r}); refusing to patch"
            )
    for target in targets:
        setattr(target.owner, target.name, target.replacement)


def revert(targets: Iterable[Target]) -> None:
    """Restore Hypercorn's own functions. Idempotent; for tests."""
    for target in targets:
        if vars(target.owner)[target.name] is target.replacement:
            setattr(target.owner, target.name, target.upstream)


def _is_upstream(target: Target) -> bool:
    """Whether ``target.upstream`` looks like 0.18.0's: same home, same calls."""
    function = target.upstream
    code = getattr(function, "__code__", None)
    home = f"{getattr(function, '__module__', None)}.{getattr(function, '__qualname__', None)}"
    return home == target.where and code is not None and target.uses <= set(code.co_names)

"""An experiment, not a server: ``pqmsg serve`` with proposals 4 and 5b applied at run time.

``python bench/patched_serve.py serve --bind ... --data-dir ...`` starts the
unchanged server after two monkeypatches, so the bench can measure the
proposals before anyone edits ``pqmsg/`` (``bench/ab_patched.sh``):

- proposal 4: ``PushDispatcher.wake`` returns at once when no push provider
  is configured (no push-target look-up per stored copy);
- proposal 5b: asyncpg pools get a ``reset`` hook that does nothing more than
  asyncpg's own roll-back of an open transaction (no reset query on release).

For measurements only; the real change belongs in the server.
"""
from __future__ import annotations

import sys
from typing import Any

import asyncpg

from pqmsg.nurseries import push

_wake = push.PushDispatcher.wake
_create_pool = asyncpg.create_pool


def wake(self: push.PushDispatcher, account: str, device: int) -> None:
    if not self._breakers:  # no provider configured: nothing could be sent
        return
    _wake(self, account, device)


async def keep_session(con: Any) -> None:
    """asyncpg has already rolled back an open transaction; send no reset query."""


def create_pool(*args: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("reset", keep_session)
    return _create_pool(*args, **kwargs)


def main() -> int:
    push.PushDispatcher.wake = wake  # type: ignore[method-assign]
    asyncpg.create_pool = create_pool
    from pqmsg.cli import main as pqmsg_main

    return pqmsg_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())

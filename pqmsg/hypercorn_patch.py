"""Fix Hypercorn 0.18.0's trio worker dying when HTTP/2 clients disconnect.

The bug
-------
``hypercorn.trio.tcp_server.TCPServer`` serialises writes to its
``trio.SocketStream`` with ``self.send_lock``: ``protocol_send`` holds the
lock around ``stream.send_all``. ``TCPServer._close`` calls
``stream.send_eof()`` without that lock. Trio's ``SocketStream.send_eof``
enters the stream's send-conflict detector and *then* yields
(``await trio.lowlevel.checkpoint()``) before it shuts the socket down, so
for one scheduling step it owns the send side while the lock is free:

1. The client sends GOAWAY while responses are in flight (h2load does this
   when its ``-D`` duration ends). The connection's reading task sees
   ``ConnectionTerminated`` and calls ``send(Closed())``, that is
   ``TCPServer._close``, from inside the live connection.
2. ``send_eof`` enters the conflict detector and yields.
3. ``H2Protocol.send_task`` already holds ``send_lock`` for its next DATA
   frame: ``trio.Lock.acquire`` yields once after taking the lock. It
   resumes first, calls ``send_all``, and gets ``trio.BusyResourceError``.
4. ``protocol_send`` only catches ``BrokenResourceError`` and
   ``ClosedResourceError``, and ``send_task`` catches nothing, so the error
   escapes the connection's task group, then the listener's handler
   nursery, and ends ``hypercorn.trio.serve()``. One client's disconnect
   takes down every connection. (When an ASGI app task loses the race
   instead, Hypercorn logs it as "Error in ASGI Framework" and drops that
   response.)

Upstream's ``_close`` already catches ``BusyResourceError`` from
``send_eof``. That covers a close that arrives while a send is in progress,
but not a send that arrives while the close is in progress.

The fix
-------
``_close`` sends EOF only if it can take ``send_lock`` without waiting.
Holding the lock, no ``send_all`` can start during ``send_eof``'s
checkpoint. A sender that queues behind it then finds the stream shut down
(or closed, or broken) and gets ``ClosedResourceError`` or
``BrokenResourceError``, both of which ``protocol_send`` already handles.
If the lock is busy, ``_close`` skips the EOF, which is what upstream does
when ``send_eof`` raises ``BusyResourceError``. ``aclose()`` then runs with
no lock at all, as before. It must not wait: a sender stuck on a peer that
stopped reading holds the lock inside a shielded ``send_all``, and only
closing the socket wakes it, with ``ClosedResourceError``. No code path
calls ``_close`` while its own task holds ``send_lock``: ``protocol_send``'s
error branch runs ``protocol.handle(Closed())``, which never sends
``Closed``. So ``acquire_nowait`` cannot hit trio's re-entry
``RuntimeError``.

Nothing else changes. The replacement keeps upstream's exception list and
its order of operations. ``apply()`` refuses to patch any Hypercorn except
the release this was written against, and any ``_close`` it does not
recognise. Either case needs a human to look at the code again.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Final

import trio
from hypercorn.trio.tcp_server import TCPServer

__all__ = ["HYPERCORN_VERSION", "HypercornPatchError", "apply", "is_applied", "revert"]

HYPERCORN_VERSION: Final = "0.18.0"

# Hypercorn's own ``_close``, captured at import so that ``revert()`` can
# restore it. A constant, not state: the only state is which function the
# ``TCPServer`` class holds.
_UPSTREAM_CLOSE: Final = TCPServer._close


class HypercornPatchError(RuntimeError):
    """The installed Hypercorn is not the code this patch was written for."""


async def _close_holding_send_lock(self: TCPServer) -> None:
    """``TCPServer._close``, but ``send_eof`` runs under ``send_lock``."""
    try:
        self.send_lock.acquire_nowait()
    except trio.WouldBlock:
        # A sender owns the stream: skip the EOF, as upstream does on
        # BusyResourceError. Waiting could hang; aclose() below wakes it.
        pass
    else:
        try:
            await self.stream.send_eof()
        except (
            trio.BrokenResourceError,
            AttributeError,
            trio.BusyResourceError,
            trio.ClosedResourceError,
        ):
            # Upstream's list, unchanged: the peer is gone, the stream is an
            # SSLStream (no send_eof), or it was closed under us.
            pass
        finally:
            self.send_lock.release()
    await self.stream.aclose()


def is_applied() -> bool:
    """Return whether ``TCPServer._close`` is currently the patched version."""
    return TCPServer.__dict__["_close"] is _close_holding_send_lock


def apply() -> None:
    """Install the fix on ``hypercorn.trio.tcp_server.TCPServer``. Idempotent.

    Call once at start-up, before ``hypercorn.trio.serve``. The patch covers
    every connection accepted afterwards.

    Raises:
        HypercornPatchError: if the installed Hypercorn is not
            ``HYPERCORN_VERSION``, or if ``TCPServer._close`` is neither
            upstream's function nor this patch (another patch, or changed code).
    """
    if is_applied():
        return
    installed = importlib.metadata.version("hypercorn")
    if installed != HYPERCORN_VERSION:
        raise HypercornPatchError(
            f"pqmsg.hypercorn_patch targets hypercorn {HYPERCORN_VERSION}, found {installed}: "
            "check whether TCPServer._close still races send_all, then update or drop the patch"
        )
    if TCPServer.__dict__["_close"] is not _UPSTREAM_CLOSE or not _is_upstream(_UPSTREAM_CLOSE):
        raise HypercornPatchError(
            "hypercorn.trio.tcp_server.TCPServer._close is not the function this patch "
            f"replaces (found {TCPServer.__dict__['_close']!r}); refusing to patch"
        )
    TCPServer._close = _close_holding_send_lock  # type: ignore[method-assign]


def revert() -> None:
    """Restore Hypercorn's own ``TCPServer._close``. Idempotent; for tests."""
    if is_applied():
        TCPServer._close = _UPSTREAM_CLOSE  # type: ignore[method-assign]


def _is_upstream(function: Callable[..., object]) -> bool:
    """Whether ``function`` looks like 0.18.0's ``_close``: from Hypercorn, calls send_eof."""
    code = getattr(function, "__code__", None)
    return (
        getattr(function, "__module__", None) == "hypercorn.trio.tcp_server"
        and getattr(function, "__qualname__", None) == "TCPServer._close"
        and code is not None
        and "send_eof" in code.co_names
        and "aclose" in code.co_names
    )

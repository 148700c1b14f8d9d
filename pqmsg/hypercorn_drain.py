"""Make Hypercorn 0.18.0's trio worker drain keep-alive connections at shutdown.

When the shutdown trigger fires, ``worker_serve`` (``trio/run.py:117-118``)
sets ``context.terminated`` and gives the connections ``graceful_timeout`` to
finish. A connection closes early only through its idle task
(``TCPServer._idle_timeout``, ``trio/tcp_server.py:131``), which waits for
``terminated`` or ``keep_alive_timeout`` and then closes it. Three bugs keep
that from happening; the second one also loses responses. Line numbers are
Hypercorn 0.18.0's.

Bug 1: after a response, the idle task is never started again
--------------------------------------------------------------
The bookkeeping after a response runs in the ASGI app's own task:
``HTTPStream.app_send`` -> ``StreamClosed`` -> ``H11Protocol._maybe_recycle``
(``protocol/h11.py:271``) or ``H2Protocol.stream_send`` (``protocol/h2.py:223``).
Both first call ``_close_stream``, which puts ``http.disconnect`` in the app's
receive channel (``protocol/http_stream.py:132``). Quart-Trio answers
``http.disconnect`` by cancelling the request's nursery
(``quart_trio/asgi.py:40``), which holds this very task. So everything
after it is cancelled at its first checkpoint:

- ``send(Updated(idle=True))`` (``h11.py:286``, ``h2.py:231``) reaches
  ``TrioSingleTask.restart`` (``trio/worker_context.py:30``) and dies on its
  lock, or in ``nursery.start``, which does not reparent a child started
  from a cancelled scope. No idle task is left. The connection sits in
  ``_read_data`` with no timeout until the graceful deadline, and
  ``keep_alive_timeout`` is not enforced either.
- ``send(Closed())`` after the last response at shutdown (``h11.py:289``)
  dies in ``_close``'s ``send_eof``, so the socket is never closed.

An ASGI app that returns after its last message does not show this; an app
that cancels itself on ``http.disconnect`` (as ASGI allows) always does.

Bug 2: HTTP/2 responses lose END_STREAM when shutdown has started
-----------------------------------------------------------------
``H2Protocol``'s ``send_task`` writes DATA and then END_STREAM
(``h2.py:163-172``). The app's ``EndBody`` only waits until the stream's
buffer is empty (``h2.py:216``, ``StreamBuffer.pop`` at ``h2.py:77``), which
is before END_STREAM. So the app task can get to ``StreamClosed`` first, and
with ``terminated`` set it calls ``close_connection()`` (``h2.py:229``). The
``h2`` state machine is then CLOSED and allows nothing but GOAWAY
(``h2/connection.py:244-247``): ``send_task``'s ``end_stream`` raises
``ProtocolError``, which ``h2.py:175`` swallows. The client has the headers
and the body but never the end of the stream, and fails with "Server
disconnected" when the connection closes. That is usually at the graceful
deadline: because of bug 1, even the GOAWAY's flush is cancelled, and no
idle task is left to close the connection. Which task wins is up to Trio's scheduler: about half the
time when the response comes just after the trigger.

Bug 3: a prior-knowledge h2c connection with no request is never idle
---------------------------------------------------------------------
``H11Protocol`` parses the h2c preface ``PRI * HTTP/2.0`` as a request and
reports ``Updated(idle=False)`` (``h11.py:171``) before switching to
``H2Protocol``. That stops the idle task, and only a finished stream starts
it again. A client that connects and has not sent a request yet holds the
drain until the graceful deadline.

The fix
-------
1. ``TCPServer.protocol_send`` restarts or stops the idle task, and runs
   ``_close()`` for ``Closed``, under ``trio.move_on_after(grace, shield=True)``.
   These steps belong to the connection, not to the task that happens to
   call them, and none of them waits for the peer. Handing ``Closed`` to the
   protocol (and from there ``http.disconnect`` to apps) stays cancellable,
   as upstream has it. ``RawData`` is unchanged.
2. ``H2Protocol`` reports the connection idle only once it is drained: no
   active stream, and ``send_task`` has written the last frame of every
   finished stream. The app task's ``StreamClosed`` no longer sends GOAWAY
   itself, and ``send_task`` reports idle when it writes the last frame of
   the last stream. ``initiate`` reports a fresh connection idle (bug 3).
3. The idle task closes an HTTP/2 connection with GOAWAY first. The GOAWAY
   write is bounded by ``GOAWAY_SEND_TIMEOUT_S`` and not shielded: a peer
   that stopped reading must not hold the close.

At shutdown, an HTTP/1.1 connection now closes after the current response
(or at once when idle), and an HTTP/2 connection sends GOAWAY and closes once
no stream is active. A request still running keeps its connection open until
the graceful deadline, which stays the upper bound. One visible change
outside shutdown: ``keep_alive_timeout`` now applies after a response, as it
is documented to, and an HTTP/2 connection it closes gets a GOAWAY.

Fewer writes per HTTP/2 response
--------------------------------
The same two methods are where Hypercorn writes a response, and upstream
writes each small response three times: the HEADERS as soon as the app
sends them (``h2.py:206``), then the DATA, then an empty DATA frame with
END_STREAM (``h2.py:166``, ``h2.py:171``), each its own ``send_all``. On
loopback a write costs about as much as the Python around it, and at a
steady arrival rate (requests one at a time, nothing to share a write with)
these writes were the largest single cost on the event loop. So:

4. ``stream_send`` puts a response's HEADERS in the connection's buffer and
   wakes ``send_task`` instead of writing them; ``send_task`` writes the
   buffer with the stream's DATA, or before it sleeps (a response with no
   body yet, such as a WebSocket accept, still goes out at once).
5. ``_send_data`` puts END_STREAM on the last DATA frame of a stream and
   writes once per chunk.

A small response is now one write; the frames on the wire are the same
except that the empty END_STREAM frame is folded into the last DATA frame.

``pqmsg.hypercorn_patch`` replaces ``TCPServer._close``. These patches call
``_close`` through the class and take ``send_lock`` like the other senders,
so the two work in either order. ``apply()`` refuses any Hypercorn except the
release this was written against, and any target function it does not
recognise. Either case needs a human to read the code again.
"""

from __future__ import annotations

from typing import Final

import h2.exceptions
import trio
from hypercorn.events import Closed, Event, Updated
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import InformationalResponse, Response, StreamClosed
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.trio.tcp_server import TCPServer
from priority.priority import DeadlockError

from pqmsg import hypercorn_targets
from pqmsg.hypercorn_targets import Target

__all__ = ["HYPERCORN_VERSION", "HypercornDrainError", "apply", "is_applied", "revert"]

HYPERCORN_VERSION: Final = hypercorn_targets.HYPERCORN_VERSION
# For shielded connection steps that never wait for the peer (starting or
# stopping the idle task, shutting the socket): a bound, not a wait.
CONNECTION_STEP_GRACE_S: Final = 1.0
# How long closing an idle HTTP/2 connection waits to write its GOAWAY.
GOAWAY_SEND_TIMEOUT_S: Final = 1.0

# Hypercorn's own functions, captured at import so ``revert()`` can restore
# them. Constants, not state: the only state is what the classes hold.
_UPSTREAM_PROTOCOL_SEND: Final = TCPServer.protocol_send
_UPSTREAM_INITIATE_SERVER_CLOSE: Final = TCPServer._initiate_server_close
_UPSTREAM_H2_INITIATE: Final = H2Protocol.initiate
_UPSTREAM_STREAM_SEND: Final = H2Protocol.stream_send
_UPSTREAM_SEND_DATA: Final = H2Protocol._send_data
_UPSTREAM_SEND_TASK: Final = H2Protocol.send_task


class HypercornDrainError(RuntimeError):
    """The installed Hypercorn is not the code this patch was written for."""


async def _protocol_send(self: TCPServer, event: Event) -> None:
    """``TCPServer.protocol_send``, with the connection's own steps shielded."""
    if isinstance(event, Updated):
        # Only restarts or stops the idle task.
        with trio.move_on_after(CONNECTION_STEP_GRACE_S, shield=True):
            await _UPSTREAM_PROTOCOL_SEND(self, event)
    elif isinstance(event, Closed):
        with trio.move_on_after(CONNECTION_STEP_GRACE_S, shield=True):
            await self._close()
        # Upstream's second step, unshielded: it can wait on an app's queue.
        await self.protocol.handle(Closed())
    else:
        await _UPSTREAM_PROTOCOL_SEND(self, event)


async def _initiate_server_close(self: TCPServer) -> None:
    """``TCPServer._initiate_server_close``, with a GOAWAY first on HTTP/2."""
    protocol = self.protocol.protocol
    if isinstance(protocol, H2Protocol) and not protocol.closed:
        protocol.connection.close_connection()
        # Runs inside _idle_timeout's shield: this deadline is the only bound.
        with trio.move_on_after(GOAWAY_SEND_TIMEOUT_S):
            await _send_before_close(self, protocol.connection.data_to_send())
    await _UPSTREAM_INITIATE_SERVER_CLOSE(self)


async def _send_before_close(server: TCPServer, data: bytes) -> None:
    """Write ``data`` under ``send_lock``, unshielded, ignoring a stream going away."""
    async with server.send_lock:
        try:
            await server.stream.send_all(data)
        except (trio.BrokenResourceError, trio.BusyResourceError, trio.ClosedResourceError):
            # Gone, or being closed by another task: the close follows anyway.
            pass


def _is_drained(protocol: H2Protocol) -> bool:
    """No active stream, and every finished stream's last frame is written."""
    # A finished stream leaves ``streams`` before send_task writes its
    # END_STREAM and drops its buffer; open streams count through ``idle``.
    return protocol.idle and all(
        stream_id in protocol.streams for stream_id in protocol.stream_buffers
    )


async def _h2_initiate(
    self: H2Protocol,
    headers: list[tuple[bytes, bytes]] | None = None,
    settings: bytes | None = None,
) -> None:
    """``H2Protocol.initiate``, then report a connection with no stream idle."""
    await _UPSTREAM_H2_INITIATE(self, headers, settings)
    if _is_drained(self):
        await self.send(Updated(idle=True))


async def _stream_send(self: H2Protocol, event: StreamEvent) -> None:
    """``H2Protocol.stream_send``; a closed stream no longer says GOAWAY itself,
    and a response's HEADERS wait in the buffer for ``send_task`` (fix 4)."""
    if isinstance(event, StreamClosed):
        await self._close_stream(event.stream_id)
        # If send_task still owes END_STREAM, it reports idle once written.
        await self.send(Updated(idle=_is_drained(self)))
    elif isinstance(event, (InformationalResponse, Response)):
        try:
            self.connection.send_headers(
                event.stream_id,
                [
                    (b":status", b"%d" % event.status_code),
                    *event.headers,
                    *self.config.response_headers("h2"),
                ],
            )
        except h2.exceptions.ProtocolError:
            return  # the stream or connection closed meanwhile, as upstream
        await self.has_data.set()  # send_task writes them, with the body if it follows
    else:
        await _UPSTREAM_STREAM_SEND(self, event)


async def _send_task(self: H2Protocol) -> None:
    """``H2Protocol.send_task``; writes what is buffered before it sleeps (fix 4)."""
    while not self.closed:
        try:
            stream_id = next(self.priority)
        except DeadlockError:
            await self._flush()
            await self.has_data.wait()
            await self.has_data.clear()
        else:
            await self._send_data(stream_id)


async def _send_data(self: H2Protocol, stream_id: int) -> None:
    """``H2Protocol._send_data`` with one write per chunk, END_STREAM on the
    last DATA frame (fix 5); then report idle after the last stream's last
    frame (fix 2)."""
    try:
        chunk_size = min(
            self.connection.local_flow_control_window(stream_id),
            self.connection.max_outbound_frame_size,
        )
        buffer = self.stream_buffers[stream_id]
        data = await buffer.pop(max(0, chunk_size))
        if data:
            self.connection.send_data(stream_id, data, end_stream=buffer.complete)
        else:
            self.priority.block(stream_id)
            if buffer.complete:
                self.connection.end_stream(stream_id)
        if buffer.complete:
            del self.stream_buffers[stream_id]
            self.priority.remove_stream(stream_id)
        await self._flush()
    except (h2.exceptions.StreamClosedError, KeyError, h2.exceptions.ProtocolError):
        # As upstream: the stream or connection closed while this waited.
        await self.stream_buffers[stream_id].close()
        del self.stream_buffers[stream_id]
        self.priority.remove_stream(stream_id)
    if stream_id not in self.stream_buffers and not self.closed and _is_drained(self):
        await self.send(Updated(idle=True))


_TARGETS: Final = (
    Target(
        TCPServer,
        "protocol_send",
        _UPSTREAM_PROTOCOL_SEND,
        _protocol_send,
        frozenset({"send_all", "idle_task", "restart", "stop", "_close"}),
    ),
    Target(
        TCPServer,
        "_initiate_server_close",
        _UPSTREAM_INITIATE_SERVER_CLOSE,
        _initiate_server_close,
        frozenset({"handle", "aclose"}),
    ),
    Target(
        H2Protocol,
        "initiate",
        _UPSTREAM_H2_INITIATE,
        _h2_initiate,
        frozenset({"initiate_connection", "send_task"}),
    ),
    Target(
        H2Protocol,
        "stream_send",
        _UPSTREAM_STREAM_SEND,
        _stream_send,
        frozenset(
            {"_close_stream", "terminated", "close_connection", "send_headers", "response_headers"}
        ),
    ),
    Target(
        H2Protocol,
        "_send_data",
        _UPSTREAM_SEND_DATA,
        _send_data,
        frozenset(
            {
                "end_stream",
                "stream_buffers",
                "remove_stream",
                "send_data",
                "local_flow_control_window",
                "max_outbound_frame_size",
                "pop",
                "block",
                "complete",
                "_flush",
            }
        ),
    ),
    Target(
        H2Protocol,
        "send_task",
        _UPSTREAM_SEND_TASK,
        _send_task,
        frozenset({"priority", "DeadlockError", "has_data", "_send_data", "closed"}),
    ),
)


def is_applied() -> bool:
    """Return whether every target is currently the patched version."""
    return hypercorn_targets.is_applied(_TARGETS)


def apply() -> None:
    """Install the fixes on Hypercorn's trio ``TCPServer`` and ``H2Protocol``. Idempotent.

    Call once at start-up, before ``hypercorn.trio.serve``. The patches cover
    every connection accepted afterwards.

    Raises:
        HypercornDrainError: if the installed Hypercorn is not
            ``HYPERCORN_VERSION``, or if a target method is neither upstream's
            function nor this patch (another patch, or changed code). Nothing
            is patched then.
    """
    hypercorn_targets.apply(
        _TARGETS,
        patch="pqmsg.hypercorn_drain",
        error=HypercornDrainError,
        symptom="shutdown still waits for idle keep-alive connections",
    )


def revert() -> None:
    """Restore Hypercorn's own functions. Idempotent; for tests."""
    hypercorn_targets.revert(_TARGETS)

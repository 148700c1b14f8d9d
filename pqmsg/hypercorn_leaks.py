"""Close what Hypercorn 0.18.0 leaves open when an HTTP/2 stream ends early.

Two leaks keep a connection, or an app task, alive after the stream that
needed it is gone. Neither ends the server. Each holds memory, and keeps
the connection from ever being idle (or, once the client has gone, a task
from ending): ``keep_alive_timeout`` never closes it, and
``pqmsg.hypercorn_drain`` cannot close it at shutdown, which waits for the
graceful deadline. Line numbers are Hypercorn 0.18.0's.

Leak 1: a stream's send buffer outlives the stream
--------------------------------------------------
Each HTTP/2 stream has a ``StreamBuffer`` between the app and ``send_task``.
The app waits in ``push`` (``protocol/h2.py:66-68``) or ``drain``
(``h2.py:45-46``) until ``send_task`` takes the data, and only
``StreamBuffer.close`` (``h2.py:51-55``) wakes those waits without it.
``send_task`` drops a buffer once it has written END_STREAM
(``h2.py:170-174``), or closes and drops it when ``h2`` raises for the
stream (``h2.py:175-180``). Nothing else closes a buffer:

- A client's RST_STREAM (``h2.py:272-274``) closes the stream, and the
  buffer stays. When the client had stopped reading, the stream's window is
  exhausted. ``h2`` keeps the reset stream and reports that window as 0
  rather than raising, so ``_send_data`` pops nothing, blocks the stream
  (``h2.py:168``) and never gets to END_STREAM or to its ``except``. The
  whole unsent body stays in memory until the connection closes, and its
  entry in ``stream_buffers`` keeps ``pqmsg.hypercorn_drain`` from ever
  reporting the connection idle. This shows with Quart-Trio: a client
  reads a large response's headers, stops reading, and resets the stream.
- ``H2Protocol.handle(Closed())`` (``h2.py:191-196``) closes the streams
  and stops ``send_task``, not the buffers. An app that keeps sending after
  ``http.disconnect`` waits in ``push`` or ``drain`` until the graceful
  deadline cancels the connection. Quart-Trio apps do not: Quart-Trio
  cancels the request on ``http.disconnect`` (``quart_trio/asgi.py:36-40``).

Closing a buffer has a consequence upstream never guards against, and
already meets when a client resets a stream whose window is open (the
``except`` at ``h2.py:175-180``). ``stream_send`` swallows the
``BufferCompleteError`` of a push to a closed buffer, and the ``KeyError``
or ``MissingStreamError`` once the buffer is dropped (``h2.py:234-242``),
without a checkpoint. An app whose body iterator never awaits then loops on
sends that do nothing and never yield: Quart-Trio's cancellation cannot
reach it, and the whole worker freezes.

Leak 2: a refused WebSocket stream is never closed
--------------------------------------------------
``WSStream`` refuses a request with 404 or 400 (``protocol/ws_stream.py:
227-232``), and with 400 when data arrives before the app has accepted
(``ws_stream.py:238-240``). It sets ``closed`` and sends the response, but
never ``StreamClosed``, the event through which the protocol forgets a
stream. So the stream stays in ``H2Protocol.streams``, never idle
(``ws_stream.py:199-201``); each refused stream adds one. In the second
case the app is already running. ``closed`` makes ``handle`` ignore the
``StreamClosed`` that would tell it ``websocket.disconnect``
(``ws_stream.py:204-205``, ``244-251``), and ``app_send`` drops what the app
sends (``ws_stream.py:254-256``). An app waiting for a message waits until
the graceful deadline, even after the client has gone, over HTTP/1.1 too.
(``HTTPStream``'s 404 for an unknown server name, ``http_stream.py:117-119``,
has the same gap. pqmsg sets no server names.)

The fix
-------
1. ``H2Protocol._close_stream`` closes the stream's buffer when the stream
   can carry no more data: the connection is closed, or ``h2`` has closed
   the stream. ``close()`` wakes the app's ``push`` and ``drain``, and
   drops the data that could never be sent. The stream is unblocked, so
   ``send_task`` visits it, finds the buffer complete, and drops it through
   its own ``except`` (``end_stream`` on a closed stream raises). That is
   also where ``pqmsg.hypercorn_drain`` reports the connection idle. A
   stream whose app ends normally is still open in ``h2`` when the app
   closes it (``send_task`` still owes END_STREAM), so its data is kept.
2. ``HTTPStream.app_send`` checkpoints before it handles a message for a
   stream that is closed, so an app sending into a gone stream can be
   cancelled. ``_close_stream`` marks the stream closed before 1 closes its
   buffer, and before upstream's ``except`` can, unless the reset arrives
   in one read after an event that yields (a window this does not close).
   Other sends, and the final ``send(None)``, are unchanged.
3. ``WSStream.handle`` gives the app ``websocket.disconnect`` (1006, as
   ``StreamClosed`` would) when it refuses a stream whose app is running.
4. ``H2Protocol.handle`` closes the streams that refused their request
   while it handled the frames just received: a stream still in ``streams``
   but already ``closed`` reports ``StreamClosed`` through its own ``send``,
   as its app does when it ends. This runs after the frames, because
   ``_handle_events`` reports the connection busy right after it creates a
   stream (``h2.py:253-254``), which would undo an idle report sent from
   inside the refusal.

``pqmsg.hypercorn_patch``, ``pqmsg.hypercorn_drain`` and
``pqmsg.hypercorn_h2_errors`` replace other functions, so the four patches
work together in any order; with the drain patch, the ``stream_send`` and
``_send_data`` these fixes reach are its versions. ``apply()`` refuses any
Hypercorn except the release this was written against, and any target
function it does not recognise. Either case needs a human to read the code
again.
"""

from __future__ import annotations

from typing import Final

import trio
from hypercorn.events import Event as ConnectionEvent
from hypercorn.events import RawData
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.typing import ASGISendEvent
from priority.priority import MissingStreamError
from wsproto.frame_protocol import CloseReason

from pqmsg import hypercorn_targets
from pqmsg.hypercorn_targets import Target

__all__ = ["HYPERCORN_VERSION", "HypercornLeaksError", "apply", "is_applied", "revert"]

HYPERCORN_VERSION: Final = hypercorn_targets.HYPERCORN_VERSION

# Hypercorn's own functions, captured at import so ``revert()`` can restore
# them. Constants, not state: the only state is what the classes hold.
_UPSTREAM_CLOSE_STREAM: Final = H2Protocol._close_stream
_UPSTREAM_H2_HANDLE: Final = H2Protocol.handle
_UPSTREAM_HTTP_APP_SEND: Final = HTTPStream.app_send
_UPSTREAM_WS_HANDLE: Final = WSStream.handle


class HypercornLeaksError(RuntimeError):
    """The installed Hypercorn is not the code this patch was written for."""


async def _close_stream(self: H2Protocol, stream_id: int) -> None:
    """``H2Protocol._close_stream``; a stream that can send no more loses its buffer."""
    await _UPSTREAM_CLOSE_STREAM(self, stream_id)
    buffer = self.stream_buffers.get(stream_id)
    if buffer is None or not (self.closed or _h2_stream_closed(self, stream_id)):
        return
    await buffer.close()  # wakes push() and drain()
    try:
        # send_task then drops the buffer: end_stream raises on a closed stream.
        self.priority.unblock(stream_id)
    except MissingStreamError:
        pass  # send_task has dropped it already.
    await self.has_data.set()


def _h2_stream_closed(protocol: H2Protocol, stream_id: int) -> bool:
    """Whether ``h2`` has closed the stream (or already forgotten it, closed)."""
    stream = protocol.connection.streams.get(stream_id)
    return stream is None or stream.closed


async def _http_app_send(self: HTTPStream, message: ASGISendEvent | None) -> None:
    """``HTTPStream.app_send``; a message for a closed stream is a checkpoint first."""
    if message is not None and self.closed:
        # Upstream drops it without yielding: an app looping on send alone
        # could never be cancelled. None is the app's last call: no yield there.
        await trio.lowlevel.checkpoint()
    await _UPSTREAM_HTTP_APP_SEND(self, message)


async def _ws_handle(self: WSStream, event: StreamEvent) -> None:
    """``WSStream.handle``; an app whose stream it refuses is told to stop."""
    was_closed = self.closed
    await _UPSTREAM_WS_HANDLE(self, event)
    refused = self.closed and not was_closed and not isinstance(event, StreamClosed)
    if refused and self.app_put is not None:
        # The app runs (data came before its accept): StreamClosed would
        # tell it this, but ``closed`` now makes handle() ignore that.
        code = CloseReason.ABNORMAL_CLOSURE.value
        await self.app_put({"type": "websocket.disconnect", "code": code})


async def _h2_handle(self: H2Protocol, event: ConnectionEvent) -> None:
    """``H2Protocol.handle``; then close the streams that refused their request."""
    await _UPSTREAM_H2_HANDLE(self, event)
    if not isinstance(event, RawData) or self.closed:
        return  # Closed() has dropped every stream.
    for stream_id, stream in list(self.streams.items()):
        if stream.closed:
            # Only a refusal leaves a closed stream here: StreamClosed drops
            # a stream before telling it. Report it as its app would.
            await stream.send(StreamClosed(stream_id=stream_id))


_TARGETS: Final = (
    Target(
        H2Protocol,
        "_close_stream",
        _UPSTREAM_CLOSE_STREAM,
        _close_stream,
        frozenset({"streams", "pop", "handle", "StreamClosed", "has_data"}),
    ),
    Target(
        HTTPStream,
        "app_send",
        _UPSTREAM_HTTP_APP_SEND,
        _http_app_send,
        frozenset({"closed", "send", "Body", "_send_closed"}),
    ),
    Target(
        H2Protocol,
        "handle",
        _UPSTREAM_H2_HANDLE,
        _h2_handle,
        frozenset({"RawData", "receive_data", "_handle_events", "Closed", "_close_stream"}),
    ),
    Target(
        WSStream,
        "handle",
        _UPSTREAM_WS_HANDLE,
        _ws_handle,
        frozenset({"closed", "is_valid", "_send_error_response", "app_put", "StreamClosed"}),
    ),
)


def is_applied() -> bool:
    """Return whether every target is currently the patched version."""
    return hypercorn_targets.is_applied(_TARGETS)


def apply() -> None:
    """Install the fixes on Hypercorn's HTTP/2 protocol and its streams. Idempotent.

    Call once at start-up, before ``hypercorn.trio.serve``. The patches cover
    every stream opened afterwards.

    Raises:
        HypercornLeaksError: if the installed Hypercorn is not
            ``HYPERCORN_VERSION``, or if a target method is neither upstream's
            function nor this patch (another patch, or changed code). Nothing
            is patched then.
    """
    hypercorn_targets.apply(
        _TARGETS,
        patch="pqmsg.hypercorn_leaks",
        error=HypercornLeaksError,
        symptom="reset or refused HTTP/2 streams still hold their connection",
    )


def revert() -> None:
    """Restore Hypercorn's own functions. Idempotent; for tests."""
    hypercorn_targets.revert(_TARGETS)

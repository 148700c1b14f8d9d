"""Keep one bad request from ending Hypercorn 0.18.0's trio server.

Hypercorn handles a connection's incoming bytes in that connection's own
task: ``TCPServer._read_data`` -> ``H2Protocol.handle`` -> ``_handle_events``.
``TCPServer.run`` catches only ``OSError`` (``trio/tcp_server.py:77``). Any
other exception there escapes the connection's task group and the
listener's handler nursery, and ends ``hypercorn.trio.serve()``: every
connection, every client. Each bug below takes one unauthenticated request.
Line numbers are Hypercorn 0.18.0's.

Bug 1: request data after the response (pgjones/hypercorn#329)
--------------------------------------------------------------
An app may answer before it has read the request body. Quart answers 413
as soon as Content-Length exceeds ``MAX_CONTENT_LENGTH``. When the response
ends, ``H2Protocol.stream_send`` drops the stream from ``streams``
(``protocol/h2.py:224``). The stream is only half-closed, so the client may
go on sending DATA, and does. ``_handle_events`` looks each ``DataReceived``
up with ``self.streams[event.stream_id]`` (``h2.py:259``). Unlike the
``StreamEnded`` branch below it, nothing catches the ``KeyError``. Upstream
PRs 312, 334 and 365 add that guard; no release has it.

Bug 2: request fields Hypercorn decodes without checking
--------------------------------------------------------
The ``h2`` library validates a request's header block (RFC 9113 §8.2.1
and §8.3: no NUL, CR or LF, the pseudo-headers a request needs) and allows
every other octet in a value, as it should. Hypercorn then decodes some
values, in the connection's task:

- ``:path``, as ASCII (``protocol/http_stream.py:93``; ``ws_stream.py:215``
  for WebSocket over HTTP/2). A raw ``é`` raises ``UnicodeDecodeError``.
  HTTP/1.1 is safe: h11 refuses such a target with a 400 first.
- ``:method``, as ASCII (``h2.py:322``).
- An ordinary CONNECT has no ``:path`` (RFC 9113 §8.5), and ``h2`` accepts
  it. ``_create_stream`` then reads an unbound ``raw_path`` (``h2.py:365``).
- The WebSocket handshake headers ``Connection``, ``Sec-WebSocket-Protocol``
  and ``Sec-WebSocket-Extensions``, as ASCII, in wsproto's
  ``split_comma_header`` (``ws_stream.py:70-76``). This also ends the server
  over HTTP/1.1, because h11 allows octets over 0x7F in header values.
- With ``config.server_names`` set, the Host header, as UTF-8
  (``utils.py:198``), over both protocols. pqmsg sets no server names today.

Bug 3: priority signals
-----------------------
Hypercorn feeds each ``PriorityUpdated`` to its ``priority.PriorityTree``
(``h2.py:300-316``). For a stream it does not know, it inserts a
placeholder, and nothing removes it. The tree refuses its 1001st stream
with ``TooManyStreamsError``, so 1000 PRIORITY frames end the server
without any request. ``reprioritize`` also raises ``PriorityLoop`` under a
dependency chain deeper than 100, which a client can build once it may
open more than 100 streams (pqmsg allows 128).

The fix
-------
``H2Protocol._handle_events`` runs upstream's loop unchanged, over an
iterator that screens each event just before the loop reaches it. The screen
sees the streams as the loop would see them, because app tasks can close
streams while the loop awaits.

1. ``DataReceived`` for a stream Hypercorn has closed is not passed on. Its
   flow-control credit is handed back (``acknowledge_received_data``, which
   skips the stream window of a closed stream), so the connection does not
   stall. Once the response is written in full (the stream has no send
   buffer left), the stream is reset with NO_ERROR. RFC 9113 §8.1 asks a
   client to stop sending a request body that way when the response is
   complete. Resetting earlier would cut the response short.
2. A ``RequestReceived`` that Hypercorn cannot represent never reaches it.
   The stream gets a 400 with END_STREAM and, if the client has more of the
   request to send, RST_STREAM with PROTOCOL_ERROR. RFC 9113 §8.1.1 makes
   such a request malformed and allows a response before the reset. The
   rule is the one h11 applies to HTTP/1.1, so both protocols accept the
   same requests: ``:method`` is a token and ``:path`` is visible ASCII
   (RFC 9110 §5.6.2, RFC 9112 §3). An ordinary CONNECT is refused too:
   Hypercorn cannot tunnel, and it answers an extended CONNECT it does not
   know with a 400 already.
3. ``PriorityUpdated`` is dropped, so streams share the connection
   round-robin at the default weight. RFC 9113 §5.3.2 deprecates these
   signals, and they never bound a server's order anyway. The tree then
   holds only the streams Hypercorn serves, one level deep.

``ws_stream.Handshake.__init__`` treats a handshake whose headers it cannot
decode as carrying no WebSocket headers. Upstream's ``is_valid()`` then
refuses it, and ``WSStream`` answers 400 over either protocol.
``valid_server_name`` treats a Host that is not UTF-8 as an unknown host:
404, as for any host not in ``server_names``.

Two changes show beyond the server staying up. A ``:path`` that HTTP/1.1
would refuse, such as a raw ``é`` in the query string, now gets a 400 over
HTTP/2 as well; Hypercorn used to pass it to the app. And client priorities
no longer order responses. Everything else runs as upstream does.

``pqmsg.hypercorn_patch`` and ``pqmsg.hypercorn_drain`` replace other
methods, so the three patches work together in any order. ``apply()``
refuses any Hypercorn except the release this was written against, and any
target function it does not recognise. Either case needs a human to read
the code again.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Final

import h2.errors
import h2.events
import h2.exceptions
from hypercorn.config import Config
from hypercorn.protocol import http_stream, ws_stream
from hypercorn.protocol.events import Request
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.ws_stream import Handshake
from hypercorn.utils import valid_server_name

from pqmsg import hypercorn_targets
from pqmsg.hypercorn_targets import Target

__all__ = ["HYPERCORN_VERSION", "HypercornH2PatchError", "apply", "is_applied", "revert"]

HYPERCORN_VERSION: Final = hypercorn_targets.HYPERCORN_VERSION
# What h11 accepts on HTTP/1.1: a method is a token (RFC 9110 §5.6.2), a
# request-target is one or more visible ASCII characters (RFC 9112 §3).
METHOD_PATTERN: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
PATH_PATTERN: Final = re.compile(rb"[\x21-\x7e]+")

_HandleEvents = Callable[[H2Protocol, Iterable[h2.events.Event]], Awaitable[None]]

# Hypercorn's own functions, captured at import so ``revert()`` can restore
# them. Constants, not state: the only state is what the owners hold.
# Upstream annotates ``events`` as a list; it only iterates it, once, in order.
_UPSTREAM_HANDLE_EVENTS: Final[_HandleEvents] = H2Protocol._handle_events  # type: ignore[assignment]
_UPSTREAM_HANDSHAKE_INIT: Final = Handshake.__init__
_UPSTREAM_VALID_SERVER_NAME: Final = valid_server_name


class HypercornH2PatchError(RuntimeError):
    """The installed Hypercorn is not the code this patch was written for."""


async def _handle_events(self: H2Protocol, events: list[h2.events.Event]) -> None:
    """``H2Protocol._handle_events``, over the events Hypercorn can handle."""
    await _UPSTREAM_HANDLE_EVENTS(self, _screened(self, events))


def _screened(protocol: H2Protocol, events: Iterable[h2.events.Event]) -> Iterator[h2.events.Event]:
    """Yield ``events``, handling here the ones that would raise in Hypercorn.

    A generator, so each check runs when upstream's loop asks for the event.
    """
    for event in events:
        if isinstance(event, h2.events.DataReceived) and event.stream_id not in protocol.streams:
            _discard_data(protocol, event)
        elif isinstance(event, h2.events.RequestReceived) and _is_malformed(event.headers):
            _refuse_request(protocol, event)
        elif isinstance(event, h2.events.PriorityUpdated):
            pass  # Deprecated and advisory: see the module docstring.
        else:
            yield event


def _discard_data(protocol: H2Protocol, event: h2.events.DataReceived) -> None:
    """Hand back the credit of data for a closed stream; stop it once answered."""
    connection = protocol.connection
    connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    if event.stream_id not in protocol.stream_buffers:
        # send_task has written END_STREAM and dropped the buffer. While the
        # buffer is there, a reset would cut the response short.
        _reset(protocol, event.stream_id, h2.errors.ErrorCodes.NO_ERROR)


def _refuse_request(protocol: H2Protocol, event: h2.events.RequestReceived) -> None:
    """Answer a malformed request with 400, without creating a stream for it."""
    # The empty 400 h11 gets from Hypercorn for a request it cannot parse.
    headers = [(b":status", b"400"), (b"content-length", b"0")]
    try:
        protocol.connection.send_headers(
            event.stream_id, headers + protocol.config.response_headers("h2"), end_stream=True
        )
    except h2.exceptions.ProtocolError:
        return  # The connection is closing: nothing more can be said on it.
    if event.stream_ended is None:
        # More of the request may follow: RFC 9113 §8.1.1's stream error.
        _reset(protocol, event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)


def _reset(protocol: H2Protocol, stream_id: int, error_code: h2.errors.ErrorCodes) -> None:
    """RST_STREAM, unless the stream or the connection is closed already."""
    try:
        protocol.connection.reset_stream(stream_id, error_code)
    except h2.exceptions.ProtocolError:
        pass  # Closed (StreamClosedError is a ProtocolError): nothing to stop.


def _is_malformed(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether Hypercorn cannot represent a request with these headers."""
    pseudo = {name: value for name, value in headers if name.startswith(b":")}
    method = pseudo.get(b":method", b"")
    if method == b"CONNECT" and b":protocol" not in pseudo:
        return True  # An ordinary CONNECT: no :path, and nothing to tunnel to.
    return not (
        METHOD_PATTERN.fullmatch(method) and PATH_PATTERN.fullmatch(pseudo.get(b":path", b""))
    )


def _handshake_init(self: Handshake, headers: list[tuple[bytes, bytes]], http_version: str) -> None:
    """``Handshake.__init__``; undecodable WebSocket headers make no handshake."""
    try:
        _UPSTREAM_HANDSHAKE_INIT(self, headers, http_version)
    except UnicodeDecodeError:
        # These headers are ASCII tokens (RFC 6455 §4.3). Without them
        # is_valid() is False, and WSStream answers 400.
        _UPSTREAM_HANDSHAKE_INIT(self, [], http_version)


def _valid_server_name(config: Config, request: Request) -> bool:
    """``valid_server_name``; a Host that is not UTF-8 matches no server name."""
    try:
        return _UPSTREAM_VALID_SERVER_NAME(config, request)
    except UnicodeDecodeError:
        return False


_TARGETS: Final = (
    Target(
        H2Protocol,
        "_handle_events",
        _UPSTREAM_HANDLE_EVENTS,
        _handle_events,
        frozenset({"streams", "acknowledge_received_data", "_create_stream", "_priority_updated"}),
        home="hypercorn.protocol.h2.H2Protocol._handle_events",
    ),
    Target(
        Handshake,
        "__init__",
        _UPSTREAM_HANDSHAKE_INIT,
        _handshake_init,
        frozenset({"split_comma_header"}),
        home="hypercorn.protocol.ws_stream.Handshake.__init__",
    ),
    *(
        Target(
            module,
            "valid_server_name",
            _UPSTREAM_VALID_SERVER_NAME,
            _valid_server_name,
            frozenset({"server_names", "decode"}),
            home="hypercorn.utils.valid_server_name",
        )
        # Both modules import the function by name; h11, h2 and h3 use these.
        for module in (http_stream, ws_stream)
    ),
)


def is_applied() -> bool:
    """Return whether every target is currently the patched version."""
    return hypercorn_targets.is_applied(_TARGETS)


def apply() -> None:
    """Install the fixes on Hypercorn's HTTP/2 and WebSocket code. Idempotent.

    Call once at start-up, before ``hypercorn.trio.serve``. The patches cover
    every request handled afterwards, on any connection.

    Raises:
        HypercornH2PatchError: if the installed Hypercorn is not
            ``HYPERCORN_VERSION``, or if a target is neither upstream's
            function nor this patch (another patch, or changed code). Nothing
            is patched then.
    """
    hypercorn_targets.apply(
        _TARGETS,
        patch="pqmsg.hypercorn_h2_errors",
        error=HypercornH2PatchError,
        symptom="one bad HTTP/2 request still ends serve()",
    )


def revert() -> None:
    """Restore Hypercorn's own functions. Idempotent; for tests."""
    hypercorn_targets.revert(_TARGETS)

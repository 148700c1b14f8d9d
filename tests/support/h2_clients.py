"""Raw HTTP/2 clients (h2c, prior knowledge) over trio sockets, for tests.

Built on the ``h2`` state machine rather than httpx so a test can do what a
well-behaved client library never does: walk away from a connection in the
middle of a response. Loopback only; callers wrap every call in their own
``trio.fail_after``.
"""

from __future__ import annotations

import socket
import struct

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio

RECEIVE_CHUNK_BYTES = 65_536
# The largest flow-control window HTTP/2 allows (RFC 9113, 6.9.1). Opening it
# fully means the server never waits on us, so it is busy writing when we leave.
MAX_WINDOW_BYTES = 2**31 - 1
DEFAULT_WINDOW_BYTES = 65_535


class H2Connection:
    """One client connection: a trio socket stream plus an ``h2`` state machine."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )

    async def start(self) -> None:
        """Send the preface and SETTINGS, and open every flow-control window fully."""
        self._h2.initiate_connection()
        self._h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: MAX_WINDOW_BYTES})
        self._h2.increment_flow_control_window(MAX_WINDOW_BYTES - DEFAULT_WINDOW_BYTES)
        await self._flush()

    async def get(self, path: str, *, authority: str) -> int:
        """Send a GET for ``path`` (HEADERS with END_STREAM); return its stream id."""
        stream_id = self._h2.get_next_available_stream_id()
        headers = [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", authority.encode("ascii")),
            (b":path", path.encode("ascii")),
        ]
        self._h2.send_headers(stream_id, headers, end_stream=True)
        await self._flush()
        return stream_id

    async def next_events(self) -> list[h2.events.Event]:
        """Receive one chunk from the server and return the events it produced.

        Raises ``EOFError`` when the server has closed the connection.
        """
        data = await self._stream.receive_some(RECEIVE_CHUNK_BYTES)
        if not data:
            raise EOFError("server closed the connection")
        events = self._h2.receive_data(data)
        await self._flush()
        return events

    async def go_away(self) -> None:
        """Send GOAWAY (NO_ERROR) while responses may still be in flight."""
        self._h2.close_connection()
        await self._flush()

    async def drain(self) -> None:
        """Discard whatever the server still sends until it closes the connection."""
        try:
            while await self._stream.receive_some(RECEIVE_CHUNK_BYTES):
                pass
        except trio.BrokenResourceError:
            pass  # Reset instead of closed: gone either way.

    def abort(self) -> None:
        """Close the socket so the kernel sends RST instead of FIN (SO_LINGER 0)."""
        self._stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._stream.socket.close()

    async def aclose(self) -> None:
        """Close the socket gracefully."""
        await self._stream.aclose()

    async def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data:
            await self._stream.send_all(data)


async def open_h2c(host: str, port: int) -> H2Connection:
    """Connect to ``host:port`` and start an HTTP/2 connection with prior knowledge."""
    connection = H2Connection(await trio.open_tcp_stream(host, port))
    await connection.start()
    return connection


async def fetch(host: str, port: int, path: str) -> tuple[int, bytes]:
    """Make one complete, well-behaved GET; return the status and the body."""
    connection = await open_h2c(host, port)
    try:
        stream_id = await connection.get(path, authority=f"{host}:{port}")
        status = 0
        body = bytearray()
        while True:
            for event in await connection.next_events():
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    body += event.data
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    return status, bytes(body)
    finally:
        await connection.aclose()


async def walk_away_mid_response(host: str, port: int, path: str, *, streams: int) -> bool:
    """Request ``path`` on ``streams`` concurrent streams, then leave mid-response.

    Waits for the first DATA frame, so the server is busy writing a body,
    with the other streams at whatever stage they have reached. Then it sends
    GOAWAY, reads until the server closes its side, and resets the TCP
    connection. This is what h2load does when its ``-D`` duration ends. GOAWAY
    is the part that matters: it makes Hypercorn close the connection from
    inside a live connection (``ConnectionTerminated``). A bare RST does not.

    Returns True if it sent GOAWAY mid-response. Returns False if the server
    refused, reset or closed the connection first.
    """
    try:
        connection = await open_h2c(host, port)
    except (OSError, trio.BrokenResourceError):
        return False
    try:
        for _ in range(streams):
            await connection.get(path, authority=f"{host}:{port}")
        while not any(
            isinstance(event, h2.events.DataReceived) for event in await connection.next_events()
        ):
            pass
        await connection.go_away()
        await connection.drain()
    except (EOFError, trio.BrokenResourceError):
        return False
    finally:
        connection.abort()
    return True

"""What an HTTP/2 client puts on the wire: a TCP proxy that records it, and an HPACK reader.

:func:`recording_proxy` forwards loopback TCP connections to a real server
and keeps every byte each client sent. :func:`header_blocks` cuts one
connection's bytes into HPACK header blocks (HEADERS plus CONTINUATION
frames), and :func:`string_literals` walks a block's representations
(RFC 7541 section 6) and reports, for every string literal in it, whether
its H bit says Huffman-coded (section 5.2). No HPACK state is needed for
that: the structure of a block does not depend on the header table.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import attrs
import hpack
import trio
from hyperframe.frame import ContinuationFrame, Frame, HeadersFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_BYTES = 9


@attrs.define
class Recording:
    port: int = 0
    #: Client-to-server bytes, one entry per accepted connection, in accept order.
    connections: list[bytearray] = attrs.field(factory=list)


@asynccontextmanager
async def recording_proxy(upstream_port: int) -> AsyncIterator[Recording]:
    """A loopback proxy to ``upstream_port`` that records what clients send."""
    recording = Recording()

    async def handle(client: trio.SocketStream) -> None:
        sent = bytearray()
        recording.connections.append(sent)
        async with client, await trio.open_tcp_stream("127.0.0.1", upstream_port) as upstream:
            async with trio.open_nursery() as pumps:

                async def pump(src: trio.SocketStream, dst: trio.SocketStream, record: bytearray | None) -> None:
                    try:
                        while data := await src.receive_some(65_536):
                            if record is not None:
                                record += data
                            await dst.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    finally:
                        pumps.cancel_scope.cancel()  # either side gone: end the pair

                pumps.start_soon(pump, client, upstream, sent)
                pumps.start_soon(pump, upstream, client, None)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        recording.port = listeners[0].socket.getsockname()[1]
        try:
            yield recording
        finally:
            nursery.cancel_scope.cancel()


def header_blocks(sent: bytes) -> list[bytes]:
    """The HPACK header blocks of one client connection, in order (h2c prior knowledge)."""
    assert sent.startswith(PREFACE), "not an HTTP/2 prior-knowledge connection"
    view = memoryview(sent)[len(PREFACE):]
    blocks: list[bytes] = []
    current = bytearray()
    while len(view) >= FRAME_HEADER_BYTES:
        frame, length = Frame.parse_frame_header(view[:FRAME_HEADER_BYTES])
        if len(view) < FRAME_HEADER_BYTES + length:
            break  # cut off when the connection closed
        frame.parse_body(view[FRAME_HEADER_BYTES:FRAME_HEADER_BYTES + length])
        view = view[FRAME_HEADER_BYTES + length:]
        if isinstance(frame, HeadersFrame | ContinuationFrame):
            current += frame.data
            if "END_HEADERS" in frame.flags:
                blocks.append(bytes(current))
                current = bytearray()
    return blocks


@attrs.frozen
class StringLiteral:
    huffman: bool
    data: bytes  # as on the wire: Huffman code when ``huffman``


def _integer(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """RFC 7541 5.1: the integer at ``pos`` and the position after it."""
    mask = (1 << prefix_bits) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        octet = block[pos]
        pos += 1
        value += (octet & 0x7F) << shift
        shift += 7
        if not octet & 0x80:
            return value, pos


def _string(block: bytes, pos: int) -> tuple[StringLiteral, int]:
    """RFC 7541 5.2: H bit, 7-bit-prefix length, octets."""
    huffman = bool(block[pos] & 0x80)
    length, pos = _integer(block, pos, 7)
    return StringLiteral(huffman, block[pos:pos + length]), pos + length


def string_literals(block: bytes) -> list[StringLiteral]:
    """Every string literal (names and values) of one header block."""
    literals: list[StringLiteral] = []
    pos = 0
    while pos < len(block):
        first = block[pos]
        if first & 0x80:  # 6.1 indexed header field: no strings
            _, pos = _integer(block, pos, 7)
            continue
        if first & 0x40:  # 6.2.1 literal with incremental indexing
            index, pos = _integer(block, pos, 6)
        elif first & 0x20:  # 6.3 dynamic table size update
            _, pos = _integer(block, pos, 5)
            continue
        else:  # 6.2.2 without indexing, 6.2.3 never indexed
            index, pos = _integer(block, pos, 4)
        if index == 0:  # a literal name comes first
            name, pos = _string(block, pos)
            literals.append(name)
        value, pos = _string(block, pos)
        literals.append(value)
    return literals


def decoded_headers(sent: bytes) -> list[list[tuple[bytes, bytes]]]:
    """The header lists of one connection, decoded in order by one ``hpack.Decoder``."""
    decoder = hpack.Decoder()
    return [[(bytes(k), bytes(v)) for k, v in decoder.decode(block, raw=True)] for block in header_blocks(sent)]

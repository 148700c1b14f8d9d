"""A real server's HTTP/2 response headers: raw literals, the request id never indexed."""

from __future__ import annotations

from pathlib import Path

import h2.config
import h2.connection
import h2.events
import hpack
import trio

from pqmsg import h2_responses
from tests.support.server import make_settings, running_server

HEADERS, CONTINUATION = 0x1, 0x9


def header_blocks(raw: bytes) -> list[bytes]:
    """The header blocks of the HEADERS (and CONTINUATION) frames in ``raw``, in order."""
    blocks: list[bytes] = []
    offset = 0
    while offset + 9 <= len(raw):
        length = int.from_bytes(raw[offset : offset + 3], "big")
        kind, flags = raw[offset + 3], raw[offset + 4]
        payload = raw[offset + 9 : offset + 9 + length]
        if kind == HEADERS:
            assert not flags & 0x28, "no padding or priority expected"
            blocks.append(payload)
        elif kind == CONTINUATION:
            blocks[-1] += payload
        offset += 9 + length
    return blocks


async def raw_responses(port: int, paths: list[str]) -> bytes:
    """Every byte the server sent on one h2c connection while answering ``paths``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    for index, path in enumerate(paths):
        request = [(":method", "GET"), (":scheme", "http"), (":authority", "localhost"), (":path", path)]
        conn.send_headers(1 + 2 * index, request, end_stream=True)
    await stream.send_all(conn.data_to_send())
    received, ended = b"", 0
    while ended < len(paths):
        data = await stream.receive_some(65_536)
        assert data, "the server closed the connection"
        received += data
        ended += sum(isinstance(e, h2.events.StreamEnded) for e in conn.receive_data(data))
        await stream.send_all(conn.data_to_send())
    await stream.aclose()
    return received


async def test_response_headers_are_raw_literals_and_the_request_id_is_never_indexed(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path)) as server:
        with trio.fail_after(30):
            raw = await raw_responses(server.port, ["/health/live", "/health/live", "/nowhere"])
    decoder = hpack.Decoder()
    ids = []
    for block in header_blocks(raw):
        fields = decoder.decode(block, raw=True)
        (request_id,) = [f for f in fields if f[0] == b"x-request-id"]
        assert isinstance(request_id, hpack.NeverIndexedHeaderTuple)
        assert request_id[1] in block  # as it is: not Huffman-coded
        ids.append(request_id[1])
    assert len(set(ids)) == 3
    # Never indexed: no request id reached the client's copy of the table.
    assert not any(entry[0] == b"x-request-id" for entry in decoder.header_table.dynamic_entries)


def test_apply_is_idempotent_and_reverts() -> None:
    from hypercorn.protocol.h2 import H2Protocol

    h2_responses.apply()
    patched = H2Protocol.__init__
    h2_responses.apply()
    assert H2Protocol.__init__ is patched
    h2_responses.revert()
    assert H2Protocol.__init__ is not patched
    h2_responses.apply()

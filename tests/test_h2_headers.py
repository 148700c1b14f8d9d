"""h2's header character check at C speed refuses exactly what h2 refuses (``pqmsg.h2_headers``)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable, Iterator

import h2.config
import h2.connection
import h2.events
import h2.utilities
import httpx
import pytest
import trio
from h2.exceptions import ProtocolError
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pqmsg import h2_headers
from tests.support.server import RunningServer

Header = tuple[bytes, bytes]
Check = Callable[[Iterable[Header], object], Iterator[Header]]
UPSTREAM: Check = h2_headers.upstream()  # type: ignore[assignment]
PATCHED: Check = h2_headers.reject_illegal_characters
FLAGS = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)

# Bytes around every boundary the check cares about, and ordinary ones.
EDGES = [0x00, 0x09, 0x0A, 0x0D, 0x1F, 0x20, 0x21, 0x3A, 0x40, 0x41, 0x5A, 0x5B, 0x60, 0x61,
         0x7A, 0x7E, 0x7F, 0x80, 0xFF]
interesting_bytes = st.binary(max_size=12) | st.lists(
    st.sampled_from(EDGES) | st.integers(0x61, 0x7A), max_size=12
).map(bytes)
headers_strategy = st.lists(st.tuples(interesting_bytes, interesting_bytes), max_size=6)


def outcome(check: Check, headers: list[Header]) -> tuple[str, object]:
    """What a check yields before it stops, and how it stops."""
    seen: list[Header] = []
    try:
        for header in check(iter(headers), FLAGS):
            seen.append(header)
    except ProtocolError as exc:
        return "refused", (seen, str(exc))
    return "passed", seen


@settings(max_examples=2000)
@given(headers_strategy)
@example([(b":path", b"/v1/messages"), (b"pqmsg-signature", b"A" * 4412)])
@example([(b"x-ok", b"v"), (b"Upper", b"v")])
@example([(b"x", b"a\x00b")])
@example([(b"x", b"a\rb\n")])
@example([(b"x", b" padded")])
@example([(b"x", b"tab\t")])
@example([(b"x:y", b"v")])
@example([(b"", b"")])
@example([(b"x", b"\x7f\x80 inside is fine")])
def test_the_fast_check_refuses_exactly_what_h2_refuses(headers: list[Header]) -> None:
    assert outcome(PATCHED, headers) == outcome(UPSTREAM, headers)


def test_a_signed_request_passes_and_each_rule_still_holds() -> None:
    signature = (b"pqmsg-signature", b"abc_-" * 900)
    assert outcome(PATCHED, [signature]) == ("passed", [signature])
    for bad, message in [
        ((b"Pqmsg-Nonce", b"v"), "Received uppercase header name"),
        ((b"x y", b"v"), "Illegal character ' ' in header name"),
        ((b"x\xff", b"v"), "Illegal character"),
        ((b"x:y", b"v"), "Illegal character ':' in header name"),
        ((b"x", b"v\r\nset-cookie: a=b"), "Illegal character '\r' in header value"),
        ((b"x", b"\x00"), "Illegal character '\x00' in header value"),
        ((b"x", b"v "), "surrounded by whitespace"),
    ]:
        kind, (seen, error) = outcome(PATCHED, [signature, bad])  # type: ignore[misc]
        assert (kind, seen) == ("refused", [signature])
        assert message in error


def test_apply_is_idempotent_and_revert_restores_h2() -> None:
    try:
        assert h2_headers.apply() is True
        assert h2_headers.apply() is True
        assert h2.utilities._reject_illegal_characters is PATCHED
    finally:
        h2_headers.revert()
    assert h2.utilities._reject_illegal_characters is UPSTREAM
    h2_headers.apply()  # as the server left it


def test_another_h2_release_keeps_its_own_check(monkeypatch: pytest.MonkeyPatch) -> None:
    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "4.5.0" if name == "h2" else real_version(name)
    )
    h2_headers.revert()
    try:
        assert h2_headers.apply() is False
        assert h2.utilities._reject_illegal_characters is UPSTREAM
    finally:
        monkeypatch.undo()
        h2_headers.apply()


async def raw_request(server: RunningServer, headers: list[Header]) -> h2.events.Event:
    """Send one GET with exactly these extra headers (unchecked on our side); the server's first answer."""
    config = h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = h2.connection.H2Connection(config)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        conn.initiate_connection()
        request = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"localhost"),
                   (b":path", b"/health/live"), *headers]
        conn.send_headers(1, request, end_stream=True)
        await stream.send_all(conn.data_to_send())
        while True:
            data = await stream.receive_some(65_536)
            if not data:
                raise EOFError("the server closed the connection without an answer")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.StreamReset
                              | h2.events.ConnectionTerminated):
                    return event
            await stream.send_all(conn.data_to_send())


async def test_the_server_refuses_bad_header_bytes_and_serves_on(server: RunningServer) -> None:
    assert h2.utilities._reject_illegal_characters is PATCHED
    with trio.fail_after(10):
        good = await raw_request(server, [(b"pqmsg-signature", b"A" * 4412)])
        refused = [
            await raw_request(server, [(b"x-injected", b"a\r\nx-evil: 1")]),
            await raw_request(server, [(b"X-Upper", b"v")]),
        ]
        async with httpx.AsyncClient(http2=True) as client:
            after = await client.get(server.url + "/health/live")

    assert isinstance(good, h2.events.ResponseReceived)
    assert dict(good.headers)[b":status"] == b"200"
    for event in refused:
        assert isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated), event
        assert event.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert after.status_code == 200

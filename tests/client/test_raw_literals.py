"""The SDK sends HTTP/2 header fields as raw HPACK literals, read off the wire of a real server.

Every request goes through :func:`tests.client.wire.recording_proxy` to a
real Hypercorn server; the test then cuts what the client sent into header
blocks and checks the H bit (RFC 7541 5.2) of every string literal, and
that each ``Pqmsg-Signature`` value is on the wire verbatim. The server
recycles connections with GOAWAY every 4th request here, so the check
covers connections the pool made again.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import h2.config
import h2.connection
import hpack
import httpx
import pytest
import trio
import trustme

import pqmsg.server
from pqmsg.client import Client, open_stream, transport
from pqmsg.client.transport import (
    RawLiteralEncoder,
    RawLiteralTransport,
    raw_literal_encoder,
    use_raw_literals,
)
from pqmsg.settings import Settings
from tests.client.wire import decoded_headers, header_blocks, string_literals
from tests.client.wire import recording_proxy as recording_proxy
from tests.support.server import make_settings, running_server

SIGNATURE_CHARS = 4_412  # base64url of an ML-DSA-65 signature (3,309 bytes)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "_warned", set())


def header_values(sent: bytes, name: bytes) -> list[bytes]:
    return [v for headers in decoded_headers(sent) for k, v in headers if k == name]


def transport_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == transport.__name__]


async def test_every_header_literal_is_raw_on_every_connection(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pqmsg.server, "MAX_REQUESTS_PER_CONNECTION", 3)  # GOAWAY on each 4th request
    with trio.fail_after(60):
        async with running_server(settings) as server, recording_proxy(server.port) as wire:
            async with Client(f"http://127.0.0.1:{wire.port}") as client:
                alice = await client.register()
                bob = await client.register()
                await bob.upload_prekeys(ec=1, pq=1)
                for i in range(6):
                    await alice.send(bob.account, {1: b"m%d" % i})
                messages, _ = await bob.receive()
                assert await bob.ack([m.id for m in messages]) == 6
                async with open_stream(bob, http2=True) as stream:  # its own h2 connection
                    await alice.send(bob.account, {1: b"streamed"})
                    assert (await stream.receive()).ciphertext == b"streamed"
    assert len(messages) == 6
    assert client.retries >= 1, "the server's GOAWAYs should have cost a request or more"
    assert len(wire.connections) >= 4  # the pool reconnected; the stream had its own

    signed = 0
    for sent in wire.connections:
        blocks = header_blocks(bytes(sent))
        assert blocks, "a connection that sent no request"
        literals = [lit for block in blocks for lit in string_literals(block)]
        assert literals and not [lit for lit in literals if lit.huffman]
        signatures = header_values(bytes(sent), b"pqmsg-signature")
        for signature in signatures:
            assert len(signature) == SIGNATURE_CHARS
            assert any(lit.data == signature for lit in literals), "the signature is not on the wire as sent"
        signed += len(signatures)
    assert signed >= 6 + 1 + 1 + 1 + 1 + 1  # upload, sends, receive, ack, the upgrade, the last send
    assert transport_warnings(caplog) == []


async def test_huffman_coding_is_seen_when_used_and_other_clients_keep_it(settings: Settings) -> None:
    """The reader is not blind to Huffman coding; a plain httpx client in the process still uses it."""
    with trio.fail_after(60):
        async with running_server(settings) as server, recording_proxy(server.port) as wire:
            url = f"http://127.0.0.1:{wire.port}"
            async with (
                Client(url) as sdk,
                Client(url, huffman=True) as opted_out,
                httpx.AsyncClient(base_url=url, http1=False, http2=True, headers={"x-who": "plain"}) as plain,
            ):
                alice = await sdk.register()
                await alice.key_status()  # the SDK's pool is in use alongside the others
                bob = await opted_out.register()
                await bob.key_status()
                assert (await plain.get("/health/live")).status_code == 200

    by_kind: dict[str, list[bool]] = {}
    for sent in wire.connections:
        headers = [dict(h) for h in decoded_headers(bytes(sent))]
        kind = "plain" if headers[0].get(b"x-who") == b"plain" else (
            "opted_out" if headers and any(h.get(b"pqmsg-account") == bob.account.encode() for h in headers)
            else "sdk"
        )
        by_kind.setdefault(kind, []).extend(
            lit.huffman for block in header_blocks(bytes(sent)) for lit in string_literals(block)
        )
    assert set(by_kind) == {"sdk", "opted_out", "plain"}
    assert not any(by_kind["sdk"])
    assert all(by_kind["opted_out"]) and all(by_kind["plain"])


async def test_tls_alpn_h2_connections_get_the_encoder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Over TLS httpcore picks HTTP/2 by ALPN; the wire is encrypted, so look at the encoder that wrote it."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    settings = make_settings(tmp_path / "data", http__certfile=certfile, http__keyfile=keyfile)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with trio.fail_after(30):
        async with running_server(settings) as server, Client(server.url, verify=context) as client:
            assert server.url.startswith("https://")
            alice = await client.register()
            await alice.key_status()
            pool = client.http._transport._pool  # type: ignore[attr-defined]
            encoders = [raw_literal_encoder(getattr(c, "_connection", None)) for c in pool.connections]
    assert [e.blocks if e else None for e in encoders] == [2]
    assert transport_warnings(caplog) == []


def test_encoder_round_trips_and_keeps_state_when_swapped() -> None:
    """A swapped-in encoder continues the header table the peer's decoder mirrors."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    decoder = hpack.Decoder()
    headers = [(b":method", b"GET"), (b"pqmsg-account", b"a" * 36), (b"pqmsg-signature", b"s" * SIGNATURE_CHARS)]
    before = connection.encoder.encode(headers[:2])
    assert decoder.decode(before, raw=True) == headers[:2]
    assert use_raw_literals(connection)
    assert isinstance(connection.encoder, RawLiteralEncoder)
    after = connection.encoder.encode(headers)
    assert decoder.decode(after, raw=True) == headers  # the table entries of ``before`` still index right
    assert not [lit for lit in string_literals(after) if lit.huffman]
    assert b"s" * SIGNATURE_CHARS in after
    assert use_raw_literals(connection) and connection.encoder.blocks == 1  # idempotent


def test_an_unexpected_encoder_is_left_alone_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    class OtherEncoder(hpack.Encoder):
        pass

    connection = h2.connection.H2Connection()
    connection.encoder = other = OtherEncoder()
    assert not use_raw_literals(connection)
    assert connection.encoder is other
    assert any("not an hpack.Encoder" in w for w in transport_warnings(caplog))


def test_a_proxy_transport_keeps_the_default_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    proxied = RawLiteralTransport(http2=True, proxy="http://127.0.0.1:9")
    assert type(proxied._pool).__name__ == "AsyncHTTPProxy"
    assert any("not an httpcore AsyncConnectionPool" in w for w in transport_warnings(caplog))


async def test_a_connection_the_hook_missed_is_reported_and_still_works(
    server: object, client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What a changed httpcore would look like: requests still work, with Huffman coding and a warning."""
    monkeypatch.setattr(transport, "_adopt", lambda connection: None)
    with trio.fail_after(30):
        alice = await client.register()
        await alice.key_status()
    records = [r for r in caplog.records if r.name == transport.__name__]
    assert [r.levelno for r in records] == [logging.WARNING]  # once, for two requests
    assert "was not given the raw-literal encoder" in records[0].getMessage()

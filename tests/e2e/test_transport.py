"""HTTP/1.1, cleartext HTTP/2 (prior knowledge and Upgrade) and TLS with ALPN, on real sockets."""

from __future__ import annotations

import ssl
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio
import trustme

from pqmsg.settings import Settings
from tests.support.server import RunningServer, make_settings, running_server


async def test_http11(server: RunningServer) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=server.url) as http:
            response = await http.get("/health/live")
    assert response.http_version == "HTTP/1.1"
    assert response.status_code == 200


async def test_h2c_prior_knowledge(server: RunningServer) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=server.url, http1=False, http2=True) as http:
            response = await http.get("/health/live")
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200


async def test_h2c_upgrade(server: RunningServer) -> None:
    """An HTTP/1.1 request with ``Upgrade: h2c`` is answered over HTTP/2 (RFC 7540 §3.2)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings_header = conn.initiate_upgrade_connection()
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        request = (
            b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: " + settings_header + b"\r\n\r\n"
        )
        await stream.send_all(request)
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        status_line, _, rest = head.partition(b"\r\n\r\n")
        assert status_line.startswith(b"HTTP/1.1 101")
        await stream.send_all(conn.data_to_send())
        events = conn.receive_data(rest)
        got_status = None
        while got_status is None:
            for event in events:
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                    got_status = dict(event.headers)[b":status"]
            if got_status is None:
                events = conn.receive_data(await stream.receive_some(65536))
                await stream.send_all(conn.data_to_send())
        await stream.aclose()
    assert got_status == b"200"


@pytest.fixture
def tls_settings(tmp_path: Path) -> tuple[Settings, ssl.SSLContext]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    settings = make_settings(tmp_path / "data", http__certfile=certfile, http__keyfile=keyfile)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return settings, client_ctx


@pytest.mark.parametrize(("http2", "version"), [(True, "HTTP/2"), (False, "HTTP/1.1")])
async def test_tls_negotiates_by_alpn(
    tls_settings: tuple[Settings, ssl.SSLContext], http2: bool, version: str
) -> None:
    settings, ctx = tls_settings
    with trio.fail_after(15):
        async with running_server(settings) as server:
            assert server.url.startswith("https://")
            async with httpx.AsyncClient(base_url=server.url, verify=ctx, http2=http2) as http:
                response = await http.get("/health/live")
    assert response.http_version == version
    assert response.status_code == 200


async def test_one_http2_connection_serves_well_past_a_thousand_requests(server: RunningServer) -> None:
    """Hypercorn's default would end the connection at 1,000 requests, losing some in flight."""
    statuses: list[int] = []
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=server.url, http1=False, http2=True) as http:

            async def worker() -> None:
                for _ in range(110):
                    statuses.append((await http.get("/health/live")).status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(worker)
    assert statuses == [200] * 1100

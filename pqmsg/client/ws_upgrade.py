"""What both stream transports do to upgrade: connect, send headers, read a refusal."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterable, Mapping

import httpx
import trio

from pqmsg.client.session import ProblemResponse
from pqmsg.client.ws_transport import StreamUnsupported

Socket = trio.SocketStream | trio.SSLStream[trio.SocketStream]


async def connect(url: httpx.URL, ssl_context: ssl.SSLContext | None, *, alpn: str) -> Socket:
    """TCP, and TLS for ``https://``, where ALPN must select ``alpn``.

    A caller's context must offer ``alpn``; mind that ``httpx`` sets its own
    ALPN list on a context it is handed.
    """
    tcp = await trio.open_tcp_stream(url.host, _port(url))
    if url.scheme != "https":
        return tcp
    if ssl_context is None:
        ssl_context = ssl.create_default_context()
        ssl_context.set_alpn_protocols([alpn])
    tls = trio.SSLStream(tcp, ssl_context, server_hostname=url.host, https_compatible=True)
    try:
        await tls.do_handshake()
        selected = tls.selected_alpn_protocol()
        if selected != alpn and not (selected is None and alpn == "http/1.1"):
            raise StreamUnsupported(f"TLS selected {selected or 'no protocol'}, not {alpn}")
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


def authority(url: httpx.URL) -> str:
    """``host:port`` for the ``Host`` header or ``:authority``."""
    return f"{url.host}:{_port(url)}"


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def header_list(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [
        (name.lower().encode("ascii"), value.encode("ascii")) for name, value in headers.items()
    ]


def problem(status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> ProblemResponse:
    """A refused upgrade as the SDK reports any error response."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        document = {"detail": body.decode("utf-8", errors="replace")}
    names = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}
    return ProblemResponse(status, document, names)

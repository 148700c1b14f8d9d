"""Loopback HTTP/2 servers over TLS that can misbehave, for provider fakes.

A fake provider is a Quart-Trio app served by Hypercorn (h2c) behind a
TLS front (a trustme certificate, ALPN ``h2``), so the code under test
speaks HTTP/2 over TLS as it does to the real hosts. The front can also
*drop* the connection a request came on (a TCP reset, no answer), which
Hypercorn alone cannot do.

A test queues :class:`Reply` objects on a :class:`FakeServer` to answer its
next requests differently (provider errors, slow answers, dropped
connections); every request is recorded as a :class:`Received`. JWTs are
verified here with ``cryptography`` directly, not with ``pqmsg.push.jwt``,
so a mistake there cannot hide itself.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Final

import attrs
import hypercorn.trio
import quart
import trio
import trustme
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypercorn.config import Config
from quart_trio import QuartTrio

# Virtual seconds: idle connections must survive the tests' long jumps.
IDLE_FOREVER_S: Final = 1e9

log = logging.getLogger(__name__)


@attrs.frozen
class Reply:
    """How to answer one request: a JSON body, or ``drop`` the connection."""

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = attrs.field(factory=dict)
    delay_s: float = 0.0
    drop: bool = False


DROP: Final = Reply(drop=True)


@attrs.frozen
class Received:
    """One request as the fake saw it."""

    method: str
    path: str
    raw_path: bytes
    http_version: str
    headers: Mapping[str, str]
    body: bytes
    jwt_header: Mapping[str, Any] | None = None
    jwt_claims: Mapping[str, Any] | None = None

    def json(self) -> Any:
        return json.loads(self.body)


class JwtRejected(Exception):
    pass


def _b64d(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verify_jwt(
    token: str, alg: str, key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of a compact JWS, after checking its signature."""
    try:
        head, body, signature = token.split(".")
        header, claims = json.loads(_b64d(head)), json.loads(_b64d(body))
        raw = _b64d(signature)
        signed = f"{head}.{body}".encode("ascii")
        if header.get("alg") != alg:
            raise JwtRejected(f"alg {header.get('alg')!r}")
        if alg == "RS256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(raw, signed, padding.PKCS1v15(), hashes.SHA256())
        elif alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey):
            if len(raw) != 64:  # RFC 7518 3.4: r || s, 32 bytes each
                raise JwtRejected("ES256 signature is not 64 bytes")
            der = encode_dss_signature(
                int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
            )
            key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
        else:
            raise JwtRejected("key and alg do not match")
    except (ValueError, InvalidSignature) as exc:
        raise JwtRejected(repr(exc)) from exc
    return header, claims


# -- the TLS front ----------------------------------------------------------


class TlsFront:
    """Terminates TLS (ALPN h2) and relays bytes to the h2c app server."""

    def __init__(self, ssl_context: ssl.SSLContext, backend_port: int) -> None:
        self._ssl_context = ssl_context
        self._backend_port = backend_port
        # The app server sees our outgoing port as its client port.
        self._links: dict[int, trio.CancelScope] = {}
        self.connections = 0

    def drop(self, app_client_port: int) -> None:
        """Reset the connection that a request seen by the app came on."""
        self._links[app_client_port].cancel()

    async def handle(self, tcp: trio.SocketStream) -> None:
        self.connections += 1
        tls = trio.SSLStream(tcp, self._ssl_context, server_side=True, https_compatible=True)
        async with tcp, await trio.open_tcp_stream("127.0.0.1", self._backend_port) as backend:
            port = backend.socket.getsockname()[1]
            with trio.CancelScope() as link:
                self._links[port] = link
                try:
                    await tls.do_handshake()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, tls, backend, nursery.cancel_scope)
                        nursery.start_soon(self._pump, backend, tls, nursery.cancel_scope)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                finally:
                    del self._links[port]
            if link.cancelled_caught:  # dropped: a reset, not a goodbye
                tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    @staticmethod
    async def _pump(
        source: trio.abc.ReceiveStream, sink: trio.abc.SendStream, link: trio.CancelScope
    ) -> None:
        try:
            async for chunk in source:
                await sink.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        link.cancel()


@attrs.frozen
class Served:
    url: str
    front: TlsFront


@asynccontextmanager
async def serve(app: QuartTrio, ca: trustme.CA) -> AsyncIterator[Served]:
    """Serve ``app`` over HTTP/2 and TLS on a loopback port until the block ends."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.keep_alive_timeout = IDLE_FOREVER_S
    config.errorlog = log
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    context.set_alpn_protocols(["h2"])
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn.trio.serve, app, config))
        front = TlsFront(context, int(binds[0].rsplit(":", 1)[1]))
        listeners = await nursery.start(partial(trio.serve_tcp, front.handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield Served(f"https://127.0.0.1:{port}", front)
        nursery.cancel_scope.cancel()


def client_ssl_context(ca: trustme.CA) -> ssl.SSLContext:
    """What a client needs to trust the fakes."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def respond(reply: Reply, **extra_headers: str) -> quart.Response:
    """The reply as a response; ``retry_after`` style names become ``retry-after``."""
    body = b"" if reply.body is None else json.dumps(reply.body).encode()
    headers = {k.replace("_", "-"): v for k, v in {**reply.headers, **extra_headers}.items()}
    if body:
        headers["content-type"] = "application/json; charset=UTF-8"
    return quart.Response(body, reply.status, headers)


async def answer(fake: FakeServer, reply: Reply, **headers: str) -> quart.Response:
    """Answer the current request as ``reply`` says: maybe late, maybe never."""
    if reply.delay_s:
        await trio.sleep(reply.delay_s)
    if reply.drop:
        client = quart.request.scope["client"]
        assert fake.front is not None and client is not None
        fake.front.drop(client[1])
        await trio.sleep_forever()  # cancelled when the connection goes
    return respond(reply, **headers)


async def record(**jwt: Any) -> Received:
    """The current request, body read in full."""
    request = quart.request
    return Received(
        method=request.method,
        path=request.path,
        raw_path=request.scope["raw_path"],
        http_version=request.http_version,
        headers={k.lower(): v for k, v in request.headers.items()},
        body=await request.get_data(as_text=False),
        **jwt,
    )


@attrs.define
class FakeServer:
    """What every fake has: its URL, its front, scripted replies, records."""

    url: str = ""
    front: TlsFront | None = None
    # Answers for the next requests, in order; then the documented default.
    replies: collections.deque[Reply] = attrs.field(factory=collections.deque)
    unregistered: set[str] = attrs.field(factory=set)
    sent: list[Received] = attrs.field(factory=list)
    # Every request's undecoded path, also those no route matched.
    raw_paths: list[bytes] = attrs.field(factory=list)

    def queue(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def next_reply(self) -> Reply | None:
        """The next scripted reply, if the test queued one."""
        return self.replies.popleft() if self.replies else None


def make_app(fake: FakeServer) -> QuartTrio:
    app = QuartTrio(__name__)

    @app.before_request
    async def note_path() -> None:
        fake.raw_paths.append(quart.request.scope["raw_path"])

    return app

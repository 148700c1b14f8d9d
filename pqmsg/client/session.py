"""The pqmsg client SDK: an httpx-based async client that signs every request.

::

    async with Client("http://127.0.0.1:8080") as client:
        alice = await client.register(name="phone")
        await alice.upload_prekeys(ec=10, pq=10)
        bob = await client.register()
        bundle = await alice.fetch_bundle(bob.account)
        await alice.send(bob.account, {1: b"ciphertext"})
        messages, _more = await bob.receive(wait=5)
        await bob.ack([m.id for m in messages])

HTTP/2 is the default (cleartext prior knowledge for ``http://`` URLs, ALPN
for ``https://``), with header fields sent as raw HPACK literals rather than
Huffman-coded ones (:mod:`pqmsg.client.transport` says why and how). Errors
come back as :class:`ProblemResponse` carrying the server's problem+json.

Retries
-------
A request can fail in transit after the server acted on it: a server or
proxy that ends an HTTP/2 connection (GOAWAY) with requests in flight, or a
connection that breaks, leaves httpx with ``httpx.RemoteProtocolError``
(``ConnectionTerminated``, "Server disconnected"), ``httpx.ReadError`` or
``httpx.WriteError``, and no way to tell whether the server processed it
(a request on a stream above the GOAWAY's last stream id was not, and
httpcore already resends it on a new connection by itself). The SDK
then retries a call **once, signed afresh** (a new timestamp and nonce: the
server may have recorded the first nonce, and would answer the same
signature with ``401 replay``), when the call is idempotent by the protocol:

========================================  =====  ======================================
call                                      retry  why
========================================  =====  ======================================
:meth:`Device.send`                       yes    the same ``(sender, id)`` within 24 h
                                                 is stored once (PROTOCOL.md 5,
                                                 Messages); the id is chosen before the
                                                 first attempt and kept
:meth:`Device.receive`                    yes    reads; messages stay queued until acked
:meth:`Device.ack`                        yes    acking twice removes nothing more
                                                 (``acked`` then counts only what the
                                                 retry removed: it may be 0)
:meth:`Device.list_devices`,              yes    reads
:meth:`Device.key_status`
:meth:`Device.set_push`,                  yes    set or remove the same state
:meth:`Device.delete_push`
:meth:`Device.fetch_bundle`               no     hands out one-time prekeys at most once:
                                                 a retry would burn another
:meth:`Device.upload_keys`,               no     one-time keys are appended; a retry
:meth:`Device.upload_prekeys`                    after a processed attempt is a ``409``
:meth:`Device.provisioning_token`         no     mints a new single-use token
:meth:`Device.revoke`,                    no     a retry after a processed attempt gets
:meth:`Device.delete_account`                    an error (``404``, ``401``) for a
                                                 success
:meth:`Client.register`,                  no     create an account / consume a token
:meth:`Client.link`
========================================  =====  ======================================

:meth:`Device.call` retries only when its caller passes ``idempotent=True``.
Connect errors (nothing was sent), timeouts and error responses
(:class:`ProblemResponse`, including ``429``/``503`` with ``Retry-After``)
are never retried by the SDK; a second failure is raised as it is.
``Client.retries`` counts the retries made.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlencode

import attrs
import httpx

from pqmsg.client.keys import (
    Identity,
    PrekeyPair,
    ml_kem_keypair,
    registration_body,
    x25519_keypair,
)
from pqmsg.client.transport import RawLiteralTransport
from pqmsg.clock import WallClock
from pqmsg.protocol import crypto
from pqmsg.protocol.b64 import b64decode, b64encode
from pqmsg.protocol.canonical import SignedRequest, canonical_string

log = logging.getLogger(__name__)

#: Failures in transit after which the server may or may not have processed
#: the request (see "Retries" above).
RETRYABLE_ERRORS: Final = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class ProblemResponse(Exception):
    """The server answered with an error (RFC 9457 problem+json)."""

    def __init__(self, status: int, problem: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        self.status = status
        self.problem = dict(problem)
        self.headers = dict(headers)
        self.reason = str(problem.get("reason", ""))
        super().__init__(f"{status} {self.reason}: {problem.get('detail', '')}")


@attrs.frozen
class ReceivedMessage:
    id: str
    sender_account: str
    sender_device: int
    ciphertext: bytes
    pq_epoch: int | None
    server_ts: float

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ReceivedMessage:
        return cls(
            id=obj["id"],
            sender_account=obj["sender"]["account"],
            sender_device=obj["sender"]["device"],
            ciphertext=b64decode(obj["ciphertext"]),
            pq_epoch=obj.get("pq_epoch"),
            server_ts=obj["server_ts"],
        )


def encode_body(body: Any) -> bytes:
    return b"" if body is None else json.dumps(body, separators=(",", ":")).encode()


def sign_headers(
    method: str, path: str, query: str, body: bytes, *, account: str, device: int,
    device_key: crypto.SigningKeyPair, now: float,
) -> dict[str, str]:
    """The five §3 headers for one request."""
    nonce = secrets.token_urlsafe(18)
    req = SignedRequest(method.upper(), path, query, account, device, int(now), nonce, body)
    signature = crypto.sign(device_key.secret_key, canonical_string(req))
    return {
        "Pqmsg-Account": account,
        "Pqmsg-Device": str(device),
        "Pqmsg-Timestamp": str(int(now)),
        "Pqmsg-Nonce": nonce,
        "Pqmsg-Signature": b64encode(signature),
    }


class Client:
    """Unauthenticated entry points and the shared HTTP connection pool.

    The pool's HTTP/2 connections send header fields as raw HPACK literals
    (:class:`~pqmsg.client.transport.RawLiteralTransport`); ``huffman=True``
    keeps hpack's default, Huffman coding. Neither applies to an ``http``
    client passed in, which is used as it is.
    """

    def __init__(
        self,
        base_url: str,
        *,
        http2: bool = True,
        verify: Any = True,
        http: httpx.AsyncClient | None = None,
        clock: WallClock = time.time,
        timeout_s: float = 60.0,
        huffman: bool = False,
    ) -> None:
        if http is None:
            cleartext = base_url.startswith("http://")
            http1 = not (http2 and cleartext)  # h2c needs prior knowledge: HTTP/2 only
            transport = None if huffman else RawLiteralTransport(http1=http1, http2=http2, verify=verify)
            http = httpx.AsyncClient(
                base_url=base_url, http1=http1, http2=http2, verify=verify, timeout=timeout_s,
                transport=transport,  # http1, http2 and verify still serve httpx's proxy transports
            )
        self.http = http
        self.clock = clock
        #: Requests retried after a failure in transit (see the module's "Retries").
        self.retries = 0

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def call(
        self, method: str, path: str, *, body: Any = None, params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One request; a 4xx/5xx raises :class:`ProblemResponse`."""
        query = urlencode(params or {})
        target = f"{path}?{query}" if query else path
        all_headers = dict(headers or {})
        content = encode_body(body)
        if body is not None:
            all_headers["Content-Type"] = "application/json"
        response = await self.http.request(method, target, content=content, headers=all_headers)
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"detail": response.text}
            raise ProblemResponse(response.status_code, problem, response.headers)
        return response

    async def register(self, *, identity: Identity | None = None, name: str | None = None) -> Device:
        """Create an account; returns its primary device (1), signed in."""
        identity = identity or Identity()
        device_key = crypto.generate_signing_key()
        response = await self.call("POST", "/v1/accounts", body=registration_body(identity, device_key, name))
        data = response.json()
        return Device(self, data["account"], data["device"], device_key, identity)

    async def link(self, token: str, identity: Identity, *, name: str | None = None) -> Device:
        """Link a new device with a provisioning token (the identity certifies its key)."""
        device_key = crypto.generate_signing_key()
        body = {"token": token, **registration_body(identity, device_key, name)}
        body.pop("identity_key")
        response = await self.call("POST", "/v1/devices", body=body)
        data = response.json()
        return Device(self, data["account"], data["device"], device_key, identity)


class Device:
    """One signed-in device: every call is signed by its device key."""

    def __init__(
        self, client: Client, account: str, device: int, device_key: crypto.SigningKeyPair,
        identity: Identity | None,
    ) -> None:
        self.client = client
        self.account = account
        self.device = device
        self.device_key = device_key
        self.identity = identity
        self.prekeys: dict[int, PrekeyPair] = {}

    async def call(
        self, method: str, path: str, *, body: Any = None, params: Mapping[str, Any] | None = None,
        idempotent: bool = False,
    ) -> httpx.Response:
        """One signed request; a 4xx/5xx raises :class:`ProblemResponse`.

        ``idempotent=True`` says that doing the request twice has the effect
        of doing it once: then a failure in transit (:data:`RETRYABLE_ERRORS`)
        is retried once, signed afresh. See the module's "Retries".
        """
        query = urlencode(params or {})
        content = encode_body(body)
        try:
            return await self.client.call(
                method, path, body=body, params=params, headers=self._sign(method, path, query, content)
            )
        except RETRYABLE_ERRORS as exc:
            if not idempotent:
                raise
            self.client.retries += 1
            log.info("%s %s failed in transit (%s: %s); retrying once, signed afresh",
                     method, path, type(exc).__name__, exc)
        return await self.client.call(
            method, path, body=body, params=params, headers=self._sign(method, path, query, content)
        )

    def _sign(self, method: str, path: str, query: str, content: bytes) -> dict[str, str]:
        """Fresh §3 headers: the clock's timestamp now and a new nonce."""
        return sign_headers(
            method, path, query, content, account=self.account, device=self.device,
            device_key=self.device_key, now=self.client.clock(),
        )

    # -- devices ---------------------------------------------------------------

    async def provisioning_token(self) -> str:
        return str((await self.call("POST", "/v1/devices/provisioning")).json()["token"])

    async def link_new_device(self, *, name: str | None = None) -> Device:
        """Provision and link another device of this account (needs the identity)."""
        assert self.identity is not None, "linking needs the account's identity key"
        return await self.client.link(await self.provisioning_token(), self.identity, name=name)

    async def list_devices(self) -> list[dict[str, Any]]:
        return list((await self.call("GET", "/v1/devices", idempotent=True)).json()["devices"])

    async def revoke(self, device: int) -> None:
        await self.call("DELETE", f"/v1/devices/{device}")

    async def delete_account(self) -> None:
        await self.call("DELETE", "/v1/accounts/self")

    async def set_push(self, provider: str, token: str) -> None:
        body = {"provider": provider, "token": token}
        await self.call("PUT", "/v1/devices/self/push", body=body, idempotent=True)

    async def delete_push(self) -> None:
        await self.call("DELETE", "/v1/devices/self/push", idempotent=True)

    # -- keys ------------------------------------------------------------------

    def prekey_body(self, *, ec: int, pq: int, signed: bool = True) -> dict[str, Any]:
        """A ``PUT /v1/keys`` body with fresh keys (secrets kept in ``self.prekeys``)."""
        identity = self.identity
        assert identity is not None, "uploading prekeys needs the account's identity key"
        body: dict[str, Any] = {}
        if signed:
            body["signed_prekey"] = identity.signed_entry("spk", self._keep(x25519_keypair(identity.next_key_id())))
            body["pq_last_resort"] = identity.signed_entry("pqspk", self._keep(ml_kem_keypair(identity.next_key_id())))
        if ec:
            pairs = [self._keep(x25519_keypair(identity.next_key_id())) for _ in range(ec)]
            body["one_time_prekeys"] = [{"id": p.key_id, "public_key": b64encode(p.public_key)} for p in pairs]
        if pq:
            pairs = [self._keep(ml_kem_keypair(identity.next_key_id())) for _ in range(pq)]
            body["pq_one_time_prekeys"] = [identity.signed_entry("pqspk", p) for p in pairs]
        return body

    def _keep(self, pair: PrekeyPair) -> PrekeyPair:
        self.prekeys[pair.key_id] = pair
        return pair

    async def upload_keys(self, body: Mapping[str, Any]) -> dict[str, int]:
        """``PUT /v1/keys``; never retried (a repeated one-time key id is a ``409``)."""
        return dict((await self.call("PUT", "/v1/keys", body=body)).json())

    async def upload_prekeys(self, *, ec: int = 10, pq: int = 10, signed: bool = True) -> dict[str, int]:
        return await self.upload_keys(self.prekey_body(ec=ec, pq=pq, signed=signed))

    async def key_status(self) -> dict[str, Any]:
        return dict((await self.call("GET", "/v1/keys/status", idempotent=True)).json())

    async def fetch_bundle(self, account: str, device: int | str = "*") -> dict[str, Any]:
        """The account's (or one device's) prekey bundle.

        Never retried: each fetch hands out one-time prekeys at most once, so
        a retry after a processed attempt would burn another one.
        """
        return dict((await self.call("GET", f"/v1/keys/{account}/{device}")).json())

    # -- messages --------------------------------------------------------------

    async def send(
        self, recipient: str, ciphertexts: Mapping[int, bytes], *, message_id: str | None = None,
        pq_epochs: Mapping[int, int] | None = None,
    ) -> dict[str, Any]:
        """Send one copy per recipient device; returns ``{"id", "stored"}``.

        Retried once after a failure in transit, with the same ``id`` (drawn
        once, here, when not given): the server stores a repeated
        ``(sender, id)`` once.
        """
        copies: list[dict[str, Any]] = []
        for device, ciphertext in sorted(ciphertexts.items()):
            copy: dict[str, Any] = {"device": device, "ciphertext": b64encode(ciphertext)}
            if pq_epochs and device in pq_epochs:
                copy["pq_epoch"] = pq_epochs[device]
            copies.append(copy)
        body = {"id": message_id or str(uuid.uuid4()), "messages": copies}
        response = await self.call("PUT", f"/v1/messages/{recipient}", body=body, idempotent=True)
        return dict(response.json())

    async def receive(self, *, limit: int = 100, wait: int = 0) -> tuple[list[ReceivedMessage], bool]:
        """The oldest unacknowledged messages (long poll with ``wait``); retried once in transit."""
        params: dict[str, int] = {"limit": limit}
        if wait:
            params["wait"] = wait
        data = (await self.call("GET", "/v1/messages", params=params, idempotent=True)).json()
        return [ReceivedMessage.from_json(m) for m in data["messages"]], bool(data["more"])

    async def ack(self, ids: Sequence[str]) -> int:
        """Remove delivered messages; retried once in transit.

        Returns how many this request removed: after a retry whose first
        attempt was processed, that can be fewer than were acked (even 0).
        """
        response = await self.call("POST", "/v1/messages/ack", body={"ids": list(ids)}, idempotent=True)
        return int(response.json()["acked"])

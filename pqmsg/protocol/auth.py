"""Request authentication (PROTOCOL.md §3): parse, then check in contract order.

The order is part of the contract: ``malformed``, ``skew``,
``unknown_device``, ``revoked``, ``signature``, ``replay``. The nonce is
recorded only after the signature verified, so a forged request cannot burn
another device's nonce.

:meth:`Authenticator.verify` stops before the last check and returns an
:class:`Unadmitted` request: a route that validates its input first and
then records the nonce together with its rate-limit token (one round trip
to Redis instead of two, see :mod:`pqmsg.nurseries.admission`) uses it,
and must admit the request before it acts on it. Given a
:class:`~pqmsg.protocol.keycache.DeviceKeyCache`, it may verify against a
remembered key; the request then says so (``from_cache``), and its route
must have the storage confirm the device (see :mod:`pqmsg.protocol.keycache`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping

import attrs

from pqmsg.clock import WallClock
from pqmsg.errors import AuthError, device_reject
from pqmsg.protocol import crypto
from pqmsg.protocol.b64 import Base64Error, b64decode
from pqmsg.protocol.canonical import SignedRequest, canonical_string
from pqmsg.protocol.keycache import DeviceKeyCache
from pqmsg.storage.base import DeviceAuth

ACCOUNT_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DEVICE_RE = re.compile(r"[1-9][0-9]{0,9}")
TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
MAX_DEVICE_ID = 2**31 - 1

HEADER_ACCOUNT = "pqmsg-account"
HEADER_DEVICE = "pqmsg-device"
HEADER_TIMESTAMP = "pqmsg-timestamp"
HEADER_NONCE = "pqmsg-nonce"
HEADER_SIGNATURE = "pqmsg-signature"
AUTH_HEADERS = (HEADER_ACCOUNT, HEADER_DEVICE, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)

DeviceLookup = Callable[[str, int], Awaitable[DeviceAuth | None]]
NonceRecorder = Callable[[str, int, str], Awaitable[bool]]
SignatureCheck = Callable[[bytes, bytes, bytes], Awaitable[bool]]


@attrs.frozen
class Principal:
    """The device an authenticated request comes from.

    ``device_key`` and ``from_cache`` as for :class:`Unadmitted` (the key is
    empty where the request was not verified through :meth:`Authenticator.verify`).
    """

    account: str
    device: int
    last_seen_at: float | None
    device_key: bytes = b""
    from_cache: bool = False


@attrs.frozen
class Unadmitted:
    """A request whose checks 1-5 passed; its nonce is not recorded yet.

    ``device_key`` is the key its signature verified with; ``from_cache``
    says that key was remembered, not read from the database for this
    request (checks 3 and 4 are then still to be confirmed).
    """

    account: str
    device: int
    nonce: str
    last_seen_at: float | None
    device_key: bytes
    from_cache: bool = False

    def admitted(self) -> Principal:
        """The principal, once the nonce was recorded as fresh."""
        return Principal(
            self.account, self.device, self.last_seen_at, self.device_key, self.from_cache
        )


@attrs.frozen
class ParsedAuth:
    request: SignedRequest
    signature: bytes


def parse_device_id(text: str) -> int:
    """A device id in decimal; ValueError unless 1..2**31-1 without leading zeros."""
    if not DEVICE_RE.fullmatch(text) or int(text) > MAX_DEVICE_ID:
        raise ValueError(f"not a device id: {text[:20]!r}")
    return int(text)


def parse_auth(
    method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
) -> ParsedAuth:
    """Parse the five headers; :class:`AuthError` ``malformed`` if any is off."""
    values = {name: headers.get(name) for name in AUTH_HEADERS}
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise AuthError(f"missing header {_title(missing[0])}", reason="malformed")
    account, device, timestamp, nonce, signature = (str(values[n]) for n in AUTH_HEADERS)
    if not ACCOUNT_RE.fullmatch(account):
        raise AuthError("Pqmsg-Account must be a lowercase hyphenated UUID", reason="malformed")
    try:
        device_id = parse_device_id(device)
    except ValueError:
        raise AuthError("Pqmsg-Device must be a positive decimal integer", reason="malformed") from None
    if not TIMESTAMP_RE.fullmatch(timestamp):
        raise AuthError("Pqmsg-Timestamp must be Unix seconds in decimal", reason="malformed")
    if not NONCE_RE.fullmatch(nonce):
        raise AuthError("Pqmsg-Nonce must be 16 to 64 base64url characters", reason="malformed")
    try:
        sig = b64decode(signature, length=crypto.SIGNATURE_BYTES)
    except Base64Error as exc:
        raise AuthError(f"Pqmsg-Signature {exc}", reason="malformed") from None
    signed = SignedRequest(method, path, query, account, device_id, int(timestamp), nonce, body)
    return ParsedAuth(request=signed, signature=sig)


def replayed() -> AuthError:
    """The sixth check's reject: the nonce was already accepted within the window."""
    return AuthError("this nonce was already used", reason="replay")


def _title(header: str) -> str:
    return "-".join(part.capitalize() for part in header.split("-"))


@attrs.frozen
class Authenticator:
    """Checks a parsed request against the device registry and the replay cache.

    With a ``cache``, :meth:`verify` tries a remembered key first (see
    :mod:`pqmsg.protocol.keycache`); :meth:`authenticate` never uses it.
    """

    lookup_device: DeviceLookup
    record_nonce: NonceRecorder
    clock: WallClock
    skew_window_s: int
    cache: DeviceKeyCache | None = None
    #: Where signatures are checked (``pqmsg.nurseries.verifier``); None: here.
    check_signature: SignatureCheck | None = None

    async def authenticate(self, parsed: ParsedAuth) -> Principal:
        """All six checks; the nonce is recorded."""
        pending = await self._verify(parsed, None)
        if not await self.record_nonce(pending.account, pending.device, pending.nonce):
            raise replayed()
        return pending.admitted()

    async def verify(self, parsed: ParsedAuth) -> Unadmitted:
        """Checks 1-5 (``replay`` is the caller's, with the nonce returned)."""
        return await self._verify(parsed, self.cache)

    async def _verifies(self, key: bytes, message: bytes, signature: bytes) -> bool:
        if self.check_signature is None:
            return crypto.verifies(key, message, signature)
        return await self.check_signature(key, message, signature)

    async def _verify(self, parsed: ParsedAuth, cache: DeviceKeyCache | None) -> Unadmitted:
        req = parsed.request
        if abs(self.clock() - req.timestamp) > self.skew_window_s:
            raise AuthError("Pqmsg-Timestamp is outside the accepted clock skew", reason="skew")
        message = canonical_string(req)
        remembered = cache.get(req.account, req.device) if cache is not None else None
        if remembered is not None and await self._verifies(
            remembered.device_key, message, parsed.signature
        ):
            return Unadmitted(
                req.account, req.device, req.nonce, remembered.last_seen_at,
                remembered.device_key, from_cache=True,
            )
        found = await self.lookup_device(req.account, req.device)
        if found is None:
            raise device_reject("unknown_device")
        if found.revoked:
            raise device_reject("revoked")
        checked = remembered is not None and remembered.device_key == found.device_key
        if checked or not await self._verifies(found.device_key, message, parsed.signature):
            raise device_reject("signature")
        if cache is not None:
            cache.put(req.account, req.device, found.device_key, found.last_seen_at)
        return Unadmitted(req.account, req.device, req.nonce, found.last_seen_at, found.device_key)

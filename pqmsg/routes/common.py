"""What every handler shares: authentication, body parsing, responses."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, NoReturn, TypeVar

import trio
from quart import Response, request

from pqmsg.audit.events import AUTH_REJECTED, AUTH_REPLAY, RATE_LIMIT_REJECTED
from pqmsg.errors import AuthError, BadRequest, RateLimited
from pqmsg.http.edge import REQUEST_ID_KEY
from pqmsg.protocol import crypto
from pqmsg.protocol.auth import (
    Authenticator,
    ParsedAuth,
    Principal,
    Unadmitted,
    parse_auth,
    replayed,
)
from pqmsg.protocol.keycache import DeviceKeyCache
from pqmsg.protocol.validate import Obj, parse_json_object
from pqmsg.services import Services
from pqmsg.storage.base import device_refusal

T = TypeVar("T")

# Verify at most this many signatures between checkpoints, so one request
# never holds the event loop for more than a couple of milliseconds.
VERIFY_BATCH = 8


def request_id() -> str:
    return str(request.scope.get(REQUEST_ID_KEY, "-"))


def client_ip() -> str:
    client = request.scope.get("client")
    return str(client[0]) if client else "unknown"


def rate_key_ip() -> str:
    """The client address as a rate-limit key; IPv6 by /64, as one host gets one."""
    ip = client_ip()
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6:
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status=status, content_type="application/json")


def no_content() -> Response:
    return Response("", status=204)


async def read_body() -> bytes:
    return await request.get_data(cache=True, as_text=False, parse_form_data=False)


async def json_body(body: bytes | None = None) -> Obj:
    if body is None:
        body = await read_body()
    return parse_json_object(body, request.headers.get("content-type"))


async def authenticate(svc: Services, *, remembered: bool = False) -> tuple[Principal, bytes]:
    """Authenticate the current request (§3); returns the device and the raw body.

    ``remembered`` as for :func:`verify_request`: the nonce is recorded
    here, and a replay reads the device before it is refused.
    """
    body = await read_body()
    if not remembered:
        principal = await authenticate_scope(
            svc, request.scope, request.method, request.path, request.headers.items(), body
        )
        return principal, body
    pending, body = await verify_request(svc, remembered=True, body=body)
    fresh = await svc.replay.record(pending.account, pending.device, pending.nonce)
    return await _admitted(svc, pending, fresh), body


async def verify_request(
    svc: Services, *, remembered: bool = False, body: bytes | None = None
) -> tuple[Unadmitted, bytes]:
    """Checks 1-5 of §3 for the current request; the nonce waits for :func:`admit`.

    For routes that validate their input before they record the nonce and
    take their rate-limit token in one step. Such a route must :func:`admit`
    the request before it acts on it.

    ``remembered``: the signature may verify against a key remembered from
    an earlier request (:mod:`pqmsg.protocol.keycache`). Only for a route
    whose storage calls re-check the device (``sender_key``,
    ``device_key``), pass every storage refusal of the device to
    :func:`device_refused`, and run its own refusals through
    :func:`confirm_device`.
    """
    if body is None:
        body = await read_body()
    pending = await _checked(
        svc, request.scope, request.method, request.path, request.headers.items(), body,
        Authenticator.verify, cache=svc.device_keys if remembered else None,
    )
    return pending, body


async def confirm_device(svc: Services, pending: Unadmitted | Principal) -> None:
    """Checks 3-5 against the database, for a request verified with a remembered key.

    A route calls it before it answers with a refusal of its own (bad
    input, replay, rate limit), so a device revoked or removed since it was
    remembered hears that first, as §3's order has it.
    """
    if not pending.from_cache:
        return
    refusal = device_refusal(
        await svc.storage.db.get_device_auth(pending.account, pending.device),
        pending.device_key,
    )
    if refusal is not None:
        await device_refused(svc, pending, refusal)


async def device_refused(svc: Services, pending: Unadmitted | Principal, exc: AuthError) -> NoReturn:
    """The device no longer signs with the key its request verified with: forget it, reject."""
    svc.device_keys.forget(pending.account, pending.device)
    await record_auth_reject(svc, exc, request.scope, pending.account)
    raise exc


async def admit(svc: Services, pending: Unadmitted, limiter: str, key: str) -> Principal:
    """Record the nonce (check 6 of §3) and take a token from ``limiter``, in one step.

    A replay is rejected as :func:`authenticate` rejects it (counted and
    audited); a refused token as :func:`limit` refuses it.
    """
    try:
        fresh = await svc.admission.admit(pending.account, pending.device, pending.nonce, limiter, key)
    except RateLimited:
        await confirm_device(svc, pending)
        await _audit_rate_limited(svc, limiter, pending.account)
        raise
    return await _admitted(svc, pending, fresh)


async def _admitted(svc: Services, pending: Unadmitted, fresh: bool) -> Principal:
    """The principal once its nonce was recorded; a replay (not ``fresh``) is refused."""
    if not fresh:
        await confirm_device(svc, pending)
        exc = replayed()
        await record_auth_reject(svc, exc, request.scope, pending.account)
        raise exc
    principal = pending.admitted()
    await _touch(svc, principal)
    return principal


async def authenticate_scope(
    svc: Services,
    scope: Mapping[str, Any],
    method: str,
    fallback_path: str,
    header_items: Iterable[tuple[str, str]],
    body: bytes,
) -> Principal:
    """§3 for an HTTP request or a WebSocket upgrade, given its ASGI scope.

    The path and query are signed exactly as sent (``raw_path``,
    ``query_string``). Every reject is counted by reason and audited before
    it propagates; a device seen again is touched at most once per
    ``last_seen_resolution_s``.
    """
    principal = await _checked(
        svc, scope, method, fallback_path, header_items, body, Authenticator.authenticate
    )
    await _touch(svc, principal)
    return principal


async def _checked(
    svc: Services,
    scope: Mapping[str, Any],
    method: str,
    fallback_path: str,
    header_items: Iterable[tuple[str, str]],
    body: bytes,
    check: Callable[[Authenticator, ParsedAuth], Awaitable[T]],
    *,
    cache: DeviceKeyCache | None = None,
) -> T:
    """Parse the request's §3 headers and run ``check`` (all six checks, or 1-5)."""
    try:
        path = (scope.get("raw_path") or fallback_path.encode()).decode("ascii")
        query = scope.get("query_string", b"").decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("the request target must be ASCII", reason="bad_path") from None
    headers = {name.lower(): value for name, value in header_items}
    authenticator = Authenticator(
        lookup_device=svc.storage.db.get_device_auth,
        record_nonce=svc.replay.record,
        clock=svc.clock,
        skew_window_s=svc.settings.auth.skew_window_s,
        cache=cache,
        check_signature=svc.verifier.verifies,
    )
    try:
        return await check(authenticator, parse_auth(method, path, query, headers, body))
    except AuthError as exc:
        account = headers.get("pqmsg-account") if exc.reason != "malformed" else None
        await record_auth_reject(svc, exc, scope, account)
        raise


async def _touch(svc: Services, principal: Principal) -> None:
    """Note that the device was seen, at most once per ``last_seen_resolution_s``."""
    now = svc.clock()
    last = principal.last_seen_at
    if last is None or now - last >= svc.settings.auth.last_seen_resolution_s:
        await svc.storage.db.touch_device(principal.account, principal.device, now=now)
        svc.device_keys.seen(principal.account, principal.device, now)


async def record_auth_reject(
    svc: Services, exc: AuthError, scope: Mapping[str, Any], account: str | None
) -> None:
    """Count an authentication reject by reason and audit it (§3)."""
    svc.metrics.auth_rejects.labels(exc.reason).inc()
    client = scope.get("client")
    await svc.audit.record(
        AUTH_REPLAY if exc.reason == "replay" else AUTH_REJECTED,
        outcome="rejected",
        request_id=str(scope.get(REQUEST_ID_KEY, "-")),
        account=account,
        ip=str(client[0]) if client else "unknown",
        detail={"reason": exc.reason},
    )


async def verify_all(items: list[tuple[bytes, bytes, bytes]]) -> None:
    """Verify ``(public_key, message, signature)`` triples, yielding between batches."""
    for index, (public_key, message, signature) in enumerate(items):
        if index and index % VERIFY_BATCH == 0:
            await trio.lowlevel.checkpoint()
        crypto.verify(public_key, message, signature)


async def limit(svc: Services, limiter: str, key: str, *, account: str | None = None) -> None:
    """Apply a rate limiter; a reject is audited, then answered 429."""
    try:
        await svc.limiter.check(limiter, key)
    except RateLimited:
        await _audit_rate_limited(svc, limiter, account)
        raise


async def _audit_rate_limited(svc: Services, limiter: str, account: str | None) -> None:
    await svc.audit.record(
        RATE_LIMIT_REJECTED,
        outcome="rejected",
        request_id=request_id(),
        account=account,
        ip=client_ip(),
        detail={"limiter": limiter},
    )


def query_params() -> Mapping[str, str]:
    return request.args

"""Devices: provisioning tokens, linking, listing, revocation, push targets."""

from __future__ import annotations

import hashlib
import secrets

from quart import Blueprint, Response

from pqmsg.audit.events import (
    DEVICE_LINKED,
    DEVICE_PROVISIONING_STARTED,
    DEVICE_REVOKED,
    PUSH_TOKEN_SET,
)
from pqmsg.errors import BadRequest, Forbidden, NotFound
from pqmsg.protocol import crypto
from pqmsg.protocol.auth import parse_device_id
from pqmsg.protocol.validate import b64_field, reject_unknown, str_field
from pqmsg.routes.accounts import PRIMARY_DEVICE, parse_new_device, verify_device
from pqmsg.routes.common import (
    authenticate,
    client_ip,
    json_body,
    json_response,
    limit,
    no_content,
    rate_key_ip,
    request_id,
)
from pqmsg.services import Services
from pqmsg.storage.base import PushTarget

LINK_FIELDS = {"token", "device_key", "device_certificate", "proof", "name"}
PUSH_FIELDS = {"provider", "token"}
TOKEN_BYTES = 32
MAX_PUSH_TOKEN_CHARS = 4096


def token_hash(token: str) -> bytes:
    """Tokens are stored only as their SHA-256."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def blueprint(svc: Services) -> Blueprint:
    bp = Blueprint("devices", __name__)
    db = svc.storage.db

    @bp.post("/v1/devices/provisioning")
    async def provisioning() -> Response:
        me, _ = await authenticate(svc)
        await limit(svc, "provisioning", f"acct:{me.account}", account=me.account)
        token = secrets.token_urlsafe(TOKEN_BYTES)
        expires_at = int(svc.clock()) + svc.settings.auth.provisioning_token_ttl_s
        await db.create_provisioning_token(me.account, token_hash(token), expires_at=expires_at)
        await svc.audit.record(
            DEVICE_PROVISIONING_STARTED, outcome="ok", request_id=request_id(), account=me.account,
            device=me.device, ip=client_ip(),
        )
        return json_response({"token": token, "expires_at": expires_at}, status=201)

    @bp.post("/v1/devices")
    async def link() -> Response:
        await limit(svc, "provisioning", f"ip:{rate_key_ip()}")
        body = await json_body()
        reject_unknown(body, LINK_FIELDS)
        token = str_field(body, "token", max_chars=128)
        device = parse_new_device(body)
        proof = b64_field(body, "proof", length=crypto.SIGNATURE_BYTES)
        grant = await db.get_provisioning_grant(token_hash(token), now=svc.clock())
        if grant is None:
            raise Forbidden("the provisioning token is unknown, used or expired", reason="provisioning_token")
        await verify_device(grant.identity_key, device, proof)
        device_id = await db.link_device(token_hash(token), device, now=svc.clock())
        await svc.audit.record(
            DEVICE_LINKED, outcome="ok", request_id=request_id(), account=grant.account,
            device=device_id, ip=client_ip(),
        )
        return json_response({"account": grant.account, "device": device_id}, status=201)

    @bp.get("/v1/devices")
    async def list_devices() -> Response:
        me, _ = await authenticate(svc)
        devices = await db.list_devices(me.account)
        return json_response(
            {
                "devices": [
                    {
                        "device": d.device,
                        "name": d.name,
                        "created_at": int(d.created_at),
                        "last_seen_at": None if d.last_seen_at is None else int(d.last_seen_at),
                    }
                    for d in devices
                ]
            }
        )

    @bp.delete("/v1/devices/<device>")
    async def revoke(device: str) -> Response:
        me, _ = await authenticate(svc)
        try:
            target = parse_device_id(device)
        except ValueError:
            raise BadRequest("path parameter 'device' must be a positive integer", reason="bad_path") from None
        if target == PRIMARY_DEVICE:
            raise Forbidden("the primary device cannot be revoked")
        if me.device != PRIMARY_DEVICE and target != me.device:
            raise Forbidden("only the primary device can revoke another device")
        if not await db.revoke_device(me.account, target, now=svc.clock()):
            raise NotFound(f"device {target} is not an active device of this account")
        svc.metrics.revocations.inc()
        svc.device_keys.forget(me.account, target)
        svc.notifier.close_device(me.account, target)
        await svc.audit.record(
            DEVICE_REVOKED, outcome="ok", request_id=request_id(), account=me.account,
            device=me.device, target_device=target, ip=client_ip(),
        )
        return no_content()

    @bp.put("/v1/devices/self/push")
    async def set_push() -> Response:
        me, body_bytes = await authenticate(svc)
        body = await json_body(body_bytes)
        reject_unknown(body, PUSH_FIELDS)
        provider = body.get("provider")
        if provider not in ("fcm", "apns"):
            raise BadRequest("'provider' must be \"fcm\" or \"apns\"", reason="bad_provider")
        token = str_field(body, "token", max_chars=MAX_PUSH_TOKEN_CHARS)
        await db.set_push_target(me.account, me.device, PushTarget(provider=provider, token=token))
        await svc.audit.record(
            PUSH_TOKEN_SET, outcome="ok", request_id=request_id(), account=me.account, device=me.device,
            detail={"provider": provider},
        )
        return no_content()

    @bp.delete("/v1/devices/self/push")
    async def delete_push() -> Response:
        me, _ = await authenticate(svc)
        await db.delete_push_target(me.account, me.device)
        return no_content()

    return bp

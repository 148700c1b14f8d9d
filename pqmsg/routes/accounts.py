"""Accounts: registration (no auth) and deletion (primary device only)."""

from __future__ import annotations

import uuid

from quart import Blueprint, Response

from pqmsg.audit.events import ACCOUNT_DELETED, ACCOUNT_REGISTERED
from pqmsg.errors import BadRequest, Forbidden
from pqmsg.protocol import crypto
from pqmsg.protocol.signing import device_certificate_message, registration_proof_message
from pqmsg.protocol.validate import Obj, b64_field, optional_name, reject_unknown
from pqmsg.routes.common import (
    authenticate,
    client_ip,
    json_body,
    json_response,
    limit,
    no_content,
    rate_key_ip,
    request_id,
    verify_all,
)
from pqmsg.services import Services
from pqmsg.storage.base import NewDevice

REGISTER_FIELDS = {"identity_key", "device_key", "device_certificate", "proof", "name"}
PRIMARY_DEVICE = 1


def parse_new_device(body: Obj) -> NewDevice:
    """The device key, certificate and name of a registration or link body."""
    return NewDevice(
        device_key=b64_field(body, "device_key", length=crypto.SIGN_PUBLIC_KEY_BYTES),
        certificate=b64_field(body, "device_certificate", length=crypto.SIGNATURE_BYTES),
        name=optional_name(body),
    )


async def verify_device(identity_key: bytes, device: NewDevice, proof: bytes) -> None:
    """The identity key vouches for the device key, and the caller holds the device key."""
    try:
        await verify_all(
            [
                (identity_key, device_certificate_message(device.device_key), device.certificate),
                (device.device_key, registration_proof_message(identity_key, device.device_key), proof),
            ]
        )
    except crypto.InvalidSignature:
        raise BadRequest(
            "the device certificate or the proof does not verify", reason="bad_signature"
        ) from None


def blueprint(svc: Services) -> Blueprint:
    bp = Blueprint("accounts", __name__)

    @bp.post("/v1/accounts")
    async def register() -> Response:
        await limit(svc, "registration", rate_key_ip())
        body = await json_body()
        reject_unknown(body, REGISTER_FIELDS)
        identity_key = b64_field(body, "identity_key", length=crypto.SIGN_PUBLIC_KEY_BYTES)
        device = parse_new_device(body)
        proof = b64_field(body, "proof", length=crypto.SIGNATURE_BYTES)
        await verify_device(identity_key, device, proof)
        account = str(uuid.uuid4())
        await svc.storage.db.create_account(account, identity_key, device, now=svc.clock())
        svc.metrics.registrations.inc()
        await svc.audit.record(
            ACCOUNT_REGISTERED, outcome="ok", request_id=request_id(), account=account,
            device=PRIMARY_DEVICE, ip=client_ip(),
        )
        return json_response({"account": account, "device": PRIMARY_DEVICE}, status=201)

    @bp.delete("/v1/accounts/self")
    async def delete_account() -> Response:
        me, _ = await authenticate(svc)
        if me.device != PRIMARY_DEVICE:
            raise Forbidden("only the primary device (1) can delete the account")
        devices = await svc.storage.db.delete_account(me.account)
        svc.device_keys.forget_account(me.account)
        for device in devices:
            svc.notifier.close_device(me.account, device)
        await svc.audit.record(
            ACCOUNT_DELETED, outcome="ok", request_id=request_id(), account=me.account,
            device=me.device, ip=client_ip(),
        )
        return no_content()

    return bp

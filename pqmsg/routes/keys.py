"""Keys: upload (every signature verified first), status, and bundles."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import trio
from quart import Blueprint, Response

from pqmsg.audit.events import KEYS_LAST_RESORT_SERVED, KEYS_UPLOADED
from pqmsg.errors import BadRequest, NotFound, StorageUnavailable
from pqmsg.protocol import crypto
from pqmsg.protocol.auth import parse_device_id
from pqmsg.protocol.b64 import b64encode
from pqmsg.protocol.signing import PrekeySignatureKind, prekey_message
from pqmsg.protocol.validate import (
    MAX_KEY_ID,
    Obj,
    b64_field,
    int_field,
    list_field,
    object_field,
    reject_unknown,
    uuid_path,
)
from pqmsg.routes.common import (
    admit,
    authenticate,
    client_ip,
    json_body,
    json_response,
    request_id,
    verify_all,
    verify_request,
)
from pqmsg.services import Services
from pqmsg.storage.base import DeviceBundle, KeyUpload, OneTimeKey, SignedKey

UPLOAD_FIELDS = {"signed_prekey", "pq_last_resort", "one_time_prekeys", "pq_one_time_prekeys"}
SIGNED_FIELDS = {"id", "public_key", "signature"}
EC_FIELDS = {"id", "public_key"}
ALL_DEVICES = "*"
# One-time keys decoded between checkpoints (each PQ key is ~6 KB of base64).
PARSE_BATCH = 16


def _signed(obj: Obj, where: str, key_length: int) -> SignedKey:
    reject_unknown(obj, SIGNED_FIELDS, where)
    return SignedKey(
        key_id=int_field(obj, "id", low=0, high=MAX_KEY_ID, where=where),
        public_key=b64_field(obj, "public_key", length=key_length, where=where),
        signature=b64_field(obj, "signature", length=crypto.SIGNATURE_BYTES, where=where),
    )


def parse_upload(body: Obj, max_per_upload: int) -> KeyUpload:
    """Validate a ``PUT /v1/keys`` body in one go (see :func:`parse_upload_yielding`)."""
    steps = _upload_parser(body, max_per_upload)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            upload: KeyUpload = done.value
            return upload


async def parse_upload_yielding(body: Obj, max_per_upload: int) -> KeyUpload:
    """Like :func:`parse_upload`, with a checkpoint every few keys.

    Decoding a hundred PQ keys and their signatures takes over 10 ms of
    CPU; spreading it over steps keeps other requests moving meanwhile.
    """
    steps = _upload_parser(body, max_per_upload)
    count = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            upload: KeyUpload = done.value
            return upload
        count += 1
        if count % PARSE_BATCH == 0:
            await trio.lowlevel.checkpoint()


def _upload_parser(body: Obj, max_per_upload: int) -> Generator[None, None, KeyUpload]:
    """Yields after each one-time key; returns the whole upload."""
    reject_unknown(body, UPLOAD_FIELDS)
    spk = pq_lr = None
    if body.get("signed_prekey") is not None:
        spk = _signed(object_field(body, "signed_prekey"), "signed_prekey.", crypto.X25519_PUBLIC_KEY_BYTES)
    if body.get("pq_last_resort") is not None:
        pq_lr = _signed(object_field(body, "pq_last_resort"), "pq_last_resort.", crypto.KEM_PUBLIC_KEY_BYTES)
    ec: list[OneTimeKey] = []
    for i, item in enumerate(_items(body, "one_time_prekeys", max_per_upload)):
        where = f"one_time_prekeys[{i}]."
        reject_unknown(item, EC_FIELDS, where)
        ec.append(
            OneTimeKey(
                key_id=int_field(item, "id", low=0, high=MAX_KEY_ID, where=where),
                public_key=b64_field(item, "public_key", length=crypto.X25519_PUBLIC_KEY_BYTES, where=where),
            )
        )
        yield
    pq: list[OneTimeKey] = []
    for i, item in enumerate(_items(body, "pq_one_time_prekeys", max_per_upload)):
        pq.append(_one_time_pq(item, f"pq_one_time_prekeys[{i}]."))
        yield
    return KeyUpload(spk, pq_lr, tuple(ec), tuple(pq))


def _one_time_pq(item: Obj, where: str) -> OneTimeKey:
    signed = _signed(item, where, crypto.KEM_PUBLIC_KEY_BYTES)
    return OneTimeKey(signed.key_id, signed.public_key, signed.signature)


def _items(body: Obj, name: str, max_items: int) -> list[Obj]:
    if body.get(name) is None:
        return []
    items = list_field(body, name, max_items=max_items)
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest(f"{name}[{i}] must be a JSON object", reason="wrong_type")
    return items


def signatures_of(upload: KeyUpload) -> list[tuple[PrekeySignatureKind, int, bytes, bytes]]:
    """Every ``(kind, id, public key, signature)`` the identity key must have signed."""
    out: list[tuple[PrekeySignatureKind, int, bytes, bytes]] = []
    if upload.signed_prekey:
        k = upload.signed_prekey
        out.append(("spk", k.key_id, k.public_key, k.signature))
    if upload.pq_last_resort:
        k = upload.pq_last_resort
        out.append(("pqspk", k.key_id, k.public_key, k.signature))
    for otk in upload.pq_one_time_prekeys:
        assert otk.signature is not None
        out.append(("pqspk", otk.key_id, otk.public_key, otk.signature))
    return out


def bundle_device_json(entry: DeviceBundle) -> dict[str, Any]:
    spk = entry.signed_prekey
    otk = entry.one_time_prekey
    pq = entry.pq_prekey
    return {
        "device": entry.device,
        "signed_prekey": None
        if spk is None
        else {"id": spk.key_id, "public_key": b64encode(spk.public_key), "signature": b64encode(spk.signature)},
        "one_time_prekey": None if otk is None else {"id": otk.key_id, "public_key": b64encode(otk.public_key)},
        "pq_prekey": None
        if pq is None
        else {
            "id": pq.key_id,
            "public_key": b64encode(pq.public_key),
            "signature": b64encode(pq.signature or b""),
            "last_resort": entry.pq_last_resort,
        },
    }


def blueprint(svc: Services) -> Blueprint:
    bp = Blueprint("keys", __name__)
    db = svc.storage.db
    settings = svc.settings.keys

    @bp.put("/v1/keys")
    async def upload() -> Response:
        me, raw = await authenticate(svc)
        parsed = await parse_upload_yielding(await json_body(raw), settings.max_per_upload)
        identity_key = await db.get_identity_key(me.account)
        if identity_key is None:  # deleted between authentication and now
            raise StorageUnavailable("the account changed during the request")
        try:
            await verify_all(
                [(identity_key, prekey_message(kind, key_id, pk), sig) for kind, key_id, pk, sig in signatures_of(parsed)]
            )
        except crypto.InvalidSignature:
            raise BadRequest(
                "a prekey signature does not verify under the identity key; nothing was stored",
                reason="bad_signature",
            ) from None
        counts = await db.put_keys(
            me.account, me.device, parsed, max_per_kind=settings.max_stored_per_kind, now=svc.clock()
        )
        await svc.audit.record(
            KEYS_UPLOADED, outcome="ok", request_id=request_id(), account=me.account, device=me.device,
            detail={"count": len(parsed.one_time_prekeys) + len(parsed.pq_one_time_prekeys)},
        )
        return json_response(
            {"one_time_prekeys": counts.one_time_prekeys, "pq_one_time_prekeys": counts.pq_one_time_prekeys}
        )

    @bp.get("/v1/keys/status")
    async def status() -> Response:
        me, _ = await authenticate(svc)
        st = await db.key_status(me.account, me.device)
        age = None if st.signed_prekey_created_at is None else max(0, int(svc.clock() - st.signed_prekey_created_at))
        low = settings.low_water_mark
        replenish = (
            st.counts.one_time_prekeys < low
            or st.counts.pq_one_time_prekeys < low
            or age is None
            or age > settings.signed_prekey_max_age_s
            or not st.has_pq_last_resort
        )
        return json_response(
            {
                "one_time_prekeys": st.counts.one_time_prekeys,
                "pq_one_time_prekeys": st.counts.pq_one_time_prekeys,
                "signed_prekey_age_s": age,
                "pq_last_resort": st.has_pq_last_resort,
                "low_water_mark": low,
                "replenish": replenish,
            }
        )

    @bp.get("/v1/keys/<account>/<device>")
    async def bundle(account: str, device: str) -> Response:
        # As a send: input checked, then the nonce and the bundle token in one step.
        pending, _ = await verify_request(svc)
        target = uuid_path(account, "account")
        device_id: int | None = None
        if device != ALL_DEVICES:
            try:
                device_id = parse_device_id(device)
            except ValueError:
                raise BadRequest(
                    "path parameter 'device' must be a positive integer or *", reason="bad_path"
                ) from None
        me = await admit(svc, pending, "bundle", f"{pending.account}:{pending.device}:{target}")
        found = await db.take_bundle(target, device_id)
        if found is None:
            raise NotFound("no such account or active device")
        for entry in found.devices:
            if entry.pq_last_resort:
                svc.metrics.last_resort_served.inc()
                await svc.audit.record(
                    KEYS_LAST_RESORT_SERVED, outcome="ok", request_id=request_id(), account=me.account,
                    device=me.device, target_account=target, target_device=entry.device, ip=client_ip(),
                )
        return json_response(
            {"identity_key": b64encode(found.identity_key), "devices": [bundle_device_json(d) for d in found.devices]}
        )

    return bp

"""Messages: send (durable before the answer), fetch with long poll, ack."""

from __future__ import annotations

import re
from typing import Any

import trio
from quart import Blueprint, Response, request

from pqmsg.errors import AuthError, BadRequest, PayloadTooLarge, ProblemError
from pqmsg.nurseries.notify import DeviceClosed
from pqmsg.protocol.auth import MAX_DEVICE_ID
from pqmsg.protocol.b64 import Base64Error, b64decode, b64encode
from pqmsg.protocol.validate import (
    Obj,
    field,
    int_field,
    list_field,
    optional_int,
    reject_unknown,
    uuid_field,
    uuid_path,
)
from pqmsg.routes.common import (
    admit,
    authenticate,
    confirm_device,
    device_refused,
    json_body,
    json_response,
    verify_request,
)
from pqmsg.services import Services
from pqmsg.storage.base import OutgoingCopy, QueuedMessage, Sender

SEND_FIELDS = {"id", "messages"}
COPY_FIELDS = {"device", "ciphertext", "pq_epoch"}
FETCH_PARAMS = {"limit", "wait"}
MAX_COPIES = 1000
MAX_ACK = 500
MAX_EPOCH = 2**63 - 1
DEFAULT_FETCH = 100
DECIMAL_RE = re.compile("[0-9]{1,6}")  # ASCII digits only: str.isdigit() admits superscripts and other scripts' digits


def parse_copies(body: Obj, max_ciphertext: int) -> list[OutgoingCopy]:
    items = list_field(body, "messages", max_items=MAX_COPIES)
    if not items:
        raise BadRequest("'messages' must name at least one device", reason="out_of_range")
    copies: list[OutgoingCopy] = []
    for i, item in enumerate(items):
        where = f"messages[{i}]."
        if not isinstance(item, dict):
            raise BadRequest(f"messages[{i}] must be a JSON object", reason="wrong_type")
        reject_unknown(item, COPY_FIELDS, f"messages[{i}]")
        device = int_field(item, "device", low=1, high=MAX_DEVICE_ID, where=where)
        ciphertext = field(item, "ciphertext", where)
        if not isinstance(ciphertext, str):
            raise BadRequest(f"{where}'ciphertext' must be a base64url string", reason="wrong_type")
        try:
            data = b64decode(ciphertext, max_length=max_ciphertext)
        except Base64Error as exc:
            if "longer than" in str(exc):
                raise PayloadTooLarge(f"{where}'ciphertext' is larger than {max_ciphertext} bytes") from None
            raise BadRequest(f"{where}'ciphertext' {exc}", reason="bad_base64") from None
        if not data:
            raise BadRequest(f"{where}'ciphertext' must not be empty", reason="out_of_range")
        epoch = optional_int(item, "pq_epoch", low=0, high=MAX_EPOCH, where=where)
        copies.append(OutgoingCopy(device, data, epoch))
    devices = [c.device for c in copies]
    if len(set(devices)) != len(devices):
        raise BadRequest("each device may appear once in 'messages'", reason="duplicate_device")
    return copies


def message_json(msg: QueuedMessage) -> dict[str, Any]:
    return {
        "id": msg.id,
        "sender": {"account": msg.sender.account, "device": msg.sender.device},
        "ciphertext": b64encode(msg.ciphertext),
        "pq_epoch": msg.pq_epoch,
        "server_ts": msg.server_ts,
    }


def _int_param(name: str, raw: str, low: int, high: int) -> int:
    if not DECIMAL_RE.fullmatch(raw) or not low <= int(raw) <= high:
        raise BadRequest(f"query parameter {name!r} must be an integer from {low} to {high}", reason="bad_query")
    return int(raw)


def blueprint(svc: Services) -> Blueprint:
    bp = Blueprint("messages", __name__)
    db = svc.storage.db
    settings = svc.settings.messages

    @bp.put("/v1/messages/<account>")
    async def send(account: str) -> Response:
        # Input is validated before the nonce is recorded, so bad input
        # changes nothing; the nonce and the send token are one step. The
        # signature may verify against a remembered key: the store re-checks
        # the device (sender_key), and a refusal here checks it first.
        pending, raw = await verify_request(svc, remembered=True)
        try:
            recipient = uuid_path(account, "account")
            body = await json_body(raw)
            reject_unknown(body, SEND_FIELDS)
            message_id = uuid_field(body, "id")
            copies = parse_copies(body, settings.max_ciphertext_bytes)
        except ProblemError:
            await confirm_device(svc, pending)
            raise
        me = await admit(svc, pending, "send", f"{pending.account}:{pending.device}")
        try:
            result = await db.store_messages(
                Sender(me.account, me.device), message_id, recipient, copies,
                now=svc.clock(), idempotency_window_s=settings.idempotency_window_s,
                sender_key=pending.device_key,
            )
        except AuthError as exc:
            await device_refused(svc, pending, exc)
        if not result.duplicate:
            svc.metrics.stored.inc(result.stored)
            svc.metrics.ratchet_advances.inc(result.ratchet_advances)
            for device in result.devices:
                svc.notifier.publish(recipient, device)
                svc.push.wake(recipient, device)
        return json_response({"id": message_id, "stored": result.stored})

    @bp.get("/v1/messages")
    async def fetch() -> Response:
        # As for sends: the key may be remembered, and each read re-checks it.
        me, _ = await authenticate(svc, remembered=True)
        args = request.args
        try:
            unknown = sorted(set(args) - FETCH_PARAMS)
            if unknown:
                raise BadRequest(f"unknown query parameter {unknown[0]!r}", reason="bad_query")
            limit_n = _int_param("limit", args["limit"], 1, settings.max_fetch) if "limit" in args else DEFAULT_FETCH
            wait_s = _int_param("wait", args["wait"], 0, settings.max_wait_s) if "wait" in args else 0
        except ProblemError:
            await confirm_device(svc, me)
            raise
        try:
            with svc.notifier.subscribe(me.account, me.device) as sub:
                messages, more = await db.fetch_messages(
                    me.account, me.device, limit=limit_n, device_key=me.device_key
                )
                if not messages and wait_s > 0:
                    borrower = request.scope.get("pqmsg.borrower")
                    async with svc.in_flight.parked(borrower):
                        with trio.move_on_after(wait_s):
                            try:
                                await sub.wait()
                            except DeviceClosed:
                                pass  # revoked or deleted: the fetch below says so
                    messages, more = await db.fetch_messages(
                        me.account, me.device, limit=limit_n, device_key=me.device_key
                    )
        except AuthError as exc:
            await device_refused(svc, me, exc)
        svc.metrics.delivered.inc(len(messages))
        return json_response({"messages": [message_json(m) for m in messages], "more": more})

    @bp.post("/v1/messages/ack")
    async def ack() -> Response:
        me, raw = await authenticate(svc, remembered=True)
        try:
            body = await json_body(raw)
            reject_unknown(body, {"ids"})
            ids = list_field(body, "ids", max_items=MAX_ACK)
            for i, value in enumerate(ids):
                uuid_field({"id": value}, "id", where=f"ids[{i}].")
        except ProblemError:
            await confirm_device(svc, me)
            raise
        try:
            acked = await db.ack_messages(me.account, me.device, ids, device_key=me.device_key)
        except AuthError as exc:
            await device_refused(svc, me, exc)
        svc.metrics.acked.inc(acked)
        return json_response({"acked": acked})

    return bp

"""The OpenAPI 3.1 description of the wire protocol, served at ``/openapi.json``.

:func:`openapi_document` builds the whole document, one fresh dict per call.
This module holds the paths; the named schemas live in
:mod:`pqmsg.openapi_schemas`, the auth headers and shared error responses in
:mod:`pqmsg.openapi_auth`.
"""

from __future__ import annotations

from typing import Any

from pqmsg import __version__
from pqmsg.http.problems import PROBLEM_JSON
from pqmsg.openapi_auth import (
    PROBLEM_NAMES,
    auth_parameter_refs,
    auth_parameters,
    empty_response,
    headers,
    json_response,
    problem_response,
    problem_responses,
    security_requirement,
    security_schemes,
)
from pqmsg.openapi_schemas import device_id, ref, schemas, uuid
from pqmsg.routes.messages import DEFAULT_FETCH
from pqmsg.settings import AuthSettings, HttpSettings, LimitSettings, MessageSettings

Operation = dict[str, Any]
ProblemSpec = int | tuple[int, str]

TAGS = (
    ("accounts", "Registration and deletion of accounts."),
    ("devices", "Linking, listing and revoking devices."),
    ("keys", "Prekey upload, status and bundles."),
    ("messages", "Sending, fetching and acknowledging ciphertexts."),
    ("push", "Push wake-up targets."),
    ("stream", "WebSocket delivery."),
    ("operations", "Health, metrics and this document (no auth)."),
)

INFO_DESCRIPTION = """\
pqmsg-server relays post-quantum, end-to-end-encrypted messages: it stores public key
material and opaque ciphertexts and never sees plaintext (wire protocol version 1).

Binary values are unpadded base64url (RFC 4648 §5) strings. Authenticated operations
carry the five `Pqmsg-*` headers described by the `PqmsgSignature` security scheme.
Every error is `application/problem+json` (RFC 9457) with a stable `reason` token, and
every response carries `X-Request-Id`. Any request may be shed with `503` and
`Retry-After` when the server is at its in-flight limit. An unknown path is `404`, an
unsupported method `405`; an unexpected failure is a bare `500` whose details go only to
the server log."""


def _problem_responses(*codes: ProblemSpec) -> dict[str, Any]:
    """Error responses by status: a bare code refers to the shared response,
    ``(code, text)`` states what that code means for this operation."""
    out: dict[str, Any] = {}
    for code in codes:
        if isinstance(code, int):
            out[str(code)] = {"$ref": f"#/components/responses/{PROBLEM_NAMES[code]}"}
        else:
            status, text = code
            out[str(status)] = problem_response(status, text)
    return out


def _operation(
    op_id: str,
    summary: str,
    tag: str,
    ok: dict[str, Any],
    *errors: ProblemSpec,
    auth: bool = True,
    body: str | None = None,
    params: tuple[dict[str, Any], ...] = (),
    description: str = "",
) -> Operation:
    """One operation. Authenticated ones get the auth headers and a 401; those
    with a JSON body get 413 and 415; every operation may answer 503."""
    implied: list[ProblemSpec] = [401] if auth else []
    if body is not None:
        implied += [413, 415]
    responses = {**ok, **_problem_responses(*implied, 503), **_problem_responses(*errors)}
    op: Operation = {
        "operationId": op_id,
        "summary": summary,
        "tags": [tag],
        "security": security_requirement() if auth else [],
        "parameters": [*(auth_parameter_refs() if auth else []), *params],
        "responses": dict(sorted(responses.items())),
    }
    if description:
        op["description"] = description
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "description": f"JSON, at most {HttpSettings().max_body_bytes} bytes (2 MiB).",
            "content": {"application/json": {"schema": ref(body)}},
        }
    return op


def _path_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema,
            "description": description}


def _query_param(name: str, low: int, high: int, default: int, description: str) -> dict[str, Any]:
    schema = {"type": "integer", "minimum": low, "maximum": high, "default": default}
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


_BODY_400 = "Bad input (`bad_json`, `unknown_field`, `missing_field`, `wrong_type`, `out_of_range`"
_BAD_SIGNATURE = "`bad_signature`: the certificate or the proof does not verify."


def _account_paths() -> dict[str, Any]:
    per_ip = LimitSettings().registration
    return {
        "/v1/accounts": {"post": _operation(
            "registerAccount", "Register an account and its primary device 1", "accounts",
            {"201": json_response("Created; the primary device is 1.", "DeviceCreated")},
            (400, f"{_BODY_400}, `bad_base64`) or {_BAD_SIGNATURE}"),
            (429, f"Registration is rate limited per client IP ({per_ip.burst} at once, "
                  f"{per_ip.per_s}/s by default)."),
            auth=False, body="RegisterRequest",
            description="`proof` proves possession of the device key; `device_certificate` shows "
                        "the identity key vouches for it.",
        )},
        "/v1/accounts/self": {"delete": _operation(
            "deleteAccount", "Delete the account, its devices, keys and queued messages",
            "accounts",
            {"204": empty_response("Deleted; its devices' later requests get 401 "
                                   "`unknown_device`.")},
            (403, "`forbidden`: only the primary device (1) can delete the account."),
        )},
    }


def _device_paths() -> dict[str, Any]:
    ttl_s = AuthSettings().provisioning_token_ttl_s
    device = _path_param("device", device_id(), "The device to revoke.")
    return {
        "/v1/devices/provisioning": {"post": _operation(
            "createProvisioningToken", "Create a single-use token to link a new device", "devices",
            {"201": json_response(f"Created; valid for {ttl_s} s, single use.",
                                  "ProvisioningToken")},
            (429, "Provisioning is rate limited per account."),
        )},
        "/v1/devices": {
            "post": _operation(
                "linkDevice", "Link a new device with a provisioning token", "devices",
                {"201": json_response("Linked.", "DeviceCreated")},
                (400, f"{_BODY_400}, `bad_base64`) or {_BAD_SIGNATURE}"),
                (403, "`provisioning_token`: the token is unknown, used or expired."),
                (429, "Linking is rate limited per client IP."),
                auth=False, body="LinkRequest",
                description="The certificate must verify under the account's identity key; "
                            "`proof` is formed as at registration. A token is consumed by its "
                            "first successful use.",
            ),
            "get": _operation(
                "listDevices", "List the account's active devices", "devices",
                {"200": json_response("Active devices.", "DeviceList")},
            ),
        },
        "/v1/devices/{device}": {"delete": _operation(
            "revokeDevice", "Revoke a device of the same account", "devices",
            {"204": empty_response("Revoked: its keys, queue and push token are gone, its streams "
                                   "closed, its parked long polls answer 401 `revoked`, and its "
                                   "later requests get 401 `revoked`.")},
            (400, "`bad_path`: `device` is not a positive integer."),
            (403, "`forbidden`: the primary cannot be revoked, and a secondary device may revoke "
                  "only itself."),
            (404, "`not_found`: not an active device of this account."),
            params=(device,),
        )},
    }


def _key_paths() -> dict[str, Any]:
    account = _path_param("account", uuid("Account UUID."), "The account whose keys to fetch.")
    device = _path_param("device", {"oneOf": [device_id(), {"type": "string", "const": "*"}]},
                         "A device id, or `*` for every active device of the account.")
    return {
        "/v1/keys": {"put": _operation(
            "uploadKeys", "Upload prekeys", "keys",
            {"200": json_response("Stored; counts of one-time keys now stored.", "KeyCounts")},
            (400, f"{_BODY_400}, `too_many`, `bad_base64`) or `bad_signature`: a prekey signature "
                  "does not verify under the identity key; nothing was stored."),
            (409, "`duplicate_prekey` (a one-time key id already stored or repeated) or "
                  "`prekey_limit` (a pool would exceed its limit); nothing was stored."),
            body="KeyUpload",
        )},
        "/v1/keys/status": {"get": _operation(
            "getKeyStatus", "Remaining prekeys and whether to replenish", "keys",
            {"200": json_response("The device's key status.", "KeyStatus")},
        )},
        "/v1/keys/{account}/{device}": {"get": _operation(
            "getKeyBundle", "Fetch a prekey bundle for one device or all (`*`)", "keys",
            {"200": json_response("The bundle; each one-time key is handed out at most once.",
                                  "KeyBundle")},
            (400, "`bad_path`: `account` is not a UUID or `device` is not a positive integer "
                  "or `*`."),
            (404, "`not_found`: no such account or active device."),
            (429, "Rate limited per requesting device and target account."),
            params=(account, device),
            description="When a device's PQ one-time pool is empty its last-resort PQ key is "
                        "served with `last_resort: true`.",
        )},
    }


def _message_paths() -> dict[str, Any]:
    msgs = MessageSettings()
    recipient = _path_param("account", uuid("Account UUID."), "The recipient account.")
    limit = _query_param("limit", 1, msgs.max_fetch, DEFAULT_FETCH, "At most this many messages.")
    wait = _query_param("wait", 0, msgs.max_wait_s, 0,
                        "Long poll: with nothing queued, wait up to this many seconds for a "
                        "message.")
    send = _operation(
        "sendMessage", "Send one ciphertext per recipient device", "messages",
        {"200": json_response("Every copy is durably stored (or was, by an earlier retry "
                              "with the same id).", "SendResponse")},
        (400, f"{_BODY_400}, `too_many`, `bad_base64`, `bad_uuid`, `duplicate_device`) or "
              "`bad_path`: `account` is not a UUID."),
        (404, "`not_found`: no such recipient account."),
        (413, f"A ciphertext is larger than {msgs.max_ciphertext_bytes} bytes (256 KiB), or the "
              "body larger than 2 MiB (`too_large`)."),
        (429, "Sending is rate limited per sender device."),
        body="SendRequest", params=(recipient,),
    )
    send["responses"]["409"] = {"$ref": "#/components/responses/DeviceMismatch"}
    return {
        "/v1/messages/{account}": {"put": send},
        "/v1/messages": {"get": _operation(
            "fetchMessages", "Fetch the device's oldest unacknowledged messages", "messages",
            {"200": json_response("Messages in store order; `more` when others wait.",
                                  "MessageList")},
            (400, "`bad_query`: `limit` or `wait` out of range, or an unknown query parameter."),
            params=(limit, wait),
            description="Unacknowledged messages are delivered again by later fetches.",
        )},
        "/v1/messages/ack": {"post": _operation(
            "ackMessages", "Acknowledge messages, removing them from the queue", "messages",
            {"200": json_response("How many were removed; unknown ids are ignored.",
                                  "AckResponse")},
            (400, f"{_BODY_400}, `too_many`, `bad_uuid`)."),
            body="AckRequest",
        )},
    }


def _push_paths() -> dict[str, Any]:
    return {"/v1/devices/self/push": {
        "put": _operation(
            "setPushTarget", "Set this device's push token", "push",
            {"204": empty_response("Stored; replaces any earlier token.")},
            (400, f"{_BODY_400}, `bad_provider`)."),
            body="PushTarget",
            description="When a message is stored for this device and it has no open stream, "
                        "the server sends a content-free wake-up through the provider.",
        ),
        "delete": _operation(
            "deletePushTarget", "Remove this device's push token", "push",
            {"204": empty_response("Removed (also when none was set).")},
        ),
    }}


STREAM_DESCRIPTION = """\
A WebSocket (RFC 6455 upgrade over HTTP/1.1, or RFC 8441 extended CONNECT over HTTP/2
where the client supports it). The upgrade request is authenticated like any other:
it carries the five `Pqmsg-*` headers and is signed as `GET /v1/stream` with an empty body.

After the upgrade the server sends each queued and each new message as a JSON text
frame `{"type": "message", "id", "sender": {"account", "device"}, "ciphertext",
"pq_epoch", "server_ts"}` (schema `StreamMessageFrame`). The client acknowledges with
`{"type": "ack", "ids": [...]}` (schema `StreamAckFrame`); unacknowledged messages are
delivered again. The server answers each ack frame, once the acknowledgement is
committed, with `{"type": "acked", "acked": n}`; it sends `{"type": "ping"}` every
`PQMSG_STREAM_PING_INTERVAL_S` (the client may answer `{"type": "pong"}`; any frame from
the client counts as a sign of life). At most `PQMSG_STREAM_MAX_UNACKED` messages (and
about `PQMSG_STREAM_MAX_UNACKED_BYTES`) are in flight unacknowledged per stream. A device
with an open stream gets no push; a newer stream of the same device replaces the older.

The upgrade is refused with problem+json before any WebSocket exists: 400 `bad_query`
(the stream takes no query parameters), 401 with the authentication reason, 503
`overloaded` (stream limit reached, or the server is draining).

Close codes: 1001 `going_away` (server draining), 1003 `unsupported` (binary frame),
1008 `bad_frame` (malformed frame), 1009 `too_big` (frame over 64 KiB), 1011
`internal_error`, 1013 `unavailable` (storage unavailable), 4001 `revoked` (device
revoked or account deleted), 4002 `replaced` (a newer stream of this device), 4003
`slow_consumer` (window held full past `PQMSG_STREAM_ACK_TIMEOUT_S`), 4004
`idle_timeout` (nothing from the client for `PQMSG_STREAM_IDLE_TIMEOUT_S`).
Unacknowledged messages stay queued whatever the close."""


def _stream_paths() -> dict[str, Any]:
    upgraded = empty_response("Switching Protocols: the WebSocket is open.")
    return {"/v1/stream": {"get": _operation(
        "openStream", "Receive messages over a WebSocket", "stream",
        {"101": upgraded, **_problem_responses(400, 401, 503)},
        description=STREAM_DESCRIPTION,
    )}}


def _ops_paths() -> dict[str, Any]:
    health = _operation("getHealth", "Health of every supervised service", "operations",
                        {"200": json_response("Every component is healthy.", "Health")}, auth=False)
    # One status, two bodies: a failing component (Health, no Retry-After) or a shed request.
    failing = json_response("A component is failing (the same shape, naming it), or the request "
                            "was shed (problem+json with Retry-After).", "Health")
    failing["content"][PROBLEM_JSON] = {"schema": ref("Problem")}
    failing["headers"]["Retry-After"] = {"description": "Only when the request was shed.",
                                         "schema": {"type": "integer", "minimum": 1}}
    health["responses"]["503"] = failing
    metrics = empty_response("Prometheus text exposition format.")
    metrics["content"] = {"text/plain": {"schema": {"type": "string"}}}
    document = json_response("This document.", {"type": "object"})
    return {
        "/health/live": {"get": _operation(
            "getLiveness", "Liveness: 200 while the process runs", "operations",
            {"200": json_response("Alive.", "Live")}, auth=False)},
        "/health": {"get": health},
        "/metrics": {"get": _operation(
            "getMetrics", "Prometheus metrics", "operations", {"200": metrics}, auth=False)},
        "/openapi.json": {"get": _operation(
            "getOpenApi", "This OpenAPI 3.1 document", "operations", {"200": document},
            auth=False)},
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every endpoint of the wire protocol."""
    paths: dict[str, Any] = {}
    for group in (_account_paths, _device_paths, _key_paths, _message_paths, _push_paths,
                  _stream_paths, _ops_paths):
        for path, item in group().items():
            paths.setdefault(path, {}).update(item)
    return {
        "openapi": "3.1.0",
        "info": {"title": "pqmsg-server", "version": __version__, "description": INFO_DESCRIPTION,
                 "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"}},
        "tags": [{"name": name, "description": text} for name, text in TAGS],
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": security_schemes(),
            "parameters": auth_parameters(),
            "headers": headers(),
            "responses": problem_responses(),
        },
    }

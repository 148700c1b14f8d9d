"""The reusable parts of the OpenAPI document: JSON schemas and auth headers.

Sizes and limits are read from the modules that enforce them (key sizes
from :mod:`pqmsg.protocol.crypto`, limits from the default
:class:`~pqmsg.settings.Settings` sections and the route modules), so the
document follows the implementation instead of restating it. Every builder
returns a fresh dict: callers may mutate what they get.
"""

from __future__ import annotations

from typing import Any

from pqmsg.protocol import crypto
from pqmsg.protocol.auth import MAX_DEVICE_ID
from pqmsg.protocol.validate import MAX_KEY_ID, MAX_NAME_CHARS, UUID_RE
from pqmsg.routes.devices import MAX_PUSH_TOKEN_CHARS
from pqmsg.routes.messages import MAX_ACK, MAX_COPIES, MAX_EPOCH
from pqmsg.settings import KeySettings, MessageSettings

Schema = dict[str, Any]

B64URL_PATTERN = "^[A-Za-z0-9_-]*$"
# No C0 control characters, as pqmsg.protocol.validate.optional_name checks.
NAME_PATTERN = r"^[^\u0000-\u001f]*$"
MAX_LINK_TOKEN_CHARS = 128
AUTH_REASONS = ("malformed", "skew", "unknown_device", "revoked", "signature", "replay")


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def b64_chars(size: int) -> int:
    """Characters of unpadded base64url for ``size`` bytes."""
    return -(-4 * size // 3)


def _b64(description: str, size: int, *, at_most: bool = False) -> Schema:
    """An unpadded base64url string decoding to ``size`` bytes (or at most that)."""
    bound = "at most" if at_most else "exactly"
    return {
        "type": "string",
        "contentEncoding": "base64url",
        "pattern": B64URL_PATTERN,
        "minLength": 2 if at_most else b64_chars(size),
        "maxLength": b64_chars(size),
        "description": f"{description} Unpadded base64url (RFC 4648 §5) that decodes to "
        f"{bound} {size} bytes; padding and the standard alphabet are refused.",
    }


def _int(description: str, low: int, high: int) -> Schema:
    return {"type": "integer", "minimum": low, "maximum": high, "description": description}


def _object(
    props: dict[str, Schema],
    *,
    required: tuple[str, ...] | None = None,
    closed: bool = False,
    description: str = "",
) -> Schema:
    """An object schema, every property required unless ``required`` says otherwise.

    ``closed`` is for request bodies: the handlers reject unknown fields with a 400.
    """
    names = list(props) if required is None else list(required)
    schema: Schema = {"type": "object", "properties": props, "required": names}
    if closed:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


def uuid(description: str) -> Schema:
    return {"type": "string", "format": "uuid", "pattern": UUID_RE.pattern,
            "description": description}


def device_id(description: str = "Device id.") -> Schema:
    return _int(description, 1, MAX_DEVICE_ID)


def _device_schemas() -> dict[str, Schema]:
    sig = crypto.SIGNATURE_BYTES
    pk = crypto.SIGN_PUBLIC_KEY_BYTES
    new_device = {
        "device_key": _b64("ML-DSA-65 public key of the device (signs its requests).", pk),
        "device_certificate": _b64("ML-DSA-65 signature by the identity key over "
                                   "`\"pqmsg-device-v1\" || device_key`.", sig),
        "proof": _b64("ML-DSA-65 signature by the device key over "
                      "`\"pqmsg-register-v1\" || identity_key || device_key`.", sig),
        "name": nullable({"type": "string", "maxLength": MAX_NAME_CHARS, "pattern": NAME_PATTERN,
                          "description": f"Optional label, at most {MAX_NAME_CHARS} characters, "
                                         "no control characters."}),
    }
    identity = _b64("ML-DSA-65 public identity key of the account.", pk)
    token = {"type": "string", "minLength": 1, "maxLength": MAX_LINK_TOKEN_CHARS,
             "description": "Provisioning token from POST /v1/devices/provisioning."}
    required = ("device_key", "device_certificate", "proof")
    return {
        "RegisterRequest": _object({"identity_key": identity, **new_device},
                                   required=("identity_key", *required), closed=True),
        "LinkRequest": _object({"token": token, **new_device}, required=("token", *required),
                               closed=True),
        "DeviceCreated": _object({"account": uuid("Account id."), "device": device_id()}),
        "ProvisioningToken": _object({
            "token": {"type": "string", "pattern": B64URL_PATTERN,
                      "description": "Single-use token."},
            "expires_at": {"type": "integer", "description": "Expiry, Unix seconds."},
        }),
        "DeviceList": _object({"devices": {"type": "array", "items": ref("DeviceInfo")}}),
        "DeviceInfo": _object({
            "device": device_id(),
            "name": nullable({"type": "string"}),
            "created_at": {"type": "integer", "description": "Unix seconds."},
            "last_seen_at": nullable({"type": "integer", "description": "Unix seconds (coarse)."}),
        }),
        "PushTarget": _object({
            "provider": {"type": "string", "enum": ["fcm", "apns"]},
            "token": {"type": "string", "minLength": 1, "maxLength": MAX_PUSH_TOKEN_CHARS,
                      "description": "The provider's device token."},
        }, closed=True),
    }


def _key_schemas() -> dict[str, Schema]:
    keys = KeySettings()
    key_id = _int("Client-chosen key id.", 0, MAX_KEY_ID)
    sig = _b64("ML-DSA-65 signature by the identity key over `\"pqmsg-prekey-v1\" || kind || "
               "key_id (8 bytes BE) || public_key`.", crypto.SIGNATURE_BYTES)
    x25519 = _b64("X25519 public key.", crypto.X25519_PUBLIC_KEY_BYTES)
    kem = _b64("ML-KEM-768 public key.", crypto.KEM_PUBLIC_KEY_BYTES)
    batch = keys.max_per_upload
    return {
        "SignedPrekey": _object({"id": key_id, "public_key": x25519, "signature": sig}, closed=True,
                                description="Signed X25519 prekey (kind `spk`)."),
        "SignedPqPrekey": _object({"id": key_id, "public_key": kem, "signature": sig}, closed=True,
                                  description="Signed ML-KEM-768 prekey (kind `pqspk`)."),
        "OneTimePrekey": _object({"id": key_id, "public_key": x25519}, closed=True,
                                 description="Unsigned one-time X25519 prekey."),
        "KeyUpload": _object({
            "signed_prekey": nullable(ref("SignedPrekey")),
            "pq_last_resort": nullable(ref("SignedPqPrekey")),
            "one_time_prekeys": {"type": "array", "maxItems": batch, "items": ref("OneTimePrekey")},
            "pq_one_time_prekeys": {"type": "array", "maxItems": batch,
                                    "items": ref("SignedPqPrekey")},
        }, required=(), closed=True, description=(
            "Every part is optional. Signed keys replace the current ones; one-time keys are "
            f"appended (at most {batch} per list per request, {keys.max_stored_per_kind} stored "
            "per kind).")),
        "KeyCounts": _object({"one_time_prekeys": {"type": "integer", "minimum": 0},
                              "pq_one_time_prekeys": {"type": "integer", "minimum": 0}},
                             description="One-time keys now stored for the device."),
        "KeyStatus": _object({
            "one_time_prekeys": {"type": "integer", "minimum": 0},
            "pq_one_time_prekeys": {"type": "integer", "minimum": 0},
            "signed_prekey_age_s": nullable({"type": "integer", "minimum": 0}),
            "pq_last_resort": {"type": "boolean", "description": "A last-resort PQ key is stored."},
            "low_water_mark": {"type": "integer", "description": f"Default {keys.low_water_mark}."},
            "replenish": {"type": "boolean", "description": (
                "True when a one-time pool is below the low-water mark, the signed prekey is "
                f"missing or older than {keys.signed_prekey_max_age_s} s, or no last-resort PQ key "
                "is stored.")},
        }),
        "BundlePqPrekey": _object({"id": key_id, "public_key": kem, "signature": sig,
                                   "last_resort": {"type": "boolean"}}),
        "DeviceBundle": _object({
            "device": device_id(),
            "signed_prekey": nullable(ref("SignedPrekey")),
            "one_time_prekey": nullable(ref("OneTimePrekey")),
            "pq_prekey": nullable(ref("BundlePqPrekey")),
        }),
        "KeyBundle": _object({
            "identity_key": _b64("ML-DSA-65 public identity key.", crypto.SIGN_PUBLIC_KEY_BYTES),
            "devices": {"type": "array", "items": ref("DeviceBundle")},
        }),
    }


def _message_schemas() -> dict[str, Schema]:
    msgs = MessageSettings()
    ciphertext = _b64("Opaque ciphertext.", msgs.max_ciphertext_bytes, at_most=True)
    epoch = _int("Post-quantum ratchet epoch of the session.", 0, MAX_EPOCH)
    ids = {"type": "array", "maxItems": MAX_ACK, "items": uuid("Message id from a fetch.")}
    return {
        "OutgoingMessage": _object({"device": device_id("Recipient device."),
                                    "ciphertext": ciphertext, "pq_epoch": nullable(epoch)},
                                   required=("device", "ciphertext"), closed=True),
        "SendRequest": _object({
            "id": uuid("Client-chosen message id; a retry with the same id within "
                       f"{msgs.idempotency_window_s} s is not stored twice."),
            "messages": {"type": "array", "minItems": 1, "maxItems": MAX_COPIES,
                         "items": ref("OutgoingMessage"),
                         "description": "One copy per active recipient device, each device once."},
        }, closed=True),
        "SendResponse": _object({"id": uuid("The request's id."),
                                 "stored": {"type": "integer", "minimum": 0}}),
        "Message": _object({
            "id": uuid("Server-assigned id of this copy: what the recipient acknowledges."),
            "sender": _object({"account": uuid("Sender account."), "device": device_id()}),
            "ciphertext": ciphertext,
            "pq_epoch": nullable(epoch),
            "server_ts": {"type": "number", "description": "When stored, Unix seconds."},
        }),
        "MessageList": _object({"messages": {"type": "array", "items": ref("Message")},
                                "more": {"type": "boolean"}}),
        "AckRequest": _object({"ids": ids}, closed=True),
        "AckResponse": _object({"acked": {"type": "integer", "minimum": 0}}),
        "StreamMessageFrame": {"allOf": [ref("Message"), _object(
            {"type": {"const": "message"}}, description="Server to client, a JSON text frame.")]},
        "StreamAckFrame": _object({"type": {"const": "ack"}, "ids": ids}, closed=True,
                                  description="Client to server, a JSON text frame."),
    }


def _ops_schemas() -> dict[str, Schema]:
    component = {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "failing"]},
            "detail": {"type": "string"},
            "backend": {"type": "string"},
            "state": {"type": "string"},
            "providers": {"type": "object", "additionalProperties": _object(
                {"enabled": {"type": "boolean"}, "state": {"type": "string"}})},
        },
    }
    return {
        "Live": _object({"status": {"const": "ok"}}),
        "Health": _object({
            "status": {"type": "string", "enum": ["ok", "failing"]},
            "components": {"type": "object", "additionalProperties": component,
                           "description": "Each supervised service by name."},
        }),
    }


def _auth_and_problem_schemas() -> dict[str, Schema]:
    text = {"type": "string"}
    problem = _object({
        "type": {"type": "string", "format": "uri",
                 "description": "`https://pqmsg.dev/problems/<kind>`"},
        "title": text,
        "status": {"type": "integer"},
        "detail": {"type": "string", "description": "What was wrong, for a human."},
        "reason": {"type": "string", "description": "Stable machine-readable token."},
        "request_id": {"type": "string", "description": "Same as the X-Request-Id header."},
    }, description="RFC 9457 problem details.")
    indices = {"type": "array", "items": {"type": "integer"}}
    return {
        "RequestSignature": _b64("ML-DSA-65 signature by the device key over the canonical string "
                                 "(the Pqmsg-Signature header).", crypto.SIGNATURE_BYTES),
        "Problem": problem,
        "AuthProblem": {"allOf": [ref("Problem"),
                                  {"properties": {"reason": {"enum": list(AUTH_REASONS)}}}]},
        "DeviceMismatchProblem": {"allOf": [ref("Problem"), _object({
            "reason": {"const": "device_mismatch"},
            "missing": {**indices, "description": "Active recipient devices the request left out."},
            "extra": {**indices, "description": "Devices in the request that are not active."},
        })]},
    }


def schemas() -> dict[str, Schema]:
    """Every named schema of ``#/components/schemas``."""
    return {**_device_schemas(), **_key_schemas(), **_message_schemas(), **_ops_schemas(),
            **_auth_and_problem_schemas()}

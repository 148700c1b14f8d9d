"""Request authentication and errors as OpenAPI components (PROTOCOL.md §3, §4).

The five ``Pqmsg-*`` headers are five ``apiKey`` security schemes that an
operation requires together, and also reusable header parameters carrying
their formats (security schemes have no schema). The canonical string and
the order of reject reasons are documented on the signature scheme.
"""

from __future__ import annotations

from typing import Any

from pqmsg.http.problems import PROBLEM_JSON
from pqmsg.openapi_schemas import AUTH_REASONS, Schema, ref
from pqmsg.protocol.auth import ACCOUNT_RE, DEVICE_RE, NONCE_RE, TIMESTAMP_RE
from pqmsg.protocol.canonical import CANONICAL_VERSION
from pqmsg.settings import AuthSettings, HttpSettings

CANONICAL_STRING_DOC = f"""Canonical string, UTF-8, lines joined with `\\n`, no trailing newline:

```
{CANONICAL_VERSION}
<METHOD upper case>
<path, exactly as sent, percent-encoding untouched>
<raw query string, exactly as sent, empty if none>
<account>
<device>
<timestamp>
<nonce>
<lowercase hex SHA-256 of the raw request body (of the empty string if none)>
```"""


def check_order_doc() -> str:
    auth = AuthSettings()
    return f"""The server checks in this order and rejects with `401` and a `reason`:

1. `malformed`: a header missing, unparsable, or out of range.
2. `skew`: `|server_now - timestamp| > {auth.skew_window_s}` seconds (configurable).
3. `unknown_device`: no such account or device.
4. `revoked`: the device was revoked.
5. `signature`: the signature does not verify.
6. `replay`: this `(account, device, nonce)` was already accepted within the
   replay window (default {auth.replay_window_s} s, always longer than twice the skew window).
   A nonce is recorded only after its signature verified. A send
   (`PUT /v1/messages/{{account}}`) and a bundle fetch check their input
   before the sixth check: bad input is a `400` and records no nonce."""


def _auth_headers() -> tuple[tuple[str, str, Schema, str], ...]:
    """``(security scheme and parameter name, header, schema, description)`` of each header."""
    return (
        ("PqmsgAccount", "Pqmsg-Account", {"type": "string", "pattern": ACCOUNT_RE.pattern},
         "Account UUID (lowercase, hyphenated)."),
        ("PqmsgDevice", "Pqmsg-Device", {"type": "string", "pattern": DEVICE_RE.pattern},
         "Device id, decimal, no leading zeros."),
        ("PqmsgTimestamp", "Pqmsg-Timestamp", {"type": "string", "pattern": TIMESTAMP_RE.pattern},
         "Unix seconds, decimal."),
        ("PqmsgNonce", "Pqmsg-Nonce", {"type": "string", "pattern": NONCE_RE.pattern},
         "16 to 64 characters of base64url, fresh per request."),
        ("PqmsgSignature", "Pqmsg-Signature", ref("RequestSignature"),
         "Base64url ML-DSA-65 signature by the device key over the canonical string."),
    )


def security_schemes() -> dict[str, Any]:
    schemes: dict[str, Any] = {}
    for key, header, _schema, description in _auth_headers():
        schemes[key] = {"type": "apiKey", "in": "header", "name": header,
                        "description": description}
    schemes["PqmsgSignature"]["description"] += (
        "\n\nEvery authenticated request carries all five `Pqmsg-*` headers.\n\n"
        f"{CANONICAL_STRING_DOC}\n\n{check_order_doc()}"
    )
    return schemes


def security_requirement() -> list[dict[str, list[str]]]:
    """All five schemes at once (one requirement object is a logical AND)."""
    return [{key: [] for key, *_ in _auth_headers()}]


def auth_parameters() -> dict[str, Any]:
    return {
        key: {"name": header, "in": "header", "required": True, "schema": schema,
              "description": description}
        for key, header, schema, description in _auth_headers()
    }


def auth_parameter_refs() -> list[dict[str, str]]:
    return [{"$ref": f"#/components/parameters/{key}"} for key, *_ in _auth_headers()]


def headers() -> dict[str, Any]:
    return {
        "X-Request-Id": {"description": "Echo of a safe client X-Request-Id, else generated.",
                         "schema": {"type": "string"}},
        "Retry-After": {"description": "Seconds to wait before retrying.", "required": True,
                        "schema": {"type": "integer", "minimum": 1}},
    }


def _header_refs(*names: str) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


def problem_response(status: int, description: str, schema: str | None = None) -> dict[str, Any]:
    """An ``application/problem+json`` response; 429 and 503 carry Retry-After.

    ``schema`` defaults to ``AuthProblem`` for 401 (reason is one of six) and ``Problem``.
    """
    schema = schema or ("AuthProblem" if status == 401 else "Problem")
    names = ("X-Request-Id", "Retry-After") if status in (429, 503) else ("X-Request-Id",)
    return {
        "description": description,
        "headers": _header_refs(*names),
        "content": {PROBLEM_JSON: {"schema": ref(schema)}},
    }


def json_response(description: str, schema: str | Schema) -> dict[str, Any]:
    """A JSON response; ``schema`` is a name in ``#/components/schemas`` or a schema."""
    body = ref(schema) if isinstance(schema, str) else schema
    return {
        "description": description,
        "headers": _header_refs("X-Request-Id"),
        "content": {"application/json": {"schema": body}},
    }


def empty_response(description: str) -> dict[str, Any]:
    return {"description": description, "headers": _header_refs("X-Request-Id")}


#: Status -> name in ``#/components/responses``.
PROBLEM_NAMES = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
    413: "PayloadTooLarge", 415: "UnsupportedMediaType", 429: "TooManyRequests",
    503: "ServiceUnavailable",
}


def problem_responses() -> dict[str, Any]:
    """The shared error responses; operations refer to these or refine their text."""
    max_body = HttpSettings().max_body_bytes
    reasons = ", ".join(f"`{r}`" for r in AUTH_REASONS)
    texts: dict[int, str] = {
        400: "Bad input; `detail` names the field. Reasons include `bad_json`, `unknown_field`, "
             "`missing_field`, `wrong_type`, `out_of_range`, `too_many`, `bad_base64`, `bad_uuid`, "
             "`bad_path`, `bad_query`, `bad_signature`.",
        401: f"Authentication failed; `reason` is one of {reasons}, checked in that order "
             "(see the PqmsgSignature security scheme).",
        403: "Not allowed (`forbidden`).",
        404: "No such resource (`not_found`).",
        409: "Conflicts with stored state.",
        413: f"The body is larger than {max_body} bytes (2 MiB) (`too_large`).",
        415: "The body is not `application/json` (`unsupported_media_type`). "
             "A missing Content-Type is read as JSON.",
        429: "Rate limited (`rate_limited`); retry after `Retry-After` seconds.",
        503: "Try again after `Retry-After` seconds: the server is at its in-flight limit "
             "(`overloaded`) or a backend is down (`storage_unavailable`, "
             "`replay_cache_unavailable`, `limiter_unavailable`).",
    }
    out = {PROBLEM_NAMES[status]: problem_response(status, text) for status, text in texts.items()}
    out["DeviceMismatch"] = problem_response(
        409, "The `device` values are not exactly the recipient's active devices "
             "(`device_mismatch`); `missing` and `extra` say how to fix the set.",
        "DeviceMismatchProblem")
    return out


"""The error hierarchy: every failure a client can see, with its HTTP shape.

::

    ProblemError                      (status, type, title, reason)
    ├── BadRequest            400     bad_request, bad_base64, bad_signature, ...
    ├── AuthError             401     malformed, skew, unknown_device, revoked,
    │                                 signature, replay
    ├── Forbidden             403     forbidden, provisioning_token
    ├── NotFound              404     not_found
    ├── Conflict              409     duplicate_prekey, prekey_limit, ...
    │   └── DeviceMismatch    409     device_mismatch (+ missing, extra)
    ├── PayloadTooLarge       413     too_large
    ├── RateLimited           429     rate_limited (+ Retry-After)
    └── Unavailable           503     overloaded, unavailable (+ Retry-After)

Each class carries its status, problem type URI and a stable ``reason``
token; :func:`pqmsg.problem.render` turns any of them into RFC 9457
problem+json. Anything that is not a ``ProblemError`` is a bare 500 whose
details go only to the log.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

PROBLEM_BASE = "https://pqmsg.dev/problems/"


class ProblemError(Exception):
    """An error the client is told about, as problem+json."""

    status: int = 400
    kind: ClassVar[str] = "bad-request"
    title: str = "Bad request"
    default_reason: ClassVar[str] = "bad_request"

    def __init__(self, detail: str, *, reason: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason or self.default_reason
        self.extra = extra

    @property
    def type_uri(self) -> str:
        return PROBLEM_BASE + self.kind

    def headers(self) -> dict[str, str]:
        return {}

    def body(self, request_id: str) -> dict[str, Any]:
        return {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "reason": self.reason,
            "request_id": request_id,
            **self.extra,
        }


class BadRequest(ProblemError):
    pass


class AuthError(ProblemError):
    status = 401
    kind = "auth"
    title = "Authentication failed"
    default_reason = "malformed"


#: The detail of each §3 reject that depends on the device's current state.
DEVICE_REJECTS = {
    "unknown_device": "no such account or device",
    "revoked": "this device was revoked",
    "signature": "signature does not verify",
}


def device_reject(reason: str) -> AuthError:
    """The 401 for ``unknown_device``, ``revoked`` or ``signature``."""
    return AuthError(DEVICE_REJECTS[reason], reason=reason)


class Forbidden(ProblemError):
    status = 403
    kind = "forbidden"
    title = "Forbidden"
    default_reason = "forbidden"


class NotFound(ProblemError):
    status = 404
    kind = "not-found"
    title = "Not found"
    default_reason = "not_found"


class MethodNotAllowed(ProblemError):
    status = 405
    kind = "method-not-allowed"
    title = "Method not allowed"
    default_reason = "method_not_allowed"


class Conflict(ProblemError):
    status = 409
    kind = "conflict"
    title = "Conflict"
    default_reason = "conflict"


class DeviceMismatch(Conflict):
    kind = "device-mismatch"
    title = "Device list does not match"
    default_reason = "device_mismatch"

    def __init__(self, missing: list[int], extra: list[int]) -> None:
        super().__init__(
            "the message set must address exactly the recipient's active devices",
            missing=sorted(missing),
            extra=sorted(extra),
        )


class PayloadTooLarge(ProblemError):
    status = 413
    kind = "too-large"
    title = "Payload too large"
    default_reason = "too_large"


class UnsupportedMediaType(ProblemError):
    status = 415
    kind = "unsupported-media-type"
    title = "Unsupported media type"
    default_reason = "unsupported_media_type"


class _RetryLater(ProblemError):
    def __init__(self, detail: str, *, retry_after_s: float, reason: str | None = None) -> None:
        super().__init__(detail, reason=reason)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class RateLimited(_RetryLater):
    status = 429
    kind = "rate-limited"
    title = "Too many requests"
    default_reason = "rate_limited"


class Unavailable(_RetryLater):
    """The server cannot serve this now: overloaded, or a backend is down."""

    status = 503
    kind = "unavailable"
    title = "Service unavailable"
    default_reason = "unavailable"


class HttpError(ProblemError):
    """An HTTP-level error raised by the framework (bad method, bad framing...)."""

    kind = "http"

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail, reason=title.lower().replace(" ", "_"))
        self.status = status
        self.title = title


class StorageUnavailable(Unavailable):
    def __init__(self, detail: str = "the database is unavailable") -> None:
        super().__init__(detail, retry_after_s=2, reason="storage_unavailable")

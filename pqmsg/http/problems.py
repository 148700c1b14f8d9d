"""RFC 9457 problem+json rendering, for Quart responses and for raw ASGI."""

from __future__ import annotations

import json
from typing import Any

from pqmsg.errors import ProblemError

PROBLEM_JSON = "application/problem+json"


def problem_body(error: ProblemError, request_id: str) -> bytes:
    return json.dumps(error.body(request_id), separators=(",", ":")).encode()


def internal_error_body(request_id: str) -> bytes:
    """The bare 500: no detail of what went wrong reaches the client."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": "Internal Server Error",
        "status": 500,
        "request_id": request_id,
    }
    return json.dumps(body, separators=(",", ":")).encode()

"""The names of audit events and their outcomes.

An event name is ``<subject>.<what happened>`` in lower snake case; it is a
stable token that dashboards and incident queries match on, so a name is
never reused for something else. Callers use these constants rather than
string literals.
"""

from __future__ import annotations

import re
from typing import Final

ACCOUNT_REGISTERED: Final = "account.registered"
ACCOUNT_DELETED: Final = "account.deleted"

AUTH_REJECTED: Final = "auth.rejected"
"""A signed request failed authentication; ``detail.reason`` says why."""
AUTH_REPLAY: Final = "auth.replay"
"""A correctly signed request reused a nonce (an active attack signal)."""

DEVICE_PROVISIONING_STARTED: Final = "device.provisioning_started"
DEVICE_LINKED: Final = "device.linked"
DEVICE_REVOKED: Final = "device.revoked"

KEYS_UPLOADED: Final = "keys.uploaded"
KEYS_LAST_RESORT_SERVED: Final = "keys.last_resort_served"

RATE_LIMIT_REJECTED: Final = "rate_limit.rejected"

PUSH_TOKEN_SET: Final = "push.token_set"
PUSH_TOKEN_DROPPED: Final = "push.token_dropped"

EVENTS: Final = frozenset(
    {
        ACCOUNT_REGISTERED,
        ACCOUNT_DELETED,
        AUTH_REJECTED,
        AUTH_REPLAY,
        DEVICE_PROVISIONING_STARTED,
        DEVICE_LINKED,
        DEVICE_REVOKED,
        KEYS_UPLOADED,
        KEYS_LAST_RESORT_SERVED,
        RATE_LIMIT_REJECTED,
        PUSH_TOKEN_SET,
        PUSH_TOKEN_DROPPED,
    }
)
"""Every event this server records."""

OUTCOME_OK: Final = "ok"
OUTCOME_REJECTED: Final = "rejected"
"""The server refused the request (bad input, failed check, limit)."""
OUTCOME_FAILED: Final = "failed"
"""The server tried and could not (a backend or provider error)."""

_EVENT_RE: Final = re.compile(r"[a-z][a-z_]*\.[a-z][a-z_]*")
_OUTCOME_RE: Final = re.compile(r"[a-z][a-z_]{0,31}")


def check_event(event: str) -> str:
    """``event`` if it is a well-formed event name, else :class:`ValueError`."""
    if not _EVENT_RE.fullmatch(event):
        raise ValueError(f"not an audit event name: {event!r}")
    return event


def check_outcome(outcome: str) -> str:
    """``outcome`` if it is a well-formed outcome token, else :class:`ValueError`."""
    if not _OUTCOME_RE.fullmatch(outcome):
        raise ValueError(f"not an audit outcome: {outcome!r}")
    return outcome

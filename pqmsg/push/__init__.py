"""Content-free wake-ups through FCM and APNs.

::

    pqmsg.nurseries.push     the dispatcher service: queue, workers, coalescing
    ├── pqmsg.push.fcm       FCM HTTP v1 sender (OAuth2 service-account token)
    ├── pqmsg.push.apns      APNs sender (ES256 provider token)
    │   └── pqmsg.push.jwt   RS256 / ES256 JWT signing
    └── pqmsg.push.breaker   one circuit breaker per provider

A sender turns one wake-up into one :data:`PushOutcome` and never raises
for anything the network or the provider does: transport errors, HTTP
errors and malformed answers are translated here, at the edge. How long a
send may take is the caller's business (a cancel scope around ``send``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final, Literal, Protocol

import httpx

from pqmsg.storage.base import PushProvider

#: What became of one wake-up that reached a provider:
#:
#: - ``sent``: the provider accepted it.
#: - ``dead_token``: the provider says the token is gone for good; the
#:   dispatcher drops it from storage.
#: - ``failed``: the provider is unwell or unreachable (HTTP 429 or 5xx,
#:   timeout, refused or dropped connection, malformed answer). Counts as a
#:   failure for the provider's circuit breaker.
#: - ``rejected``: the provider answered and refused this request (any other
#:   4xx, including our credentials being refused). The provider is
#:   reachable and answering, so this counts as a *success* for the
#:   breaker: opening it would not help, and a half-open probe that gets a
#:   clear answer has shown the provider is back. Rejections are logged.
PushOutcome = Literal["sent", "dead_token", "failed", "rejected"]

PROVIDERS: Final[tuple[PushProvider, ...]] = ("fcm", "apns")


class PushSender(Protocol):
    """Sends one content-free wake-up to one device token."""

    @property
    def provider(self) -> PushProvider: ...

    async def send(self, token: str) -> PushOutcome:
        """Deliver a wake-up; never raises except for cancellation."""
        ...


class ProviderAnswer(Exception):
    """Internal short cut: a step of a send already settled its outcome."""

    def __init__(self, outcome: PushOutcome, why: str) -> None:
        super().__init__(why)
        self.outcome = outcome


def is_provider_failure(status: int) -> bool:
    """HTTP statuses that mean the provider, not our request, is the problem."""
    return status in (408, 429) or status >= 500


def json_object(response: httpx.Response) -> Mapping[str, Any]:
    """The response body as a JSON object, or empty if it is anything else."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}

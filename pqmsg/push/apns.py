"""APNs sender: HTTP/2 with token-based (ES256 JWT) authentication.

A wake-up is ``POST {endpoint}/3/device/{token}`` with a background
notification: body ``{"aps": {"content-available": 1}}`` and headers
``authorization: bearer <provider token>``, ``apns-topic``,
``apns-push-type: background`` and ``apns-priority: 5`` (APNs requires
priority 5 for background pushes).

The provider token is a JWT signed ES256 with the ``.p8`` key: header
``{"alg": "ES256", "kid": key id}``, claims ``{"iss": team id, "iat": now}``.
APNs rejects tokens older than an hour and throttles providers that make
new ones too often (``TooManyProviderTokenUpdates``), so one token is
shared by every request for :data:`PROVIDER_TOKEN_REUSE_S` (50 minutes).
If APNs answers ``ExpiredProviderToken`` to a cached token, a new one is
made and the send retried once.

Outcomes (see :data:`pqmsg.push.PushOutcome`): 200 is ``sent``; 410 (the
documented ``Unregistered`` and ``ExpiredToken`` reasons) and 400
``BadDeviceToken`` are ``dead_token``; 408, 429 and 5xx are ``failed``;
other 4xx (``BadTopic``, ``InvalidProviderToken``, ...) are ``rejected``.
"""

from __future__ import annotations

import logging
from typing import Final, final
from urllib.parse import quote

import attrs
import httpx
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pqmsg.clock import WallClock
from pqmsg.push import ProviderAnswer, PushOutcome, is_provider_failure, json_object
from pqmsg.push.jwt import encode_es256
from pqmsg.settings import PushSettings, SettingsError
from pqmsg.storage.base import PushProvider

log = logging.getLogger(__name__)

PROVIDER_TOKEN_REUSE_S: Final = 50 * 60.0
WAKE_BODY: Final = {"aps": {"content-available": 1}}
BACKGROUND_PRIORITY: Final = "5"
DEAD_TOKEN_400_REASONS: Final = frozenset({"BadDeviceToken"})


@attrs.frozen
class ApnsKey:
    """The token-signing key from the developer account, with its ids."""

    key_id: str
    team_id: str
    private_key: ec.EllipticCurvePrivateKey = attrs.field(repr=False)

    @classmethod
    def from_p8(cls, raw: bytes, *, key_id: str, team_id: str) -> ApnsKey:
        """Parse a ``.p8`` (PKCS#8 PEM, P-256) key; :class:`SettingsError` if it is not one."""
        try:
            key = serialization.load_pem_private_key(raw, password=None)
        except (ValueError, TypeError) as exc:
            raise SettingsError(f"PQMSG_APNS_KEY_FILE: not a .p8 key ({exc!r})") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise SettingsError("PQMSG_APNS_KEY_FILE: not a P-256 (ES256) key")
        return cls(key_id, team_id, key)


async def apns_sender_from_settings(
    settings: PushSettings, client: httpx.AsyncClient, *, clock: WallClock
) -> ApnsSender | None:
    """An :class:`ApnsSender`, or None when APNs is not configured."""
    if settings.apns_key_file is None:
        return None
    if not (settings.apns_key_id and settings.apns_team_id and settings.apns_topic):
        raise SettingsError(
            "PQMSG_APNS_KEY_FILE needs PQMSG_APNS_KEY_ID, PQMSG_APNS_TEAM_ID and PQMSG_APNS_TOPIC"
        )
    try:
        raw = await trio.Path(settings.apns_key_file).read_bytes()
    except OSError as exc:
        raise SettingsError(f"PQMSG_APNS_KEY_FILE: cannot read it ({exc.strerror})") from exc
    key = ApnsKey.from_p8(raw, key_id=settings.apns_key_id, team_id=settings.apns_team_id)
    return ApnsSender(
        client, key, endpoint=settings.apns_endpoint, topic=settings.apns_topic, clock=clock
    )


@final
class ApnsSender:
    """Sends wake-ups through APNs; see the module docstring."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        key: ApnsKey,
        *,
        endpoint: str,
        topic: str,
        clock: WallClock,
    ) -> None:
        self._client = client
        self._key = key
        self._base = f"{endpoint.rstrip('/')}/3/device/"
        self._topic = topic
        self._clock = clock
        self._jwt: str | None = None
        self._jwt_made_at = 0.0

    @property
    def provider(self) -> PushProvider:
        return "apns"

    async def send(self, token: str) -> PushOutcome:
        # Tokens come from clients: quote them so one can only name a path segment.
        url = self._base + quote(token, safe="")
        try:
            jwt, cached = self._provider_token()
            response = await self._post(url, jwt)
            if cached and _reason(response) == "ExpiredProviderToken":
                self._forget(jwt)
                jwt, _ = self._provider_token()
                response = await self._post(url, jwt)
        except ProviderAnswer as answer:
            log.warning("apns: %s (%s)", answer, answer.outcome)
            return answer.outcome
        return _outcome(response)

    async def _post(self, url: str, jwt: str) -> httpx.Response:
        headers = {
            "authorization": f"bearer {jwt}",
            "apns-topic": self._topic,
            "apns-push-type": "background",
            "apns-priority": BACKGROUND_PRIORITY,
        }
        try:
            return await self._client.post(url, json=WAKE_BODY, headers=headers)
        except httpx.RequestError as exc:
            raise ProviderAnswer("failed", f"send: {type(exc).__name__}") from exc

    def _provider_token(self) -> tuple[str, bool]:
        """The provider JWT and whether it was reused."""
        if (
            self._jwt is not None
            and trio.current_time() < self._jwt_made_at + PROVIDER_TOKEN_REUSE_S
        ):
            return self._jwt, True
        claims = {"iss": self._key.team_id, "iat": int(self._clock())}
        self._jwt = encode_es256(claims, self._key.private_key, kid=self._key.key_id)
        self._jwt_made_at = trio.current_time()
        return self._jwt, False

    def _forget(self, jwt: str) -> None:
        if self._jwt == jwt:
            self._jwt = None


def _reason(response: httpx.Response) -> str | None:
    reason = json_object(response).get("reason")
    return reason if isinstance(reason, str) else None


def _outcome(response: httpx.Response) -> PushOutcome:
    status = response.status_code
    if status == 200:
        return "sent"
    reason = _reason(response)
    if status == 410 or (status == 400 and reason in DEAD_TOKEN_400_REASONS):
        return "dead_token"
    outcome: PushOutcome = "failed" if is_provider_failure(status) else "rejected"
    log.warning("apns: send answered %d %s (%s)", status, reason, outcome)
    return outcome

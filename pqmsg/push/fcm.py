"""FCM HTTP v1 sender with a service-account OAuth2 token.

A wake-up is ``POST {endpoint}/v1/projects/{project}/messages:send`` with
a data-only, high-priority message (no notification, no content)::

    {"message": {"token": T, "data": {"pqmsg": "wake"},
                 "android": {"priority": "high"}}}

Authorization is a bearer access token from the OAuth2 token endpoint
(``PushSettings.fcm_token_url``), obtained with the JWT-bearer grant
(RFC 7523): an RS256 assertion signed with the service account's key, for
the ``firebase.messaging`` scope. The token is cached and shared by every
worker (one fetch at a time) until :data:`TOKEN_REFRESH_MARGIN_S` before
it expires; if FCM answers 401 to a cached token it is fetched again and
the send retried once.

Outcomes (see :data:`pqmsg.push.PushOutcome`): 2xx is ``sent``; the
documented ``UNREGISTERED`` error code (HTTP 404) is ``dead_token``. A 404
without that code is only ``rejected``: a wrong project id also gives 404,
and dropping every token for a configuration mistake would be
unrecoverable. 408, 429 and 5xx, and the same from the token endpoint, are
``failed``; other 4xx are ``rejected``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Final, final
from urllib.parse import quote

import attrs
import httpx
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pqmsg.clock import WallClock
from pqmsg.push import ProviderAnswer, PushOutcome, is_provider_failure, json_object
from pqmsg.push.jwt import encode_rs256
from pqmsg.settings import PushSettings, SettingsError
from pqmsg.storage.base import PushProvider

log = logging.getLogger(__name__)

FCM_SCOPE: Final = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR_TYPE: Final = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
ASSERTION_LIFETIME_S: Final = 3600
TOKEN_REFRESH_MARGIN_S: Final = 300.0
WAKE_DATA: Final = {"pqmsg": "wake"}


@attrs.frozen
class ServiceAccount:
    """The parts of a Google service-account JSON key that FCM needs."""

    client_email: str
    project_id: str
    private_key: rsa.RSAPrivateKey = attrs.field(repr=False)
    private_key_id: str | None = None

    @classmethod
    def from_json(cls, raw: bytes) -> ServiceAccount:
        """Parse the JSON key file; :class:`SettingsError` says what is wrong."""
        try:
            data = json.loads(raw)
            email, project, pem = data["client_email"], data["project_id"], data["private_key"]
            key = serialization.load_pem_private_key(pem.encode(), password=None)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SettingsError(
                f"PQMSG_FCM_CREDENTIALS: not a service-account key ({exc!r})"
            ) from exc
        if not isinstance(key, rsa.RSAPrivateKey):
            raise SettingsError("PQMSG_FCM_CREDENTIALS: private_key is not an RSA key")
        if not (isinstance(email, str) and isinstance(project, str) and email and project):
            raise SettingsError("PQMSG_FCM_CREDENTIALS: client_email and project_id must be set")
        kid = data.get("private_key_id")
        return cls(email, project, key, kid if isinstance(kid, str) else None)


async def fcm_sender_from_settings(
    settings: PushSettings, client: httpx.AsyncClient, *, clock: WallClock
) -> FcmSender | None:
    """An :class:`FcmSender`, or None when FCM is not configured."""
    if settings.fcm_credentials is None:
        return None
    try:
        raw = await trio.Path(settings.fcm_credentials).read_bytes()
    except OSError as exc:
        raise SettingsError(f"PQMSG_FCM_CREDENTIALS: cannot read it ({exc.strerror})") from exc
    return FcmSender(
        client,
        ServiceAccount.from_json(raw),
        endpoint=settings.fcm_endpoint,
        token_url=settings.fcm_token_url,
        clock=clock,
    )


@final
class FcmSender:
    """Sends wake-ups through FCM HTTP v1; see the module docstring."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        account: ServiceAccount,
        *,
        endpoint: str,
        token_url: str,
        clock: WallClock,
    ) -> None:
        self._client = client
        self._account = account
        self._token_url = token_url
        self._clock = clock
        project = quote(account.project_id, safe="")
        self._send_url = f"{endpoint.rstrip('/')}/v1/projects/{project}/messages:send"
        self._lock = trio.Lock()
        self._bearer: str | None = None
        self._refresh_at = 0.0

    @property
    def provider(self) -> PushProvider:
        return "fcm"

    async def send(self, token: str) -> PushOutcome:
        message = {"token": token, "data": WAKE_DATA, "android": {"priority": "high"}}
        try:
            bearer, cached = await self._access_token()
            response = await self._post(message, bearer)
            if response.status_code == 401 and cached:
                # Revoked early, or our clock is off: a fresh token, once.
                self._forget(bearer)
                bearer, _ = await self._access_token()
                response = await self._post(message, bearer)
        except ProviderAnswer as answer:
            log.warning("fcm: %s (%s)", answer, answer.outcome)
            return answer.outcome
        return _outcome(response)

    async def _post(self, message: Mapping[str, Any], bearer: str) -> httpx.Response:
        try:
            return await self._client.post(
                self._send_url,
                json={"message": message},
                headers={"authorization": f"Bearer {bearer}"},
            )
        except httpx.RequestError as exc:
            raise ProviderAnswer("failed", f"send: {type(exc).__name__}") from exc

    async def _access_token(self) -> tuple[str, bool]:
        """The bearer token and whether it came from the cache."""
        async with self._lock:
            if self._bearer is not None and trio.current_time() < self._refresh_at:
                return self._bearer, True
            bearer, lifetime_s = await self._fetch_token()
            self._bearer = bearer
            margin_s = min(TOKEN_REFRESH_MARGIN_S, lifetime_s / 2)
            self._refresh_at = trio.current_time() + lifetime_s - margin_s
            return bearer, False

    def _forget(self, bearer: str) -> None:
        if self._bearer == bearer:
            self._bearer = None

    async def _fetch_token(self) -> tuple[str, float]:
        now = int(self._clock())
        claims = {
            "iss": self._account.client_email,
            "scope": FCM_SCOPE,
            "aud": self._token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_S,
        }
        assertion = encode_rs256(
            claims, self._account.private_key, kid=self._account.private_key_id
        )
        form = {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}
        try:
            response = await self._client.post(self._token_url, data=form)
        except httpx.RequestError as exc:
            raise ProviderAnswer("failed", f"token endpoint: {type(exc).__name__}") from exc
        body = json_object(response)
        if response.status_code != 200:
            outcome: PushOutcome = (
                "failed" if is_provider_failure(response.status_code) else "rejected"
            )
            error = body.get("error")
            raise ProviderAnswer(outcome, f"token endpoint: {response.status_code} {error!r:.80}")
        bearer, lifetime_s = body.get("access_token"), body.get("expires_in")
        if not (isinstance(bearer, str) and bearer and isinstance(lifetime_s, int | float)):
            raise ProviderAnswer("failed", "token endpoint: malformed answer")
        if lifetime_s <= 0:
            raise ProviderAnswer("failed", "token endpoint: token already expired")
        return bearer, float(lifetime_s)


def _outcome(response: httpx.Response) -> PushOutcome:
    status = response.status_code
    if 200 <= status < 300:
        return "sent"
    error = json_object(response).get("error")
    codes = _error_codes(error)
    if "UNREGISTERED" in codes:
        return "dead_token"
    outcome: PushOutcome = "failed" if is_provider_failure(status) else "rejected"
    status_name = error.get("status") if isinstance(error, dict) else None
    log.warning("fcm: send answered %d %s %s (%s)", status, status_name, sorted(codes), outcome)
    return outcome


def _error_codes(error: object) -> set[str]:
    """The ``FcmError.errorCode`` values of a google.rpc.Status error body."""
    if not isinstance(error, dict) or not isinstance(error.get("details"), list):
        return set()
    return {
        detail["errorCode"]
        for detail in error["details"]
        if isinstance(detail, dict)
        and detail.get("@type") == FCM_ERROR_TYPE
        and isinstance(detail.get("errorCode"), str)
    }

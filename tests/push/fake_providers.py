"""FCM and APNs as real HTTP/2 servers on loopback, for the push tests.

Served by :mod:`tests.push.fake_http` (HTTP/2 over TLS, scripted replies,
dropped connections). The apps check requests the way the providers
document it and answer with the documented bodies:

- FCM: the OAuth2 token endpoint verifies the RS256 JWT-bearer assertion
  with the service account's public key; ``messages:send`` checks the
  bearer token and the message, answers 200 ``{"name": ...}``, 404
  ``UNREGISTERED`` for tokens in ``unregistered``, 404 ``NOT_FOUND``
  for another project, and 401 ``UNAUTHENTICATED`` for unknown or
  expired bearer tokens.
- APNs: ``/3/device/{token}`` verifies the ES256 provider token, its age
  and the ``apns-*`` headers; answers 200 with ``apns-id``, 400
  ``BadDeviceToken`` for malformed tokens, 410 ``Unregistered`` for tokens
  in ``unregistered``, 404 ``BadPath`` elsewhere.
"""

from __future__ import annotations

import collections
import itertools
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import quart
import trio
import trustme
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from quart_trio import QuartTrio

from tests.push.fake_http import (
    FakeServer,
    JwtRejected,
    Received,
    Reply,
    answer,
    make_app,
    record,
    respond,
    serve,
    verify_jwt,
)

WallClock = Callable[[], float]

FCM_SCOPE: Final = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR_TYPE: Final = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
APNS_TOKEN_MAX_AGE_S: Final = 3600
APNS_DEVICE_TOKEN: Final = re.compile(r"[0-9a-f]{64}")
FCM_PROJECT_ID: Final = "pqmsg-test"
FCM_CLIENT_EMAIL: Final = "push@pqmsg-test.iam.gserviceaccount.com"
APNS_TEAM_ID: Final = "TEAM123456"
APNS_KEY_ID: Final = "KEY1234567"
APNS_TOPIC: Final = "dev.pqmsg.app"


def fcm_error(
    code: int, status: str, message: str, *, error_code: str | None = None, **headers: str
) -> Reply:
    """A google.rpc.Status error body, as FCM HTTP v1 documents it."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if error_code is not None:
        error["details"] = [{"@type": FCM_ERROR_TYPE, "errorCode": error_code}]
    return Reply(code, {"error": error}, headers)


def apns_error(
    status: int, reason: str, *, timestamp_ms: int | None = None, **headers: str
) -> Reply:
    """An APNs error body ``{"reason": ...}`` (410 adds ``timestamp``)."""
    body: dict[str, Any] = {"reason": reason}
    if timestamp_ms is not None:
        body["timestamp"] = timestamp_ms
    return Reply(status, body, headers)


FCM_UNREGISTERED: Final = fcm_error(
    404, "NOT_FOUND", "Requested entity was not found.", error_code="UNREGISTERED"
)
FCM_QUOTA: Final = fcm_error(
    429, "RESOURCE_EXHAUSTED", "Quota exceeded.", error_code="QUOTA_EXCEEDED", retry_after="60"
)
FCM_UNAVAILABLE: Final = fcm_error(
    503,
    "UNAVAILABLE",
    "The service is currently unavailable.",
    error_code="UNAVAILABLE",
    retry_after="30",
)
FCM_INVALID_ARGUMENT: Final = fcm_error(
    400, "INVALID_ARGUMENT", "Request contains an invalid argument.", error_code="INVALID_ARGUMENT"
)
APNS_UNAVAILABLE: Final = apns_error(503, "ServiceUnavailable", retry_after="30")
APNS_TOO_MANY: Final = apns_error(429, "TooManyRequests")


# -- FCM --------------------------------------------------------------------


@attrs.define
class FakeFcm(FakeServer):
    """FCM HTTP v1 and Google's OAuth2 token endpoint on one origin."""

    project_id: str = FCM_PROJECT_ID
    client_email: str = FCM_CLIENT_EMAIL
    public_key: rsa.RSAPublicKey | None = None
    now: WallClock = lambda: 0.0
    token_lifetime_s: int = 3599
    token_replies: collections.deque[Reply] = attrs.field(factory=collections.deque)
    token_requests: list[Received] = attrs.field(factory=list)
    # Issued access token -> trio time it expires at.
    issued: dict[str, float] = attrs.field(factory=dict)
    _ids: itertools.count[int] = attrs.field(factory=itertools.count)

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    def revoke_tokens(self) -> None:
        self.issued.clear()


def _fcm_app(fake: FakeFcm) -> QuartTrio:
    app = make_app(fake)

    @app.post("/token")
    async def token() -> quart.Response:
        form = await quart.request.form
        try:
            if form.get("grant_type") != JWT_BEARER:
                raise JwtRejected("grant_type")
            assert fake.public_key is not None
            header, claims = verify_jwt(form.get("assertion", ""), "RS256", fake.public_key)
            _check_assertion(fake, claims)
        except JwtRejected as exc:
            header, claims = {}, {}
            reply: Reply | None = Reply(
                400, {"error": "invalid_grant", "error_description": str(exc)}
            )
        else:
            reply = fake.token_replies.popleft() if fake.token_replies else None
        fake.token_requests.append(await record(jwt_header=header, jwt_claims=claims))
        if reply is None:
            access = f"ya29.fake-{next(fake._ids)}"
            fake.issued[access] = trio.current_time() + fake.token_lifetime_s
            body = {
                "access_token": access,
                "expires_in": fake.token_lifetime_s,
                "token_type": "Bearer",
            }
            reply = Reply(200, body)
        return await answer(fake, reply)

    @app.post("/v1/projects/<project>/messages:send")
    async def send(project: str) -> quart.Response:
        fake.sent.append(received := await record())
        bearer = received.headers.get("authorization", "").removeprefix("Bearer ")
        if fake.issued.get(bearer, -1.0) <= trio.current_time():
            return await answer(
                fake,
                fcm_error(
                    401, "UNAUTHENTICATED", "Request had invalid authentication credentials."
                ),
            )
        if project != fake.project_id:
            return await answer(
                fake, fcm_error(404, "NOT_FOUND", "Requested entity was not found.")
            )
        message = json.loads(received.body).get("message", {})
        if not isinstance(message.get("token"), str):
            return await answer(fake, FCM_INVALID_ARGUMENT)
        if (reply := fake.next_reply()) is None:
            name = f"projects/{project}/messages/{next(fake._ids)}"
            reply = (
                FCM_UNREGISTERED
                if message["token"] in fake.unregistered
                else Reply(200, {"name": name})
            )
        return await answer(fake, reply)

    return app


def _check_assertion(fake: FakeFcm, claims: Mapping[str, Any]) -> None:
    now = fake.now()
    if claims.get("iss") != fake.client_email:
        raise JwtRejected("iss")
    if claims.get("aud") != fake.token_url:
        raise JwtRejected("aud")
    if FCM_SCOPE not in str(claims.get("scope", "")).split():
        raise JwtRejected("scope")
    iat, exp = claims.get("iat"), claims.get("exp")
    if not (isinstance(iat, int) and isinstance(exp, int)):
        raise JwtRejected("iat/exp")
    if not (iat - 60 <= now < exp) or exp - iat > 3600:
        raise JwtRejected(
            "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe"
        )


@asynccontextmanager
async def open_fake_fcm(
    ca: trustme.CA, public_key: rsa.RSAPublicKey, *, now: WallClock
) -> AsyncIterator[FakeFcm]:
    fake = FakeFcm(public_key=public_key, now=now)
    async with serve(_fcm_app(fake), ca) as served:
        fake.url, fake.front = served.url, served.front
        yield fake


# -- APNs -------------------------------------------------------------------


@attrs.define
class FakeApns(FakeServer):
    """APNs' HTTP/2 provider API."""

    team_id: str = APNS_TEAM_ID
    key_id: str = APNS_KEY_ID
    topic: str = APNS_TOPIC
    public_key: ec.EllipticCurvePublicKey | None = None
    now: WallClock = lambda: 0.0


def _apns_app(fake: FakeApns) -> QuartTrio:
    app = make_app(fake)

    @app.errorhandler(404)
    async def bad_path(error: Exception) -> quart.Response:
        # Hypercorn trips over request DATA that arrives after the answer.
        await quart.request.get_data()
        return respond(apns_error(404, "BadPath"))

    @app.post("/3/device/<token>")
    async def push(token: str) -> quart.Response:
        apns_id = quart.request.headers.get("apns-id") or str(uuid.uuid4()).upper()
        header: dict[str, Any] | None = None
        claims: dict[str, Any] | None = None
        auth = quart.request.headers.get("authorization", "")
        reply: Reply | None = None
        try:
            scheme, _, jwt = auth.partition(" ")
            if scheme.lower() != "bearer" or not jwt:
                reply = apns_error(403, "MissingProviderToken")
            else:
                assert fake.public_key is not None
                header, claims = verify_jwt(jwt, "ES256", fake.public_key)
        except JwtRejected:
            reply = apns_error(403, "InvalidProviderToken")
        fake.sent.append(received := await record(jwt_header=header, jwt_claims=claims))
        reply = reply or _apns_check(fake, received, token)
        if reply is None:
            reply = fake.next_reply() or Reply(200)
        return await answer(fake, reply, apns_id=apns_id)

    return app


def _apns_check(fake: FakeApns, received: Received, token: str) -> Reply | None:
    headers, header, claims = received.headers, received.jwt_header or {}, received.jwt_claims or {}
    if header.get("kid") != fake.key_id or claims.get("iss") != fake.team_id:
        return apns_error(403, "InvalidProviderToken")
    if not isinstance(claims.get("iat"), int) or fake.now() - claims["iat"] > APNS_TOKEN_MAX_AGE_S:
        return apns_error(403, "ExpiredProviderToken")
    if "apns-topic" not in headers:
        return apns_error(400, "MissingTopic")
    if headers["apns-topic"] != fake.topic:
        return apns_error(400, "BadTopic")
    if headers.get("apns-push-type") == "background" and headers.get("apns-priority") != "5":
        return apns_error(400, "BadPriority")
    if not received.body:
        return apns_error(400, "PayloadEmpty")
    if not APNS_DEVICE_TOKEN.fullmatch(token):
        return apns_error(400, "BadDeviceToken")
    if token in fake.unregistered:
        return apns_error(410, "Unregistered", timestamp_ms=int(fake.now() * 1000))
    return None


@asynccontextmanager
async def open_fake_apns(
    ca: trustme.CA, public_key: ec.EllipticCurvePublicKey, *, now: WallClock
) -> AsyncIterator[FakeApns]:
    fake = FakeApns(public_key=public_key, now=now)
    async with serve(_apns_app(fake), ca) as served:
        fake.url, fake.front = served.url, served.front
        yield fake

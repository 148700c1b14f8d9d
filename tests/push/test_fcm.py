"""The FCM sender against a real HTTP/2 FCM fake on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
import trio.testing
import trustme
from cryptography.hazmat.primitives.asymmetric import rsa

from pqmsg.push.fcm import FcmSender, ServiceAccount
from tests.push.conftest import EPOCH_S, service_account_json
from tests.push.fake_http import DROP, Reply
from tests.push.fake_providers import (
    FCM_INVALID_ARGUMENT,
    FCM_QUOTA,
    FCM_SCOPE,
    FCM_UNAVAILABLE,
    FCM_UNREGISTERED,
    FakeFcm,
    fcm_error,
    open_fake_fcm,
)

DEADLINE_S = 60


@asynccontextmanager
async def fcm_world(
    ca: trustme.CA,
    rsa_key: rsa.RSAPrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> AsyncIterator[tuple[FakeFcm, FcmSender]]:
    async with open_fake_fcm(ca, rsa_key.public_key(), now=wall_clock) as fcm:
        account = ServiceAccount.from_json(
            service_account_json(rsa_key, project_id=fcm.project_id, client_email=fcm.client_email)
        )
        async with http_client_factory() as client:
            yield (
                fcm,
                FcmSender(
                    client, account, endpoint=fcm.url, token_url=fcm.token_url, clock=wall_clock
                ),
            )


async def test_wake_up_has_the_documented_shape(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    rsa_key: rsa.RSAPrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with fcm_world(ca, rsa_key, wall_clock, http_client_factory) as (fcm, sender):
            outcome = await sender.send("device-token-1")

    assert outcome == "sent"
    (token_request,) = fcm.token_requests
    assert token_request.http_version == "2"
    assert token_request.jwt_claims is not None
    assert token_request.jwt_claims["scope"] == FCM_SCOPE
    (sent,) = fcm.sent
    assert sent.http_version == "2"
    assert sent.path == f"/v1/projects/{fcm.project_id}/messages:send"
    assert sent.headers["authorization"] == f"Bearer {next(iter(fcm.issued))}"
    assert sent.json() == {
        "message": {
            "token": "device-token-1",
            "data": {"pqmsg": "wake"},
            "android": {"priority": "high"},
        }
    }


async def test_access_token_is_cached_until_shortly_before_expiry(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    rsa_key: rsa.RSAPrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    fetched = []
    with trio.fail_after(3300 + DEADLINE_S):
        async with fcm_world(ca, rsa_key, wall_clock, http_client_factory) as (fcm, sender):
            # The fake's tokens live 3599 s; refreshed 300 s early.
            for at in (0.0, 3298.0, 3300.0):
                await trio.sleep_until(at)
                assert await sender.send("device-token-1") == "sent"
                fetched.append(len(fcm.token_requests))

    assert fetched == [1, 1, 2]
    bearers = {sent.headers["authorization"] for sent in fcm.sent}
    assert len(bearers) == 2
    first = fcm.token_requests[0]
    assert first.jwt_header == {"alg": "RS256", "typ": "JWT", "kid": "0123456789abcdef"}
    assert first.jwt_claims == {
        "iss": fcm.client_email,
        "scope": FCM_SCOPE,
        "aud": fcm.token_url,
        "iat": int(EPOCH_S),
        "exp": int(EPOCH_S) + 3600,
    }
    assert first.headers["content-type"] == "application/x-www-form-urlencoded"


async def test_a_refused_cached_token_is_fetched_again_once(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    rsa_key: rsa.RSAPrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with fcm_world(ca, rsa_key, wall_clock, http_client_factory) as (fcm, sender):
            assert await sender.send("device-token-1") == "sent"
            fcm.revoke_tokens()
            outcome = await sender.send("device-token-1")

    assert outcome == "sent"
    assert len(fcm.token_requests) == 2
    assert [
        s.headers["authorization"] == fcm.sent[0].headers["authorization"] for s in fcm.sent
    ] == [
        True,
        True,
        False,
    ]


async def test_unregistered_token_is_dead(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    rsa_key: rsa.RSAPrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with fcm_world(ca, rsa_key, wall_clock, http_client_factory) as (fcm, sender):
            fcm.unregistered.add("gone")
            outcomes = [await sender.send("gone"), await sender.send("still-here")]

    assert outcomes == ["dead_token", "sent"]


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (FCM_UNREGISTERED, "dead_token"),
        (FCM_QUOTA, "failed"),
        (FCM_UNAVAILABLE, "failed"),
        (fcm_error(500, "INTERNAL", "Internal error.", error_code="INTERNAL"), "failed"),
        (Reply(502, None), "failed"),
        (FCM_INVALID_ARGUMENT, "rejected"),
        (
            fcm_error(
                403, "PERMISSION_DENIED", "SenderId mismatch", error_code="SENDER_ID_MISMATCH"
            ),
            "rejected",
        ),
        (fcm_error(404, "NOT_FOUND", "Requested entity was not found."), "rejected"),
        (Reply(200, {"name": "projects/p/messages/1"}), "sent"),
    ],
)
async def test_provider_answers_map_to_outcomes(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    rsa_key: rsa.RSAPrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
    reply: Reply,
    outcome: str,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with fcm_world(ca, rsa_key, wall_clock, http_client_factory) as (fcm, sender):
            fcm.queue(reply)
            got = await sender.send("device-token-1")

    assert got == outcome


async def test_wrong_project_is_rejected_not_dead(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    rsa_key: rsa.RSAPrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_fake_fcm(ca, rsa_key.public_key(), now=wall_clock) as fcm:
            account = ServiceAccount.from_json(
                service_account_json(rsa_key, project_id="typo", client_email=fcm.client_email)
            )
            async with http_client_factory() as client:
                sender = FcmSender(
                    client, account, endpoint=fcm.url, token_url=fcm.token_url, clock=wall_clock
                )
                outcome = await sender.send("device-token-1")

    assert outcome == "rejected"
    assert fcm.sent[0].path == "/v1/projects/typo/messages:send"


@pytest.mark.parametrize(
    ("token_reply", "outcome"),
    [
        (Reply(503, {"error": "internal_failure"}), "failed"),
        (Reply(429, {"error": "rate_limit_exceeded"}), "failed"),
        (Reply(200, {"token_type": "Bearer"}), "failed"),  # no access_token
        (Reply(400, {"error": "invalid_grant", "error_description": "Invalid JWT"}), "rejected"),
        (DROP, "failed"),
    ],
)
async def test_token_endpoint_trouble(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    rsa_key: rsa.RSAPrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
    token_reply: Reply,
    outcome: str,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with fcm_world(ca, rsa_key, wall_clock, http_client_factory) as (fcm, sender):
            fcm.token_replies.append(token_reply)
            first = await sender.send("device-token-1")
            second = await sender.send("device-token-1")

    assert (first, second) == (outcome, "sent")
    assert len(fcm.sent) == 1  # nothing was sent without a token


async def test_an_assertion_signed_with_another_key_is_refused(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    rsa_key: rsa.RSAPrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with trio.fail_after(DEADLINE_S):
        async with open_fake_fcm(ca, other.public_key(), now=wall_clock) as fcm:
            account = ServiceAccount.from_json(
                service_account_json(
                    rsa_key, project_id=fcm.project_id, client_email=fcm.client_email
                )
            )
            async with http_client_factory() as client:
                sender = FcmSender(
                    client, account, endpoint=fcm.url, token_url=fcm.token_url, clock=wall_clock
                )
                outcome = await sender.send("device-token-1")

    assert outcome == "rejected"
    assert fcm.sent == []


async def test_a_dropped_connection_fails_and_the_next_send_reconnects(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    rsa_key: rsa.RSAPrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with fcm_world(ca, rsa_key, wall_clock, http_client_factory) as (fcm, sender):
            fcm.queue(DROP)
            outcomes = [await sender.send("device-token-1"), await sender.send("device-token-1")]
            connections = fcm.front.connections if fcm.front else 0

    assert outcomes == ["failed", "sent"]
    assert connections == 2


async def test_a_slow_answer_is_cut_by_the_callers_deadline(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    rsa_key: rsa.RSAPrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with fcm_world(ca, rsa_key, wall_clock, http_client_factory) as (fcm, sender):
            fcm.queue(Reply(200, {"name": "projects/p/messages/1"}, delay_s=30))
            start = trio.current_time()
            with trio.move_on_after(10) as deadline:
                await sender.send("device-token-1")
            waited = trio.current_time() - start
            # The connection is still good for the next wake-up.
            after = await sender.send("device-token-1")

    assert deadline.cancelled_caught
    assert waited == 10
    assert after == "sent"


async def test_nobody_listening_fails(
    autojump_clock: trio.testing.MockClock,
    rsa_key: rsa.RSAPrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: connections are refused
    account = ServiceAccount.from_json(
        service_account_json(rsa_key, project_id="p", client_email="e@example.com")
    )
    with trio.fail_after(DEADLINE_S):
        async with http_client_factory() as client:
            sender = FcmSender(
                client,
                account,
                endpoint=f"https://127.0.0.1:{port}",
                token_url=f"https://127.0.0.1:{port}/token",
                clock=wall_clock,
            )
            outcome = await sender.send("device-token-1")

    assert outcome == "failed"

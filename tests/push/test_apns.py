"""The APNs sender against a real HTTP/2 APNs fake on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
import trio.testing
import trustme
from cryptography.hazmat.primitives.asymmetric import ec

from pqmsg.push.apns import ApnsKey, ApnsSender
from tests.push.conftest import EPOCH_S, p8
from tests.push.fake_http import DROP, Reply
from tests.push.fake_providers import (
    APNS_TOO_MANY,
    APNS_UNAVAILABLE,
    FakeApns,
    apns_error,
    open_fake_apns,
)

DEADLINE_S = 60
TOKEN = "ab" * 32  # APNs device tokens are 64 hex digits


@asynccontextmanager
async def apns_world(
    ca: trustme.CA,
    ec_key: ec.EllipticCurvePrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
    *,
    topic: str | None = None,
    signing_key: ec.EllipticCurvePrivateKey | None = None,
) -> AsyncIterator[tuple[FakeApns, ApnsSender]]:
    async with open_fake_apns(ca, ec_key.public_key(), now=wall_clock) as apns:
        key = ApnsKey.from_p8(p8(signing_key or ec_key), key_id=apns.key_id, team_id=apns.team_id)
        async with http_client_factory() as client:
            yield (
                apns,
                ApnsSender(
                    client, key, endpoint=apns.url, topic=topic or apns.topic, clock=wall_clock
                ),
            )


async def test_wake_up_has_the_documented_shape(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    ec_key: ec.EllipticCurvePrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with apns_world(ca, ec_key, wall_clock, http_client_factory) as (apns, sender):
            outcome = await sender.send(TOKEN)

    assert outcome == "sent"
    (sent,) = apns.sent
    assert sent.http_version == "2"
    assert (sent.method, sent.path) == ("POST", f"/3/device/{TOKEN}")
    assert sent.headers["apns-topic"] == apns.topic
    assert sent.headers["apns-push-type"] == "background"
    assert sent.headers["apns-priority"] == "5"
    assert sent.headers["authorization"].startswith("bearer ")
    assert sent.json() == {"aps": {"content-available": 1}}
    assert sent.jwt_header == {"alg": "ES256", "kid": apns.key_id}
    assert sent.jwt_claims == {"iss": apns.team_id, "iat": int(EPOCH_S)}


async def test_provider_token_is_reused_for_fifty_minutes(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    ec_key: ec.EllipticCurvePrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    with trio.fail_after(3000 + DEADLINE_S):
        async with apns_world(ca, ec_key, wall_clock, http_client_factory) as (apns, sender):
            for at in (0.0, 2999.0, 3000.0):
                await trio.sleep_until(at)
                assert await sender.send(TOKEN) == "sent"

    issued_at = [sent.jwt_claims["iat"] for sent in apns.sent if sent.jwt_claims]
    assert issued_at == [int(EPOCH_S), int(EPOCH_S), int(EPOCH_S) + 3000]


async def test_an_expired_provider_token_is_renewed_once(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    ec_key: ec.EllipticCurvePrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with apns_world(ca, ec_key, wall_clock, http_client_factory) as (apns, sender):
            assert await sender.send(TOKEN) == "sent"
            await trio.sleep(1)
            apns.queue(apns_error(403, "ExpiredProviderToken"))
            outcome = await sender.send(TOKEN)

    assert outcome == "sent"
    jwts = [sent.headers["authorization"] for sent in apns.sent]
    assert jwts[0] == jwts[1] != jwts[2]


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (apns_error(410, "Unregistered", timestamp_ms=1_760_000_000_000), "dead_token"),
        (apns_error(410, "ExpiredToken"), "dead_token"),
        (apns_error(400, "BadDeviceToken"), "dead_token"),
        (APNS_TOO_MANY, "failed"),
        (APNS_UNAVAILABLE, "failed"),
        (apns_error(500, "InternalServerError"), "failed"),
        (apns_error(413, "PayloadTooLarge"), "rejected"),
        (apns_error(400, "DeviceTokenNotForTopic"), "rejected"),
        (apns_error(403, "InvalidProviderToken"), "rejected"),
        (Reply(200), "sent"),
    ],
)
async def test_provider_answers_map_to_outcomes(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    ec_key: ec.EllipticCurvePrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
    reply: Reply,
    outcome: str,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with apns_world(ca, ec_key, wall_clock, http_client_factory) as (apns, sender):
            apns.queue(reply)
            got = await sender.send(TOKEN)

    assert got == outcome


async def test_the_fakes_own_verdicts(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    ec_key: ec.EllipticCurvePrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with apns_world(ca, ec_key, wall_clock, http_client_factory) as (apns, sender):
            apns.unregistered.add(TOKEN)
            gone = await sender.send(TOKEN)
            malformed = await sender.send("not-a-device-token")

    assert (gone, malformed) == ("dead_token", "dead_token")
    assert [s.path for s in apns.sent] == [f"/3/device/{TOKEN}", "/3/device/not-a-device-token"]


async def test_wrong_key_or_topic_is_rejected(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    ec_key: ec.EllipticCurvePrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with trio.fail_after(DEADLINE_S):
        async with apns_world(ca, ec_key, wall_clock, http_client_factory, signing_key=other) as (
            _,
            sender,
        ):
            wrong_key = await sender.send(TOKEN)
        async with apns_world(
            ca, ec_key, wall_clock, http_client_factory, topic="dev.someone.else"
        ) as (_, sender):
            wrong_topic = await sender.send(TOKEN)

    assert (wrong_key, wrong_topic) == ("rejected", "rejected")


async def test_a_token_cannot_leave_its_path_segment(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    ec_key: ec.EllipticCurvePrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with apns_world(ca, ec_key, wall_clock, http_client_factory) as (apns, sender):
            outcome = await sender.send("../../x?y=1#z")

    assert outcome == "rejected"  # 404 BadPath: it did not match /3/device/<token>
    assert apns.raw_paths == [b"/3/device/..%2F..%2Fx%3Fy%3D1%23z"]


async def test_dropped_connections_and_slow_answers(
    autojump_clock: trio.testing.MockClock,
    ca: trustme.CA,
    ec_key: ec.EllipticCurvePrivateKey,
    wall_clock: Callable[[], float],
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with apns_world(ca, ec_key, wall_clock, http_client_factory) as (apns, sender):
            apns.queue(DROP, Reply(200, delay_s=30))
            dropped = await sender.send(TOKEN)
            with trio.move_on_after(10) as deadline:
                await sender.send(TOKEN)
            recovered = await sender.send(TOKEN)

    assert dropped == "failed"
    assert deadline.cancelled_caught
    assert recovered == "sent"
    assert len(apns.sent) == 3

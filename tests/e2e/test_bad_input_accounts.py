"""Bad input to accounts, devices and push targets: a 4xx problem, nothing stored.

The matrix every endpoint shares (malformed JSON, media types, body size,
signatures) is in ``test_bad_input``; the harness in ``test_bad_input_harness``.
``POST /v1/devices/provisioning``, ``GET /v1/devices`` and
``DELETE /v1/devices/self/push`` take no input but the signature, which the
shared matrix covers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from pqmsg.client import Client, Identity
from pqmsg.client.keys import registration_body
from pqmsg.protocol import crypto
from pqmsg.protocol.b64 import b64encode
from pqmsg.settings import Settings
from tests.e2e.test_bad_input_harness import (
    NOT_DEVICE_IDS,
    NOT_STRINGS,
    Case,
    Endpoint,
    World,
    bad_input_settings,
    check_cases,
    link_body,
    open_world,
)
from tests.support.server import RunningServer

KEY_BYTES = crypto.SIGN_PUBLIC_KEY_BYTES
SIGNATURE_BYTES = crypto.SIGNATURE_BYTES


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return bad_input_settings(tmp_path / "data")


@pytest.fixture
async def world(client: Client, server: RunningServer) -> AsyncIterator[World]:
    async with Client(server.url, http2=False) as reader:
        with trio.fail_after(30):
            built = await open_world(client, server, reader)
        yield built


def key_material_cases(endpoint: Endpoint, base: dict[str, object]) -> list[Case]:
    """Device key, certificate and proof, as registration and linking both take them."""
    cases = []
    for name, length in (
        ("device_key", KEY_BYTES),
        ("device_certificate", SIGNATURE_BYTES),
        ("proof", SIGNATURE_BYTES),
    ):
        cases.append(endpoint.missing(base, name))
        cases += endpoint.wrong_types(base, name, NOT_STRINGS)
        cases += endpoint.bad_base64(base, name, length)
    cases += endpoint.wrong_types(base, "name", (1, True, [], {}))
    cases += endpoint.out_of_range(base, "name", ("x" * 65, "tab\there", "nul\x00", "line\nbreak"))
    cases += endpoint.wrong_types(base, "name", ("lone \ud800 surrogate",), reason="bad_text")
    cases.append(endpoint.unknown_member(base))
    return cases


async def test_registration(world: World) -> None:
    with trio.fail_after(60):
        endpoint = Endpoint("POST", "/v1/accounts", signer=None)
        identity, device_key = Identity(), crypto.generate_signing_key()
        base = registration_body(identity, device_key, "eve")
        other = registration_body(Identity(), crypto.generate_signing_key(), None)
        cases = [endpoint.missing(base, "identity_key")]
        cases += endpoint.wrong_types(base, "identity_key", NOT_STRINGS)
        cases += endpoint.bad_base64(base, "identity_key", KEY_BYTES)
        cases += key_material_cases(endpoint, base)
        for label, swapped in (
            ("identity key of another account", "identity_key"),
            ("device key the identity did not certify", "device_key"),
            ("certificate by another identity", "device_certificate"),
            ("proof by another device key", "proof"),
        ):
            cases.append(
                endpoint.case(
                    label,
                    {**base, swapped: other[swapped]},
                    reason="bad_signature",
                    mentions=("certificate",),
                )
            )
        await check_cases(world, cases, views=())
        # None of that held anything up: the same keys register now.
        registered = await world.client.call("POST", "/v1/accounts", body=base)
        assert (registered.status_code, registered.json()["device"]) == (201, 1)


async def test_account_deletion_by_a_secondary_device(world: World) -> None:
    with trio.fail_after(30):
        endpoint = Endpoint("DELETE", "/v1/accounts/self")
        cases = [
            endpoint.case(
                f"by {signer}",
                None,
                signer=signer,
                status=403,
                reason="forbidden",
                mentions=("primary",),
            )
            for signer in ("alice2", "bob2")
        ]
        cases.append(
            Case("SELF in capitals", "DELETE", "/v1/accounts/SELF", status=404, reason="not_found")
        )
        await check_cases(world, cases, views=("alice devices", "bob devices"))


async def test_linking_a_device(world: World) -> None:
    with trio.fail_after(60):
        endpoint = Endpoint("POST", "/v1/devices", signer=None)
        base = link_body(world, name="eve laptop")
        identity = world["alice"].identity
        assert identity is not None
        cases = [endpoint.missing(base, "token")]
        cases += endpoint.wrong_types(base, "token", (*NOT_STRINGS, ""))
        cases += endpoint.out_of_range(base, "token", ("t" * 129,))
        cases += endpoint.wrong_types(base, "token", ("\udfff",), reason="bad_text")
        cases += key_material_cases(endpoint, base)
        cases += [
            endpoint.case(
                "the identity key too",
                {**base, "identity_key": b64encode(identity.public_key)},
                reason="unknown_field",
                mentions=("identity_key",),
            ),
            endpoint.case(
                "a token never issued",
                {**base, "token": "x" * 43},
                status=403,
                reason="provisioning_token",
                mentions=("token",),
            ),
            endpoint.case(
                "certified by Bob's identity",
                link_body(world, identity=world["bob"].identity),
                reason="bad_signature",
                mentions=("certificate",),
            ),
            endpoint.case(
                "proof by another device key",
                {**base, "proof": link_body(world)["proof"]},
                reason="bad_signature",
                mentions=("proof",),
            ),
        ]
        await check_cases(world, cases, views=("alice devices",))
        # The token survived every rejection, and no device id was spent.
        linked = await world.client.call("POST", "/v1/devices", body=base)
        assert linked.json() == {"account": world["alice"].account, "device": 4}


async def test_revoking_a_device(world: World) -> None:
    with trio.fail_after(60):
        cases = [
            Case(
                f"device {raw}",
                "DELETE",
                f"/v1/devices/{raw}",
                reason="bad_path",
                mentions=("device",),
            )
            for raw in NOT_DEVICE_IDS
        ]
        cases += [
            Case(
                f"device {n}",
                "DELETE",
                f"/v1/devices/{n}",
                status=404,
                reason="not_found",
                mentions=(str(n),),
            )
            for n in (99, 2**31 - 1, 3)  # 3 is revoked already
        ]
        cases += [
            Case(
                label,
                "DELETE",
                f"/v1/devices/{n}",
                signer=signer,
                status=403,
                reason="forbidden",
                mentions=("primary",),
            )
            for label, signer, n in (
                ("the primary", "alice", 1),
                ("the primary, by device 2", "alice2", 1),
                ("an unknown device, by device 2", "alice2", 99),
                ("a revoked device, by device 2", "alice2", 3),
                ("Bob's device 1, by Bob's device 2", "bob2", 1),
            )
        ]
        await check_cases(world, cases, views=("alice devices", "bob devices"))


async def test_setting_a_push_target(world: World) -> None:
    with trio.fail_after(60):
        endpoint = Endpoint("PUT", "/v1/devices/self/push")
        base = {"provider": "apns", "token": "another-token"}
        cases = [endpoint.missing(base, "token"), endpoint.unknown_member(base)]
        cases.append(
            endpoint.case(
                "provider missing", {"token": "t"}, reason="bad_provider", mentions=("provider",)
            )
        )
        cases += endpoint.wrong_types(
            base, "provider", ("gcm", "FCM", "", None, 1, []), reason="bad_provider"
        )
        cases += endpoint.wrong_types(base, "token", (*NOT_STRINGS, ""))
        cases += endpoint.out_of_range(base, "token", ("t" * 4097,))
        cases += endpoint.wrong_types(base, "token", ("push\ud800token",), reason="bad_text")
        await check_cases(world, cases, views=())  # push targets: rows only


async def test_a_push_token_with_a_nul_is_400(world: World) -> None:
    with trio.fail_after(30):
        endpoint = Endpoint("PUT", "/v1/devices/self/push")
        body = {"provider": "fcm", "token": "push\x00token"}
        await check_cases(world, [endpoint.case("NUL in the token", body, mentions=("'token'",))])

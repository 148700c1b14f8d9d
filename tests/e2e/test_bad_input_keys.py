"""Bad input to the key endpoints: a 4xx problem, and no key stored, replaced or handed out.

The matrix every endpoint shares (malformed JSON, media types, body size,
signatures) is in ``test_bad_input``; the harness in ``test_bad_input_harness``.
``GET /v1/keys/status`` takes no input but the signature, which the shared
matrix covers.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from pqmsg.client import Client, Identity
from pqmsg.client.keys import ml_kem_keypair, x25519_keypair
from pqmsg.protocol import crypto
from pqmsg.protocol.b64 import b64decode, b64encode
from pqmsg.protocol.signing import PrekeySignatureKind
from pqmsg.settings import Settings
from tests.e2e.test_bad_input_harness import (
    NOT_DEVICE_IDS,
    NOT_INTEGERS,
    NOT_OBJECTS,
    NOT_STRINGS,
    Case,
    Endpoint,
    World,
    bad_input_settings,
    check_cases,
    edit,
    open_world,
)
from tests.support.server import RunningServer

EC_BYTES = crypto.X25519_PUBLIC_KEY_BYTES
KEM_BYTES = crypto.KEM_PUBLIC_KEY_BYTES
SIGNATURE_BYTES = crypto.SIGNATURE_BYTES
STORED_EC_ID = 424_242


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return bad_input_settings(tmp_path / "data")


@pytest.fixture
async def world(client: Client, server: RunningServer) -> AsyncIterator[World]:
    async with Client(server.url, http2=False) as reader:
        with trio.fail_after(30):
            built = await open_world(client, server, reader)
        yield built


def ec_entry(key_id: int) -> dict[str, Any]:
    return {"id": key_id, "public_key": b64encode(x25519_keypair(key_id).public_key)}


def malformed_uploads(endpoint: Endpoint, base: dict[str, Any]) -> list[Case]:
    """Each member of an upload body missing, mistyped, out of range or badly encoded."""
    cases = [endpoint.unknown_member(base)]
    for part in ("signed_prekey", "pq_last_resort"):
        cases += endpoint.wrong_types(base, part, (1, "x", True, []))
    for part in ("one_time_prekeys", "pq_one_time_prekeys"):
        cases += endpoint.wrong_types(base, part, (1, "x", True, {}))
        cases += endpoint.wrong_types(base, f"{part}.1", NOT_OBJECTS)
        cases.append(
            endpoint.case(
                f"101 {part}", {part: [{}] * 101}, reason="too_many", mentions=(part, "100")
            )
        )
    for where, length in (
        ("signed_prekey", EC_BYTES),
        ("pq_last_resort", KEM_BYTES),
        ("pq_one_time_prekeys.1", KEM_BYTES),
    ):
        cases += [
            endpoint.missing(base, f"{where}.{name}") for name in ("id", "public_key", "signature")
        ]
        cases.append(endpoint.unknown_member(base, where))
        cases += endpoint.wrong_types(base, f"{where}.id", NOT_INTEGERS)
        cases += endpoint.out_of_range(base, f"{where}.id", (-1, 2**63))
        cases += endpoint.wrong_types(base, f"{where}.public_key", NOT_STRINGS)
        cases += endpoint.bad_base64(base, f"{where}.public_key", length)
        cases += endpoint.wrong_types(base, f"{where}.signature", NOT_STRINGS)
        cases += endpoint.bad_base64(base, f"{where}.signature", SIGNATURE_BYTES)
    where = "one_time_prekeys.1"
    cases += [endpoint.missing(base, f"{where}.id"), endpoint.missing(base, f"{where}.public_key")]
    cases.append(
        endpoint.case(
            "one-time EC key with a signature",
            edit(base, f"{where}.signature", base["signed_prekey"]["signature"]),
            reason="unknown_field",
            mentions=("one_time_prekeys[1]", "signature"),
        )
    )
    cases += endpoint.wrong_types(base, f"{where}.id", NOT_INTEGERS)
    cases += endpoint.out_of_range(base, f"{where}.id", (-1, 2**63))
    cases += endpoint.wrong_types(base, f"{where}.public_key", NOT_STRINGS)
    cases += endpoint.bad_base64(base, f"{where}.public_key", EC_BYTES)
    return cases


def forged_uploads(
    endpoint: Endpoint, base: dict[str, Any], alice: Identity, bob: Identity
) -> list[Case]:
    """Well-formed uploads with one signature that does not verify under Alice's identity."""
    spk, last_resort = base["signed_prekey"], base["pq_last_resort"]

    def signature(identity: Identity, kind: PrekeySignatureKind, entry: dict[str, Any]) -> str:
        return b64encode(identity.sign_prekey(kind, entry["id"], b64decode(entry["public_key"])))

    forged = {
        "signed prekey signed by Bob's identity": edit(
            base, "signed_prekey.signature", signature(bob, "spk", spk)
        ),
        "signed prekey id changed after signing": edit(base, "signed_prekey.id", spk["id"] + 1000),
        "signed prekey signed as a PQ prekey": edit(
            base, "signed_prekey.signature", signature(alice, "pqspk", spk)
        ),
        "last-resort key signed as an EC prekey": edit(
            base, "pq_last_resort.signature", signature(alice, "spk", last_resort)
        ),
        "signatures of the two signed prekeys swapped": edit(
            edit(base, "signed_prekey.signature", last_resort["signature"]),
            "pq_last_resort.signature",
            spk["signature"],
        ),
        "one PQ one-time key signed by Bob's identity": edit(
            base,
            "pq_one_time_prekeys.1.signature",
            signature(bob, "pqspk", base["pq_one_time_prekeys"][1]),
        ),
    }
    return [
        endpoint.case(label, body, reason="bad_signature", mentions=("signature",))
        for label, body in forged.items()
    ]


async def test_uploading_keys(world: World) -> None:
    with trio.fail_after(90):
        alice, alice2 = world["alice"], world["alice2"]
        assert alice.identity is not None and world["bob"].identity is not None
        # An EC key under a known id, and Alice's device 2 at the 1000-key limit.
        await alice.upload_keys({"one_time_prekeys": [ec_entry(STORED_EC_ID)]})
        ids = range(10_000, 10_997)  # device 2 has 3 already
        for start in range(0, len(ids), 100):
            await alice2.upload_keys(
                {"one_time_prekeys": [ec_entry(i) for i in ids[start : start + 100]]}
            )
        endpoint = Endpoint("PUT", "/v1/keys")
        base = alice.prekey_body(ec=2, pq=2)
        pq0 = base["pq_one_time_prekeys"][0]
        pq_again = alice.identity.signed_entry("pqspk", ml_kem_keypair(pq0["id"]))
        cases = malformed_uploads(endpoint, base)
        cases += forged_uploads(endpoint, base, alice.identity, world["bob"].identity)
        cases += [
            endpoint.case(
                "an EC id twice",
                edit(base, "one_time_prekeys.1.id", base["one_time_prekeys"][0]["id"]),
                status=409,
                reason="duplicate_prekey",
                mentions=("twice",),
            ),
            endpoint.case(
                "a PQ id twice",
                edit(base, "pq_one_time_prekeys.1", pq_again),
                status=409,
                reason="duplicate_prekey",
                mentions=("twice",),
            ),
            endpoint.case(
                "an EC id already stored",
                edit(base, "one_time_prekeys.1.id", STORED_EC_ID),
                status=409,
                reason="duplicate_prekey",
                mentions=("already stored",),
            ),
            endpoint.case(
                "one key over the stored limit",
                {"one_time_prekeys": [ec_entry(99_999)]},
                signer="alice2",
                status=409,
                reason="prekey_limit",
                mentions=("1000",),
            ),
        ]
        await check_cases(world, cases, views=("alice keys", "alice2 keys"))
        # Nothing was half-stored: the whole valid body goes in now.
        assert await alice.upload_keys(base) == {
            "one_time_prekeys": 3 + 1 + 2,
            "pq_one_time_prekeys": 3 + 2,
        }


async def test_fetching_a_bundle(world: World) -> None:
    with trio.fail_after(60):
        alice = world["alice"].account
        not_accounts = (
            "not-a-uuid",
            alice.upper(),
            alice.replace("-", ""),
            f"%7B{alice}%7D",
            f"urn:uuid:{alice}",
            alice + "0",
            alice[:-1],
            alice[:-1] + "g",
            "%20" + alice,
            alice + "%20",
            alice + "%0A",
        )
        cases = [
            Case(
                f"account {raw}",
                "GET",
                f"/v1/keys/{raw}/1",
                signer="bob",
                reason="bad_path",
                mentions=("account",),
            )
            for raw in not_accounts
        ]
        cases += [
            Case(
                f"device {raw}",
                "GET",
                f"/v1/keys/{alice}/{raw}",
                signer="bob",
                reason="bad_path",
                mentions=("device",),
            )
            for raw in (*NOT_DEVICE_IDS, "**", "1%0A")
        ]
        unknown = str(uuid.uuid4())
        cases += [
            Case(
                label,
                "GET",
                path,
                signer="bob",
                status=404,
                reason="not_found",
                mentions=("no such",),
            )
            for label, path in (
                ("unknown account, one device", f"/v1/keys/{unknown}/1"),
                ("unknown account, all devices", f"/v1/keys/{unknown}/*"),
                ("unknown device", f"/v1/keys/{alice}/99"),
                ("largest device id", f"/v1/keys/{alice}/{2**31 - 1}"),
                ("revoked device", f"/v1/keys/{alice}/3"),
            )
        ]
        await check_cases(world, cases, views=("alice keys", "alice2 keys"))

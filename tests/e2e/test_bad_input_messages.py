"""Bad input to the message endpoints: a 4xx problem, nothing queued, acknowledged or recorded.

The matrix every endpoint shares (malformed JSON, media types, body size,
signatures) is in ``test_bad_input``; the harness in ``test_bad_input_harness``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from pqmsg.client import Client
from pqmsg.protocol.b64 import b64encode
from pqmsg.settings import MessageSettings, Settings
from tests.e2e.test_bad_input_harness import (
    NOT_ARRAYS,
    NOT_INTEGERS,
    NOT_OBJECTS,
    NOT_STRINGS,
    Case,
    Endpoint,
    World,
    bad_input_settings,
    base64_variants,
    check_cases,
    edit,
    encode,
    open_world,
)
from tests.support.server import RunningServer

MAX_CIPHERTEXT_BYTES = MessageSettings().max_ciphertext_bytes
# Not ASCII digits: superscript two, Arabic-Indic one, fullwidth five.
OTHER_DIGITS = ("%C2%B2", "%D9%A1", "%EF%BC%95")
BAD_LIMITS = ("", *"0 501 -1 abc 1.5 0x10 1e2 %201 1%20 1%0A 1000000 1e999".split(), *OTHER_DIGITS)
BAD_WAITS = ("", *"31 -1 abc 2.5 %2B1 1%0A 1000000".split(), *OTHER_DIGITS)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return bad_input_settings(tmp_path / "data")


@pytest.fixture
async def world(client: Client, server: RunningServer) -> AsyncIterator[World]:
    async with Client(server.url, http2=False) as reader:
        with trio.fail_after(30):
            built = await open_world(client, server, reader)
        yield built


def not_uuids(valid: str) -> tuple[str, ...]:
    return (
        "",
        "abc",
        valid.upper(),
        valid.replace("-", ""),
        f"{{{valid}}}",
        valid[:-1],
        valid + "0",
        f" {valid}",
        f"{valid}\n",
    )


def copies(*devices: int) -> list[dict[str, Any]]:
    return [{"device": d, "ciphertext": b64encode(f"to device {d}".encode())} for d in devices]


def send_cases(world: World, base: dict[str, Any]) -> list[Case]:
    alice = world["alice"].account
    endpoint = Endpoint("PUT", f"/v1/messages/{alice}", signer="bob")
    cases = [
        Case(
            f"account {raw}",
            "PUT",
            f"/v1/messages/{raw}",
            body=encode(base),
            signer="bob",
            reason="bad_path",
            mentions=("account",),
        )
        for raw in (
            "not-a-uuid",
            alice.upper(),
            alice.replace("-", ""),
            f"%7B{alice}%7D",
            alice[:-1],
            alice + "0",
            alice + "%0A",
        )
    ]
    unknown = str(uuid.uuid4())
    cases.append(
        Case(
            "unknown account",
            "PUT",
            f"/v1/messages/{unknown}",
            body=encode(base),
            signer="bob",
            status=404,
            reason="not_found",
            mentions=("account",),
        )
    )
    cases += [
        endpoint.missing(base, "id"),
        endpoint.missing(base, "messages"),
        endpoint.unknown_member(base),
    ]
    cases += endpoint.wrong_types(
        base, "id", (*NOT_STRINGS, *not_uuids(base["id"])), reason="bad_uuid"
    )
    cases += endpoint.wrong_types(base, "messages", NOT_ARRAYS)
    cases.append(
        endpoint.case(
            "no copies", {**base, "messages": []}, reason="out_of_range", mentions=("messages",)
        )
    )
    cases.append(
        endpoint.case(
            "1001 copies",
            {**base, "messages": copies(*range(1, 1002))},
            reason="too_many",
            mentions=("messages", "1000"),
        )
    )
    cases += endpoint.wrong_types(base, "messages.1", NOT_OBJECTS)
    cases += [
        endpoint.missing(base, "messages.1.device"),
        endpoint.missing(base, "messages.1.ciphertext"),
    ]
    cases.append(endpoint.unknown_member(base, "messages.1"))
    cases += endpoint.wrong_types(base, "messages.1.device", NOT_INTEGERS)
    cases += endpoint.out_of_range(base, "messages.1.device", (0, -1, 2**31))
    cases += endpoint.wrong_types(base, "messages.1.ciphertext", NOT_STRINGS)
    cases.append(
        endpoint.case(
            "empty ciphertext",
            edit(base, "messages.1.ciphertext", ""),
            reason="out_of_range",
            mentions=("ciphertext",),
        )
    )
    cases += [
        endpoint.case(
            f"ciphertext {label}",
            edit(base, "messages.1.ciphertext", value),
            reason="bad_base64",
            mentions=("messages[1]", "ciphertext", fragment),
        )
        for label, value, fragment in base64_variants(48)
        if "must decode" not in fragment  # any length is a ciphertext's length
    ]
    cases.append(
        endpoint.case(
            "ciphertext one byte over 256 KiB",
            edit(base, "messages.1.ciphertext", b64encode(b"\x00" * (MAX_CIPHERTEXT_BYTES + 1))),
            status=413,
            reason="too_large",
            mentions=("ciphertext", str(MAX_CIPHERTEXT_BYTES)),
        )
    )
    cases += endpoint.wrong_types(base, "messages.1.pq_epoch", ("1", 1.5, True, [], {}))
    cases += endpoint.out_of_range(base, "messages.1.pq_epoch", (-1, 2**63))
    cases.append(
        endpoint.case(
            "device 1 twice",
            {**base, "messages": copies(1, 1, 2)},
            reason="duplicate_device",
            mentions=("device",),
        )
    )
    for label, devices, missing, extra in (
        ("device 2 left out", (1,), [2], []),
        ("device 1 left out", (2,), [1], []),
        ("revoked device 3 too", (1, 2, 3), [], [3]),
        ("unknown device 99 too", (1, 2, 99), [], [99]),
        ("devices 3 and 4 instead", (3, 4), [1, 2], [3, 4]),
    ):
        cases.append(
            endpoint.case(
                label,
                {**base, "messages": copies(*devices)},
                status=409,
                reason="device_mismatch",
                problem={"missing": missing, "extra": extra},
            )
        )
    return cases


async def test_sending(world: World) -> None:
    with trio.fail_after(60):
        messages = copies(1, 2)
        messages[0]["pq_epoch"] = 9  # a rejected send must not advance the ratchet either
        base: dict[str, Any] = {"id": str(uuid.uuid4()), "messages": messages}
        await check_cases(world, send_cases(world, base), views=("alice queue", "alice2 queue"))
        # No rejected send recorded its id: sending it for real stores both copies.
        sent = await world["bob"].call("PUT", f"/v1/messages/{world['alice'].account}", body=base)
        assert sent.json() == {"id": base["id"], "stored": 2}


async def test_fetching(world: World) -> None:
    with trio.fail_after(60):
        cases = [
            Case(query, "GET", "/v1/messages", query=query, reason="bad_query", mentions=(name,))
            for query, name in (
                *((f"limit={value}", "'limit'") for value in BAD_LIMITS),
                *((f"wait={value}", "'wait'") for value in BAD_WAITS),
                ("limit", "'limit'"),
                ("wait=1&limit=0", "'limit'"),
                ("foo=1", "'foo'"),
                ("LIMIT=10", "'LIMIT'"),
                ("limit=10&since=0", "'since'"),
                ("ack=1", "'ack'"),
            )
        ]
        await check_cases(world, cases, views=("alice queue",))


async def test_acknowledging(world: World) -> None:
    with trio.fail_after(60):
        queued = [m.id for m in (await world["alice"].receive())[0]]
        assert queued, "Alice has a message waiting"
        endpoint = Endpoint("POST", "/v1/messages/ack")
        base = {"ids": [*queued, str(uuid.uuid4())]}
        cases = [endpoint.missing(base, "ids"), endpoint.unknown_member(base)]
        cases += endpoint.wrong_types(base, "ids", NOT_ARRAYS)
        cases += endpoint.wrong_types(
            base, "ids.1", (*NOT_STRINGS, *not_uuids(queued[0])), reason="bad_uuid"
        )
        cases.append(
            endpoint.case(
                "501 ids",
                {"ids": [*queued, *(str(uuid.uuid4()) for _ in range(501 - len(queued)))]},
                reason="too_many",
                mentions=("ids", "500"),
            )
        )
        await check_cases(world, cases, views=("alice queue",))

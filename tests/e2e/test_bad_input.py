"""Bad input to any endpoint is a 4xx problem and changes nothing stored (PROTOCOL.md §4).

The matrix every endpoint shares: malformed JSON, the wrong media type, an
oversized body, unsigned or wrongly signed requests, and unknown routes.
Each endpoint's own fields are in ``test_bad_input_<area>``; the harness is
``test_bad_input_harness``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from pqmsg.client import Client, Device, Identity, sign_headers
from pqmsg.client.keys import registration_body
from pqmsg.protocol import crypto
from pqmsg.settings import Settings
from tests.e2e.test_bad_input_harness import (
    JSON,
    MAX_BODY_BYTES,
    Case,
    Endpoint,
    World,
    bad_input_settings,
    check_cases,
    encode,
    link_body,
    misbehaving,
    open_world,
    report,
    request_http2,
    stranger,
)
from tests.support.server import RunningServer, running_server


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return bad_input_settings(tmp_path / "data")


@pytest.fixture
async def world(client: Client, server: RunningServer) -> AsyncIterator[World]:
    async with Client(server.url, http2=False) as reader:
        with trio.fail_after(30):
            built = await open_world(client, server, reader)
        yield built


BODY_ROUTES = (
    "POST /v1/accounts",
    "POST /v1/devices",
    "PUT /v1/keys",
    "PUT /v1/messages/{account}",
    "POST /v1/messages/ack",
    "PUT /v1/devices/self/push",
)
SIGNED_ROUTES = (
    "DELETE /v1/accounts/self",
    "POST /v1/devices/provisioning",
    "GET /v1/devices",
    "DELETE /v1/devices/{device}",
    "PUT /v1/keys",
    "GET /v1/keys/status",
    "GET /v1/keys/{account}/{device}",
    "PUT /v1/messages/{account}",
    "GET /v1/messages",
    "POST /v1/messages/ack",
    "PUT /v1/devices/self/push",
    "DELETE /v1/devices/self/push",
)
UNSIGNED_ROUTES = ("POST /v1/accounts", "POST /v1/devices")
# What a request to each route could disturb, read through the API after each of its cases.
ROUTE_VIEWS = {
    "POST /v1/accounts": (),
    "POST /v1/devices": ("alice devices",),
    "PUT /v1/keys": ("alice keys",),
    "PUT /v1/messages/{account}": ("bob queue", "bob2 queue"),
    "POST /v1/messages/ack": ("alice queue",),
    "PUT /v1/devices/self/push": (),
    "DELETE /v1/accounts/self": ("alice devices",),
    "POST /v1/devices/provisioning": (),
    "GET /v1/devices": (),
    "DELETE /v1/devices/{device}": ("alice devices",),
    "GET /v1/keys/status": (),
    "GET /v1/keys/{account}/{device}": ("bob2 keys",),
    "GET /v1/messages": ("alice queue",),
    "DELETE /v1/devices/self/push": (),
}
WRONG_MEDIA_TYPES = (
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/xml",
    "application/json-seq",
)


async def valid_request(world: World, route: str) -> tuple[Endpoint, Any]:
    """``route`` as Alice's request that would succeed, aimed at Bob or at her device 2."""
    method, template = route.split(" ")
    alice, bob = world["alice"], world["bob"]
    endpoint = Endpoint(
        method,
        template.format(account=bob.account, device=2),
        None if route in UNSIGNED_ROUTES else "alice",
    )
    body: Any = None
    if route == "POST /v1/accounts":
        body = registration_body(Identity(), crypto.generate_signing_key(), "eve")
    elif route == "POST /v1/devices":
        body = link_body(world, name="eve's laptop")
    elif route == "PUT /v1/keys":
        body = alice.prekey_body(ec=1, pq=1)
    elif route == "PUT /v1/messages/{account}":
        copies = [{"device": 1, "ciphertext": "AAAA"}, {"device": 2, "ciphertext": "AAAA"}]
        body = {"id": str(uuid.uuid4()), "messages": copies}
    elif route == "POST /v1/messages/ack":
        body = {"ids": [m.id for m in (await alice.receive())[0]]}
    elif route == "PUT /v1/devices/self/push":
        body = {"provider": "apns", "token": "another-token"}
    return endpoint, body


def malformed_json(endpoint: Endpoint, valid: Any) -> list[Case]:
    good = encode(valid)
    bodies = [
        ("empty body", b""),
        ("truncated by one byte", good[:-1]),
        ("cut in half", good[: len(good) // 2]),
        ("not UTF-8", good.replace(b'"', b'"\xff', 1)),
        ("Latin-1 text", b'{"caf\xe9": 1}'),
        ("UTF-8 encoded surrogate", b'{"name": "\xed\xa0\x80"}'),
        ("UTF-16", json.dumps(valid).encode("utf-16")),
        ("UTF-32", json.dumps(valid).encode("utf-32")),
        ("an integer of 5000 digits", b'{"id": ' + b"7" * 5000 + b"}"),
        ("top-level array", b"[" + good + b"]"),
        ("top-level string", encode(good.decode())),
        ("top-level number", b"42"),
        ("top-level null", b"null"),
        ("top-level NaN", b"NaN"),
        ("trailing data", good + b"{}"),
        ("single quotes", b"{'id': 1}"),
        ("a comment", b'{"id": 1 /* why not */}'),
        ("arrays 100000 deep", b"[" * 100_000 + b"]" * 100_000),
        ("objects 50000 deep", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    ]
    return [
        endpoint.case(label, body, reason="bad_json", mentions=("body",)) for label, body in bodies
    ]


def wrong_media_types(endpoint: Endpoint, valid: Any) -> list[Case]:
    return [
        endpoint.case(
            f"Content-Type {media_type}",
            valid,
            content_type=media_type,
            status=415,
            reason="unsupported_media_type",
            mentions=("application/json",),
        )
        for media_type in WRONG_MEDIA_TYPES
    ]


def oversized(endpoint: Endpoint, valid: Any) -> list[Case]:
    """Valid JSON, but for the whitespace that takes it over the body limit."""
    good = encode(valid)
    return [
        endpoint.case(
            label,
            good + b" " * (size - len(good)),
            status=413,
            reason="too_large",
            mentions=("larger",),
            http1=True,
        )
        for label, size in (("one byte over 2 MiB", MAX_BODY_BYTES + 1), ("3 MiB", 3 * 1024 * 1024))
    ]


def bad_signers(world: World, endpoint: Endpoint, valid: Any) -> list[Case]:
    alice = world["alice"]
    impostor = Device(world.client, alice.account, 1, world["alice2"].device_key, None)
    signers: list[tuple[str, str | Device | None, str, tuple[str, ...]]] = [
        ("unsigned", None, "malformed", ("Pqmsg-Account",)),
        ("unknown device", stranger(world, alice.account, 99), "unknown_device", ()),
        ("unknown account", stranger(world), "unknown_device", ()),
        ("revoked device", "alice3", "revoked", ("revoked",)),
        ("another device's key", impostor, "signature", ("signature",)),
    ]
    cases = [
        endpoint.case(label, valid, signer=signer, status=401, reason=reason, mentions=mentions)
        for label, signer, reason, mentions in signers
    ]
    cases.append(
        endpoint.case(
            "signed for another path",
            valid,
            signed_path=endpoint.path + "/x",
            status=401,
            reason="signature",
            mentions=("signature",),
        )
    )
    return cases


async def test_malformed_json_wrong_media_type_and_oversized_bodies(world: World) -> None:
    with trio.fail_after(60):
        failures, count = [], 0
        for route in BODY_ROUTES:
            endpoint, valid = await valid_request(world, route)
            # Oversized bodies go over HTTP/1.1 here; HTTP/2 has its own test below.
            cases = (
                malformed_json(endpoint, valid)
                + wrong_media_types(endpoint, valid)
                + oversized(endpoint, valid)
            )
            failures += await misbehaving(world, cases, ROUTE_VIEWS[route])
            count += len(cases)
        report(failures, count)


async def test_unsigned_unknown_revoked_and_forged_requests_are_401(world: World) -> None:
    with trio.fail_after(60):
        failures, count = [], 0
        for route in SIGNED_ROUTES:
            endpoint, valid = await valid_request(world, route)
            cases = bad_signers(world, endpoint, valid)
            failures += await misbehaving(world, cases, ROUTE_VIEWS[route])
            count += len(cases)
        report(failures, count)


async def test_unknown_routes_and_methods_are_problems(world: World) -> None:
    with trio.fail_after(30):
        bob = world["bob"].account
        routes = [
            ("GET", "/v1/accounts", 405, "GET"),
            ("PATCH", "/v1/keys", 405, "PATCH"),
            ("DELETE", "/v1/devices", 405, "DELETE"),
            ("POST", "/v1/messages", 405, "POST"),
            ("GET", "/v1/nothing-here", 404, "no such endpoint"),
            ("DELETE", f"/v1/accounts/{bob}", 404, "no such endpoint"),
            ("GET", f"/v1/keys/{bob}/1/2", 404, "no such endpoint"),
            ("GET", "/v1/keys//1", 404, "no such endpoint"),
            ("DELETE", "/v1/devices/2/", 404, "no such endpoint"),
        ]
        await check_cases(
            world,
            [
                Case("routing", method, path, status=status, mentions=(word,))
                for method, path, status, word in routes
            ],
            views=(),
        )


# -- bugs: each test states the behaviour the contract asks for ---------------------


async def test_oversized_body_over_http2_is_413_and_the_server_lives_on(settings: Settings) -> None:
    with trio.fail_after(30):
        async with running_server(settings) as server, Client(server.url) as client:
            alice = await client.register()
            headers = {"Content-Type": JSON}
            body = b" " * (MAX_BODY_BYTES + 1)
            status, content = await request_http2(
                server.url, "POST", b"/v1/accounts", headers, body
            )
            assert status == 413, content
            assert json.loads(content)["reason"] == "too_large"
            assert [d["device"] for d in await alice.list_devices()] == [1]


async def test_a_request_target_that_is_not_ascii_is_refused_and_the_server_lives_on(
    settings: Settings,
) -> None:
    with trio.fail_after(30):
        async with running_server(settings) as server, Client(server.url) as client:
            alice = await client.register()
            await alice.link_new_device()
            path = "/v1/devices/\u00e9"  # raw UTF-8 on the wire, where HTTP wants %C3%A9
            headers = sign_headers(
                "DELETE",
                path,
                "",
                b"",
                account=alice.account,
                device=1,
                device_key=alice.device_key,
                now=client.clock(),
            )
            status, content = await request_http2(server.url, "DELETE", path.encode(), headers)
            # RFC 9113 8.1.1 makes it a malformed request: a stream reset, or a 400 will do.
            assert status is None or 400 <= status < 500, (status, content)
            assert [d["device"] for d in await alice.list_devices()] == [1, 2]

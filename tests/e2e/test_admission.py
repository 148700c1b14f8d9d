"""Sends and bundle fetches admit a request after checking its input (a real server, HTTP/2).

Bad input is answered before the nonce is recorded or a token taken, so it
changes nothing at all; a replayed request is refused without spending the
device's tokens. (The same rules through Redis: tests/nurseries/test_admission.py
and tests/e2e/test_replicas.py.)
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from pqmsg.client import Client, Device, ProblemResponse
from pqmsg.protocol import crypto
from pqmsg.protocol.b64 import b64encode
from pqmsg.protocol.canonical import SignedRequest, canonical_string
from pqmsg.settings import RateLimit, Settings, SettingsError
from tests.support.server import RunningServer, make_settings, running_server

TEST_TIMEOUT_S = 60


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    settings = make_settings(
        tmp_path / "data",
        limits__send=RateLimit(per_s=0.01, burst=2),
        limits__bundle=RateLimit(per_s=0.01, burst=1),
    )
    async with running_server(settings) as server:
        yield server


def signed(device: Device, method: str, path: str, body: bytes, nonce: str) -> dict[str, str]:
    """§3 headers with a nonce of the test's choosing."""
    now = int(device.client.clock())
    req = SignedRequest(method, path, "", device.account, device.device, now, nonce, body)
    signature = crypto.sign(device.device_key.secret_key, canonical_string(req))
    return {
        "Pqmsg-Account": device.account,
        "Pqmsg-Device": str(device.device),
        "Pqmsg-Timestamp": str(now),
        "Pqmsg-Nonce": nonce,
        "Pqmsg-Signature": b64encode(signature),
        "Content-Type": "application/json",
    }


def send_body(ciphertext: bytes = b"hello") -> bytes:
    copy = {"device": 1, "ciphertext": b64encode(ciphertext)}
    return json.dumps({"id": str(uuid.uuid4()), "messages": [copy]}).encode()


async def test_bad_input_does_not_use_the_nonce_or_a_token(server: RunningServer) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with Client(server.url) as client, httpx.AsyncClient(http2=True, base_url=server.url) as raw:
            alice, bob = await client.register(), await client.register()
            path = f"/v1/messages/{bob.account}"
            nonce = secrets.token_urlsafe(18)
            bad = json.dumps({"id": "not-a-uuid", "messages": []}).encode()
            refused = await raw.put(path, content=bad, headers=signed(alice, "PUT", path, bad, nonce))
            # The same nonce on a good request is still fresh, and the bad
            # requests took no token: both sends of the burst of 2 go through.
            good = send_body()
            first = await raw.put(path, content=good, headers=signed(alice, "PUT", path, good, nonce))
            second = await alice.send(bob.account, {1: b"second"})
            messages, _ = await bob.receive()

    assert (refused.status_code, refused.json()["reason"]) == (400, "bad_uuid")
    assert first.status_code == 200, first.text
    assert second["stored"] == 1
    assert [m.ciphertext for m in messages] == [b"hello", b"second"]


async def test_replayed_sends_are_refused_without_spending_tokens(server: RunningServer) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with Client(server.url) as client, httpx.AsyncClient(http2=True, base_url=server.url) as raw:
            alice, bob = await client.register(), await client.register()
            path = f"/v1/messages/{bob.account}"
            body = send_body(b"once")
            headers = signed(alice, "PUT", path, body, secrets.token_urlsafe(18))
            answers = [await raw.put(path, content=body, headers=headers) for _ in range(5)]
            # One token of two is left: the replays spent none.
            await alice.send(bob.account, {1: b"twice"})
            limited = await raw.put(
                path, content=(third := send_body()),
                headers=signed(alice, "PUT", path, third, secrets.token_urlsafe(18)),
            )
            messages, _ = await bob.receive()
            metrics = (await client.http.get("/metrics")).text

    assert answers[0].status_code == 200
    assert [(a.status_code, a.json()["reason"]) for a in answers[1:]] == [(401, "replay")] * 4
    assert limited.status_code == 429
    assert [m.ciphertext for m in messages] == [b"once", b"twice"]
    assert 'pqmsg_auth_rejects_total{reason="replay"} 4.0' in metrics
    assert 'pqmsg_rate_limit_rejects_total{limiter="send"} 1.0' in metrics


async def test_bundle_fetches_are_admitted_the_same_way(server: RunningServer) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with Client(server.url) as client, httpx.AsyncClient(http2=True, base_url=server.url) as raw:
            alice, bob = await client.register(), await client.register()
            await bob.upload_prekeys(ec=2, pq=2)
            nonce = secrets.token_urlsafe(18)
            bad_path = f"/v1/keys/{bob.account}/zero"
            refused = await raw.get(bad_path, headers=signed(alice, "GET", bad_path, b"", nonce))
            path = f"/v1/keys/{bob.account}/1"
            headers = signed(alice, "GET", path, b"", nonce)
            fetched = await raw.get(path, headers=headers)
            replayed = await raw.get(path, headers=headers)
            limited = await raw.get(path, headers=signed(alice, "GET", path, b"", secrets.token_urlsafe(18)))
            status = await bob.key_status()

    assert (refused.status_code, refused.json()["reason"]) == (400, "bad_path")
    assert fetched.status_code == 200, fetched.text
    assert (replayed.status_code, replayed.json()["reason"]) == (401, "replay")
    assert limited.status_code == 429
    # One bundle handed out, one one-time key of each kind gone.
    assert (status["one_time_prekeys"], status["pq_one_time_prekeys"]) == (1, 1)


async def test_without_remembered_keys_every_request_reads_its_device(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", auth__device_key_cache=0)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_server(settings) as server, Client(server.url) as client:
            alice, bob = await client.register(), await client.register()
            second = await alice.link_new_device()
            await alice.send(bob.account, {1: b"one"})
            messages, _ = await bob.receive()
            assert await bob.ack([m.id for m in messages]) == 1
            await alice.revoke(second.device)
            with pytest.raises(ProblemResponse) as revoked:
                await second.send(bob.account, {1: b"two"})
    assert (revoked.value.status, revoked.value.reason) == (401, "revoked")


def test_remembered_keys_setting() -> None:
    assert Settings.from_env({}).auth.device_key_cache == 10_000
    assert Settings.from_env({"PQMSG_DEVICE_KEY_CACHE": "0"}).auth.device_key_cache == 0
    with pytest.raises(SettingsError, match="PQMSG_DEVICE_KEY_CACHE"):
        Settings.from_env({"PQMSG_DEVICE_KEY_CACHE": "-1"})

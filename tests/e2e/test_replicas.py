"""Two real server processes on one PostgreSQL and one Redis behave as one service."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from pqmsg.client import Client, ProblemResponse, sign_headers
from pqmsg.protocol.b64 import b64encode
from tests.support.postgres import create_throwaway_database, drop_throwaway_database
from tests.support.process import server_process

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def shared_env() -> Iterator[dict[str, str]]:
    url = create_throwaway_database()
    try:
        yield {
            "PQMSG_DATABASE_URL": url,
            "PQMSG_REDIS_URL": "redis://127.0.0.1:6379/0",
            "PQMSG_REDIS_PREFIX": f"pqmsg-test-{secrets.token_hex(4)}:",
            "PQMSG_RATE_SEND": "0.01/3",
        }
    finally:
        drop_throwaway_database(url)


async def test_replicas_share_wake_ups_nonces_and_limits(tmp_path: Path, shared_env: dict[str, str]) -> None:
    with trio.fail_after(90):
        async with (
            server_process(tmp_path / "a", env=shared_env) as a,
            server_process(tmp_path / "b", env=shared_env) as b,
            Client(a.url) as on_a,
            Client(b.url) as on_b,
        ):
            alice = await on_a.register()
            bob = await on_a.register()
            bob_on_b = type(bob)(on_b, bob.account, bob.device, bob.device_key, bob.identity)

            # A long poll parked on A ends as soon as B stores a message.
            woke: list[float] = []

            async def poll() -> None:
                messages, _ = await bob.receive(wait=20)
                woke.append(trio.current_time())
                assert [m.ciphertext for m in messages] == [b"via B"]

            alice_on_b = type(alice)(on_b, alice.account, alice.device, alice.device_key, alice.identity)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                await trio.sleep(0.5)
                await alice_on_b.send(bob.account, {1: b"via B"})
                sent = trio.current_time()
            assert woke[0] - sent < 1.0

            # A nonce accepted by A is a replay on B.
            headers = sign_headers(
                "GET", "/v1/devices", "", b"", account=bob.account, device=bob.device,
                device_key=bob.device_key, now=on_a.clock(),
            )
            async with httpx.AsyncClient() as raw:
                first = await raw.get(a.url + "/v1/devices", headers=headers)
                again = await raw.get(b.url + "/v1/devices", headers=headers)
            assert first.status_code == 200
            assert (again.status_code, again.json()["reason"]) == (401, "replay")

            # The send limit (burst 3) is one bucket across both replicas,
            # and a send replayed at the other replica spends no token.
            path = f"/v1/messages/{bob.account}"
            body = json.dumps({"id": str(uuid.uuid4()), "messages": [
                {"device": 1, "ciphertext": b64encode(b"2")}]}).encode()
            headers = sign_headers(
                "PUT", path, "", body, account=alice.account, device=alice.device,
                device_key=alice.device_key, now=on_a.clock(),
            ) | {"Content-Type": "application/json"}
            async with httpx.AsyncClient() as raw:
                sent_on_a = await raw.put(a.url + path, content=body, headers=headers)
                replays_on_b = [await raw.put(b.url + path, content=body, headers=headers) for _ in range(3)]
            assert sent_on_a.status_code == 200
            assert {(r.status_code, r.json()["reason"]) for r in replays_on_b} == {(401, "replay")}
            await alice_on_b.send(bob.account, {1: b"3"})
            with pytest.raises(ProblemResponse) as limited:
                await alice.send(bob.account, {1: b"4"})
            assert limited.value.status == 429

            # Both replicas see the same queue.
            messages, _ = await bob_on_b.receive()
            assert [m.ciphertext for m in messages] == [b"via B", b"2", b"3"]
            health = (await on_b.http.get("/health")).json()
            assert health["components"]["storage"]["backend"] == "postgres"


async def test_on_postgres_alone_wake_ups_cross_replicas_by_listen_notify(
    tmp_path: Path, shared_env: dict[str, str]
) -> None:
    env = {"PQMSG_DATABASE_URL": shared_env["PQMSG_DATABASE_URL"]}
    with trio.fail_after(90):
        async with (
            server_process(tmp_path / "a", env=env) as a,
            server_process(tmp_path / "b", env=env) as b,
            Client(a.url) as on_a,
            Client(b.url) as on_b,
        ):
            alice = await on_b.register()
            bob = await on_a.register()
            woke: list[float] = []

            async def poll() -> None:
                messages, _ = await bob.receive(wait=20)
                woke.append(trio.current_time())
                assert [m.ciphertext for m in messages] == [b"via B"]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                await trio.sleep(0.5)
                await alice.send(bob.account, {1: b"via B"})
                sent = trio.current_time()
            assert woke[0] - sent < 1.0


async def test_a_revocation_at_one_replica_refuses_the_next_send_at_the_other(
    tmp_path: Path, shared_env: dict[str, str]
) -> None:
    """A's remembered device keys (pqmsg.protocol.keycache) do not outlive a revocation at B."""
    with trio.fail_after(90):
        async with (
            server_process(tmp_path / "a", env=shared_env) as a,
            server_process(tmp_path / "b", env=shared_env) as b,
            Client(a.url) as on_a,
            Client(b.url) as on_b,
            httpx.AsyncClient() as raw,
        ):
            alice = await on_a.register()
            bob = await on_a.register()
            second, third, fourth = [await alice.link_new_device() for _ in range(3)]

            def signed_send(device: Any, body: bytes) -> tuple[str, bytes, dict[str, str]]:
                path = f"/v1/messages/{bob.account}"
                headers = sign_headers(
                    "PUT", path, "", body, account=alice.account, device=device.device,
                    device_key=device.device_key, now=on_a.clock(),
                ) | {"Content-Type": "application/json"}
                return a.url + path, body, headers

            # Each device sends at A once, so A remembers its key; the fourth
            # device's request is kept to be replayed.
            await second.send(bob.account, {1: b"second"})
            await third.send(bob.account, {1: b"third"})
            url, body, kept = signed_send(fourth, json.dumps({"id": str(uuid.uuid4()), "messages": [
                {"device": 1, "ciphertext": b64encode(b"fourth")}]}).encode())
            assert (await raw.put(url, content=body, headers=kept)).status_code == 200

            alice_on_b = type(alice)(on_b, alice.account, alice.device, alice.device_key, alice.identity)
            for device in (second, third, fourth):
                await alice_on_b.revoke(device.device)

            # At A: a good send is refused by the store's check; bad input and
            # a replay are refused as revoked, not as bad input or replay.
            with pytest.raises(ProblemResponse) as good:
                await second.send(bob.account, {1: b"after"})
            _, bad_body, bad_headers = signed_send(third, b'{"id": "not-a-uuid", "messages": []}')
            bad = await raw.put(url, content=bad_body, headers=bad_headers)
            replay = await raw.put(url, content=body, headers=kept)
            # Refused again, now without the remembered key.
            with pytest.raises(ProblemResponse) as again:
                await second.send(bob.account, {1: b"again"})

            assert (good.value.status, good.value.reason) == (401, "revoked")
            assert (bad.status_code, bad.json()["reason"]) == (401, "revoked")
            assert (replay.status_code, replay.json()["reason"]) == (401, "revoked")
            assert (again.value.status, again.value.reason) == (401, "revoked")
            messages, _ = await bob.receive()
            assert [m.ciphertext for m in messages] == [b"second", b"third", b"fourth"]
            metrics = (await on_a.http.get("/metrics")).text
            assert 'pqmsg_auth_rejects_total{reason="revoked"} 4.0' in metrics

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

from pqmsg.client import ProblemResponse, sign_headers
from pqmsg.protocol.b64 import b64encode
from tests.support.postgres import create_throwaway_database, drop_throwaway_database
from tests.support.process import two_replicas

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
        async with two_replicas(tmp_path, shared_env) as (a, b, on_a, on_b):
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
        async with two_replicas(tmp_path, env) as (_a, _b, on_a, on_b):
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


async def test_a_revocation_at_one_replica_refuses_the_next_request_at_the_other(
    tmp_path: Path, shared_env: dict[str, str]
) -> None:
    """A's remembered device keys (pqmsg.protocol.keycache) do not outlive a revocation at B."""
    env = shared_env | {"PQMSG_RATE_PROVISIONING": "100/100"}
    with trio.fail_after(90):
        async with two_replicas(tmp_path, env) as (a, _b, on_a, on_b), httpx.AsyncClient() as raw:
            alice = await on_a.register()
            bob = await on_a.register()
            devices = [await alice.link_new_device() for _ in range(7)]
            sender, bad_sender, replayer, poller, acker, bad_fetcher, bad_acker = devices

            def signed(device: Any, method: str, path: str, query: str, body: bytes) -> dict[str, str]:
                return sign_headers(
                    method, path, query, body, account=alice.account, device=device.device,
                    device_key=device.device_key, now=on_a.clock(),
                ) | {"Content-Type": "application/json"}

            # Each device makes a request at A, so A remembers its key; one
            # send is kept to be replayed, one message waits to be acked.
            for device in devices:
                await device.receive()
            send_path = f"/v1/messages/{bob.account}"
            body = json.dumps({"id": str(uuid.uuid4()), "messages": [
                {"device": 1, "ciphertext": b64encode(b"kept")}]}).encode()
            kept = signed(replayer, "PUT", send_path, "", body)
            assert (await raw.put(a.url + send_path, content=body, headers=kept)).status_code == 200
            await bob.send(alice.account, {d: b"to ack" for d in range(1, 9)})
            to_ack = (await acker.receive())[0][0].id
            await poller.ack([m.id for m in (await poller.receive())[0]])

            alice_on_b = type(alice)(on_b, alice.account, alice.device, alice.device_key, alice.identity)
            answers: dict[str, tuple[int, str]] = {}

            async def parked_poll() -> None:
                with pytest.raises(ProblemResponse) as refused:
                    await poller.receive(wait=3)
                answers["parked poll"] = (refused.value.status, refused.value.reason)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(parked_poll)
                await trio.sleep(0.5)
                for device in devices:
                    await alice_on_b.revoke(device.device)

            # At A: what the storage does is refused by its own re-check; bad
            # input and a replay are refused as revoked, not as what they are.
            async def refused(name: str, call: Any) -> None:
                with pytest.raises(ProblemResponse) as exc:
                    await call
                answers[name] = (exc.value.status, exc.value.reason)

            async def raw_answer(name: str, method: str, path: str, query: str, body: bytes, device: Any) -> None:
                response = await raw.request(
                    method, a.url + path + (f"?{query}" if query else ""), content=body,
                    headers=signed(device, method, path, query, body),
                )
                answers[name] = (response.status_code, response.json()["reason"])

            await refused("send", sender.send(bob.account, {1: b"after"}))
            await refused("send again", sender.send(bob.account, {1: b"again"}))
            await raw_answer("bad send", "PUT", send_path, "", b'{"id": "not-a-uuid"}', bad_sender)
            replay = await raw.put(a.url + send_path, content=body, headers=kept)
            answers["replayed send"] = (replay.status_code, replay.json()["reason"])
            await refused("ack", acker.ack([to_ack]))
            await raw_answer("bad fetch", "GET", "/v1/messages", "limit=0", b"", bad_fetcher)
            await raw_answer("bad ack", "POST", "/v1/messages/ack", "", b'{"ids": 1}', bad_acker)

            assert answers == dict.fromkeys(
                ["parked poll", "send", "send again", "bad send", "replayed send", "ack",
                 "bad fetch", "bad ack"],
                (401, "revoked"),
            )
            messages, _ = await bob.receive()
            assert [m.ciphertext for m in messages] == [b"kept"]
            metrics = (await on_a.http.get("/metrics")).text
            assert 'pqmsg_auth_rejects_total{reason="revoked"} 8.0' in metrics

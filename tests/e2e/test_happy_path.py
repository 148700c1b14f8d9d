"""The whole relay over real HTTP/2: two accounts, two devices each, keys, messages, revocation."""

from __future__ import annotations

import pytest
import trio

from pqmsg.client import Client, Device, ProblemResponse

pytestmark = pytest.mark.usefixtures("server")


async def send_to_all(sender: Device, recipient: Device, devices: list[int], text: bytes) -> None:
    await sender.send(recipient.account, {d: text + b"@" + str(d).encode() for d in devices})


async def drain(device: Device) -> list[bytes]:
    messages, more = await device.receive()
    assert not more
    await device.ack([m.id for m in messages])
    return [m.ciphertext for m in messages]


async def test_two_accounts_two_devices_exchange_keys_and_messages(client: Client) -> None:
    with trio.fail_after(30):
        alice1 = await client.register(name="alice phone")
        alice2 = await alice1.link_new_device(name="alice laptop")
        bob1 = await client.register(name="bob phone")
        bob2 = await bob1.link_new_device(name="bob laptop")
        assert (alice2.device, bob2.device) == (2, 2)
        for device in (alice1, alice2, bob1, bob2):
            counts = await device.upload_prekeys(ec=3, pq=3)
            assert counts == {"one_time_prekeys": 3, "pq_one_time_prekeys": 3}

        bundle = await alice1.fetch_bundle(bob1.account)
        assert [d["device"] for d in bundle["devices"]] == [1, 2]
        for entry in bundle["devices"]:
            assert entry["one_time_prekey"] is not None
            assert entry["pq_prekey"]["last_resort"] is False

        await send_to_all(alice1, bob1, [1, 2], b"hi bob")
        await send_to_all(bob2, alice1, [1, 2], b"hi alice")
        assert await drain(bob1) == [b"hi bob@1"]
        assert await drain(bob2) == [b"hi bob@2"]
        assert await drain(alice1) == [b"hi alice@1"]
        assert await drain(alice2) == [b"hi alice@2"]

        # Bob revokes his laptop: its requests fail at once, senders must drop it.
        await bob1.revoke(2)
        with pytest.raises(ProblemResponse) as revoked:
            await bob2.receive()
        assert (revoked.value.status, revoked.value.reason) == (401, "revoked")
        with pytest.raises(ProblemResponse) as mismatch:
            await send_to_all(alice1, bob1, [1, 2], b"still two?")
        assert mismatch.value.status == 409
        assert mismatch.value.problem["extra"] == [2]
        assert mismatch.value.problem["missing"] == []

        await send_to_all(alice1, bob1, [1], b"just one")
        assert await drain(bob1) == [b"just one@1"]
        assert [d["device"] for d in await bob1.list_devices()] == [1]


async def test_pq_pool_exhaustion_serves_the_last_resort_key(client: Client) -> None:
    with trio.fail_after(20):
        alice = await client.register()
        bob = await client.register()
        await bob.upload_prekeys(ec=1, pq=1)
        first = (await alice.fetch_bundle(bob.account, 1))["devices"][0]
        second = (await alice.fetch_bundle(bob.account, 1))["devices"][0]
        assert first["pq_prekey"]["last_resort"] is False
        assert second["pq_prekey"]["last_resort"] is True
        assert second["one_time_prekey"] is None
        assert first["pq_prekey"]["id"] != second["pq_prekey"]["id"]


async def test_unacknowledged_messages_come_back_in_order(client: Client) -> None:
    with trio.fail_after(20):
        alice = await client.register()
        bob = await client.register()
        for i in range(5):
            await alice.send(bob.account, {1: f"m{i}".encode()})
        first, more = await bob.receive(limit=3)
        assert [m.ciphertext for m in first] == [b"m0", b"m1", b"m2"] and more
        again, _ = await bob.receive(limit=3)
        assert [m.id for m in again] == [m.id for m in first]
        assert await bob.ack([first[0].id, first[1].id, "0f8fad5b-d9cb-469f-a165-70867728950e"]) == 2
        rest, more = await bob.receive()
        assert [m.ciphertext for m in rest] == [b"m2", b"m3", b"m4"] and not more
        assert rest[0].sender_account == alice.account and rest[0].sender_device == 1


async def test_retried_send_is_stored_once(client: Client) -> None:
    with trio.fail_after(20):
        alice = await client.register()
        bob = await client.register()
        message_id = "6f1c1a8e-7b4a-4f8e-9a56-0d9a3b5c2e11"
        assert (await alice.send(bob.account, {1: b"x"}, message_id=message_id))["stored"] == 1
        assert (await alice.send(bob.account, {1: b"x"}, message_id=message_id))["stored"] == 1
        messages, _ = await bob.receive()
        assert len(messages) == 1


async def test_account_deletion_makes_devices_unknown(client: Client) -> None:
    with trio.fail_after(20):
        alice = await client.register()
        laptop = await alice.link_new_device()
        with pytest.raises(ProblemResponse) as not_primary:
            await laptop.delete_account()
        assert not_primary.value.status == 403
        await alice.delete_account()
        for device in (alice, laptop):
            with pytest.raises(ProblemResponse) as gone:
                await device.list_devices()
            assert (gone.value.status, gone.value.reason) == (401, "unknown_device")

"""The storage contract suite: every backend must pass it unchanged.

A backend's test module subclasses :class:`StorageContract` and provides a
``storage`` fixture yielding a freshly migrated, empty
:class:`pqmsg.storage.base.Backend`; ``now`` (a fixed wall-clock instant)
comes from ``tests/storage/conftest.py``. Nothing here knows which database
runs underneath.

Rules pinned here beyond the ``Storage`` docstrings:

- device ids are never reused, also after revocation;
- revoking a device also deletes every outstanding provisioning token of its
  account (tokens do not record which device created them, and a revoked,
  perhaps stolen, device must not link a replacement);
- ``last_seen_at`` never moves back;
- a provisioning token is valid while ``now < expires_at``;
- a retried send gets the first result back with ``duplicate=True``, even
  after the recipient's devices changed or the recipient was deleted; a
  failed send does not burn its id;
- a pair's first PQ epoch counts as a ratchet advance;
- one-time prekey ids are unique per device and kind (an EC and a PQ key may
  share an id).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import attrs
import pytest
import trio

from pqmsg.errors import AuthError, Conflict, DeviceMismatch, Forbidden, NotFound, ProblemError
from pqmsg.storage.base import (
    Backend,
    Bundle,
    DeviceAuth,
    DeviceInfo,
    KeyCounts,
    KeyUpload,
    NewDevice,
    OneTimeKey,
    OutgoingCopy,
    PoolStatistics,
    PushTarget,
    Sender,
    SignedKey,
    StoreResult,
)

DEADLINE_S = 20.0
WINDOW_S = 24 * 3600.0
TOKEN_TTL_S = 600.0
MAX_KEYS = 1000


# -- builders -------------------------------------------------------------------


def device_of(tag: str, name: str | None = None) -> NewDevice:
    return NewDevice(
        device_key=f"key:{tag}".encode(), certificate=f"cert:{tag}".encode(), name=name
    )


def spk(key_id: int) -> SignedKey:
    return SignedKey(key_id, f"spk{key_id}".encode(), f"spk-sig{key_id}".encode())


def pqlr(key_id: int) -> SignedKey:
    return SignedKey(key_id, f"pqlr{key_id}".encode(), f"pqlr-sig{key_id}".encode())


def ec_keys(*ids: int) -> tuple[OneTimeKey, ...]:
    return tuple(OneTimeKey(i, f"ec{i}".encode()) for i in ids)


def pq_keys(*ids: int) -> tuple[OneTimeKey, ...]:
    return tuple(OneTimeKey(i, f"pq{i}".encode(), f"pq-sig{i}".encode()) for i in ids)


def copies(*devices: int, epoch: int | None = None, text: str = "m") -> tuple[OutgoingCopy, ...]:
    return tuple(OutgoingCopy(d, f"{text}->{d}".encode(), epoch) for d in devices)


def new_id() -> str:
    return str(uuid.uuid4())


async def make_account(storage: Backend, now: float, *, devices: int = 1) -> str:
    """A new account with devices 1..``devices`` (linked through tokens)."""
    account = new_id()
    await storage.create_account(account, f"identity:{account}".encode(), device_of("1"), now=now)
    for n in range(2, devices + 1):
        await link(storage, account, now, tag=str(n))
    return account


async def link(storage: Backend, account: str, now: float, *, tag: str = "x") -> int:
    token = uuid.uuid4().bytes * 2
    await storage.create_provisioning_token(account, token, expires_at=now + TOKEN_TTL_S)
    return await storage.link_device(token, device_of(tag), now=now)


async def send(
    storage: Backend,
    sender: Sender,
    recipient: str,
    outgoing: Sequence[OutgoingCopy],
    now: float,
    *,
    message_id: str | None = None,
) -> int:
    result = await storage.store_messages(
        sender, message_id or new_id(), recipient, outgoing, now=now, idempotency_window_s=WINDOW_S
    )
    return result.stored


async def queue_of(storage: Backend, account: str, device: int) -> list[bytes]:
    messages, more = await storage.fetch_messages(account, device, limit=500)
    assert not more
    return [m.ciphertext for m in messages]


class StorageContract:
    """The rules of :class:`pqmsg.storage.base.Storage`, backend-agnostic."""

    # -- accounts -------------------------------------------------------------

    async def test_new_account_has_primary_device(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            account = new_id()
            await storage.create_account(account, b"identity", device_of("1", "phone"), now=now)
            assert await storage.get_identity_key(account) == b"identity"
            assert await storage.get_device_auth(account, 1) == DeviceAuth(
                device_key=b"key:1", revoked=False, last_seen_at=None
            )
            assert await storage.list_devices(account) == (DeviceInfo(1, "phone", now, None),)
            assert await storage.active_device_ids(account) == (1,)

    async def test_unknown_account_and_device(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now)
            stranger = new_id()
            assert await storage.get_identity_key(stranger) is None
            assert await storage.get_device_auth(stranger, 1) is None
            assert await storage.get_device_auth(account, 2) is None
            assert await storage.list_devices(stranger) == ()
            assert await storage.active_device_ids(stranger) == ()
            assert await storage.take_bundle(stranger, None) is None

    async def test_delete_account_removes_everything(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now, devices=2)
            bob = await make_account(storage, now)
            await storage.put_keys(
                alice,
                1,
                KeyUpload(spk(1), pqlr(2), ec_keys(1), pq_keys(1)),
                max_per_kind=MAX_KEYS,
                now=now,
            )
            await send(storage, Sender(bob, 1), alice, copies(1, 2), now)
            await storage.set_push_target(alice, 1, PushTarget("fcm", "alice-token"))
            token = b"t" * 32
            await storage.create_provisioning_token(alice, token, expires_at=now + TOKEN_TTL_S)
            await send(storage, Sender(alice, 1), bob, copies(1, epoch=1), now)

            assert await storage.delete_account(alice) == (1, 2)

            assert await storage.get_identity_key(alice) is None
            assert await storage.get_device_auth(alice, 1) is None
            assert await storage.get_device_auth(alice, 2) is None
            assert await storage.list_devices(alice) == ()
            assert await storage.take_bundle(alice, None) is None
            assert await queue_of(storage, alice, 1) == []
            assert await storage.get_push_target(alice, 1) is None
            assert await storage.get_provisioning_grant(token, now=now) is None
            with pytest.raises(NotFound):
                await send(storage, Sender(bob, 1), alice, copies(1), now)
            assert await storage.delete_account(alice) == ()
            # Bob is untouched.
            assert await storage.active_device_ids(bob) == (1,)
            assert await storage.get_device_auth(bob, 1) is not None

    # -- devices --------------------------------------------------------------

    async def test_touch_device_records_last_seen(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now)
            await storage.touch_device(account, 1, now=now + 60)
            auth = await storage.get_device_auth(account, 1)
            assert auth is not None and auth.last_seen_at == now + 60
            # A late, slower request does not move it back.
            await storage.touch_device(account, 1, now=now + 30)
            (info,) = await storage.list_devices(account)
            assert info.last_seen_at == now + 60
            # A revoked device's request (refused later) changes nothing.
            second = await link(storage, account, now)
            assert await storage.revoke_device(account, second, now=now)
            await storage.touch_device(account, second, now=now + 90)
            revoked = await storage.get_device_auth(account, second)
            assert revoked is not None and revoked.last_seen_at is None

    async def test_list_devices_shows_active_devices_in_id_order(
        self, storage: Backend, now: float
    ) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now, devices=3)
            assert await storage.revoke_device(account, 2, now=now)
            assert [d.device for d in await storage.list_devices(account)] == [1, 3]
            assert await storage.active_device_ids(account) == (1, 3)

    async def test_revoke_device_deletes_what_it_owned(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now, devices=2)
            bob = await make_account(storage, now)
            for device in (1, 2):
                await storage.put_keys(
                    alice,
                    device,
                    KeyUpload(spk(1), pqlr(2), ec_keys(1, 2), pq_keys(1, 2)),
                    max_per_kind=MAX_KEYS,
                    now=now,
                )
                await storage.set_push_target(alice, device, PushTarget("apns", f"tok{device}"))
            await send(storage, Sender(bob, 1), alice, copies(1, 2), now)

            assert await storage.revoke_device(alice, 2, now=now + 5)

            auth = await storage.get_device_auth(alice, 2)
            assert auth is not None and auth.revoked
            assert await storage.take_bundle(alice, 2) is None
            status = await storage.key_status(alice, 2)
            assert status.counts == KeyCounts(0, 0)
            assert status.signed_prekey_created_at is None
            assert not status.has_pq_last_resort
            assert await queue_of(storage, alice, 2) == []
            assert await storage.get_push_target(alice, 2) is None
            # Device 1 keeps all of its own.
            assert await queue_of(storage, alice, 1) == [b"m->1"]
            assert await storage.get_push_target(alice, 1) == PushTarget("apns", "tok1")
            assert (await storage.key_status(alice, 1)).counts == KeyCounts(2, 2)
            # Only once; unknown devices are not revoked.
            assert not await storage.revoke_device(alice, 2, now=now + 6)
            assert not await storage.revoke_device(alice, 9, now=now + 6)
            assert not await storage.revoke_device(new_id(), 1, now=now + 6)

    async def test_device_ids_are_never_reused(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now, devices=2)
            assert await storage.revoke_device(account, 2, now=now)
            assert await link(storage, account, now) == 3
            assert await storage.active_device_ids(account) == (1, 3)

    async def test_revoking_drops_outstanding_provisioning_tokens(
        self, storage: Backend, now: float
    ) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now, devices=2)
            token = b"p" * 32
            await storage.create_provisioning_token(account, token, expires_at=now + TOKEN_TTL_S)
            assert await storage.revoke_device(account, 2, now=now)
            assert await storage.get_provisioning_grant(token, now=now) is None
            with pytest.raises(Forbidden):
                await storage.link_device(token, device_of("late"), now=now)

    # -- provisioning ---------------------------------------------------------

    async def test_provisioning_token_links_one_device(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now)
            token = b"a" * 32
            await storage.create_provisioning_token(account, token, expires_at=now + TOKEN_TTL_S)
            grant = await storage.get_provisioning_grant(token, now=now)
            assert grant is not None
            assert (grant.account, grant.expires_at) == (account, now + TOKEN_TTL_S)
            assert grant.identity_key == f"identity:{account}".encode()

            device = await storage.link_device(token, device_of("2", "tablet"), now=now + 1)

            assert device == 2
            assert await storage.get_device_auth(account, 2) == DeviceAuth(
                device_key=b"key:2", revoked=False, last_seen_at=None
            )
            assert (await storage.list_devices(account))[1] == DeviceInfo(
                2, "tablet", now + 1, None
            )
            # Used up.
            assert await storage.get_provisioning_grant(token, now=now + 2) is None
            with pytest.raises(Forbidden) as used:
                await storage.link_device(token, device_of("again"), now=now + 2)
            assert used.value.reason == "provisioning_token"
            assert await storage.active_device_ids(account) == (1, 2)

    async def test_expired_or_unknown_token_links_nothing(
        self, storage: Backend, now: float
    ) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now)
            token = b"e" * 32
            await storage.create_provisioning_token(account, token, expires_at=now + TOKEN_TTL_S)
            expired_at = now + TOKEN_TTL_S
            assert await storage.get_provisioning_grant(token, now=expired_at - 1) is not None
            assert await storage.get_provisioning_grant(token, now=expired_at) is None
            for bad in (token, b"u" * 32):
                with pytest.raises(Forbidden) as refused:
                    await storage.link_device(bad, device_of("2"), now=expired_at)
                assert refused.value.reason == "provisioning_token"
            assert await storage.active_device_ids(account) == (1,)
            # The failures burnt no device id.
            assert await link(storage, account, now) == 2

    async def test_concurrent_links_with_one_token(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now)
            token = b"c" * 32
            await storage.create_provisioning_token(account, token, expires_at=now + TOKEN_TTL_S)
            linked: list[int] = []
            refused: list[Forbidden] = []

            async def attempt(tag: str) -> None:
                try:
                    linked.append(await storage.link_device(token, device_of(tag), now=now))
                except Forbidden as exc:
                    refused.append(exc)

            async with trio.open_nursery() as nursery:
                for tag in ("a", "b", "c", "d"):
                    nursery.start_soon(attempt, tag)

            assert linked == [2]
            assert len(refused) == 3
            assert await storage.active_device_ids(account) == (1, 2)

    # -- keys -----------------------------------------------------------------

    async def test_put_keys_stores_and_counts(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now)
            upload = KeyUpload(spk(7), pqlr(8), ec_keys(1, 2, 3), pq_keys(1, 2))
            counts = await storage.put_keys(account, 1, upload, max_per_kind=MAX_KEYS, now=now)
            assert counts == KeyCounts(one_time_prekeys=3, pq_one_time_prekeys=2)
            status = await storage.key_status(account, 1)
            assert status.counts == counts
            assert status.signed_prekey_created_at == now
            assert status.has_pq_last_resort
            # One-time keys append, and an EC and a PQ key may share an id.
            counts = await storage.put_keys(
                account,
                1,
                KeyUpload(one_time_prekeys=ec_keys(4), pq_one_time_prekeys=pq_keys(3)),
                max_per_kind=MAX_KEYS,
                now=now + 1,
            )
            assert counts == KeyCounts(4, 3)
            assert (await storage.key_status(account, 1)).signed_prekey_created_at == now

    async def test_key_status_of_a_device_without_keys(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now)
            status = await storage.key_status(account, 1)
            assert status.counts == KeyCounts(0, 0)
            assert status.signed_prekey_created_at is None
            assert not status.has_pq_last_resort

    async def test_signed_keys_replace_the_current_ones(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now)
            await storage.put_keys(
                account, 1, KeyUpload(spk(1), pqlr(2)), max_per_kind=MAX_KEYS, now=now
            )
            await storage.put_keys(
                account, 1, KeyUpload(spk(3), pqlr(4)), max_per_kind=MAX_KEYS, now=now + 10
            )
            status = await storage.key_status(account, 1)
            assert status.signed_prekey_created_at == now + 10
            bundle = await storage.take_bundle(account, 1)
            assert bundle is not None
            (entry,) = bundle.devices
            assert entry.signed_prekey == spk(3)
            assert entry.pq_prekey == OneTimeKey(4, b"pqlr4", b"pqlr-sig4")

    async def test_duplicate_one_time_key_stores_nothing(
        self, storage: Backend, now: float
    ) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now)
            await storage.put_keys(
                account,
                1,
                KeyUpload(spk(1), None, ec_keys(1, 2), pq_keys(1)),
                max_per_kind=MAX_KEYS,
                now=now,
            )
            attempts = [
                KeyUpload(spk(9), pqlr(9), ec_keys(3, 2)),  # 2 already stored
                KeyUpload(spk(9), pqlr(9), (), pq_keys(5, 1)),  # 1 already stored
                KeyUpload(spk(9), pqlr(9), ec_keys(5, 6, 5)),  # 5 twice in the upload
                KeyUpload(spk(9), pqlr(9), ec_keys(7), pq_keys(8, 8)),
            ]
            for upload in attempts:
                with pytest.raises(Conflict) as conflict:
                    await storage.put_keys(account, 1, upload, max_per_kind=MAX_KEYS, now=now + 1)
                assert conflict.value.reason == "duplicate_prekey"
            status = await storage.key_status(account, 1)
            assert status.counts == KeyCounts(2, 1)
            assert status.signed_prekey_created_at == now
            assert not status.has_pq_last_resort

    async def test_one_time_key_limit(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now)
            assert await storage.put_keys(
                account, 1, KeyUpload(one_time_prekeys=ec_keys(1, 2)), max_per_kind=3, now=now
            ) == KeyCounts(2, 0)
            with pytest.raises(Conflict) as conflict:
                await storage.put_keys(
                    account,
                    1,
                    KeyUpload(spk(1), None, ec_keys(3, 4), pq_keys(1)),
                    max_per_kind=3,
                    now=now,
                )
            assert conflict.value.reason == "prekey_limit"
            status = await storage.key_status(account, 1)
            assert status.counts == KeyCounts(2, 0)
            assert status.signed_prekey_created_at is None
            # Up to the limit is fine, per kind.
            assert await storage.put_keys(
                account,
                1,
                KeyUpload(None, None, ec_keys(3), pq_keys(1, 2, 3)),
                max_per_kind=3,
                now=now,
            ) == KeyCounts(3, 3)

    async def test_take_bundle_hands_out_one_time_keys_once(
        self, storage: Backend, now: float
    ) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now)
            await storage.put_keys(
                account,
                1,
                KeyUpload(spk(1), pqlr(50), ec_keys(1, 2), pq_keys(1)),
                max_per_kind=MAX_KEYS,
                now=now,
            )
            taken = []
            for _ in range(3):
                bundle = await storage.take_bundle(account, 1)
                assert bundle is not None
                assert bundle.identity_key == f"identity:{account}".encode()
                (entry,) = bundle.devices
                assert entry.device == 1
                assert entry.signed_prekey == spk(1)
                taken.append(entry)
            assert sorted(e.one_time_prekey.key_id for e in taken[:2] if e.one_time_prekey) == [
                1,
                2,
            ]
            assert set(e.one_time_prekey for e in taken[:2]) == set(ec_keys(1, 2))
            assert taken[2].one_time_prekey is None
            pq_served = [(e.pq_prekey, e.pq_last_resort) for e in taken]
            assert pq_served[0] == (pq_keys(1)[0], False)
            # The last-resort key is served again and again, and flagged.
            last_resort = OneTimeKey(50, b"pqlr50", b"pqlr-sig50")
            assert pq_served[1:] == [(last_resort, True), (last_resort, True)]
            assert (await storage.key_status(account, 1)).counts == KeyCounts(0, 0)

    async def test_concurrent_bundles_hand_out_each_key_once(
        self, storage: Backend, now: float
    ) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now)
            await storage.put_keys(
                account,
                1,
                KeyUpload(spk(1), pqlr(99), ec_keys(*range(1, 6)), pq_keys(*range(11, 16))),
                max_per_kind=MAX_KEYS,
                now=now,
            )
            bundles: list[Bundle | None] = []

            async def fetch() -> None:
                bundles.append(await storage.take_bundle(account, 1))

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(fetch)

            entries = [b.devices[0] for b in bundles if b is not None]
            assert len(entries) == 20
            ec = [e.one_time_prekey.key_id for e in entries if e.one_time_prekey is not None]
            assert sorted(ec) == [1, 2, 3, 4, 5]
            pq = [e.pq_prekey.key_id for e in entries if e.pq_prekey and not e.pq_last_resort]
            assert sorted(pq) == [11, 12, 13, 14, 15]
            fallbacks = [e for e in entries if e.pq_last_resort]
            assert len(fallbacks) == 15
            assert all(e.pq_prekey is not None and e.pq_prekey.key_id == 99 for e in fallbacks)

    async def test_bundle_for_every_active_device(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now, devices=4)
            await storage.put_keys(
                account,
                1,
                KeyUpload(spk(1), pqlr(2), ec_keys(1), pq_keys(1)),
                max_per_kind=MAX_KEYS,
                now=now,
            )
            # Device 2: one-time keys but no signed prekey yet; device 4: nothing.
            await storage.put_keys(
                account, 2, KeyUpload(one_time_prekeys=ec_keys(5)), max_per_kind=MAX_KEYS, now=now
            )
            assert await storage.revoke_device(account, 3, now=now)

            bundle = await storage.take_bundle(account, None)

            assert bundle is not None
            assert [e.device for e in bundle.devices] == [1, 2, 4]
            one, two, four = bundle.devices
            assert (one.signed_prekey, one.one_time_prekey, one.pq_prekey) == (
                spk(1),
                ec_keys(1)[0],
                pq_keys(1)[0],
            )
            assert not one.pq_last_resort
            assert (two.signed_prekey, two.one_time_prekey, two.pq_prekey) == (
                None,
                ec_keys(5)[0],
                None,
            )
            assert not two.pq_last_resort
            assert (four.signed_prekey, four.one_time_prekey, four.pq_prekey) == (None, None, None)
            assert not four.pq_last_resort

    async def test_bundle_of_revoked_or_unknown_device(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            account = await make_account(storage, now, devices=2)
            assert await storage.revoke_device(account, 2, now=now)
            assert await storage.take_bundle(account, 2) is None
            assert await storage.take_bundle(account, 3) is None
            assert await storage.take_bundle(new_id(), 1) is None

    async def test_count_stale_signed_prekeys(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now, devices=3)
            bob = await make_account(storage, now, devices=2)
            old, fresh = now - 1000, now
            for account, device, stored_at in (
                (alice, 1, old),
                (alice, 2, fresh),
                (alice, 3, old),
                (bob, 1, old),
            ):
                await storage.put_keys(
                    account,
                    device,
                    KeyUpload(spk(device), pqlr(9)),
                    max_per_kind=MAX_KEYS,
                    now=stored_at,
                )
            # Bob's device 2 has no signed prekey: it is not counted.
            assert await storage.count_stale_signed_prekeys(older_than=now - 500) == 3
            assert await storage.revoke_device(alice, 3, now=now)
            assert await storage.count_stale_signed_prekeys(older_than=now - 500) == 2
            # Rotating makes it fresh again.
            await storage.put_keys(bob, 1, KeyUpload(spk(2)), max_per_kind=MAX_KEYS, now=fresh)
            assert await storage.count_stale_signed_prekeys(older_than=now - 500) == 1
            assert await storage.count_stale_signed_prekeys(older_than=now + 1) == 3

    # -- messages -------------------------------------------------------------

    async def test_store_and_fetch_in_order(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now, devices=2)
            bob = await make_account(storage, now, devices=2)
            first = await storage.store_messages(
                Sender(alice, 2),
                new_id(),
                bob,
                copies(1, 2, text="one", epoch=3),
                now=now,
                idempotency_window_s=WINDOW_S,
            )
            assert first.stored == 2 and not first.duplicate and first.devices == (1, 2)
            for i, text in enumerate(("two", "three", "four"), start=1):
                await send(storage, Sender(alice, 1), bob, copies(1, 2, text=text), now + i)

            messages, more = await storage.fetch_messages(bob, 1, limit=10)

            assert not more
            assert [m.ciphertext for m in messages] == [
                b"one->1",
                b"two->1",
                b"three->1",
                b"four->1",
            ]
            head = messages[0]
            assert head.sender == Sender(alice, 2)
            assert (head.pq_epoch, head.server_ts) == (3, now)
            assert messages[1].pq_epoch is None and messages[1].server_ts == now + 1
            assert len({m.id for m in messages}) == 4
            # Each device has its own copy, with its own id.
            other, _ = await storage.fetch_messages(bob, 2, limit=10)
            assert other[0].ciphertext == b"one->2"
            assert not {m.id for m in messages} & {m.id for m in other}
            assert await queue_of(storage, alice, 1) == []

    async def test_fetch_limit_and_more(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now)
            bob = await make_account(storage, now)
            for i in range(5):
                await send(storage, Sender(alice, 1), bob, copies(1, text=str(i)), now)
            page, more = await storage.fetch_messages(bob, 1, limit=2)
            assert [m.ciphertext for m in page] == [b"0->1", b"1->1"] and more
            page, more = await storage.fetch_messages(bob, 1, limit=5)
            assert len(page) == 5 and not more
            page, more = await storage.fetch_messages(bob, 1, limit=6)
            assert len(page) == 5 and not more

    async def test_ack_removes_only_those_messages(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now)
            bob = await make_account(storage, now, devices=2)
            for i in range(4):
                await send(storage, Sender(alice, 1), bob, copies(1, 2, text=str(i)), now)
            mine, _ = await storage.fetch_messages(bob, 1, limit=10)
            theirs, _ = await storage.fetch_messages(bob, 2, limit=10)

            acked = await storage.ack_messages(
                bob, 1, [mine[0].id, mine[2].id, mine[0].id, new_id(), "not-a-uuid", theirs[1].id]
            )

            assert acked == 2
            assert await queue_of(storage, bob, 1) == [b"1->1", b"3->1"]
            # Another device's ids are not this device's to ack.
            assert len(await queue_of(storage, bob, 2)) == 4
            # Unacknowledged messages come again; acknowledged ones never.
            assert await queue_of(storage, bob, 1) == [b"1->1", b"3->1"]
            assert await storage.ack_messages(bob, 1, [mine[0].id]) == 0
            assert await storage.ack_messages(bob, 1, []) == 0

    async def test_retry_within_window_is_not_stored_twice(
        self, storage: Backend, now: float
    ) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now)
            bob = await make_account(storage, now, devices=2)
            carol = await make_account(storage, now)
            message_id = new_id()

            async def store(sender: Sender, at: float) -> StoreResult:
                return await storage.store_messages(
                    sender,
                    message_id,
                    bob,
                    copies(1, 2, epoch=1),
                    now=at,
                    idempotency_window_s=WINDOW_S,
                )

            first = await store(Sender(alice, 1), now)
            assert (first.duplicate, first.ratchet_advances) == (False, 2)
            retry = await store(Sender(alice, 1), now + WINDOW_S - 1)
            assert retry == attrs.evolve(first, duplicate=True)
            assert await queue_of(storage, bob, 1) == [b"m->1"]
            # The id is the sender account's: another sender may use it.
            assert not (await store(Sender(carol, 1), now)).duplicate
            # After the window it is a new message.
            later = await store(Sender(alice, 1), now + WINDOW_S + 1)
            assert not later.duplicate and later.stored == 2
            assert await queue_of(storage, bob, 1) == [b"m->1"] * 3

    async def test_concurrent_retries_store_once(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now)
            bob = await make_account(storage, now)
            message_id = new_id()
            duplicates: list[bool] = []

            async def store() -> None:
                result = await storage.store_messages(
                    Sender(alice, 1),
                    message_id,
                    bob,
                    copies(1),
                    now=now,
                    idempotency_window_s=WINDOW_S,
                )
                duplicates.append(result.duplicate)

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(store)

            assert sorted(duplicates) == [False, True, True, True, True]
            assert await queue_of(storage, bob, 1) == [b"m->1"]

    async def test_retry_after_the_recipient_changed_gets_the_first_result(
        self, storage: Backend, now: float
    ) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now)
            bob = await make_account(storage, now, devices=2)
            message_id = new_id()

            async def store() -> StoreResult:
                return await storage.store_messages(
                    Sender(alice, 1),
                    message_id,
                    bob,
                    copies(1, 2, epoch=1),
                    now=now,
                    idempotency_window_s=WINDOW_S,
                )

            first = await store()
            assert await storage.revoke_device(bob, 2, now=now)
            assert await store() == attrs.evolve(first, duplicate=True)
            await storage.delete_account(bob)
            assert await store() == attrs.evolve(first, duplicate=True)

    async def test_device_mismatch_stores_nothing(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now)
            bob = await make_account(storage, now, devices=3)
            assert await storage.revoke_device(bob, 3, now=now)
            message_id = new_id()

            with pytest.raises(DeviceMismatch) as mismatch:
                await storage.store_messages(
                    Sender(alice, 1),
                    message_id,
                    bob,
                    copies(1, 3, 4, epoch=1),
                    now=now,
                    idempotency_window_s=WINDOW_S,
                )

            assert mismatch.value.reason == "device_mismatch"
            # The revoked device 3 counts as extra, like the unknown 4.
            assert mismatch.value.extra == {"missing": [2], "extra": [3, 4]}
            assert await queue_of(storage, bob, 1) == []
            # The failed send burnt neither its id nor the ratchet state.
            result = await storage.store_messages(
                Sender(alice, 1),
                message_id,
                bob,
                copies(1, 2, epoch=1),
                now=now,
                idempotency_window_s=WINDOW_S,
            )
            assert (result.duplicate, result.stored, result.ratchet_advances) == (False, 2, 2)

    async def test_device_addressed_twice_is_refused(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now)
            bob = await make_account(storage, now)
            with pytest.raises(ProblemError) as refused:
                await send(storage, Sender(alice, 1), bob, copies(1) + copies(1), now)
            assert refused.value.status in (400, 409)
            assert await queue_of(storage, bob, 1) == []

    async def test_unknown_recipient(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now)
            message_id = new_id()
            with pytest.raises(NotFound):
                await send(
                    storage, Sender(alice, 1), new_id(), copies(1), now, message_id=message_id
                )
            bob = await make_account(storage, now)
            assert (
                await send(storage, Sender(alice, 1), bob, copies(1), now, message_id=message_id)
                == 1
            )

    async def test_sender_key_is_checked_with_the_send(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now, devices=2)
            bob = await make_account(storage, now)
            first = new_id()

            async def keyed(sender: Sender, key: bytes, message_id: str | None = None) -> int:
                result = await storage.store_messages(
                    sender, message_id or new_id(), bob, copies(1), now=now,
                    idempotency_window_s=WINDOW_S, sender_key=key,
                )
                return result.stored

            assert await keyed(Sender(alice, 1), b"key:1", first) == 1
            refusals = []
            for sender, key in [
                (Sender(alice, 1), b"key:2"),  # another device's key
                (Sender(alice, 3), b"key:1"),  # no such device
                (Sender(new_id(), 1), b"key:1"),  # no such account
            ]:
                with pytest.raises(AuthError) as refused:
                    await keyed(sender, key)
                refusals.append(refused.value.reason)
            assert refusals == ["signature", "unknown_device", "unknown_device"]

            assert await storage.revoke_device(alice, 2, now=now)
            with pytest.raises(AuthError) as revoked:
                await keyed(Sender(alice, 2), b"key:2")
            assert revoked.value.reason == "revoked"
            # Checked before the send id: a retry of a stored send is refused too.
            await storage.delete_account(alice)
            with pytest.raises(AuthError) as gone:
                await keyed(Sender(alice, 1), b"key:1", first)
            assert gone.value.reason == "unknown_device"
            assert await queue_of(storage, bob, 1) == [b"m->1"]

    async def test_device_key_is_checked_with_fetch_and_ack(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now)
            bob = await make_account(storage, now, devices=2)
            await send(storage, Sender(alice, 1), bob, copies(1, 2), now)
            fetched, more = await storage.fetch_messages(bob, 1, limit=10, device_key=b"key:1")
            assert ([m.ciphertext for m in fetched], more) == ([b"m->1"], False)
            empty, _ = await storage.fetch_messages(alice, 1, limit=10, device_key=b"key:1")
            assert empty == ()
            assert await storage.ack_messages(bob, 1, [], device_key=b"key:1") == 0

            reasons = []
            for account, device, key in [
                (bob, 1, b"key:2"),  # another device's key
                (bob, 3, b"key:1"),  # no such device
                (new_id(), 1, b"key:1"),  # no such account
            ]:
                for call in (
                    storage.fetch_messages(account, device, limit=10, device_key=key),
                    storage.ack_messages(account, device, [fetched[0].id], device_key=key),
                ):
                    with pytest.raises(AuthError) as refused:
                        await call
                    reasons.append(refused.value.reason)
            assert reasons == ["signature"] * 2 + ["unknown_device"] * 4
            assert await queue_of(storage, bob, 1) == [b"m->1"]  # the refused ack removed nothing

            second, _ = await storage.fetch_messages(bob, 2, limit=10)
            assert await storage.revoke_device(bob, 2, now=now)
            for call in (
                storage.fetch_messages(bob, 2, limit=10, device_key=b"key:2"),
                storage.ack_messages(bob, 2, [second[0].id], device_key=b"key:2"),
                storage.ack_messages(bob, 2, [], device_key=b"key:2"),
            ):
                with pytest.raises(AuthError) as revoked:
                    await call
                assert revoked.value.reason == "revoked"
            assert await storage.ack_messages(bob, 1, [fetched[0].id], device_key=b"key:1") == 1
            assert await queue_of(storage, bob, 1) == []

    async def test_account_registered_again_under_its_id_refuses_the_old_key(
        self, storage: Backend, now: float
    ) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now)
            bob = await make_account(storage, now)
            await storage.delete_account(alice)
            await storage.create_account(alice, b"identity again", device_of("again"), now=now)
            with pytest.raises(AuthError) as refused:
                await storage.store_messages(
                    Sender(alice, 1), new_id(), bob, copies(1), now=now,
                    idempotency_window_s=WINDOW_S, sender_key=b"key:1",
                )
            assert refused.value.reason == "signature"
            assert await queue_of(storage, bob, 1) == []
            stored = await storage.store_messages(
                Sender(alice, 1), new_id(), bob, copies(1), now=now,
                idempotency_window_s=WINDOW_S, sender_key=b"key:again",
            )
            assert stored.stored == 1

    async def test_purge_forgets_old_send_ids(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now)
            bob = await make_account(storage, now)
            old_id, new_send_id = new_id(), new_id()
            await send(storage, Sender(alice, 1), bob, copies(1), now - 100, message_id=old_id)
            await send(storage, Sender(alice, 1), bob, copies(1), now, message_id=new_send_id)

            assert await storage.purge_idempotency(older_than=now - 50) == 1
            assert await storage.purge_idempotency(older_than=now - 50) == 0

            async def retry(message_id: str) -> bool:
                result = await storage.store_messages(
                    Sender(alice, 1),
                    message_id,
                    bob,
                    copies(1),
                    now=now + 1,
                    idempotency_window_s=WINDOW_S,
                )
                return result.duplicate

            assert not await retry(old_id)  # forgotten: stored again
            assert await retry(new_send_id)
            assert len(await queue_of(storage, bob, 1)) == 3

    async def test_ratchet_advances(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now, devices=2)
            bob = await make_account(storage, now, devices=2)

            async def advances(sender_device: int, epochs: tuple[int | None, int | None]) -> int:
                outgoing = tuple(
                    OutgoingCopy(device, b"c", epoch)
                    for device, epoch in zip((1, 2), epochs, strict=True)
                )
                result = await storage.store_messages(
                    Sender(alice, sender_device),
                    new_id(),
                    bob,
                    outgoing,
                    now=now,
                    idempotency_window_s=WINDOW_S,
                )
                return result.ratchet_advances

            assert await advances(1, (1, 1)) == 2  # first epoch of each pair
            assert await advances(1, (1, 1)) == 0
            assert await advances(1, (2, 1)) == 1
            assert await advances(1, (1, None)) == 0  # lower, or none: no advance
            assert await advances(1, (None, None)) == 0
            assert await advances(1, (2, 2)) == 1  # "none" did not reset device 2
            assert await advances(2, (1, 1)) == 2  # another sender device, other pairs
            assert await advances(1, (5, 5)) == 2

    # -- push -----------------------------------------------------------------

    async def test_push_targets(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now, devices=2)
            bob = await make_account(storage, now)
            assert await storage.get_push_target(alice, 1) is None
            await storage.set_push_target(alice, 1, PushTarget("fcm", "a"))
            await storage.set_push_target(alice, 1, PushTarget("apns", "b"))
            assert await storage.get_push_target(alice, 1) == PushTarget("apns", "b")
            await storage.set_push_target(alice, 2, PushTarget("apns", "shared"))
            await storage.set_push_target(bob, 1, PushTarget("apns", "shared"))

            assert await storage.delete_push_target(alice, 1)
            assert not await storage.delete_push_target(alice, 1)
            assert await storage.get_push_target(alice, 1) is None

            # A dead token goes wherever it is stored, only for its provider.
            await storage.set_push_target(alice, 1, PushTarget("fcm", "shared"))
            assert await storage.drop_push_token(PushTarget("apns", "shared")) == 2
            assert await storage.get_push_target(alice, 2) is None
            assert await storage.get_push_target(bob, 1) is None
            assert await storage.get_push_target(alice, 1) == PushTarget("fcm", "shared")
            assert await storage.drop_push_token(PushTarget("apns", "shared")) == 0

    async def test_push_target_of_revoked_device_is_not_set(
        self, storage: Backend, now: float
    ) -> None:
        with trio.fail_after(DEADLINE_S):
            alice = await make_account(storage, now, devices=2)
            assert await storage.revoke_device(alice, 2, now=now)
            await storage.set_push_target(alice, 2, PushTarget("fcm", "late"))
            assert await storage.get_push_target(alice, 2) is None

    # -- lifecycle ------------------------------------------------------------

    async def test_ping_and_idle_pool(self, storage: Backend, now: float) -> None:
        with trio.fail_after(DEADLINE_S):
            await storage.ping()
            stats = storage.pool_statistics()
            assert isinstance(stats, PoolStatistics)
            assert (stats.in_use, stats.waiting) == (0, 0)
            assert stats.max_size >= 1
            assert isinstance(storage.name, str) and storage.name

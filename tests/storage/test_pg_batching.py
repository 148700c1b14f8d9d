"""Coalesced device lookups and sends on a real PostgreSQL.

Concurrent calls through :func:`open_postgres_storage` share one statement
(``store_messages_batch``, one ``unnest`` lookup), and each caller still
gets exactly what its call alone gets: stored, duplicate, its own refusal,
or its own error after a batch that PostgreSQL rolled back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import asyncpg
import outcome
import pytest
import trio

from pqmsg.aioloop import open_aio_loop
from pqmsg.errors import AuthError, DeviceMismatch, NotFound, StorageUnavailable
from pqmsg.settings import StorageSettings
from pqmsg.storage.base import DeviceAuth, OutgoingCopy, Sender, StoreResult
from pqmsg.storage.postgres import (
    PostgresStorage,
    open_postgres_storage,
    rolled_back,
)
from tests.storage.contract import WINDOW_S, copies, make_account, new_id, queue_of
from tests.support.postgres import migrated_throwaway_database

pytestmark = pytest.mark.postgres

DEADLINE_S = 20.0


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with migrated_throwaway_database() as url:
        yield url


@pytest.fixture
async def storage(url: str) -> AsyncIterator[PostgresStorage]:
    settings = StorageSettings(database_url=url, pool_min_size=1, pool_max_size=4)
    async with open_aio_loop(), open_postgres_storage(settings) as db:
        yield db


async def all_at_once(calls: Sequence[Any]) -> list[outcome.Outcome[Any]]:
    """Start every call in one scheduling round, so they queue together."""
    answers: list[outcome.Outcome[Any] | None] = [None] * len(calls)

    async def one(index: int) -> None:
        fn, *args = calls[index]
        answers[index] = await outcome.acapture(fn, *args)

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            for index in range(len(calls)):
                nursery.start_soon(one, index)
    return [a for a in answers if a is not None]


def sending(
    db: PostgresStorage,
    sender: Sender,
    recipient: str,
    sent: Sequence[OutgoingCopy],
    now: float,
    message_id: str,
    sender_key: bytes | None = None,
) -> tuple[Any, ...]:
    async def call() -> StoreResult:
        return await db.store_messages(
            sender, message_id, recipient, sent, now=now, idempotency_window_s=WINDOW_S,
            sender_key=sender_key,
        )

    return (call,)


async def test_concurrent_sends_share_statements_and_each_is_stored(
    storage: PostgresStorage, now: float
) -> None:
    bob = await make_account(storage, now, devices=2)
    senders = [await make_account(storage, now) for _ in range(12)]
    before = storage.batch_statistics()["sends"]
    answers = await all_at_once(
        [
            sending(
                storage, Sender(s, 1), bob, copies(1, 2, epoch=3, text=f"from {n}"), now, new_id()
            )
            for n, s in enumerate(senders)
        ]
    )
    results = [a.unwrap() for a in answers]
    assert all(
        r == StoreResult(stored=2, duplicate=False, ratchet_advances=2, devices=(1, 2))
        for r in results
    )
    after = storage.batch_statistics()["sends"]
    assert after.calls - before.calls == 12
    assert after.batches > before.batches  # coalescing really happened
    for device in (1, 2):
        assert sorted(await queue_of(storage, bob, device)) == sorted(
            f"from {n}->{device}".encode() for n in range(12)
        )


async def test_a_repeated_id_in_one_batch_is_stored_once(
    storage: PostgresStorage, now: float
) -> None:
    alice, bob = await make_account(storage, now), await make_account(storage, now)
    message_id = new_id()
    answers = await all_at_once(
        [
            sending(storage, Sender(alice, 1), bob, copies(1, text=f"try {n}"), now, message_id)
            for n in range(4)
        ]
    )
    results = [a.unwrap() for a in answers]
    assert sum(not r.duplicate for r in results) == 1
    assert {(r.stored, r.devices) for r in results} == {(1, (1,))}
    assert len(await queue_of(storage, bob, 1)) == 1


async def test_refusals_in_a_batch_are_their_senders_alone(
    storage: PostgresStorage, now: float
) -> None:
    alice, bob = await make_account(storage, now), await make_account(storage, now, devices=2)
    answers = await all_at_once(
        [
            sending(storage, Sender(alice, 1), bob, copies(1, 2, text="ok"), now, new_id()),
            sending(storage, Sender(alice, 1), new_id(), copies(1), now, new_id()),
            sending(storage, Sender(alice, 1), bob, copies(1, text="short"), now, new_id()),
            sending(storage, Sender(alice, 1), bob, copies(1, 2, text="ok too"), now, new_id()),
        ]
    )
    assert answers[0].unwrap().stored == 2 and answers[3].unwrap().stored == 2
    with pytest.raises(NotFound):
        answers[1].unwrap()
    with pytest.raises(DeviceMismatch) as mismatch:
        answers[2].unwrap()
    assert mismatch.value.extra == {"missing": [2], "extra": []}
    assert sorted(await queue_of(storage, bob, 1)) == [b"ok too->1", b"ok->1"]


async def test_sender_checks_in_a_batch_are_their_senders_alone(
    storage: PostgresStorage, now: float
) -> None:
    alice = await make_account(storage, now, devices=2)
    bob = await make_account(storage, now)
    await storage.revoke_device(alice, 2, now=now)
    before = storage.batch_statistics()["sends"]
    answers = await all_at_once(
        [
            sending(storage, Sender(alice, 1), bob, copies(1, text="keyed"), now, new_id(), b"key:1"),
            sending(storage, Sender(alice, 2), bob, copies(1, text="revoked"), now, new_id(), b"key:2"),
            sending(storage, Sender(alice, 1), bob, copies(1, text="old key"), now, new_id(), b"key:x"),
            sending(storage, Sender(alice, 1), bob, copies(1, text="unkeyed"), now, new_id()),
        ]
    )
    after = storage.batch_statistics()["sends"]
    assert after.batches > before.batches
    reasons = []
    for answer in answers[1:3]:
        with pytest.raises(AuthError) as refused:
            answer.unwrap()
        reasons.append(refused.value.reason)
    assert reasons == ["revoked", "signature"]
    assert answers[0].unwrap().stored == answers[3].unwrap().stored == 1
    assert sorted(await queue_of(storage, bob, 1)) == [b"keyed->1", b"unkeyed->1"]


async def test_a_batch_the_database_refuses_runs_again_send_by_send(
    storage: PostgresStorage, now: float
) -> None:
    alice, bob = await make_account(storage, now), await make_account(storage, now)
    poison = (OutgoingCopy(2**31, b"no such device id"),)  # not an integer column value
    before = storage.batch_statistics()["sends"]
    answers = await all_at_once(
        [
            sending(storage, Sender(alice, 1), bob, copies(1, text="a"), now, new_id()),
            sending(storage, Sender(alice, 1), bob, poison, now, new_id()),
            sending(storage, Sender(alice, 1), bob, copies(1, text="b"), now, new_id()),
        ]
    )
    assert answers[0].unwrap().stored == 1 and answers[2].unwrap().stored == 1
    with pytest.raises(asyncpg.DataError):
        answers[1].unwrap()
    assert storage.batch_statistics()["sends"].retried - before.retried == 3
    assert sorted(await queue_of(storage, bob, 1)) == [b"a->1", b"b->1"]


async def test_concurrent_device_lookups_share_a_statement(
    storage: PostgresStorage, now: float
) -> None:
    alice = await make_account(storage, now, devices=3)
    assert await storage.revoke_device(alice, 3, now=now)
    before = storage.batch_statistics()["device_lookups"]
    wanted = [(alice, 1), (alice, 2), (alice, 3), (alice, 4), (new_id(), 1), (alice, 1)]
    answers = await all_at_once(
        [(storage.get_device_auth, account, device) for account, device in wanted]
    )
    found = [a.unwrap() for a in answers]
    assert found[0] == found[5] == DeviceAuth(device_key=b"key:1", revoked=False, last_seen_at=None)
    assert found[1] == DeviceAuth(device_key=b"key:2", revoked=False, last_seen_at=None)
    assert found[2] is not None and found[2].revoked
    assert found[3] is None and found[4] is None
    after = storage.batch_statistics()["device_lookups"]
    assert after.calls - before.calls == 6 and after.batches > before.batches


def test_what_counts_as_rolled_back() -> None:
    deadlock = StorageUnavailable()
    deadlock.__cause__ = asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
    assert rolled_back(deadlock)
    assert rolled_back(asyncpg.exceptions.UniqueViolationError("duplicate key"))
    assert rolled_back(asyncpg.DataError("out of range"))
    lost = StorageUnavailable()
    lost.__cause__ = ConnectionResetError()
    assert not rolled_back(lost)
    assert not rolled_back(StorageUnavailable("the database did not answer in time"))
    assert not rolled_back(asyncpg.exceptions.AdminShutdownError("terminating"))
    assert not rolled_back(RuntimeError("a bug after COMMIT"))

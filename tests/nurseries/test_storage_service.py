"""The storage service: its loops on trio's virtual clock, health, crash and exit.

Timing runs on ``autojump_clock``. SQLite works on worker threads, and trio
counts a task waiting for a thread as blocked, so a bare autojump clock
would leap to the next deadline (perhaps the test's own ``fail_after``)
while SQLite is still busy. The ``paced`` fixture keeps a deadline at most
:data:`TICK_S` ahead, which caps every leap; tests then wait for the calls
they are about (``Faulty.next_call``) rather than for amounts of time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import trio
from trio.testing import MockClock

from pqmsg.clock import WallClock
from pqmsg.errors import StorageUnavailable
from pqmsg.nurseries.storage import BackendOpener, open_backend, open_storage
from pqmsg.settings import KeySettings, MessageSettings, Settings, StorageSettings
from pqmsg.storage.base import Backend, KeyUpload, NewDevice, OutgoingCopy, Sender, SignedKey

DEADLINE_S = 10_000.0  # virtual seconds
TICK_S = 0.01
CLEANUP_INTERVAL_S = 10.0
STALE_SCAN_INTERVAL_S = 30.0
MAX_AGE_S = 100
WINDOW_S = 100
ACCOUNT = "0b6f1f6e-3a8c-4f4e-9d61-6a1c2b3d4e5f"
PEER = "5e4d3c2b-1a6c-4d9f-8e4f-3a8c6e1f6f0b"


@attrs.define
class FakeWallClock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Faulty:
    """The real backend, with switchable faults and calls to wait for."""

    def __init__(self) -> None:
        self.inner: Backend | None = None
        self.faults: dict[str, Callable[[], BaseException]] = {}
        self.started: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()  # finished, returned or raised
        self._changed = trio.Event()

    def opener(self) -> BackendOpener:
        @asynccontextmanager
        async def open_faulty(settings: Settings, *, clock: WallClock) -> AsyncIterator[Backend]:
            async with open_backend(settings, clock=clock) as db:
                self.inner = db
                yield cast(Backend, self)

        return open_faulty

    @property
    def name(self) -> str:
        assert self.inner is not None
        return self.inner.name

    def pool_statistics(self) -> Any:
        assert self.inner is not None
        return self.inner.pool_statistics()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.started[name] += 1
            try:
                fault = self.faults.get(name)
                if fault is not None:
                    raise fault()
                return await method(*args, **kwargs)
            finally:
                self.calls[name] += 1
                self._changed.set()
                self._changed = trio.Event()

        return call

    async def next_call(self, name: str) -> None:
        """Until a call of ``name`` that starts from now on has finished.

        The service's loops call one at a time, so once one more call has
        finished than have started by now, that call started after now (and
        saw the faults and wall-clock time set before).
        """
        target = self.started[name] + 1
        while self.calls[name] < target:
            await self._changed.wait()


@pytest.fixture
async def paced(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    async def tick() -> None:
        while True:  # noqa: ASYNC110 (the deadline is the point, not a wait)
            await trio.sleep(TICK_S)

    nursery.start_soon(tick)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "nested" / "data",
        # Long enough that a slow worker thread never looks like an outage.
        storage=StorageSettings(cleanup_interval_s=CLEANUP_INTERVAL_S, query_timeout_s=1000.0),
        keys=KeySettings(
            stale_scan_interval_s=STALE_SCAN_INTERVAL_S, signed_prekey_max_age_s=MAX_AGE_S
        ),
        messages=MessageSettings(idempotency_window_s=WINDOW_S),
    )


async def test_open_reports_a_healthy_sqlite_backend(
    settings: Settings, autojump_clock: MockClock, paced: None
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_storage(settings, clock=FakeWallClock()) as storage:
            stats = storage.statistics()
            assert (stats.backend, stats.healthy, stats.detail) == ("sqlite", True, None)
            assert stats.tasks == 3
            assert stats.pool.max_size == 1
            assert stats.stale_signed_prekey_devices == 0
            assert settings.sqlite_path.is_file()  # the data dir was created
            await storage.db.ping()
        with pytest.raises(StorageUnavailable):
            await storage.db.ping()  # closed on exit


async def test_stale_count_refreshes_every_scan_interval(
    settings: Settings, autojump_clock: MockClock, paced: None
) -> None:
    clock, faulty = FakeWallClock(), Faulty()
    with trio.fail_after(DEADLINE_S):
        async with open_storage(settings, clock=clock, backend=faulty.opener()) as storage:
            db = storage.db
            await db.create_account(ACCOUNT, b"identity", _device(), now=clock())
            await db.put_keys(
                ACCOUNT, 1, KeyUpload(SignedKey(1, b"spk", b"sig")), max_per_kind=10, now=clock()
            )
            clock.now += MAX_AGE_S + 1
            assert storage.statistics().stale_signed_prekey_devices == 0

            await faulty.next_call("count_stale_signed_prekeys")

            assert storage.statistics().stale_signed_prekey_devices == 1
            assert trio.current_time() >= STALE_SCAN_INTERVAL_S


async def test_cleanup_forgets_send_ids_past_the_window(
    settings: Settings, autojump_clock: MockClock, paced: None
) -> None:
    clock, faulty = FakeWallClock(), Faulty()
    with trio.fail_after(DEADLINE_S):
        async with open_storage(settings, clock=clock, backend=faulty.opener()) as storage:
            db = storage.db
            await db.create_account(ACCOUNT, b"identity", _device(), now=clock())
            await db.create_account(PEER, b"peer", _device(), now=clock())
            sent_at = clock.now
            await _send(db, "old", clock.now)
            await _send(db, "recent", sent_at + WINDOW_S - 10)
            clock.now = sent_at + WINDOW_S + 5

            await faulty.next_call("purge_idempotency")

            assert trio.current_time() >= CLEANUP_INTERVAL_S
            assert not await _send(db, "old", clock.now)  # forgotten: a new send
            assert await _send(db, "recent", clock.now)  # still a duplicate


async def test_outage_marks_unhealthy_until_a_ping_succeeds(
    settings: Settings, autojump_clock: MockClock, paced: None
) -> None:
    faulty = Faulty()
    with trio.fail_after(DEADLINE_S):
        async with open_storage(
            settings, clock=FakeWallClock(), backend=faulty.opener()
        ) as storage:
            faulty.faults["ping"] = lambda: StorageUnavailable("the database is unavailable (X)")
            await faulty.next_call("ping")
            stats = storage.statistics()
            assert (stats.healthy, stats.detail) == (False, "the database is unavailable (X)")

            # The loop keeps pinging, and the first answer restores health.
            del faulty.faults["ping"]
            await faulty.next_call("ping")
            stats = storage.statistics()
            assert (stats.healthy, stats.detail, stats.tasks) == (True, None, 3)


async def test_outage_in_cleanup_is_retried(
    settings: Settings, autojump_clock: MockClock, paced: None
) -> None:
    faulty = Faulty()
    faulty.faults["purge_idempotency"] = lambda: StorageUnavailable("disk full")
    with trio.fail_after(DEADLINE_S):
        async with open_storage(
            settings, clock=FakeWallClock(), backend=faulty.opener()
        ) as storage:
            await faulty.next_call("purge_idempotency")
            assert not storage.statistics().healthy
            assert storage.statistics().detail == "disk full"
            await faulty.next_call("purge_idempotency")  # retried, failing again
            assert storage.statistics().tasks == 3


async def test_a_bug_in_a_loop_stops_the_service(
    settings: Settings, autojump_clock: MockClock, paced: None
) -> None:
    faulty = Faulty()
    faulty.faults["count_stale_signed_prekeys"] = lambda: RuntimeError("bug")
    with trio.fail_after(DEADLINE_S):
        # grouped by the loops' nursery, then by the SQLite writer's
        with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="bug"), flatten_subgroups=True):
            async with open_storage(settings, clock=FakeWallClock(), backend=faulty.opener()):
                await trio.sleep_forever()
        # The backend was closed on the way out.
        assert faulty.inner is not None
        with pytest.raises(StorageUnavailable):
            await faulty.inner.ping()


def _device() -> NewDevice:
    return NewDevice(device_key=b"key", certificate=b"cert", name=None)


async def _send(db: Backend, message_id: str, now: float) -> bool:
    """Send ``message_id`` from PEER to ACCOUNT; True if it was a duplicate."""
    result = await db.store_messages(
        Sender(PEER, 1),
        message_id,
        ACCOUNT,
        [OutgoingCopy(1, b"ciphertext")],
        now=now,
        idempotency_window_s=WINDOW_S,
    )
    return result.duplicate

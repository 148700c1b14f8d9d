"""The dispatcher's timing: breaker cycle, coalescing, bounded queue, slow providers.

On ``autojump_clock`` with exact virtual durations, against the HTTP/2
fakes. Loopback I/O takes no virtual time, so after ``SETTLE_S`` every
queued wake-up that could be sent has been. Storage is the in-memory
stand-in from conftest.
"""

from __future__ import annotations

import trio
import trio.testing

from pqmsg.errors import StorageUnavailable
from pqmsg.nurseries.push import ProviderStatistics, PushDispatcher
from pqmsg.settings import BreakerSettings
from pqmsg.storage.base import PushTarget
from tests.push.conftest import MemoryPushTargets, PushEnv
from tests.push.fake_http import DROP, Reply
from tests.push.fake_providers import FCM_INVALID_ARGUMENT, FCM_UNAVAILABLE

DEADLINE_S = 600
SETTLE_S = 1.0
BREAKER = BreakerSettings(
    window_s=30.0, min_requests=3, failure_ratio=0.5, cool_down_s=60.0, half_open_probes=1
)
APNS_TOKEN = "cd" * 32


def fcm_devices(count: int) -> dict[tuple[str, int], PushTarget]:
    return {(f"account-{i}", 1): PushTarget("fcm", f"fcm-token-{i}") for i in range(count)}


def wake(dispatcher: PushDispatcher, *numbers: int) -> None:
    for number in numbers:
        dispatcher.wake(f"account-{number}", 1)


def fcm_state(dispatcher: PushDispatcher) -> tuple[str, int]:
    fcm = dispatcher.statistics().providers["fcm"]
    return fcm.state, fcm.state_value


async def test_breaker_opens_holds_wake_ups_probes_and_closes(
    autojump_clock: trio.testing.MockClock, push_env: PushEnv
) -> None:
    storage = MemoryPushTargets(fcm_devices(10))
    with trio.fail_after(DEADLINE_S):
        async with push_env.run(storage, mock_clock=autojump_clock, breaker=BREAKER) as (
            fakes,
            dispatcher,
        ):
            fakes.fcm.queue(FCM_UNAVAILABLE, FCM_UNAVAILABLE, DROP)
            start = trio.current_time()
            wake(dispatcher, 0, 1, 2)
            await trio.sleep(SETTLE_S)
            assert fcm_state(dispatcher) == ("open", 2)
            assert dispatcher.statistics().requests["fcm", "failed"] == 3

            # Open: held back and counted, nothing reaches FCM.
            wake(dispatcher, 3, 4)
            await trio.sleep(SETTLE_S)
            assert dispatcher.statistics().requests["fcm", "breaker_open"] == 2
            assert len(fakes.fcm.sent) == 3

            await trio.sleep_until(start + BREAKER.cool_down_s - 0.001)
            assert fcm_state(dispatcher) == ("open", 2)
            await trio.sleep_until(start + BREAKER.cool_down_s)
            assert fcm_state(dispatcher) == ("half_open", 1)

            wake(dispatcher, 5)  # the probe
            await trio.sleep(SETTLE_S)
            assert fcm_state(dispatcher) == ("closed", 0)
            wake(dispatcher, 6)
            await trio.sleep(SETTLE_S)

    requests = dispatcher.statistics().requests
    assert [requests["fcm", o] for o in ("sent", "failed", "breaker_open")] == [2, 3, 2]
    assert [s.json()["message"]["token"] for s in fakes.fcm.sent[3:]] == [
        "fcm-token-5",
        "fcm-token-6",
    ]


async def test_a_failed_probe_reopens_for_another_cool_down(
    autojump_clock: trio.testing.MockClock, push_env: PushEnv
) -> None:
    storage = MemoryPushTargets(fcm_devices(10))
    with trio.fail_after(DEADLINE_S):
        async with push_env.run(storage, mock_clock=autojump_clock, breaker=BREAKER) as (
            fakes,
            dispatcher,
        ):
            fakes.fcm.queue(FCM_UNAVAILABLE, FCM_UNAVAILABLE, FCM_UNAVAILABLE, DROP)
            wake(dispatcher, 0, 1, 2)
            await trio.sleep(BREAKER.cool_down_s)
            assert fcm_state(dispatcher) == ("half_open", 1)
            probe_at = trio.current_time()
            wake(dispatcher, 3, 4)  # one probe (dropped); the other is held back
            await trio.sleep(SETTLE_S)
            assert fcm_state(dispatcher) == ("open", 2)

            await trio.sleep_until(probe_at + BREAKER.cool_down_s - 0.001)
            assert fcm_state(dispatcher) == ("open", 2)
            await trio.sleep_until(probe_at + BREAKER.cool_down_s)
            wake(dispatcher, 5)
            await trio.sleep(SETTLE_S)
            assert fcm_state(dispatcher) == ("closed", 0)

    requests = dispatcher.statistics().requests
    assert [requests["fcm", o] for o in ("sent", "failed", "breaker_open")] == [1, 4, 1]


async def test_rejections_do_not_open_the_breaker(
    autojump_clock: trio.testing.MockClock, push_env: PushEnv
) -> None:
    storage = MemoryPushTargets(fcm_devices(5))
    with trio.fail_after(DEADLINE_S):
        async with push_env.run(storage, mock_clock=autojump_clock, breaker=BREAKER) as (
            fakes,
            dispatcher,
        ):
            fakes.fcm.queue(*[FCM_INVALID_ARGUMENT] * 5)
            wake(dispatcher, 0, 1, 2, 3, 4)
            await trio.sleep(SETTLE_S)

    assert dispatcher.statistics().requests["fcm", "rejected"] == 5
    assert fcm_state(dispatcher) == ("closed", 0)


async def test_one_providers_open_breaker_leaves_the_other_alone(
    autojump_clock: trio.testing.MockClock, push_env: PushEnv
) -> None:
    targets = fcm_devices(3) | {("apple", 1): PushTarget("apns", APNS_TOKEN)}
    with trio.fail_after(DEADLINE_S):
        async with push_env.run(
            MemoryPushTargets(targets), mock_clock=autojump_clock, breaker=BREAKER
        ) as (fakes, dispatcher):
            fakes.fcm.queue(*[FCM_UNAVAILABLE] * 3)
            wake(dispatcher, 0, 1, 2)
            await trio.sleep(SETTLE_S)
            dispatcher.wake("apple", 1)
            await trio.sleep(SETTLE_S)
            stats = dispatcher.statistics()

    assert stats.providers == {
        "fcm": ProviderStatistics(enabled=True, state="open", state_value=2),
        "apns": ProviderStatistics(enabled=True, state="closed", state_value=0),
    }
    assert stats.requests["apns", "sent"] == 1
    assert stats.healthy  # a provider outage does not take the server out


async def test_wake_ups_to_one_device_are_coalesced(
    autojump_clock: trio.testing.MockClock, push_env: PushEnv
) -> None:
    storage = MemoryPushTargets(fcm_devices(2))
    with trio.fail_after(DEADLINE_S):
        async with push_env.run(storage, mock_clock=autojump_clock, coalesce_s=30.0) as (
            fakes,
            dispatcher,
        ):
            start = trio.current_time()
            wake(dispatcher, 0, 0, 1)  # the second is already queued
            await trio.sleep(SETTLE_S)
            wake(dispatcher, 0)  # one was sent a moment ago
            await trio.sleep_until(start + 30.0 - 0.001)
            wake(dispatcher, 0)
            await trio.sleep_until(start + 30.0)
            wake(dispatcher, 0)  # the interval has passed
            await trio.sleep(SETTLE_S)

    tokens = [sent.json()["message"]["token"] for sent in fakes.fcm.sent]
    assert sorted(tokens) == ["fcm-token-0", "fcm-token-0", "fcm-token-1"]
    assert dispatcher.statistics().skipped["coalesced"] == 3


async def test_wake_never_blocks_and_a_full_queue_overflows(
    autojump_clock: trio.testing.MockClock, push_env: PushEnv
) -> None:
    storage = MemoryPushTargets(fcm_devices(11))
    with trio.fail_after(DEADLINE_S):
        async with push_env.run(
            storage, mock_clock=autojump_clock, workers=1, queue_size=3, request_timeout_s=10.0
        ) as (fakes, dispatcher):
            fakes.fcm.queue(Reply(200, {"name": "n"}, delay_s=1000))
            wake(dispatcher, 0)
            await trio.sleep(SETTLE_S)  # the only worker now waits for FCM

            before = trio.current_time()
            wake(dispatcher, *range(1, 11))
            assert trio.current_time() == before
            stats = dispatcher.statistics()
            assert (stats.queue_depth, stats.queue_capacity, stats.overflow_total) == (3, 3, 7)

    # The stalled send timed out; the three queued ones went out after it.
    requests = dispatcher.statistics().requests
    assert (requests["fcm", "failed"], requests["fcm", "sent"]) == (1, 3)


async def test_a_slow_provider_fails_after_the_request_timeout(
    autojump_clock: trio.testing.MockClock, push_env: PushEnv
) -> None:
    storage = MemoryPushTargets(fcm_devices(2))
    with trio.fail_after(DEADLINE_S):
        async with push_env.run(storage, mock_clock=autojump_clock, request_timeout_s=10.0) as (
            fakes,
            dispatcher,
        ):
            fakes.fcm.queue(Reply(200, {"name": "n"}, delay_s=30))
            start = trio.current_time()
            wake(dispatcher, 0)
            await trio.sleep_until(start + 10.0 - 0.001)
            assert dispatcher.statistics().requests["fcm", "failed"] == 0
            await trio.sleep_until(start + 10.0 + 0.001)
            assert dispatcher.statistics().requests["fcm", "failed"] == 1
            wake(dispatcher, 1)
            await trio.sleep(SETTLE_S)

    assert dispatcher.statistics().requests["fcm", "sent"] == 1


async def test_drain_on_exit_is_bounded_by_the_grace_period(
    autojump_clock: trio.testing.MockClock, push_env: PushEnv
) -> None:
    storage = MemoryPushTargets(fcm_devices(3))
    with trio.fail_after(DEADLINE_S):
        async with push_env.run(
            storage, mock_clock=autojump_clock, workers=1, grace_s=5.0, request_timeout_s=100.0
        ) as (fakes, dispatcher):
            fakes.fcm.queue(Reply(200, {"name": "n"}, delay_s=1000))
            wake(dispatcher, 0, 1, 2)
            await trio.sleep(SETTLE_S)
            leaving = trio.current_time()
        took = trio.current_time() - leaving

    assert took == 5.0
    stats = dispatcher.statistics()
    assert (stats.healthy, stats.detail, stats.tasks) == (False, "stopped", 0)
    assert len(fakes.fcm.sent) == 1  # the other two were abandoned
    dispatcher.wake("account-0", 1)
    assert dispatcher.statistics().skipped["closed"] == 1


async def test_drain_on_exit_sends_what_is_queued(
    autojump_clock: trio.testing.MockClock, push_env: PushEnv
) -> None:
    storage = MemoryPushTargets(fcm_devices(20))
    with trio.fail_after(DEADLINE_S):
        async with push_env.run(storage, mock_clock=autojump_clock, workers=2) as (
            fakes,
            dispatcher,
        ):
            wake(dispatcher, *range(20))
            leaving = trio.current_time()
        took = trio.current_time() - leaving

    assert took == 0
    assert len(fakes.fcm.sent) == 20


class FlakyStorage(MemoryPushTargets):
    async def get_push_target(self, account: str, device: int) -> PushTarget | None:
        if account == "account-0":
            raise StorageUnavailable()
        return await super().get_push_target(account, device)


async def test_a_storage_failure_skips_one_wake_up(
    autojump_clock: trio.testing.MockClock, push_env: PushEnv
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with push_env.run(
            FlakyStorage(fcm_devices(2)), mock_clock=autojump_clock, workers=1
        ) as (fakes, dispatcher):
            wake(dispatcher, 0, 1)
            await trio.sleep(SETTLE_S)

    assert dispatcher.statistics().skipped["storage_error"] == 1
    assert [s.json()["message"]["token"] for s in fakes.fcm.sent] == ["fcm-token-1"]


class GatedStorage(MemoryPushTargets):
    """Look-ups wait until the test opens the gate."""

    def __init__(self, targets: dict[tuple[str, int], PushTarget]) -> None:
        super().__init__(targets)
        self.gate = trio.Event()
        self.waiting = 0

    async def get_push_target(self, account: str, device: int) -> PushTarget | None:
        self.waiting += 1
        await self.gate.wait()
        return await super().get_push_target(account, device)


async def test_two_workers_never_send_one_device_two_wake_ups(
    autojump_clock: trio.testing.MockClock, push_env: PushEnv
) -> None:
    storage = GatedStorage(fcm_devices(1))
    with trio.fail_after(DEADLINE_S):
        async with push_env.run(storage, mock_clock=autojump_clock, workers=2) as (
            fakes,
            dispatcher,
        ):
            wake(dispatcher, 0)
            await trio.sleep(SETTLE_S)  # the first worker is looking the token up
            wake(dispatcher, 0)  # not queued any more, not attempted yet
            await trio.sleep(SETTLE_S)
            assert storage.waiting == 2
            storage.gate.set()
            await trio.sleep(SETTLE_S)

    assert len(fakes.fcm.sent) == 1
    assert dispatcher.statistics().skipped["coalesced"] == 1


async def test_an_open_stream_at_send_time_suppresses_the_wake_up(
    autojump_clock: trio.testing.MockClock, push_env: PushEnv
) -> None:
    storage = GatedStorage(fcm_devices(1))
    streams: set[tuple[str, int]] = set()
    with trio.fail_after(DEADLINE_S):
        async with push_env.run(
            storage,
            mock_clock=autojump_clock,
            has_stream=lambda account, device: (account, device) in streams,
        ) as (fakes, dispatcher):
            wake(dispatcher, 0)
            await trio.sleep(SETTLE_S)
            streams.add(("account-0", 1))  # the device connects meanwhile
            storage.gate.set()
            await trio.sleep(SETTLE_S)
            wake(dispatcher, 0)

    assert fakes.fcm.sent == []
    assert dispatcher.statistics().skipped["streaming"] == 2

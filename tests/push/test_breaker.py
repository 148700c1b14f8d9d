"""The circuit breaker's whole cycle, on trio's virtual clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from pqmsg.push.breaker import CircuitBreaker
from pqmsg.settings import BreakerSettings

SETTINGS = BreakerSettings(
    window_s=30.0, min_requests=5, failure_ratio=0.5, cool_down_s=60.0, half_open_probes=1
)


def _results(breaker: CircuitBreaker, pattern: str) -> None:
    """Record one result per letter: ``s`` success, ``f`` failure."""
    for letter in pattern:
        assert breaker.allow()
        if letter == "s":
            breaker.record_success()
        else:
            breaker.record_failure()


def _open(breaker: CircuitBreaker) -> None:
    _results(breaker, "fffff")
    assert breaker.state == "open"


async def test_starts_closed_and_allows(autojump_clock: trio.testing.MockClock) -> None:
    breaker = CircuitBreaker(SETTINGS)

    assert (breaker.state, breaker.state_value) == ("closed", 0)
    assert all(breaker.allow() for _ in range(100))


async def test_needs_min_requests_before_opening(autojump_clock: trio.testing.MockClock) -> None:
    breaker = CircuitBreaker(SETTINGS)

    _results(breaker, "ffff")
    assert breaker.state == "closed"

    _results(breaker, "f")
    assert (breaker.state, breaker.state_value) == ("open", 2)


async def test_opens_when_failure_share_reaches_the_ratio(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(SETTINGS)

    _results(breaker, "sssff")  # 2/5 failed
    assert breaker.state == "closed"
    _results(breaker, "f")  # 3/6 failed: the ratio exactly
    assert breaker.state == "open"


async def test_a_healthy_share_keeps_it_closed(autojump_clock: trio.testing.MockClock) -> None:
    breaker = CircuitBreaker(SETTINGS)

    _results(breaker, "ssf" * 20)  # a third failed

    assert breaker.state == "closed"


async def test_failures_leave_the_window(autojump_clock: trio.testing.MockClock) -> None:
    breaker = CircuitBreaker(SETTINGS)
    _results(breaker, "ffff")

    # Forgotten at most window_s * 1.1 later (10 buckets).
    await trio.sleep(SETTINGS.window_s * 1.1)
    _results(breaker, "ffff")

    assert breaker.state == "closed"


async def test_failures_within_the_window_add_up(autojump_clock: trio.testing.MockClock) -> None:
    breaker = CircuitBreaker(SETTINGS)
    _results(breaker, "ff")
    await trio.sleep(SETTINGS.window_s - 0.01)
    _results(breaker, "fff")

    assert breaker.state == "open"


async def test_open_refuses_until_the_cool_down_has_passed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(SETTINGS)
    _open(breaker)

    assert not breaker.allow()
    await trio.sleep(SETTINGS.cool_down_s - 0.001)
    assert not breaker.allow()
    assert breaker.state == "open"

    await trio.sleep(0.001)
    assert (breaker.state, breaker.state_value) == ("half_open", 1)


async def test_half_open_lets_one_probe_through_and_closes_on_success(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(SETTINGS)
    _open(breaker)
    await trio.sleep(SETTINGS.cool_down_s)

    assert breaker.allow()
    assert not breaker.allow()  # the probe is still out
    breaker.record_success()

    assert (breaker.state, breaker.state_value) == ("closed", 0)
    # Closing empties the window: one failure does not reopen it.
    _results(breaker, "f")
    assert breaker.state == "closed"


async def test_a_failed_probe_reopens_for_a_whole_cool_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(SETTINGS)
    _open(breaker)
    await trio.sleep(SETTINGS.cool_down_s + 5)
    assert breaker.allow()

    await trio.sleep(3)  # the probe takes a while
    breaker.record_failure()

    assert breaker.state == "open"
    await trio.sleep(SETTINGS.cool_down_s - 0.001)
    assert breaker.state == "open"
    await trio.sleep(0.001)
    assert breaker.state == "half_open"


async def test_several_probes_must_all_succeed(autojump_clock: trio.testing.MockClock) -> None:
    breaker = CircuitBreaker(
        BreakerSettings(
            window_s=30.0, min_requests=2, failure_ratio=0.5, cool_down_s=10.0, half_open_probes=3
        )
    )
    _results(breaker, "ff")
    await trio.sleep(10.0)

    assert [breaker.allow() for _ in range(4)] == [True, True, True, False]
    breaker.record_success()
    breaker.record_success()
    assert breaker.state == "half_open"
    assert not breaker.allow()  # no fourth probe, however the others went
    breaker.record_success()

    assert breaker.state == "closed"


async def test_late_results_while_open_are_ignored(autojump_clock: trio.testing.MockClock) -> None:
    breaker = CircuitBreaker(SETTINGS)
    # Two requests go out while closed...
    assert breaker.allow()
    assert breaker.allow()
    _open(breaker)
    await trio.sleep(1)

    # ...and answer after it opened: neither closes it nor extends the cool-down.
    breaker.record_success()
    breaker.record_failure()

    assert breaker.state == "open"
    await trio.sleep(SETTINGS.cool_down_s - 1)
    assert breaker.state == "half_open"


async def test_the_whole_cycle_with_exact_times(autojump_clock: trio.testing.MockClock) -> None:
    breaker = CircuitBreaker(SETTINGS)
    seen: list[tuple[float, str]] = []
    start = trio.current_time()

    def note() -> None:
        seen.append((trio.current_time() - start, breaker.state))

    note()
    for _ in range(5):
        await trio.sleep(1)
        _results(breaker, "f")
    note()  # opened at t=5
    await trio.sleep(SETTINGS.cool_down_s)
    note()  # half-open at t=65
    assert breaker.allow()
    breaker.record_failure()
    note()  # open again at t=65
    await trio.sleep(SETTINGS.cool_down_s)
    assert breaker.allow()
    breaker.record_success()
    note()  # closed at t=125

    assert seen == [
        (0, "closed"),
        (5, "open"),
        (65, "half_open"),
        (65, "open"),
        (125, "closed"),
    ]


@pytest.mark.parametrize(
    ("ratio", "total"), [(0.14, 50), (0.2, 10), (0.3, 10), (0.5, 10), (0.7, 10), (1.0, 10)]
)
async def test_ratio_boundary(
    autojump_clock: trio.testing.MockClock, ratio: float, total: int
) -> None:
    settings = BreakerSettings(
        window_s=30.0, min_requests=total, failure_ratio=ratio, cool_down_s=1.0, half_open_probes=1
    )
    failures = round(total * ratio)
    below = CircuitBreaker(settings)
    _results(below, "s" * (total + 1 - failures) + "f" * (failures - 1))
    at = CircuitBreaker(settings)
    _results(at, "s" * (total - failures) + "f" * failures)

    assert (below.state, at.state) == ("closed", "open")

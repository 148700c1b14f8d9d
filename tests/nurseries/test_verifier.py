"""The signature verifier with real helper processes: answers, failures, restarts, closing.

These run on trio's real clock: a helper is another process, and a virtual
clock would jump past the check timeout while it works.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from pqmsg.nurseries.verifier import (
    MAX_RESTART_DELAY_S,
    SignatureVerifier,
    helper_count,
    next_restart_delay,
    open_signature_verifier,
)
from pqmsg.protocol import crypto

KEY = crypto.generate_signing_key()
OTHER = crypto.generate_signing_key()


def signed(text: bytes) -> tuple[bytes, bytes, bytes]:
    return KEY.public_key, text, crypto.sign(KEY.secret_key, text)


#: (key, message, signature) and whether it verifies.
CASES: list[tuple[tuple[bytes, bytes, bytes], bool]] = [
    (signed(b"GET /v1/messages 1"), True),
    ((KEY.public_key, b"GET /v1/messages 2", crypto.sign(KEY.secret_key, b"another message")), False),
    ((OTHER.public_key, *signed(b"PUT /v1/messages/a")[1:]), False),
    (signed(b""), True),
    ((KEY.public_key[:-1], *signed(b"short key")[1:]), False),
    ((KEY.public_key, b"truncated", signed(b"truncated")[2][:-1]), False),
    (signed(b"x" * 100_000), True),
]


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


#: Reads batches like the real helper but answers a byte that means nothing.
GARBAGE = python(
    "import sys\n"
    "from pqmsg.protocol.verify_worker import answer_batch\n"
    "while (a := answer_batch(sys.stdin.buffer)) is not None:\n"
    "    sys.stdout.buffer.write(b'\\x07' * len(a)); sys.stdout.buffer.flush()\n"
)
#: Reads everything and never answers (exits at end of input).
SILENT = python("import sys; sys.stdin.buffer.read()")
#: The real helper, answering each batch after a pause.
SLOW = python(
    "import sys, time\n"
    "from pqmsg.protocol.verify_worker import answer_batch\n"
    "while (a := answer_batch(sys.stdin.buffer)) is not None:\n"
    "    time.sleep(0.3); sys.stdout.buffer.write(a); sys.stdout.buffer.flush()\n"
)


def fails_once(marker: Path) -> list[str]:
    """Exits at once the first time (leaving ``marker``), then runs the real helper."""
    return python(
        "import os, runpy, sys\n"
        "if not os.path.exists(sys.argv[1]):\n"
        "    open(sys.argv[1], 'w').close(); sys.exit(3)\n"
        "runpy.run_module('pqmsg.protocol.verify_worker', run_name='__main__')\n",
        str(marker),
    )


async def check_all(verifier: SignatureVerifier, cases: list[tuple[tuple[bytes, bytes, bytes], bool]]) -> list[bool]:
    """Run every case at once (so they share batches); the answers in order."""
    answers: list[bool | None] = [None] * len(cases)

    async def one(index: int) -> None:
        answers[index] = await verifier.verifies(*cases[index][0])

    async with trio.open_nursery() as nursery:
        for index in range(len(cases)):
            nursery.start_soon(one, index)
    return [bool(a) for a in answers]


EXPECTED = [ok for _, ok in CASES]


async def test_a_helper_answers_every_check_of_a_batch_by_position() -> None:
    cases = CASES * 6  # 42 checks at once: several to a batch
    async with open_signature_verifier(1) as verifier:
        with trio.fail_after(30):
            assert await check_all(verifier, cases) == EXPECTED * 6
        stats = verifier.statistics()
    assert (stats.running, stats.helper_checks_total, stats.in_process_checks_total) == (1, 42, 0)
    assert stats.healthy and stats.detail is None and stats.tasks == 1


async def test_two_helpers_share_the_queue() -> None:
    async with open_signature_verifier(2) as verifier:
        with trio.fail_after(30):
            for _ in range(3):
                assert await check_all(verifier, CASES) == EXPECTED
        assert verifier.statistics().helper_checks_total == 3 * len(CASES)
        assert verifier.statistics().tasks == 2


async def test_without_helpers_checks_are_made_in_process() -> None:
    async with open_signature_verifier(0) as verifier:
        assert await check_all(verifier, CASES) == EXPECTED
        stats = verifier.statistics()
    assert (stats.processes, stats.tasks, stats.helper_checks_total) == (0, 0, 0)
    assert stats.in_process_checks_total == len(CASES)
    assert stats.healthy and stats.detail == "in process"


@pytest.mark.parametrize("argv", [GARBAGE, python("import sys; sys.exit(3)")], ids=["garbage", "exits"])
async def test_a_failing_helper_never_decides_a_check(argv: list[str]) -> None:
    # A helper that answers nonsense or is gone: its checks are made here,
    # with the right answers, and it is replaced.
    async with open_signature_verifier(1, argv=argv, restart_delay_s=0.05) as verifier:
        with trio.fail_after(30):
            for _ in range(3):
                assert await check_all(verifier, CASES) == EXPECTED
                await trio.sleep(0.2)
        stats = verifier.statistics()
    assert stats.helper_checks_total == 0
    assert stats.in_process_checks_total == 3 * len(CASES)
    assert stats.helper_failures_total >= 1


async def test_a_silent_helper_times_out_and_its_checks_are_made_here() -> None:
    async with open_signature_verifier(1, argv=SILENT, check_timeout_s=0.3, restart_delay_s=0.05) as verifier:
        with trio.fail_after(30):
            assert await check_all(verifier, CASES) == EXPECTED
        assert verifier.statistics().helper_failures_total == 1


async def test_a_helper_that_failed_is_started_again(tmp_path: Path) -> None:
    async with open_signature_verifier(1, argv=fails_once(tmp_path / "failed"), restart_delay_s=0.05) as verifier:
        with trio.fail_after(30):
            assert await check_all(verifier, CASES) == EXPECTED  # the first helper exits
            # Another process's start: nothing to wait on but the statistics.
            while verifier.statistics().running == 0 or verifier.statistics().helper_failures_total == 0:  # noqa: ASYNC110
                await trio.sleep(0.05)
            assert await check_all(verifier, CASES) == EXPECTED
        stats = verifier.statistics()
    assert stats.helper_failures_total == 1
    assert stats.helper_checks_total >= len(CASES)  # the second helper answered


async def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    async with open_signature_verifier(1, argv=SLOW) as verifier:
        with trio.fail_after(30):
            results: dict[str, bool] = {}

            async def check(name: str, case: int) -> None:
                results[name] = await verifier.verifies(*CASES[case][0])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(check, "first", 0)  # taken at once; the helper pauses
                await trio.sleep(0.05)
                with trio.CancelScope() as cancelled:
                    cancelled.cancel()
                    await check("cancelled", 0)
                nursery.start_soon(check, "queued", 1)
            assert results == {"first": True, "queued": False}


async def test_closing_answers_what_is_still_waiting() -> None:
    results: list[bool] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            async with open_signature_verifier(1, argv=SILENT) as verifier:

                async def check(case: int) -> None:
                    results.append(await verifier.verifies(*CASES[case][0]))

                nursery.start_soon(check, 0)
                await trio.sleep(0.05)
                nursery.start_soon(check, 1)  # queued behind the silent batch
                await trio.sleep(0.05)
    assert sorted(results) == [False, True]


def test_auto_gives_one_helper_only_on_postgresql_with_a_cpu_to_spare() -> None:
    import os

    cpus = len(os.sched_getaffinity(0))
    assert helper_count(None, cpus, postgres=True) == 0
    assert helper_count(None, cpus - 1, postgres=True) == (1 if cpus > 1 else 0)
    assert helper_count(None, 1, postgres=False) == 0
    assert helper_count(3, cpus, postgres=False) == 3
    assert helper_count(0, 1, postgres=True) == 0


def test_restarts_back_off_while_helpers_answer_nothing() -> None:
    delays, delay = [], 1.0
    for _ in range(8):
        delay = next_restart_delay(delay, 1.0, answered=False)
        delays.append(delay)
    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0, MAX_RESTART_DELAY_S, MAX_RESTART_DELAY_S, MAX_RESTART_DELAY_S]
    assert next_restart_delay(MAX_RESTART_DELAY_S, 1.0, answered=True) == 1.0

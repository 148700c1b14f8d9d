"""Signature checks off the event loop, in helper processes.

An ML-DSA-65 check costs 0.1-0.2 ms of CPU, the largest single cost of an
authenticated request, and while it runs on the event loop no other
request moves. With ``auth.verify_processes`` set to N > 0 the service
keeps N helper processes (:mod:`pqmsg.protocol.verify_worker`) and the
checks run there, on another CPU; the loop only hands them over.

- **Batches.** A caller queues its (key, message, signature) and waits.
  Each helper's task takes everything queued (at most :data:`MAX_BATCH`),
  writes it to the helper as one batch and reads one answer byte per check.
  One batch is in flight per helper, so answers reach callers by position.
- **Never a guess.** A helper that exits, answers anything but ``0`` or
  ``1``, or takes longer than :data:`CHECK_TIMEOUT_S` is killed; the checks
  of its batch are made here, in this process, and it is started again
  after :data:`RESTART_DELAY_S` (longer, up to a minute, while its
  replacements keep failing before they answer anything). While no helper
  runs (N = 0, or all are restarting) every check is made in this
  process, as before helpers.
- **Cancellation.** A caller cancelled while queued is dropped; one whose
  batch was taken gets no answer (its check finishes and is discarded).
- **Closing** (after Hypercorn's drain, so normally nothing is waiting):
  whatever is still queued is checked in this process, then each helper
  reads end of input and exits; one that does not within
  :data:`STOP_GRACE_S` is killed.

``auto`` (the default) means one helper when the server stores in
PostgreSQL and this process may run on more CPUs than the server has
workers, and none otherwise:

- with one worker per CPU there is no spare CPU to hand the checks to,
  and handing them over would only add its own cost;
- on the embedded SQLite database the checks stay on the loop: the send
  scenario measured about 10 % fewer sends per second with a helper than
  without (``bench/RESULTS.md``). The writer thread shares the interpreter
  lock with the loop, and a check made on the loop releases the lock for
  its 0.1-0.2 ms in C, which the writer can use; most likely the two
  threads contend for the lock instead once the checks are gone.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import final

import attrs
import trio

from pqmsg.protocol import crypto
from pqmsg.protocol.verify_worker import encode_batch

log = logging.getLogger("pqmsg.verifier")

#: The most checks one batch carries; the rest wait for the next one.
MAX_BATCH = 128
#: How long a helper may take over one batch before it is replaced.
CHECK_TIMEOUT_S = 5.0
#: How long a failed helper stays down before it is started again; doubled
#: up to MAX_RESTART_DELAY_S while its replacements answer nothing.
RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 60.0
#: How long a helper may take to exit once its input is closed.
STOP_GRACE_S = 2.0
HELPER_ARGV = (sys.executable, "-m", "pqmsg.protocol.verify_worker")


def helper_count(configured: int | None, workers: int, *, postgres: bool) -> int:
    """Helpers per worker: ``configured``, or for ``auto`` (None) see the module docstring."""
    if configured is not None:
        return configured
    if not postgres:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return 1 if cpus > workers else 0


def next_restart_delay(delay: float, base: float, *, answered: bool) -> float:
    """The wait before the next restart: ``base`` again once a helper has
    answered; doubled, up to :data:`MAX_RESTART_DELAY_S`, while none does
    (one that cannot run here at all is tried less and less often)."""
    return base if answered else min(2 * delay, MAX_RESTART_DELAY_S)


@attrs.frozen
class VerifierStatistics:
    healthy: bool
    detail: str | None
    #: Helper tasks running in the service's nursery.
    tasks: int
    #: Helpers configured, and helpers up now.
    processes: int
    running: int
    #: Checks answered by helpers, and made in this process instead.
    helper_checks_total: int
    in_process_checks_total: int
    #: Helpers replaced after they failed.
    helper_failures_total: int


class HelperFailed(Exception):
    """A helper did not answer its batch as it should."""


@attrs.define(eq=False)
class _Check:
    key: bytes
    message: bytes
    signature: bytes
    done: trio.Event = attrs.Factory(trio.Event)
    abandoned: bool = False
    ok: bool = False

    def answer(self, ok: bool) -> None:
        self.ok = ok
        self.done.set()


@final
class SignatureVerifier:
    """Checks ML-DSA-65 signatures in helper processes; see the module docstring."""

    def __init__(
        self,
        processes: int,
        *,
        check_timeout_s: float = CHECK_TIMEOUT_S,
        restart_delay_s: float = RESTART_DELAY_S,
    ) -> None:
        self._processes = processes
        self._check_timeout_s = check_timeout_s
        self._restart_delay_s = restart_delay_s
        self._queue: deque[_Check] = deque()
        self._wakeup = trio.Event()
        self._tasks = 0
        self._running = 0
        self._closed = False
        self._helper_checks = 0
        self._in_process = 0
        self._failures = 0

    async def verifies(self, key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is a valid ML-DSA-65 signature of ``message`` under ``key``."""
        if self._running == 0 or self._closed:
            self._in_process += 1
            return crypto.verifies(key, message, signature)
        check = _Check(key, message, signature)
        self._queue.append(check)
        self._wakeup.set()
        try:
            await check.done.wait()
        except BaseException:
            check.abandoned = True
            raise
        return check.ok

    def statistics(self) -> VerifierStatistics:
        if self._processes == 0:
            detail = "in process"
        elif self._running < self._processes:
            detail = f"{self._running} of {self._processes} helpers up; checks in process meanwhile"
        else:
            detail = None
        return VerifierStatistics(
            healthy=True,  # without helpers, checks are made here: slower, never skipped
            detail=detail,
            tasks=self._tasks,
            processes=self._processes,
            running=self._running,
            helper_checks_total=self._helper_checks,
            in_process_checks_total=self._in_process,
            helper_failures_total=self._failures,
        )

    # The helpers' side.

    async def _helper_forever(
        self, argv: Sequence[str], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._tasks += 1
        started = False

        def up() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        delay = self._restart_delay_s
        try:
            while True:
                answered = self._helper_checks
                try:
                    await self._serve_helper(argv, up)
                except OSError as exc:  # could not start it
                    self._failures += 1
                    log.warning("signature helper did not start (%s); retrying in %.1f s", exc, delay)
                except HelperFailed as exc:
                    log.warning("signature helper failed (%s); restarting in %.1f s", exc, delay)
                up()  # a helper that could not start does not hold the server's start
                await trio.sleep(delay)
                delay = next_restart_delay(delay, self._restart_delay_s, answered=self._helper_checks > answered)
        finally:
            self._tasks -= 1

    async def _serve_helper(self, argv: Sequence[str], up: Callable[[], None]) -> None:
        process = await trio.lowlevel.open_process(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._running += 1
        up()
        try:
            while True:
                batch = await self._next_batch()
                try:
                    with trio.fail_after(self._check_timeout_s):
                        await _exchange(process, batch)
                except HelperFailed:
                    self._failures += 1
                    raise
                except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._failures += 1
                    raise HelperFailed(f"{type(exc).__name__} {exc}".strip()) from exc
                finally:
                    self._answer_in_process(batch)  # what is unanswered: failed, or the server is closing
                self._helper_checks += len(batch)
        finally:
            self._running -= 1
            if self._running == 0:
                self._drain_in_process()
            await _stop(process)

    async def _next_batch(self) -> list[_Check]:
        while True:
            while not self._queue:
                if self._wakeup.is_set():
                    self._wakeup = trio.Event()
                await self._wakeup.wait()
            batch: list[_Check] = []
            while self._queue and len(batch) < MAX_BATCH:
                check = self._queue.popleft()
                if not check.abandoned:
                    batch.append(check)
            if batch:
                return batch

    def _answer_in_process(self, checks: Iterable[_Check]) -> None:
        for check in checks:
            if not check.done.is_set() and not check.abandoned:
                self._in_process += 1
                check.answer(crypto.verifies(check.key, check.message, check.signature))

    def _drain_in_process(self) -> None:
        """Answer everything queued here: no helper is left to take it."""
        self._answer_in_process(self._queue)
        self._queue.clear()

    def _close(self) -> None:
        self._closed = True
        self._drain_in_process()


async def _exchange(process: trio.Process, batch: list[_Check]) -> None:
    """Send ``batch`` to the helper and answer its checks from the helper's reply."""
    assert process.stdin is not None and process.stdout is not None
    await process.stdin.send_all(encode_batch([(c.key, c.message, c.signature) for c in batch]))
    answers = bytearray()
    while len(answers) < len(batch):
        chunk = await process.stdout.receive_some(len(batch) - len(answers))
        if not chunk:
            raise HelperFailed(f"the helper exited with {await process.wait()}")
        answers += chunk
    if answers.strip(b"\x00\x01"):
        raise HelperFailed("the helper answered something other than 0 or 1")
    for check, answer in zip(batch, answers, strict=True):
        check.answer(answer == 1)


async def _stop(process: trio.Process) -> None:
    """End a helper: close its input and wait, then kill it if it is still there."""
    assert process.stdin is not None and process.stdout is not None
    with trio.CancelScope(shield=True):
        with trio.move_on_after(STOP_GRACE_S):
            await process.stdin.aclose()
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stdout.aclose()


@asynccontextmanager
async def open_signature_verifier(
    processes: int,
    *,
    argv: Sequence[str] = HELPER_ARGV,
    check_timeout_s: float = CHECK_TIMEOUT_S,
    restart_delay_s: float = RESTART_DELAY_S,
) -> AsyncIterator[SignatureVerifier]:
    """A :class:`SignatureVerifier` with ``processes`` helpers (0: checks in process).

    ``argv`` starts one helper (tests start broken ones).
    """
    verifier = SignatureVerifier(processes, check_timeout_s=check_timeout_s, restart_delay_s=restart_delay_s)
    if processes == 0:
        yield verifier
        return
    async with trio.open_nursery() as nursery:
        for _ in range(processes):
            await nursery.start(verifier._helper_forever, argv)
        try:
            yield verifier
        finally:
            verifier._close()
            nursery.cancel_scope.cancel()

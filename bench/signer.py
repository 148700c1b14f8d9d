"""Pre-signed requests: ML-DSA-65 signing in a pool of signer processes.

Signing costs about 0.9 ms of CPU per request, as much as the server spends
on a whole request, so the event loop that sends requests never signs.
Requests whose body is known in advance (sends, bundle fetches, fetches)
are signed before the measured window by every signer process at once, and
kept in per-kind queues; a request whose body depends on a response (an
ack names the ids it received) is signed on demand by the same pool.

A signature covers the timestamp and a fresh nonce, and the server accepts
timestamps within +-300 s; a queued request older than ``MAX_AGE_S`` is
dropped instead of sent.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence

import attrs
import trio

from pqmsg.client import sign_headers
from pqmsg.protocol import crypto
from pqmsg.protocol.b64 import b64encode

MAX_AGE_S = 240.0
BATCH = 64


@attrs.frozen
class Credentials:
    """What a signer needs of one device (secret key included: bench accounts only)."""

    account: str
    device: int
    public_key: bytes
    secret_key: bytes = attrs.field(repr=False)


@attrs.frozen
class Spec:
    """A request to sign: ``creds`` indexes the credentials given to the pool."""

    kind: str
    creds: int
    method: str
    path: str
    query: str
    body: bytes
    tag: int = 0


@attrs.frozen
class Signed:
    spec: Spec
    headers: tuple[tuple[str, str], ...]
    signed_at: float

    @property
    def target(self) -> str:
        return f"{self.spec.path}?{self.spec.query}" if self.spec.query else self.spec.path


_CREDS: list[Credentials] = []  # set once per signer process by _init; never in the parent


def _init(creds: list[Credentials]) -> None:
    _CREDS[:] = creds


def _sign_batch(specs: Sequence[Spec]) -> list[Signed]:
    out = []
    for spec in specs:
        c = _CREDS[spec.creds]
        now = time.time()
        headers = sign_headers(
            spec.method, spec.path, spec.query, spec.body, account=c.account, device=c.device,
            device_key=crypto.SigningKeyPair(c.public_key, c.secret_key), now=now,
        )
        out.append(Signed(spec, tuple(headers.items()), now))
    return out


class SignerPool:
    """A process pool that signs :class:`Spec` batches; counts what it signed."""

    def __init__(self, creds: list[Credentials], processes: int) -> None:
        spawn = multiprocessing.get_context("spawn")
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=processes, mp_context=spawn, initializer=_init, initargs=(creds,),
        )
        # On-demand signatures (acks, starved queues) get a process of their
        # own, so they never wait behind a bulk refill.
        self._urgent = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=spawn, initializer=_init, initargs=(creds,),
        )
        self.processes = processes
        self.signed = 0

    def close(self) -> None:
        self._urgent.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def sign(self, specs: Sequence[Spec]) -> list[Signed]:
        """Sign in batches spread over every process; results in ``specs`` order."""
        batches = [specs[i : i + BATCH] for i in range(0, len(specs), BATCH)]
        futures = [self._pool.submit(_sign_batch, b) for b in batches]
        results: list[Signed] = []
        for future in futures:
            results.extend(await trio.to_thread.run_sync(future.result, abandon_on_cancel=True))
        self.signed += len(results)
        return results

    async def sign_one(self, spec: Spec) -> Signed:
        """Sign one request now, on the process kept for on-demand signing."""
        future = self._urgent.submit(_sign_batch, [spec])
        signed = await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        self.signed += 1
        return signed[0]


class RequestQueue:
    """Pre-signed requests of one kind, refilled in the background when low.

    ``make`` builds the next unsigned spec (round robin over devices, fresh
    ids). ``take`` never signs on the event loop: when the queue is empty it
    waits for the pool, and counts the wait (``starved``) so the report can
    say the harness was short of signatures.
    """

    def __init__(
        self, pool: SignerPool, make: Callable[[], Spec], *, low_water: int, refill: int | None = None
    ) -> None:
        self._pool = pool
        self._make = make
        self._queue: collections.deque[Signed] = collections.deque()
        self._low_water = low_water
        self._refill_count = refill or max(low_water, BATCH * pool.processes)
        self._refilling = False
        self.starved = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._queue)

    async def fill(self, count: int) -> None:
        self._queue.extend(await self._pool.sign([self._make() for _ in range(count)]))

    def extend(self, signed: Iterable[Signed]) -> None:
        self._queue.extend(signed)

    async def take(self, nursery: trio.Nursery) -> Signed:
        while True:
            if len(self._queue) < self._low_water and not self._refilling:
                self._refilling = True
                nursery.start_soon(self._refill)
            if not self._queue:
                self.starved += 1
                return await self._pool.sign_one(self._make())
            signed = self._queue.popleft()
            if time.time() - signed.signed_at < MAX_AGE_S:
                return signed
            self.expired += 1

    async def _refill(self) -> None:
        try:
            await self.fill(self._refill_count)
        finally:
            self._refilling = False


class UnsignedPool(SignerPool):
    """For the baseline app, which checks nothing: headers of the same shape and size,
    with random bytes for a signature, made in-process (no signing cost)."""

    def __init__(self, creds: list[Credentials], processes: int) -> None:
        self._creds = creds
        self.processes = processes
        self.signed = 0

    def close(self) -> None:
        pass

    async def sign_one(self, spec: Spec) -> Signed:
        return (await self.sign([spec]))[0]

    async def sign(self, specs: Sequence[Spec]) -> list[Signed]:
        now = time.time()
        out = []
        for spec in specs:
            c = self._creds[spec.creds]
            headers = (
                ("Pqmsg-Account", c.account), ("Pqmsg-Device", str(c.device)),
                ("Pqmsg-Timestamp", str(int(now))), ("Pqmsg-Nonce", secrets.token_urlsafe(18)),
                ("Pqmsg-Signature", b64encode(os.urandom(crypto.SIGNATURE_BYTES))),
            )
            out.append(Signed(spec, headers, now))
        await trio.lowlevel.checkpoint()
        return out

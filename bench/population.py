"""The bench's accounts: registered, keyed and (optionally) queued up through the SDK.

Every account has one device. Account ``i`` sends to account ``i + 1``
(wrapping), fetches that account's bundle, and receives from ``i - 1``.
Registration is rate limited per client IP, so a 429 waits its
``Retry-After`` and tries again; a server spawned by the bench raises the
limits instead (see :mod:`bench.spawn`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from bench.signer import Credentials
from pqmsg.client import Client, Device, ProblemResponse

PREKEYS_PER_KIND = 20
SETUP_CONCURRENCY = 8
MAX_RETRIES = 50
T = TypeVar("T")


async def retrying(call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, again after ``Retry-After`` while the answer is 408, 429 or 503."""
    for _ in range(MAX_RETRIES):
        try:
            return await call()
        except ProblemResponse as exc:
            if exc.status not in (408, 429, 503):  # 408: a body stalled (seen once under load)
                raise
            await trio.sleep(float(exc.headers.get("retry-after", "1")))
    raise RuntimeError(f"still rate limited after {MAX_RETRIES} tries")


async def register_accounts(client: Client, count: int, *, prekeys: bool) -> list[Device]:
    """Register ``count`` accounts (and upload prekeys if asked), in order."""
    devices: list[Device | None] = [None] * count
    limiter = trio.CapacityLimiter(SETUP_CONCURRENCY)

    async def one(i: int) -> None:
        async with limiter:
            device = await retrying(lambda: client.register(name=f"bench-{i}"))
            if prekeys:
                await retrying(lambda: device.upload_prekeys(ec=PREKEYS_PER_KIND, pq=PREKEYS_PER_KIND))
            devices[i] = device

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    return [d for d in devices if d is not None]


def credentials(devices: list[Device]) -> list[Credentials]:
    return [
        Credentials(d.account, d.device, d.device_key.public_key, d.device_key.secret_key)
        for d in devices
    ]

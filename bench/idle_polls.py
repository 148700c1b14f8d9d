"""Server memory while it holds many idle long polls.

Each poll is one raw HTTP/1.1 connection carrying a pre-signed
``GET /v1/messages?limit=1&wait=30`` for a device with an empty queue, so
the harness holds thousands of them for the cost of a socket and a small
task each; when a poll's wait ends the connection renews it with the next
pre-signed request (keep-alive), as a client would. The polls are opened
in paced batches (every request is admitted before it parks, and admission
is bounded); the server's ``pqmsg_long_polls_waiting`` gauge says how many
are parked, and the server's RSS (its process and its workers, from /proc
via psutil) is read before opening and again at the highest parked count
seen. Run it against a single-worker server: each worker has its own gauge.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import trio

from bench.options import Options
from bench.run import population
from bench.signer import Signed, SignerPool, Spec

WAIT_S = 30
REQUESTS_PER_POLL = 3  # the first poll and two renewals: the run lasts under 90 s
BATCH = 100
BATCH_PAUSE_S = 0.05
MAX_BACKLOG = 150  # opened but not yet parked: stay well under the in-flight limit
SETTLE_S = 2.0
OPEN_DEADLINE_S = 75.0
WATCH_S = 10.0
RETRY_AFTER_S = 1.0
CLOSE_GRACE_S = 10.0
_LENGTH = re.compile(rb"^content-length:\s*(\d+)", re.MULTILINE | re.IGNORECASE)


@attrs.define
class Counters:
    answered: int = 0
    broken: int = 0
    statuses: dict[int, int] = attrs.Factory(dict)


def rss_bytes(pids: Sequence[int]) -> int:
    import psutil

    total = 0
    for pid in pids:
        proc = psutil.Process(pid)
        for p in (proc, *proc.children(recursive=True)):
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return total


async def gauge(http: httpx.AsyncClient, name: str) -> int:
    """The server's gauge ``name`` from ``/metrics`` (-1 when it is missing)."""
    found = re.search(rb"^" + re.escape(name.encode()) + rb" (\S+)$", (await http.get("/metrics")).content, re.MULTILINE)
    return int(float(found.group(1))) if found else -1


@attrs.frozen
class Held:
    """What holding many idle connections cost the server."""

    held: int  # the highest value of the server's gauge seen
    rss_before: int
    rss_after: int  # at that highest value
    open_s: float


async def hold_many(
    url: str, pids: Sequence[int], gauge_name: str, count: int,
    start_one: Callable[[int, trio.Nursery], Awaitable[None]], lost: Callable[[], int],
) -> Held:
    """Open ``count`` idle connections in paced batches and read the server's RSS.

    ``start_one(i, holders)`` opens the i-th and leaves a task holding it in
    ``holders``; ``lost()`` counts those that failed. RSS is read once before
    opening and again at the highest value of the server's gauge ``gauge_name``
    seen; the holders are cancelled at the end.
    """
    async with httpx.AsyncClient(base_url=url) as http, trio.open_nursery() as holders:
        await trio.sleep(SETTLE_S)
        before = rss_bytes(pids)
        opened_at = trio.current_time()
        with trio.move_on_after(OPEN_DEADLINE_S):
            for i in range(0, count, BATCH):
                started = min(i + BATCH, count)
                for j in range(i, started):
                    await start_one(j, holders)
                await trio.sleep(BATCH_PAUSE_S)
                # The server's gauge is the only signal that a connection is held: poll it,
                # and keep those still opening well under the server's in-flight limit.
                while started - lost() - await gauge(http, gauge_name) > MAX_BACKLOG:  # noqa: ASYNC110
                    await trio.sleep(BATCH_PAUSE_S)
        open_s = trio.current_time() - opened_at
        held, after = await _watch_peak(http, gauge_name, count, pids)
        holders.cancel_scope.cancel()
    return Held(held, before, after, open_s)


def memory_figures(held: Held, *, sign_s: float, per: str) -> dict[str, float | None]:
    """The result fields both idle modes share: timings and RSS, before, after and per connection held."""
    return {
        "open_s": round(held.open_s, 2),
        "presign_s": round(sign_s, 2),
        "rss_before_mib": round(held.rss_before / 2**20, 1),
        "rss_after_mib": round(held.rss_after / 2**20, 1),
        f"rss_per_{per}_kib": (
            round((held.rss_after - held.rss_before) / 1024 / held.held, 1) if held.held > 0 else None
        ),
    }


async def _watch_peak(http: httpx.AsyncClient, name: str, target: int, pids: Sequence[int]) -> tuple[int, int]:
    """For up to WATCH_S: the highest value of gauge ``name`` seen, and the server's RSS then."""
    peak = (0, 0)
    with trio.move_on_after(WATCH_S):
        while True:
            value = await gauge(http, name)
            if value > peak[0]:
                peak = (value, rss_bytes(pids))
            if value >= target:
                break
            await trio.sleep(1.0)
    return peak


async def hold(stream: trio.SocketStream, requests: list[bytes], counters: Counters) -> None:
    """Keep one long poll open on ``stream``: when it answers (after its wait), renew it."""
    try:
        await _hold(stream, requests, counters)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        counters.broken += 1


async def _hold(stream: trio.SocketStream, requests: list[bytes], counters: Counters) -> None:
    buffer = b""
    for raw in requests:
        await stream.send_all(raw)
        while b"\r\n\r\n" not in buffer:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        found = _LENGTH.search(head)
        length = int(found.group(1)) if found else 0
        while len(buffer) < length:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
        buffer = buffer[length:]
        status = int(head.split(b" ", 2)[1])
        counters.answered += 1
        counters.statuses[status] = counters.statuses.get(status, 0) + 1
        if status != 200:
            await trio.sleep(RETRY_AFTER_S)  # shed (503): renewing at once would feed the overload


def raw_request(signed: Signed, host: str) -> bytes:
    lines = [f"GET {signed.target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in signed.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


async def run(opts: Options, url: str, pids: Sequence[int]) -> dict[str, Any]:
    if not pids:
        raise SystemExit("--idle-polls needs --spawn or --server-pid (it reads the server's RSS)")
    split = urlsplit(url)
    host, port = split.hostname or "127.0.0.1", split.port or 80
    creds = await population(opts, url, fake=False)
    pool = SignerPool(creds, opts.signers)
    try:
        specs = [
            Spec("poll", i % len(creds), "GET", "/v1/messages", f"limit=1&wait={WAIT_S}", b"")
            for i in range(opts.idle_polls * REQUESTS_PER_POLL)
        ]
        started = trio.current_time()
        signed = await pool.sign(specs)
        sign_s = trio.current_time() - started
    finally:
        pool.close()
    raws = [raw_request(s, f"{host}:{port}") for s in signed]
    per_poll = [raws[i :: opts.idle_polls] for i in range(opts.idle_polls)]
    streams: list[trio.SocketStream] = []
    counters = Counters()

    async def start_one(i: int, holders: trio.Nursery) -> None:
        stream = await trio.open_tcp_stream(host, port)
        streams.append(stream)
        holders.start_soon(hold, stream, per_poll[i], counters)

    held = await hold_many(url, pids, "pqmsg_long_polls_waiting", opts.idle_polls, start_one, lambda: 0)
    waiting = held.held
    with trio.move_on_after(CLOSE_GRACE_S, shield=True):
        for stream in streams:
            await stream.aclose()
    result: dict[str, Any] = {
        "mode": "idle_polls",
        "target": "pqmsg",
        "polls_requested": opts.idle_polls,
        "connections_opened": len(streams),
        "answers": counters.answered,
        "broken_connections": counters.broken,
        "answer_statuses": {str(k): v for k, v in sorted(counters.statuses.items())},
        "polls_parked": waiting,
        **memory_figures(held, sign_s=sign_s, per="poll"),
        "endpoints": {},
    }
    print(
        f"idle polls: {waiting} parked of {opts.idle_polls} (opened in {result['open_s']} s); "
        f"server RSS {result['rss_before_mib']} MiB -> {result['rss_after_mib']} MiB, "
        f"{result['rss_per_poll_kib']} KiB per poll"
    )
    return result

"""One measured run against one target: set up, pre-sign, drive, summarise.

The order: register the accounts through the SDK (or invent them, for the
baseline app that checks nothing), start the signer pool, queue messages if
the scenario reads them, pre-sign what the window is expected to use, then
run the long-poll loops and the load driver while the CPU monitor and the
progress bar watch. Everything opened here is closed here.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from typing import Any, cast

import trio

from bench import cpu, hpack_raw, load, progress, stats, streams
from bench.options import Options
from bench.population import credentials, register_accounts
from bench.scenario import Peer, Workload
from bench.signer import Credentials, SignerPool, UnsignedPool
from bench.transport import Transport, open_transport
from pqmsg.client import Client

POLLS_PER_CONNECTION = 100
PRESIGN_MARGIN = 1.15
QUEUE_CONCURRENCY = 16
# Closed loop has no known rate: pre-sign for this many operations a second,
# and let the background refill (counted and reported) cover the rest. Above
# what the server can serve: a refill signs in the window, and its signer
# processes then take CPU from the server under test on the same cores (the
# floor, whose requests need no signature, never pays that).
CLOSED_LOOP_PRESIGN_RPS = 1000.0


async def population(opts: Options, url: str, *, fake: bool) -> list[Credentials]:
    if fake:
        return [Credentials(str(uuid.uuid4()), 1, b"", b"") for _ in range(opts.accounts)]
    async with Client(url, http2=not opts.http1, verify=not opts.insecure) as client:
        devices = await register_accounts(client, opts.accounts, prekeys=opts.mix["bundle"] > 0)
    return credentials(devices)


def expected_ops(opts: Options) -> int:
    if opts.requests:
        return opts.requests
    rate = opts.rate if opts.rate is not None else CLOSED_LOOP_PRESIGN_RPS
    return math.ceil(rate * (opts.duration_s + opts.warmup_s) * PRESIGN_MARGIN)


async def presign(work: Workload, opts: Options) -> None:
    total_weight = sum(opts.mix.values())
    ops = expected_ops(opts)
    for kind, queue in work.queues.items():
        await queue.fill(math.ceil(ops * opts.mix[kind] / total_weight))
    if work.poll_queues:
        # A poller re-polls after each batch it receives (at most one per send),
        # and at least every poll_wait_s.
        per_send = ops // len(work.poll_queues) + 8
        per_wait = int((opts.duration_s + opts.warmup_s) / max(1, opts.poll_wait_s)) + 8
        per_poller = min(max(per_send, per_wait), int(opts.duration_s * 20) + 8)
        for queue in work.poll_queues:
            await queue.fill(per_poller)


async def queue_messages(work: Workload, http: Transport, depth: int) -> None:
    """Put ``depth`` untimed messages in every account's queue before the window."""
    signed = await work.pool.sign(work.untimed_sends(depth * len(work.peers)))
    limiter = trio.CapacityLimiter(QUEUE_CONCURRENCY)

    async def one(i: int) -> None:
        async with limiter:
            await work.send_untimed(http, signed[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(signed)):
            nursery.start_soon(one, i)


async def run(
    opts: Options, url: str, *, server_pids: Sequence[int], target: str, fake_auth: bool = False,
    before: Callable[[list[Credentials]], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Set up, run and summarise; ``before(credentials)`` runs once the accounts exist."""
    if not opts.huffman:
        hpack_raw.disable_huffman()
    creds = await population(opts, url, fake=fake_auth)
    if before is not None:
        await before(creds)
    peers = [Peer(c.account, c.device) for c in creds]
    pool = (UnsignedPool if fake_auth else SignerPool)(creds, opts.signers)
    rec = stats.Recorder()
    async with AsyncExitStack() as stack:
        stack.callback(pool.close)
        clients = [await stack.enter_async_context(open_transport(opts, url)) for _ in range(opts.connections)]
        n_poll = math.ceil(len(peers) / POLLS_PER_CONNECTION) if opts.polling else 0
        poll_clients = [await stack.enter_async_context(open_transport(opts, url)) for _ in range(n_poll)]
        work = Workload(opts, peers, pool, rec, clients, poll_clients)
        if opts.streaming:
            work.receivers = streams.receivers(opts, url, pool, rec, work.delivery, len(peers))
        if opts.queue_depth:
            await queue_messages(work, clients[0], opts.queue_depth)
        await presign(work, opts)
        return await _drive(opts, work, rec, server_pids, target)
    raise AssertionError("unreachable")


async def _drive(
    opts: Options, work: Workload, rec: stats.Recorder, server_pids: Sequence[int], target: str,
) -> dict[str, Any]:
    lag = cpu.LoopLag()
    marks: dict[str, Any] = {}
    loop_done = trio.Event()
    measured = trio.Event()

    async def monitor() -> None:
        await trio.sleep_until(budget.measure_from)
        marks["first"], marks["signed0"] = cpu.sample(server_pids), work.pool.signed
        with trio.move_on_at(budget.deadline):
            await loop_done.wait()
        rec.end = trio.current_time()
        marks["last"], marks["signed1"] = cpu.sample(server_pids), work.pool.signed
        measured.set()

    async with trio.open_nursery() as nursery:
        # Streams open before the clock starts (their handshakes are set-up).
        for receiver in work.receivers:
            await nursery.start(receiver.run)
        start = trio.current_time()
        budget = load.Budget(opts, start)
        rec.start = budget.measure_from
        nursery.start_soon(lag.run)
        nursery.start_soon(monitor)
        if opts.progress:

            def counts() -> tuple[int, int]:
                return rec.count(), rec.errors()

            nursery.start_soon(partial(progress.show, label=target), start, budget.deadline, counts)
        for j in range(len(work.poll_queues)):
            nursery.start_soon(work.poller, j, nursery)
        driver = load.open_loop if opts.open_loop else load.closed_loop
        await driver(work, opts, budget)
        loop_done.set()
        await measured.wait()
        nursery.cancel_scope.cancel()
    return _result(opts, work, rec, marks, lag, target)


def _result(
    opts: Options, work: Workload, rec: stats.Recorder, marks: dict[str, Any], lag: cpu.LoopLag, target: str,
) -> dict[str, Any]:
    usage = cpu.usage(marks["first"], marks["last"], lag)
    endpoints = stats.summarise_all(rec)
    window = rec.end - rec.start
    shortfall = bool(opts.open_loop and rec.dropped)
    total_ops = sum(
        cast(int, s["requests"]) for k, s in endpoints.items() if k not in ("authenticated", stats.STREAM_CLOSED)
    )
    server_cpu = usage["server_cpu_s"]
    starved = sum(q.starved for q in (*work.queues.values(), *work.poll_queues))
    return {
        "target": target,
        "scenario": opts.scenario,
        "load": f"open loop {opts.rate}/s" if opts.open_loop else f"closed loop x{opts.concurrency}",
        "connections": opts.connections,
        "protocol": "http/1.1" if opts.http1 else "h2",
        "accounts": opts.accounts,
        "message_bytes": opts.message_bytes,
        "window_s": round(window, 3),
        "endpoints": endpoints,
        "e2e_delivery": stats.e2e_summary(rec),
        "open_loop": {"rate": opts.rate, "dropped": rec.dropped} if opts.open_loop else None,
        "cpu": usage,
        "server_cpu_ms_per_request": (
            round(1000 * float(server_cpu) / total_ops, 3) if server_cpu and total_ops else None
        ),
        "signing": {
            "processes": work.pool.processes,
            "signed_in_window": marks["signed1"] - marks["signed0"],
            "starved": starved,
        },
        "client": "httpx" if opts.http1 or opts.client == "httpx" else "h2 (bench)",
        "hpack_huffman": opts.huffman,
        "goaway_retries": work.goaway_retries,
        "receive": "stream" if opts.streaming else "poll" if opts.polling else None,
        "streams_reopened": sum(r.reopened for r in work.receivers) if opts.streaming else None,
        "warnings": cpu.warnings(usage, open_loop_shortfall=shortfall)
        + ([f"{starved} requests waited for a signature"] if starved else []),
        "timeline": stats.timeline(rec),
    }

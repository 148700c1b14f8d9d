"""Server memory while it holds many idle WebSocket streams (``--idle-streams N``).

The stream counterpart of :mod:`bench.idle_polls`. A device holds one
stream at a time (a newer one replaces it), so the run registers N accounts,
one device each, and opens one ``GET /v1/stream`` per device: an HTTP/1.1
upgrade signed by the signer pool (:func:`pqmsg.client.ws_h1.open_h1_transport`,
a connection each, the lightest transport for the harness to hold
thousands of). Each stream answers the server's pings, as a client must,
and nothing else arrives: the queues are empty. Streams open in paced
batches; the server's ``pqmsg_streams_open`` gauge says how many are open,
and the server's RSS is read before opening and again at the highest count
seen. Run it against a single-worker server: each worker has its own gauge.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
import httpx
import trio

from bench.idle_polls import hold_many, memory_figures
from bench.options import Options
from bench.run import population
from bench.signer import SignerPool, Spec
from bench.streams import OPEN_ERRORS, PONG_FRAME
from pqmsg.client.ws_h1 import open_h1_transport
from pqmsg.client.ws_transport import STREAM_PATH

GAUGE = "pqmsg_streams_open"


@attrs.define
class Counters:
    opened: int = 0
    failed: int = 0  # refused or broken
    pings: int = 0


async def hold(url: httpx.URL, headers: dict[str, str], counters: Counters) -> None:
    """Open one stream and keep it open, answering pings, until cancelled."""
    try:
        async with open_h1_transport(url, headers, None) as transport:
            counters.opened += 1
            while True:
                if json.loads(await transport.receive()).get("type") == "ping":
                    counters.pings += 1
                    await transport.send(PONG_FRAME)
    except OPEN_ERRORS:
        counters.failed += 1


async def run(opts: Options, url: str, pids: Sequence[int]) -> dict[str, Any]:
    if not pids:
        raise SystemExit("--idle-streams needs --spawn or --server-pid (it reads the server's RSS)")
    count = opts.idle_streams
    creds = await population(attrs.evolve(opts, accounts=count), url, fake=False)
    pool = SignerPool(creds, opts.signers)
    try:
        started = trio.current_time()
        signed = await pool.sign([Spec("stream", i, "GET", STREAM_PATH, "", b"") for i in range(count)])
        sign_s = trio.current_time() - started
    finally:
        pool.close()
    target = httpx.URL(url)
    counters = Counters()

    async def start_one(i: int, holders: trio.Nursery) -> None:
        holders.start_soon(hold, target, dict(signed[i].headers), counters)

    held = await hold_many(url, pids, GAUGE, count, start_one, lambda: counters.failed)
    streams_open = held.held
    result: dict[str, Any] = {
        "mode": "idle_streams",
        "target": "pqmsg",
        "streams_requested": count,
        "streams_opened": counters.opened,
        "streams_failed": counters.failed,
        "pings_answered": counters.pings,
        "streams_open": streams_open,
        **memory_figures(held, sign_s=sign_s, per="stream"),
        "endpoints": {},
    }
    print(
        f"idle streams: {streams_open} open of {count} (opened in {result['open_s']} s, "
        f"{counters.failed} failed); server RSS {result['rss_before_mib']} MiB -> "
        f"{result['rss_after_mib']} MiB, {result['rss_per_stream_kib']} KiB per stream"
    )
    return result

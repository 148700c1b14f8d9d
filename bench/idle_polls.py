"""Server memory while it holds many idle long polls.

Each poll is one raw HTTP/1.1 connection carrying one pre-signed
``GET /v1/messages?limit=1&wait=30`` for a device with an empty queue, so
the harness holds thousands of them for the cost of a socket each. The
polls are opened in paced batches (every request is admitted before it
parks, and admission is bounded), the server's ``pqmsg_long_polls_waiting``
gauge says how many are parked, and the server's RSS (its process and its
workers, from /proc via psutil) is read before and after. Everything
happens well inside the 30 s wait, so no poll returns during the reading.
Run it against a single-worker server: each worker has its own gauge.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from bench.options import Options
from bench.run import population
from bench.signer import Signed, SignerPool, Spec

WAIT_S = 30
BATCH = 100
BATCH_PAUSE_S = 0.05
MAX_BACKLOG = 150  # opened but not yet parked: stay well under the in-flight limit
SETTLE_S = 2.0
OPEN_DEADLINE_S = 20.0
_GAUGE = re.compile(rb"^pqmsg_long_polls_waiting (\S+)$", re.MULTILINE)


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


async def parked(http: httpx.AsyncClient) -> int:
    found = _GAUGE.search((await http.get("/metrics")).content)
    return int(float(found.group(1))) if found else -1


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
            for i in range(opts.idle_polls)
        ]
        started = trio.current_time()
        signed = await pool.sign(specs)
        sign_s = trio.current_time() - started
    finally:
        pool.close()
    requests = [raw_request(s, f"{host}:{port}") for s in signed]
    streams: list[trio.SocketStream] = []
    async with httpx.AsyncClient(base_url=url) as http:
        await trio.sleep(SETTLE_S)
        before = rss_bytes(pids)
        opened_at = trio.current_time()
        try:
            with trio.move_on_after(OPEN_DEADLINE_S):
                for i in range(0, len(requests), BATCH):
                    for raw in requests[i : i + BATCH]:
                        stream = await trio.open_tcp_stream(host, port)
                        streams.append(stream)
                        await stream.send_all(raw)
                    await trio.sleep(BATCH_PAUSE_S)
                    # The server's gauge is the only signal that polls are parked: poll it.
                    while len(streams) - await parked(http) > MAX_BACKLOG:  # noqa: ASYNC110
                        await trio.sleep(BATCH_PAUSE_S)
                while await parked(http) < len(streams):  # noqa: ASYNC110
                    await trio.sleep(BATCH_PAUSE_S)
            open_s = trio.current_time() - opened_at
            await trio.sleep(SETTLE_S)
            waiting = await parked(http)
            after = rss_bytes(pids)
        finally:
            for stream in streams:
                with trio.move_on_after(1, shield=True):
                    await stream.aclose()
    result = {
        "mode": "idle_polls",
        "target": "pqmsg",
        "polls_requested": opts.idle_polls,
        "connections_opened": len(streams),
        "polls_parked": waiting,
        "open_s": round(open_s, 2),
        "presign_s": round(sign_s, 2),
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "rss_per_poll_kib": round((after - before) / 1024 / waiting, 1) if waiting > 0 else None,
        "endpoints": {},
    }
    print(
        f"idle polls: {waiting} parked of {opts.idle_polls} (opened in {result['open_s']} s); "
        f"server RSS {result['rss_before_mib']} MiB -> {result['rss_after_mib']} MiB, "
        f"{result['rss_per_poll_kib']} KiB per poll"
    )
    return result

"""Admission control: past the in-flight limit the server sheds load at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import trio

from tests.support.server import make_settings, running_server


async def test_503_arrives_at_once_at_the_limit_and_requests_under_it_succeed(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", http__max_in_flight=2)
    with trio.fail_after(30):
        async with running_server(settings) as server:
            release = trio.Event()
            both_admitted = trio.Event()
            admitted = 0

            async def slow_body() -> AsyncIterator[bytes]:
                nonlocal admitted
                yield b'{"identity_key":'
                admitted += 1
                if admitted == 2:
                    both_admitted.set()
                await release.wait()  # the request holds its slot while its body trickles in
                yield b"1}"

            async def hold_slot() -> None:
                async with httpx.AsyncClient(base_url=server.url) as http:
                    response = await http.post("/v1/accounts", content=slow_body())
                    assert response.status_code == 400  # finished normally once released

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold_slot)
                nursery.start_soon(hold_slot)
                await both_admitted.wait()
                await trio.sleep(0.1)
                async with httpx.AsyncClient(base_url=server.url) as http:
                    started = trio.current_time()
                    shed = await http.get("/health/live")
                    shed_after = trio.current_time() - started
                    release.set()
                    await trio.sleep(0.1)
                    ok = await http.get("/health/live")
                    metrics_while_full = (await http.get("/metrics")).text

    assert shed.status_code == 503
    assert shed.headers["content-type"] == "application/problem+json"
    assert shed.headers["retry-after"] == "1"
    assert shed.json()["reason"] == "overloaded"
    assert shed_after < 1.0  # answered at once, not queued behind the held requests
    assert ok.status_code == 200
    assert "pqmsg_http_in_flight_limit 2.0" in metrics_while_full

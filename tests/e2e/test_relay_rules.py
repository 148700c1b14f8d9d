"""Relay rules a client notices: exactly-once prekeys, long-poll wake-up, limits, metrics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from pqmsg.client import Client, ProblemResponse
from pqmsg.settings import RateLimit
from tests.observability.contract import contract_violations
from tests.observability.tools import promtool_check_metrics
from tests.support.server import RunningServer, make_settings, running_server


async def test_one_time_prekeys_are_handed_out_once_under_concurrent_fetches(client: Client) -> None:
    with trio.fail_after(60):
        bob = await client.register()
        await bob.upload_prekeys(ec=5, pq=5)
        fetchers = [await client.register() for _ in range(4)]
        bundles: list[dict[str, object]] = []

        async def fetch(i: int) -> None:
            bundles.append((await fetchers[i % 4].fetch_bundle(bob.account, 1))["devices"][0])

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(fetch, i)

    ec_ids = [b["one_time_prekey"]["id"] for b in bundles if b["one_time_prekey"]]  # type: ignore[index]
    pq = [b["pq_prekey"] for b in bundles]
    pq_ids = [p["id"] for p in pq if not p["last_resort"]]  # type: ignore[index]
    assert len(ec_ids) == len(set(ec_ids)) == 5
    assert len(pq_ids) == len(set(pq_ids)) == 5
    assert sum(1 for p in pq if p["last_resort"]) == 15  # type: ignore[index]
    status = await bob.key_status()
    assert (status["one_time_prekeys"], status["pq_one_time_prekeys"]) == (0, 0)
    assert status["replenish"] is True


async def test_long_poll_returns_as_soon_as_a_message_is_stored(client: Client) -> None:
    with trio.fail_after(30):
        alice = await client.register()
        bob = await client.register()
        received: list[float] = []

        async def poll() -> None:
            messages, _ = await bob.receive(wait=20)
            received.append(trio.current_time())
            assert [m.ciphertext for m in messages] == [b"wake up"]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await trio.sleep(0.3)  # the poll is parked in the server by now
            await alice.send(bob.account, {1: b"wake up"})
            sent = trio.current_time()
    # Woken by the send, not by the 20 s timeout.
    assert received[0] - sent < 1.0


async def test_long_poll_with_nothing_to_deliver_returns_empty_at_wait(client: Client) -> None:
    with trio.fail_after(30):
        bob = await client.register()
        started = trio.current_time()
        messages, more = await bob.receive(wait=1)
        elapsed = trio.current_time() - started
    assert (messages, more) == ([], False)
    assert 0.9 <= elapsed < 5


@pytest.fixture
async def limited_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    settings = make_settings(
        tmp_path / "data",
        limits__send=RateLimit(per_s=0.01, burst=2),
        limits__registration=RateLimit(per_s=0.01, burst=3),
    )
    async with running_server(settings) as server:
        yield server


async def test_rate_limits_answer_429_with_retry_after_and_are_counted(limited_server: RunningServer) -> None:
    with trio.fail_after(30):
        async with Client(limited_server.url) as client:
            alice = await client.register()
            bob = await client.register()
            await alice.send(bob.account, {1: b"1"})
            await alice.send(bob.account, {1: b"2"})
            with pytest.raises(ProblemResponse) as limited:
                await alice.send(bob.account, {1: b"3"})
            assert limited.value.status == 429
            assert int(limited.value.headers["retry-after"]) >= 1
            await client.register()
            with pytest.raises(ProblemResponse) as registration:
                await client.register()
            assert registration.value.status == 429
            messages, _ = await bob.receive()
            assert len(messages) == 2  # the refused send stored nothing
            metrics = (await client.http.get("/metrics")).text
    assert 'pqmsg_rate_limit_rejects_total{limiter="send"} 1.0' in metrics
    assert 'pqmsg_rate_limit_rejects_total{limiter="registration"} 1.0' in metrics


async def test_metrics_pass_promtool_and_the_contract(server: RunningServer, client: Client) -> None:
    with trio.fail_after(60):
        alice = await client.register()
        bob = await client.register()
        await bob.upload_prekeys(ec=1, pq=0)
        await alice.fetch_bundle(bob.account)  # last resort: none uploaded, so pq_prekey is null
        await alice.send(bob.account, {1: b"x"}, pq_epochs={1: 1})
        await alice.send(bob.account, {1: b"y"}, pq_epochs={1: 2})
        messages, _ = await bob.receive()
        await bob.ack([m.id for m in messages])
        real_clock, client.clock = client.clock, lambda: 1_000_000.0
        with pytest.raises(ProblemResponse) as skewed:
            await bob.list_devices()
        client.clock = real_clock
        assert skewed.value.reason == "skew"
        async with httpx.AsyncClient(base_url=server.url) as http:
            text = (await http.get("/metrics")).text
    assert await trio.to_thread.run_sync(promtool_check_metrics, text) == ""
    assert contract_violations(text) == []
    assert "pqmsg_pq_ratchet_advances_total 2.0" in text
    assert "pqmsg_messages_acked_total 2.0" in text
    assert "pqmsg_messages_delivered_total 2.0" in text
    assert 'pqmsg_auth_rejects_total{reason="skew"} 1.0' in text


async def test_stale_signed_prekeys_are_counted_after_the_rotation_limit(tmp_path: Path) -> None:
    offset = [0.0]

    def clock() -> float:
        return time.time() + offset[0]

    settings = make_settings(
        tmp_path / "data", keys__signed_prekey_max_age_s=7 * 86400, keys__stale_scan_interval_s=0.05,
        auth__skew_window_s=30 * 86400, auth__replay_window_s=61 * 86400,
    )
    with trio.fail_after(30):
        async with running_server(settings, clock=clock) as server, Client(server.url, clock=clock) as client:
            fresh = await client.register()
            stale = await client.register()
            await stale.upload_prekeys(ec=0, pq=0)
            offset[0] = 6 * 86400
            await fresh.upload_prekeys(ec=0, pq=0)

            async def gauge() -> str:
                text = (await client.http.get("/metrics")).text
                return next(line for line in text.splitlines() if line.startswith("pqmsg_signed_prekey_stale_devices "))

            await trio.sleep(0.2)
            assert await gauge() == "pqmsg_signed_prekey_stale_devices 0.0"
            offset[0] = 8 * 86400  # the first key is now 8 days old, the second 2
            for _ in range(200):  # the scan runs every 50 ms
                if await gauge() == "pqmsg_signed_prekey_stale_devices 1.0":
                    break
                await trio.sleep(0.05)
            assert await gauge() == "pqmsg_signed_prekey_stale_devices 1.0"
            assert (await stale.key_status())["replenish"] is True

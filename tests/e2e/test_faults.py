"""A server process whose PostgreSQL or Redis goes away: quick 503s, honest /health, recovery."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from pqmsg.client import Client, Device, ProblemResponse
from tests.support.postgres import create_throwaway_database, drop_throwaway_database
from tests.support.process import server_process
from tests.support.redis_server import private_redis_server

pytestmark = pytest.mark.slow
FAST_S = 3.0  # what "quickly" means here: well under any client timeout


def pg_cluster(action: str) -> None:
    version = sorted(Path("/etc/postgresql").iterdir())[0].name
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action, *(["-m", "fast"] if action == "stop" else [])],
        check=True, timeout=60, capture_output=True,
    )


@pytest.fixture
def database_url() -> Iterator[str]:
    url = create_throwaway_database()
    try:
        yield url
    finally:
        drop_throwaway_database(url)


async def expect_503(call: object) -> ProblemResponse:
    started = trio.current_time()
    with pytest.raises(ProblemResponse) as info:
        await call  # type: ignore[misc]
    assert trio.current_time() - started < FAST_S
    assert info.value.status == 503
    assert "retry-after" in info.value.headers
    return info.value


async def wait_for_health(http: httpx.AsyncClient, component: str, status: str) -> dict[str, object]:
    while True:
        body = (await http.get("/health")).json()
        if body["components"][component]["status"] == status:
            return body  # type: ignore[no-any-return]
        await trio.sleep(0.2)


async def until_ok(device: Device) -> None:
    while True:
        try:
            await device.list_devices()
            return
        except ProblemResponse as exc:
            assert exc.status == 503, exc
            await trio.sleep(0.3)


@pytest.mark.postgres
async def test_postgres_down_gives_quick_503s_and_service_resumes(tmp_path: Path, database_url: str) -> None:
    env = {"PQMSG_DATABASE_URL": database_url, "PQMSG_DB_TIMEOUT_S": "1"}
    with trio.fail_after(120):
        async with server_process(tmp_path / "data", env=env) as server, Client(server.url) as client:
            alice = await client.register()
            bob = await client.register()
            await alice.send(bob.account, {1: b"acknowledged before the outage"})
            try:
                await trio.to_thread.run_sync(pg_cluster, "stop")
                for _ in range(5):  # no hang, no 500 storm
                    await expect_503(bob.receive())
                    await expect_503(alice.send(bob.account, {1: b"during"}))
                health = await wait_for_health(client.http, "storage", "failing")
                assert (await client.http.get("/health")).status_code == 503
                assert health["status"] == "failing"
            finally:
                await trio.to_thread.run_sync(pg_cluster, "start")
            await until_ok(bob)
            await wait_for_health(client.http, "storage", "ok")
            messages, _ = await bob.receive()
            assert [m.ciphertext for m in messages] == [b"acknowledged before the outage"]


@pytest.mark.redis
async def test_redis_down_fails_closed_and_recovers(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with private_redis_server() as redis:
            env = {"PQMSG_REDIS_URL": redis.url}
            async with server_process(tmp_path / "data", env=env) as server, Client(server.url) as client:
                alice = await client.register()
                await alice.list_devices()
                await redis.stop()
                # Replay protection cannot be checked: refused, never accepted.
                problem = await expect_503(alice.list_devices())
                assert problem.reason == "replay_cache_unavailable"
                # Registration's limiter is declared fail-closed.
                problem = await expect_503(client.register())
                assert problem.reason == "limiter_unavailable"
                await wait_for_health(client.http, "replay", "failing")
                await redis.start()
                await until_ok(alice)
                await wait_for_health(client.http, "replay", "ok")
                await client.register()

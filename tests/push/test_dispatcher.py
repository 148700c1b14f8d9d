"""The dispatcher end to end: SQLite storage, HTTP/2 fakes, real time.

Each test wakes devices and then leaves the dispatcher: leaving drains the
queue, so everything asserted afterwards has happened. Timing behaviour
(breaker, coalescing, overflow, slow providers) is in
``test_dispatcher_timing.py`` on virtual time.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from pqmsg.nurseries.push import ProviderStatistics, open_push_dispatcher
from pqmsg.settings import PushSettings, SettingsError
from pqmsg.storage.base import NewDevice, PushTarget
from pqmsg.storage.sqlite import SqliteStorage, open_sqlite_storage
from tests.push.conftest import Credentials, MemoryPushTargets, PushEnv

DEADLINE_S = 20
APNS_TOKENS = {name: digit * 64 for name, digit in (("iphone", "a"), ("ipad", "b"))}


@asynccontextmanager
async def open_storage(
    path: Path, devices: dict[str, PushTarget | None]
) -> AsyncIterator[tuple[SqliteStorage, dict[str, str]]]:
    """SQLite with one account per named device (device 1), and its push target."""
    async with open_sqlite_storage(path) as storage:
        accounts = {}
        for name, target in devices.items():
            account = str(uuid.uuid4())
            device = NewDevice(device_key=b"k" * 1952, certificate=b"c" * 3309, name=name)
            await storage.create_account(account, b"i" * 1952, device, now=1.0)
            if target is not None:
                await storage.set_push_target(account, 1, target)
            accounts[name] = account
        yield storage, accounts


async def test_wake_ups_reach_fcm_and_apns(push_env: PushEnv, tmp_path: Path) -> None:
    devices = {
        "pixel": PushTarget("fcm", "fcm-pixel"),
        "iphone": PushTarget("apns", APNS_TOKENS["iphone"]),
    }
    with trio.fail_after(DEADLINE_S):
        async with open_storage(tmp_path / "db", devices) as (storage, accounts):
            async with push_env.run(storage) as (fakes, dispatcher):
                dispatcher.wake(accounts["pixel"], 1)
                dispatcher.wake(accounts["iphone"], 1)

    (fcm,) = fakes.fcm.sent
    assert fcm.json()["message"] == {
        "token": "fcm-pixel",
        "data": {"pqmsg": "wake"},
        "android": {"priority": "high"},
    }
    (apns,) = fakes.apns.sent
    assert apns.path == f"/3/device/{APNS_TOKENS['iphone']}"
    assert apns.json() == {"aps": {"content-available": 1}}
    assert {fcm.http_version, apns.http_version} == {"2"}
    requests = dispatcher.statistics().requests
    assert (requests["fcm", "sent"], requests["apns", "sent"]) == (1, 1)


async def test_dead_tokens_are_removed(push_env: PushEnv, tmp_path: Path) -> None:
    devices = {
        "pixel": PushTarget("fcm", "fcm-gone"),
        "iphone": PushTarget("apns", APNS_TOKENS["iphone"]),
        "ipad": PushTarget("apns", "not-a-device-token"),
        "tablet": PushTarget("fcm", "fcm-alive"),
    }
    with trio.fail_after(DEADLINE_S):
        async with open_storage(tmp_path / "db", devices) as (storage, accounts):
            async with push_env.run(storage) as (fakes, dispatcher):
                fakes.fcm.unregistered.add("fcm-gone")
                fakes.apns.unregistered.add(APNS_TOKENS["iphone"])
                for account in accounts.values():
                    dispatcher.wake(account, 1)
            left = {name: await storage.get_push_target(a, 1) for name, a in accounts.items()}

    assert left == {"pixel": None, "iphone": None, "ipad": None, "tablet": devices["tablet"]}
    requests = dispatcher.statistics().requests
    assert (requests["fcm", "dead_token"], requests["apns", "dead_token"]) == (1, 2)


async def test_open_streams_and_missing_tokens_get_no_push(
    push_env: PushEnv, tmp_path: Path
) -> None:
    devices = {"streaming": PushTarget("fcm", "fcm-1"), "no-token": None}
    with trio.fail_after(DEADLINE_S):
        async with open_storage(tmp_path / "db", devices) as (storage, accounts):
            streams = {(accounts["streaming"], 1)}
            async with push_env.run(
                storage, has_stream=lambda account, device: (account, device) in streams
            ) as (fakes, dispatcher):
                dispatcher.wake(accounts["streaming"], 1)
                dispatcher.wake(accounts["no-token"], 1)

    assert fakes.fcm.sent == []
    skipped = dispatcher.statistics().skipped
    assert (skipped["streaming"], skipped["no_token"]) == (1, 1)


async def test_an_unconfigured_provider_is_disabled_visibly(
    push_env: PushEnv, tmp_path: Path
) -> None:
    devices = {
        "pixel": PushTarget("fcm", "fcm-1"),
        "iphone": PushTarget("apns", APNS_TOKENS["iphone"]),
    }
    with trio.fail_after(DEADLINE_S):
        async with open_storage(tmp_path / "db", devices) as (storage, accounts):
            async with push_env.run(storage, apns_key_file=None) as (fakes, dispatcher):
                stats = dispatcher.statistics()
                dispatcher.wake(accounts["pixel"], 1)
                dispatcher.wake(accounts["iphone"], 1)

    assert stats.providers["apns"] == ProviderStatistics(
        enabled=False, state="disabled", state_value=0
    )
    assert stats.detail == "fcm closed, apns disabled"
    assert stats.healthy
    assert fakes.apns.sent == []
    requests = dispatcher.statistics().requests
    assert (requests["fcm", "sent"], requests["apns", "disabled"]) == (1, 1)


async def test_leaving_drains_the_queue(push_env: PushEnv, tmp_path: Path) -> None:
    devices: dict[str, PushTarget | None] = {
        f"d{i}": PushTarget("fcm", f"fcm-{i}") for i in range(30)
    }
    with trio.fail_after(DEADLINE_S):
        async with open_storage(tmp_path / "db", devices) as (storage, accounts):
            async with push_env.run(storage, workers=3) as (fakes, dispatcher):
                for account in accounts.values():
                    dispatcher.wake(account, 1)
                queued = dispatcher.statistics().queue_depth

    assert queued == 30 - 3  # three went straight to the idle workers
    assert sorted(s.json()["message"]["token"] for s in fakes.fcm.sent) == sorted(
        f"fcm-{i}" for i in range(30)
    )


@pytest.mark.parametrize(
    "change",
    [
        {"apns_team_id": None},
        {"apns_key_file": Path("missing.p8")},
        {"fcm_credentials": Path("missing.json")},
    ],
)
async def test_a_misconfigured_provider_stops_start_up(
    credentials: Credentials, wall_clock: Callable[[], float], change: dict[str, object]
) -> None:
    settings = PushSettings(
        fcm_credentials=credentials.fcm_json,
        apns_key_file=credentials.apns_p8,
        apns_key_id="KEY",
        apns_team_id="TEAM",
        apns_topic="dev.pqmsg.app",
    )
    settings = attrs.evolve(settings, **change)
    with trio.fail_after(DEADLINE_S), pytest.raises(SettingsError):
        async with open_push_dispatcher(
            settings,
            storage=MemoryPushTargets({}),
            has_stream=lambda account, device: False,
            clock=wall_clock,
        ):
            pass


async def test_bad_key_files_stop_start_up(
    credentials: Credentials, wall_clock: Callable[[], float], tmp_path: Path
) -> None:
    not_json = tmp_path / "fcm.json"
    not_json.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    rsa_as_p8 = tmp_path / "AuthKey.p8"
    rsa_as_p8.write_bytes(credentials.fcm_json.read_bytes())
    for settings in (
        PushSettings(fcm_credentials=not_json),
        PushSettings(apns_key_file=rsa_as_p8, apns_key_id="K", apns_team_id="T", apns_topic="t"),
    ):
        with trio.fail_after(DEADLINE_S), pytest.raises(SettingsError):
            async with open_push_dispatcher(
                settings,
                storage=MemoryPushTargets({}),
                has_stream=lambda account, device: False,
                clock=wall_clock,
            ):
                pass

"""A real server whose signature checks run in a helper process.

The rest of the suite's servers check signatures in process
(``tests.support.server.make_settings``); these run the relay's happy path
and the forged-request cases of the bad-input harness with one helper, so
both ways of checking are held to the same answers.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from pqmsg.client import Client
from pqmsg.settings import Settings, SettingsError
from tests.e2e.test_bad_input import (
    test_unsigned_unknown_revoked_and_forged_requests_are_401 as test_forged_requests_are_refused_by_the_helper,  # noqa: F401
)
from tests.e2e.test_bad_input import world  # noqa: F401 (the fixture, on this module's server)
from tests.e2e.test_happy_path import (
    test_two_accounts_two_devices_exchange_keys_and_messages as test_the_relay_works_with_a_helper,  # noqa: F401
)
from tests.support.server import RunningServer, make_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data", auth__verify_processes=1)


async def test_checks_go_to_the_helper_and_health_says_so(client: Client, server: RunningServer) -> None:
    with trio.fail_after(30):
        alice = await client.register(name="alice")
        bob = await client.register(name="bob")
        await alice.send(bob.account, {1: b"hello"})
        async with httpx.AsyncClient(base_url=server.url) as http:
            health = (await http.get("/health")).json()
            metrics = (await http.get("/metrics")).text
    assert health["components"]["verifier"] == {"status": "ok"}
    assert 'pqmsg_nursery_tasks{nursery="verifier"} 1.0' in metrics
    assert "pqmsg_signature_helpers_running 1.0" in metrics
    assert "pqmsg_signature_helper_failures_total 0.0" in metrics
    # Registration is signed by its own proof, not a device: the send is the one check.
    assert 'pqmsg_signature_checks_total{where="helper"} 1.0' in metrics
    assert 'pqmsg_signature_checks_total{where="in_process"} 0.0' in metrics


def test_verify_processes_setting() -> None:
    assert Settings.from_env({}).auth.verify_processes is None
    assert Settings.from_env({"PQMSG_VERIFY_PROCESSES": "auto"}).auth.verify_processes is None
    assert Settings.from_env({"PQMSG_VERIFY_PROCESSES": "0"}).auth.verify_processes == 0
    assert Settings.from_env({"PQMSG_VERIFY_PROCESSES": "2"}).auth.verify_processes == 2
    for bad in ("-1", "65", "some"):
        with pytest.raises(SettingsError, match="PQMSG_VERIFY_PROCESSES"):
            Settings.from_env({"PQMSG_VERIFY_PROCESSES": bad})

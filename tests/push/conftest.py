"""Keys, certificates, clocks and fakes for the push tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pqmsg.nurseries.push import (
    DISPATCH_WORKERS,
    DRAIN_GRACE_S,
    PushDispatcher,
    PushTargets,
    open_push_dispatcher,
)
from pqmsg.settings import PushSettings
from pqmsg.storage.base import PushTarget
from tests.push.fake_http import client_ssl_context
from tests.push.fake_providers import (
    FCM_CLIENT_EMAIL,
    FCM_PROJECT_ID,
    FakeApns,
    FakeFcm,
    open_fake_apns,
    open_fake_fcm,
)

#: Wall-clock Unix seconds at trio time 0: the wall clock moves with trio's.
EPOCH_S = 1_760_000_000.0
#: Real seconds autojump_clock waits before jumping while threads work.
THREAD_PATIENCE_S = 1.0


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def wall_clock() -> Callable[[], float]:
    return lambda: EPOCH_S + trio.current_time()


@pytest.fixture
def http_client_factory(ca: trustme.CA) -> Callable[[], httpx.AsyncClient]:
    """Like the dispatcher's default client, trusting the fakes' CA."""
    context = client_ssl_context(ca)
    return lambda: httpx.AsyncClient(http2=True, timeout=None, verify=context)


def service_account_json(key: rsa.RSAPrivateKey, *, project_id: str, client_email: str) -> bytes:
    """A service-account key file as the Google Cloud console hands it out."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return json.dumps(
        {
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": "0123456789abcdef",
            "private_key": pem,
            "client_email": client_email,
            "client_id": "1234567890",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": "https://oauth2.googleapis.com/token",
        }
    ).encode()


def p8(key: ec.EllipticCurvePrivateKey) -> bytes:
    """An APNs ``.p8`` signing key: PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@attrs.frozen
class Credentials:
    """Key files as an operator installs them, and the public halves."""

    fcm_json: Path
    apns_p8: Path


@pytest.fixture
def credentials(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> Credentials:
    fcm_json = tmp_path / "fcm-service-account.json"
    fcm_json.write_bytes(
        service_account_json(rsa_key, project_id=FCM_PROJECT_ID, client_email=FCM_CLIENT_EMAIL)
    )
    apns_p8 = tmp_path / "AuthKey.p8"
    apns_p8.write_bytes(p8(ec_key))
    return Credentials(fcm_json, apns_p8)


class MemoryPushTargets:
    """The two storage calls the dispatcher makes, in memory.

    It stands in only for storage (not what the timing tests are about):
    the SQLite backend runs every call on a worker thread, and
    ``autojump_clock`` would jump virtual time while a thread works.
    """

    def __init__(self, targets: Mapping[tuple[str, int], PushTarget]) -> None:
        self.targets = dict(targets)

    async def get_push_target(self, account: str, device: int) -> PushTarget | None:
        await trio.lowlevel.checkpoint()
        return self.targets.get((account, device))

    async def drop_push_token(self, target: PushTarget) -> int:
        await trio.lowlevel.checkpoint()
        dead = [key for key, value in self.targets.items() if value == target]
        for key in dead:
            del self.targets[key]
        return len(dead)


@attrs.frozen
class Fakes:
    fcm: FakeFcm
    apns: FakeApns

    def settings(self, credentials: Credentials, **overrides: Any) -> PushSettings:
        """Push settings pointing at the fakes, both providers configured."""
        fields: dict[str, Any] = {
            "fcm_endpoint": self.fcm.url,
            "fcm_token_url": self.fcm.token_url,
            "fcm_credentials": credentials.fcm_json,
            "apns_endpoint": self.apns.url,
            "apns_key_file": credentials.apns_p8,
            "apns_key_id": self.apns.key_id,
            "apns_team_id": self.apns.team_id,
            "apns_topic": self.apns.topic,
        }
        return PushSettings(**(fields | overrides))


@asynccontextmanager
async def open_fakes(
    ca: trustme.CA,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    wall_clock: Callable[[], float],
) -> AsyncIterator[Fakes]:
    async with (
        open_fake_fcm(ca, rsa_key.public_key(), now=wall_clock) as fcm,
        open_fake_apns(ca, ec_key.public_key(), now=wall_clock) as apns,
    ):
        yield Fakes(fcm, apns)


@attrs.frozen
class PushEnv:
    """Everything a dispatcher test needs, and a way to run one."""

    ca: trustme.CA
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    wall_clock: Callable[[], float]
    credentials: Credentials
    http_client_factory: Callable[[], httpx.AsyncClient]

    @asynccontextmanager
    async def run(
        self,
        storage: PushTargets,
        *,
        mock_clock: trio.testing.MockClock | None = None,
        has_stream: Callable[[str, int], bool] = lambda account, device: False,
        workers: int = DISPATCH_WORKERS,
        grace_s: float = DRAIN_GRACE_S,
        **settings: Any,
    ) -> AsyncIterator[tuple[Fakes, PushDispatcher]]:
        """Both fakes, and a dispatcher with both providers pointing at them.

        With ``mock_clock`` (autojump), virtual time is held while the
        dispatcher starts: it reads the key files on worker threads, and a
        zero-threshold autojump clock jumps whenever no task can run, also
        while one waits for a thread. A long real threshold stops that and
        still ends a start-up that hangs (by jumping to its deadline).
        """
        async with open_fakes(self.ca, self.rsa_key, self.ec_key, self.wall_clock) as fakes:
            before = mock_clock.autojump_threshold if mock_clock else 0.0
            if mock_clock:
                mock_clock.autojump_threshold = THREAD_PATIENCE_S
            async with open_push_dispatcher(
                fakes.settings(self.credentials, **settings),
                storage=storage,
                has_stream=has_stream,
                clock=self.wall_clock,
                http_client_factory=self.http_client_factory,
                workers=workers,
                grace_s=grace_s,
            ) as dispatcher:
                if mock_clock:
                    mock_clock.autojump_threshold = before
                yield fakes, dispatcher


@pytest.fixture
def push_env(
    ca: trustme.CA,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    wall_clock: Callable[[], float],
    credentials: Credentials,
    http_client_factory: Callable[[], httpx.AsyncClient],
) -> PushEnv:
    return PushEnv(ca, rsa_key, ec_key, wall_clock, credentials, http_client_factory)

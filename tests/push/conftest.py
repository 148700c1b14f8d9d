"""Keys, certificates and clocks for the push tests."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
import trio
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.push.fake_http import client_ssl_context

#: Wall-clock Unix seconds at trio time 0: the wall clock moves with trio's.
EPOCH_S = 1_760_000_000.0


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

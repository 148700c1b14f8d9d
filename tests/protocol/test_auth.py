"""The check order of §3, on the authenticator alone (the HTTP path is in tests/e2e)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqmsg.errors import AuthError
from pqmsg.protocol import crypto
from pqmsg.protocol.auth import AUTH_HEADERS, Authenticator, parse_auth
from pqmsg.protocol.b64 import b64encode
from pqmsg.protocol.canonical import SignedRequest, canonical_string
from pqmsg.storage.base import DeviceAuth

ACCOUNT = "0f8fad5b-d9cb-469f-a165-70867728950e"
NOW = 1_700_000_000
KEY = crypto.generate_signing_key()
OTHER = crypto.generate_signing_key()


class Registry:
    """Device lookups and the nonce record, in memory, for the authenticator alone."""

    def __init__(self, *, revoked: bool = False) -> None:
        self.devices = {(ACCOUNT, 1): DeviceAuth(KEY.public_key, revoked, None)}
        self.nonces: set[tuple[str, int, str]] = set()

    async def lookup(self, account: str, device: int) -> DeviceAuth | None:
        return self.devices.get((account, device))

    async def record(self, account: str, device: int, nonce: str) -> bool:
        if (account, device, nonce) in self.nonces:
            return False
        self.nonces.add((account, device, nonce))
        return True

    def authenticator(self) -> Authenticator:
        return Authenticator(self.lookup, self.record, lambda: NOW, 300)


def headers(*, device: int = 1, timestamp: int = NOW, nonce: str = "n" * 16, key: crypto.SigningKeyPair = KEY) -> dict[str, str]:
    req = SignedRequest("GET", "/v1/devices", "", ACCOUNT, device, timestamp, nonce, b"")
    sig = crypto.sign(key.secret_key, canonical_string(req))
    return {
        "pqmsg-account": ACCOUNT,
        "pqmsg-device": str(device),
        "pqmsg-timestamp": str(timestamp),
        "pqmsg-nonce": nonce,
        "pqmsg-signature": b64encode(sig),
    }


async def reason_for(registry: Registry, hdrs: dict[str, str]) -> str:
    with pytest.raises(AuthError) as info:
        parsed = parse_auth("GET", "/v1/devices", "", hdrs, b"")
        await registry.authenticator().authenticate(parsed)
    return info.value.reason


async def test_accepts_a_good_request_once() -> None:
    registry = Registry()
    parsed = parse_auth("GET", "/v1/devices", "", headers(), b"")
    principal = await registry.authenticator().authenticate(parsed)
    assert (principal.account, principal.device) == (ACCOUNT, 1)
    assert await reason_for(registry, headers()) == "replay"


async def test_skew_is_checked_before_the_device() -> None:
    assert await reason_for(Registry(), headers(device=9, timestamp=NOW - 301)) == "skew"
    assert await reason_for(Registry(), headers(device=9, timestamp=NOW + 301)) == "skew"


async def test_skew_boundary_is_inclusive() -> None:
    registry = Registry()
    parsed = parse_auth("GET", "/v1/devices", "", headers(timestamp=NOW - 300), b"")
    await registry.authenticator().authenticate(parsed)


async def test_unknown_device_before_signature() -> None:
    assert await reason_for(Registry(), headers(device=2, key=OTHER)) == "unknown_device"


async def test_revoked_before_signature() -> None:
    assert await reason_for(Registry(revoked=True), headers(key=OTHER)) == "revoked"


async def test_forged_request_does_not_burn_the_nonce() -> None:
    registry = Registry()
    assert await reason_for(registry, headers(key=OTHER, nonce="x" * 16)) == "signature"
    parsed = parse_auth("GET", "/v1/devices", "", headers(nonce="x" * 16), b"")
    await registry.authenticator().authenticate(parsed)  # the real owner's request still goes through


async def test_signature_covers_the_body() -> None:
    registry = Registry()
    parsed = parse_auth("GET", "/v1/devices", "", headers(), b"tampered")
    with pytest.raises(AuthError, match="signature does not verify"):
        await registry.authenticator().authenticate(parsed)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("pqmsg-account", "0F8FAD5B-D9CB-469F-A165-70867728950E"),
        ("pqmsg-device", "0"),
        ("pqmsg-device", "01"),
        ("pqmsg-device", "99999999999"),
        ("pqmsg-timestamp", "-5"),
        ("pqmsg-timestamp", "1.5"),
        ("pqmsg-nonce", "short"),
        ("pqmsg-nonce", "n" * 65),
        ("pqmsg-nonce", "n" * 15 + "="),
        ("pqmsg-signature", "AAAA"),
    ],
)
async def test_malformed_headers(name: str, value: str) -> None:
    hdrs = headers()
    hdrs[name] = value
    assert await reason_for(Registry(), hdrs) == "malformed"


@pytest.mark.parametrize("missing", AUTH_HEADERS)
async def test_missing_header_is_malformed(missing: str) -> None:
    hdrs = headers()
    del hdrs[missing]
    assert await reason_for(Registry(), hdrs) == "malformed"


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(AUTH_HEADERS), st.text(max_size=80)))
def test_parser_only_ever_raises_malformed(hdrs: dict[str, str]) -> None:
    try:
        parse_auth("GET", "/", "", hdrs, b"")
    except AuthError as exc:
        assert exc.reason == "malformed"

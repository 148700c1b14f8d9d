"""The check order of §3, on the authenticator alone (the HTTP path is in tests/e2e)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqmsg.errors import AuthError
from pqmsg.protocol import crypto
from pqmsg.protocol.auth import AUTH_HEADERS, Authenticator, ParsedAuth, parse_auth
from pqmsg.protocol.b64 import b64encode
from pqmsg.protocol.canonical import SignedRequest, canonical_string
from pqmsg.protocol.keycache import DeviceKeyCache
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


# -- verifying against remembered keys (pqmsg.protocol.keycache) --------------


class CountingRegistry(Registry):
    def __init__(self, *, revoked: bool = False) -> None:
        super().__init__(revoked=revoked)
        self.lookups = 0

    async def lookup(self, account: str, device: int) -> DeviceAuth | None:
        self.lookups += 1
        return await super().lookup(account, device)

    def remembering(self, cache: DeviceKeyCache) -> Authenticator:
        return Authenticator(self.lookup, self.record, lambda: NOW, 300, cache)


def parsed(**kwargs: Any) -> ParsedAuth:
    return parse_auth("GET", "/v1/devices", "", headers(**kwargs), b"")


async def test_verify_remembers_an_active_device_key() -> None:
    registry, cache = CountingRegistry(), DeviceKeyCache(10)
    first = await registry.remembering(cache).verify(parsed(nonce="a" * 16))
    second = await registry.remembering(cache).verify(parsed(nonce="b" * 16))
    assert (first.from_cache, second.from_cache) == (False, True)
    assert first.device_key == second.device_key == KEY.public_key
    assert registry.lookups == 1
    # authenticate() always reads the device.
    await registry.remembering(cache).authenticate(parsed(nonce="c" * 16))
    assert registry.lookups == 2


async def test_a_revoked_or_unknown_device_is_not_remembered() -> None:
    registry, cache = CountingRegistry(revoked=True), DeviceKeyCache(10)
    for _ in range(2):
        with pytest.raises(AuthError, match="revoked"):
            await registry.remembering(cache).verify(parsed())
    with pytest.raises(AuthError) as unknown:
        await registry.remembering(cache).verify(parsed(device=2))
    assert unknown.value.reason == "unknown_device"
    assert len(cache) == 0


async def test_a_forged_request_against_a_remembered_key_reads_the_device_once() -> None:
    registry, cache = CountingRegistry(), DeviceKeyCache(10)
    await registry.remembering(cache).verify(parsed())
    with pytest.raises(AuthError) as forged:
        await registry.remembering(cache).verify(parsed(key=OTHER))
    assert forged.value.reason == "signature"
    assert registry.lookups == 2
    assert cache.get(ACCOUNT, 1) is not None  # the real owner's key stays


async def test_a_changed_key_replaces_the_remembered_one() -> None:
    registry, cache = CountingRegistry(), DeviceKeyCache(10)
    await registry.remembering(cache).verify(parsed())
    registry.devices[(ACCOUNT, 1)] = DeviceAuth(OTHER.public_key, False, None)
    pending = await registry.remembering(cache).verify(parsed(key=OTHER))
    assert (pending.from_cache, pending.device_key) == (False, OTHER.public_key)
    entry = cache.get(ACCOUNT, 1)
    assert entry is not None and entry.device_key == OTHER.public_key


def test_key_cache_is_bounded_and_forgets() -> None:
    cache = DeviceKeyCache(2)
    cache.put("a", 1, b"k1", None)
    cache.put("a", 2, b"k2", None)
    cache.put("a", 1, b"k1'", None)  # a refresh takes no room
    cache.put("b", 1, b"k3", 5.0)
    assert cache.get("a", 1) is None  # the oldest went first
    assert [e.device_key for e in (cache.get("a", 2), cache.get("b", 1)) if e] == [b"k2", b"k3"]
    cache.seen("b", 1, 9.0)
    assert (entry := cache.get("b", 1)) is not None and entry.last_seen_at == 9.0
    cache.forget_account("a")
    cache.forget("b", 1)
    assert len(cache) == 0
    off = DeviceKeyCache(0)
    off.put("a", 1, b"k", None)
    assert off.get("a", 1) is None

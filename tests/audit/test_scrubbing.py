"""No raw identifier reaches the audit file: the bytes on disk are scanned for each one.

These tests run the real writer with its default worker-thread I/O and
real fsync, on the real clock.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from pathlib import Path

import pytest
import trio

from pqmsg.audit import events
from pqmsg.audit.pseudonym import DetailValue, Pseudonymizer
from pqmsg.nurseries.audit import AuditWriter, open_audit_writer
from pqmsg.settings import AuditSettings
from tests.audit import KEY, OTHER_KEY, TEST_TIMEOUT_S, fixed_clock, records, segments

ACCOUNTS = ("3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", "7d9e0f1a-2b3c-4d5e-9f60-718293a4b5c6")
# An ML-DSA-65 public key is 1952 bytes; as sent, unpadded base64url.
DEVICE_KEY = base64.urlsafe_b64encode(hashlib.shake_256(b"device").digest(1952)).rstrip(b"=")
APNS_TOKEN = hashlib.sha256(b"apns").hexdigest()
FCM_TOKEN = "dQw4w9WgXcQ:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx"
IPV4 = "203.0.113.77"
IPV6 = "2001:db8:abcd:12::7"


def raw_identifiers() -> list[str]:
    """Everything that must not appear, in the spellings a leak would take."""
    raw = [*ACCOUNTS, DEVICE_KEY.decode(), DEVICE_KEY[:40].decode(), APNS_TOKEN, FCM_TOKEN]
    raw += [IPV4, IPV6, "2001:db8:abcd:12:", "203.0.113.77"]
    raw += [account.upper() for account in ACCOUNTS]
    raw += [account.replace("-", "") for account in ACCOUNTS]
    return raw


async def record_everything(audit: AuditWriter) -> None:
    """Every event, with a raw identifier in every field that takes one."""
    leaky_detail: dict[str, DetailValue] = {
        "reason": ACCOUNTS[1],
        "limiter": IPV4,
        "kind": DEVICE_KEY.decode(),
        "provider": FCM_TOKEN,
        "status": APNS_TOKEN,
        "count": 7,
        "account": ACCOUNTS[0],
        "ip": IPV6,
        "push_token": APNS_TOKEN,
        "device_key": DEVICE_KEY.decode(),
        ACCOUNTS[0]: "unknown_device",
    }
    for number, event in enumerate(sorted(events.EVENTS)):
        await audit.record(
            event,
            outcome=events.OUTCOME_REJECTED,
            request_id=(FCM_TOKEN, APNS_TOKEN, ACCOUNTS[0], IPV4, IPV6)[number % 5],
            account=ACCOUNTS[number % 2],
            device=number + 1,
            ip=IPV4 if number % 2 else IPV6,
            target_account=ACCOUNTS[(number + 1) % 2],
            target_device=2,
            detail=leaky_detail,
        )
    assert audit.record_nowait(
        events.PUSH_TOKEN_DROPPED,
        outcome=events.OUTCOME_OK,
        request_id=DEVICE_KEY.decode(),
        account=ACCOUNTS[0],
        device=1,
        ip=IPV4,
        detail={"provider": "apns", "reason": "BadDeviceToken"},
    )


async def write_log(directory: Path, key: bytes | None) -> None:
    settings = AuditSettings(key=key, fsync="always")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_audit_writer(settings, directory, clock=fixed_clock) as audit:
            await record_everything(audit)


async def test_no_raw_identifier_is_in_the_file(tmp_path: Path) -> None:
    await write_log(tmp_path, KEY)

    raw_bytes = b"".join(path.read_bytes() for path in segments(tmp_path))
    leaked = [raw for raw in raw_identifiers() if raw.encode() in raw_bytes]
    assert leaked == []
    # ... and the events are there, under their pseudonyms.
    pseudonyms = Pseudonymizer(KEY)
    lines = records(tmp_path)
    assert len(lines) == len(events.EVENTS) + 1
    assert {line["account"] for line in lines} == {pseudonyms.account(a) for a in ACCOUNTS}
    assert {line["ip"] for line in lines} == {"203.0.113.0/24", "2001:db8:abcd::/48"}
    assert lines[-1]["detail"] == {"provider": "apns", "reason": "BadDeviceToken"}


async def test_pseudonyms_are_stable_for_one_key_and_differ_for_another(tmp_path: Path) -> None:
    for name, key in (("first", KEY), ("second", KEY), ("other", OTHER_KEY)):
        await write_log(tmp_path / name, key)

    first, second, other = (records(tmp_path / n) for n in ("first", "second", "other"))
    fields = ("account", "device", "target_account", "target_device", "request_id")
    compared = 0
    for a, b, c in zip(first, second, other, strict=True):
        for field in fields:
            assert a[field] == b[field]
            if a[field] is not None:
                assert a[field] != c[field]
                compared += 1
    assert compared >= len(events.EVENTS) * len(fields)


async def test_without_a_key_pseudonyms_are_per_process_and_a_warning_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pqmsg.nurseries.audit"):
        await write_log(tmp_path / "first", None)
        await write_log(tmp_path / "second", None)

    warnings = [r for r in caplog.records if "PQMSG_AUDIT_KEY" in r.getMessage()]
    assert len(warnings) == 2
    first, second = records(tmp_path / "first"), records(tmp_path / "second")
    assert first[0]["account"] != second[0]["account"]
    raw_bytes = b"".join(p.read_bytes() for p in segments(tmp_path / "first"))
    assert ACCOUNTS[0].encode() not in raw_bytes

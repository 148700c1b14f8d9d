"""Scrubbing: pseudonyms, IP truncation, the detail allow-list, the line format."""

from __future__ import annotations

import ipaddress
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pqmsg.audit import events
from pqmsg.audit.pseudonym import (
    DETAIL_KEYS,
    REDACTED,
    DetailValue,
    Pseudonymizer,
    format_time,
    scrub_detail,
    truncate_ip,
)
from tests.audit import FIXED_TIME, FIXED_TIME_S, KEY, OTHER_KEY

ACCOUNT = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b"
OTHER_ACCOUNT = "7d9e0f1a-2b3c-4d5e-9f60-718293a4b5c6"
PSEUDONYM_RE = re.compile(r"acct_[0-9a-f]{32}")


def test_account_pseudonym_is_stable_for_one_key() -> None:
    first = Pseudonymizer(KEY).account(ACCOUNT)

    assert PSEUDONYM_RE.fullmatch(first)
    assert Pseudonymizer(KEY).account(ACCOUNT) == first
    assert Pseudonymizer(KEY).account(ACCOUNT.upper()) == first


def test_account_pseudonym_differs_by_key_and_by_account() -> None:
    pseudonyms = Pseudonymizer(KEY)

    assert Pseudonymizer(OTHER_KEY).account(ACCOUNT) != pseudonyms.account(ACCOUNT)
    assert pseudonyms.account(OTHER_ACCOUNT) != pseudonyms.account(ACCOUNT)


def test_the_key_is_not_in_the_repr() -> None:
    assert KEY.hex() not in repr(Pseudonymizer(KEY))
    assert repr(KEY) not in repr(Pseudonymizer(KEY))


def test_device_pairs_its_number_with_the_account_pseudonym() -> None:
    pseudonyms = Pseudonymizer(KEY)

    assert pseudonyms.device(ACCOUNT, 3) == pseudonyms.account(ACCOUNT) + "/3"
    assert pseudonyms.device(None, 3) == "-/3"


@pytest.mark.parametrize(
    ("ip", "network"),
    [
        ("203.0.113.77", "203.0.113.0/24"),
        (" 198.51.100.255 ", "198.51.100.0/24"),
        ("2001:db8:abcd:12::7", "2001:db8:abcd::/48"),
        ("2001:DB8:ABCD:FFFF:1:2:3:4", "2001:db8:abcd::/48"),
        ("::ffff:198.51.100.9", "198.51.100.0/24"),
        ("fe80::1:2%eth0", "fe80::/48"),
        ("not-an-ip", "invalid"),
        ("203.0.113.7:443", "invalid"),
        ("[2001:db8::1]:443", "invalid"),
        ("", "invalid"),
    ],
)
def test_ip_truncation(ip: str, network: str) -> None:
    assert truncate_ip(ip) == network


@given(st.ip_addresses())
def test_truncated_ip_is_a_short_network_containing_the_address(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    network = ipaddress.ip_network(truncate_ip(str(address)))

    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    assert network.prefixlen == (24 if address.version == 4 else 48)
    assert address in network


def test_detail_keeps_allowed_tokens_and_drops_everything_else() -> None:
    detail: dict[str, DetailValue] = {
        "reason": "unknown_device",
        "status": "BadDeviceToken",
        "count": 42,
        "kind": None,
        "provider": True,
        "limiter": ACCOUNT,
        "account": ACCOUNT,
        "ip": "203.0.113.77",
        "push_token": "f" * 64,
    }

    assert scrub_detail(detail) == {
        "reason": "unknown_device",
        "status": "BadDeviceToken",
        "count": 42,
        "kind": None,
        "provider": True,
        "limiter": REDACTED,
    }


@pytest.mark.parametrize(
    "value",
    [
        "203.0.113.77",
        "2001:db8::1",
        ACCOUNT,
        "a" * 41,
        "f" * 64,
        "dGhpcy1pcw-bm90",
        "with space",
        "",
        1.5,
    ],
)
def test_detail_redacts_values_that_are_not_short_tokens(value: object) -> None:
    assert scrub_detail({"reason": value}) == {"reason": REDACTED}  # type: ignore[dict-item]


@given(st.dictionaries(st.text(), st.one_of(st.text(), st.integers(), st.booleans(), st.none())))
def test_scrubbed_detail_has_only_allowed_keys_and_token_values(
    detail: dict[str, str | int | bool | None],
) -> None:
    scrubbed = scrub_detail(detail)

    assert set(scrubbed) <= DETAIL_KEYS
    for value in scrubbed.values():
        if isinstance(value, str):
            assert value == REDACTED or re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,39}", value)


def test_safe_request_ids_are_kept_and_others_pseudonymised() -> None:
    pseudonyms = Pseudonymizer(KEY)
    push_token = "cXg7:APA91bH-long/token+value="

    assert pseudonyms.request_id("9f86d081884c7d659a2feaa0") == "9f86d081884c7d659a2feaa0"
    assert pseudonyms.request_id("01J9ZQ4XK8M2V7T3B6N5C0D1E2") == "01J9ZQ4XK8M2V7T3B6N5C0D1E2"
    hidden = pseudonyms.request_id(push_token)
    assert re.fullmatch(r"req_[0-9a-f]{32}", hidden)
    assert pseudonyms.request_id(push_token) == hidden


@pytest.mark.parametrize(
    "request_id",
    [ACCOUNT, ACCOUNT.replace("-", ""), "203.0.113.77", "2001:db8::1", "f" * 64, "x" * 27],
)
def test_request_ids_that_could_be_identifiers_are_pseudonymised(request_id: str) -> None:
    assert re.fullmatch(r"req_[0-9a-f]{32}", Pseudonymizer(KEY).request_id(request_id))


def test_time_is_rfc3339_utc_with_milliseconds() -> None:
    assert format_time(FIXED_TIME_S) == FIXED_TIME
    assert format_time(0) == "1970-01-01T00:00:00.000Z"


def test_line_has_every_key_in_order_with_nulls() -> None:
    pseudonyms = Pseudonymizer(KEY)

    line = pseudonyms.line(
        time=FIXED_TIME_S,
        event=events.DEVICE_REVOKED,
        outcome=events.OUTCOME_OK,
        request_id="r1",
        account=ACCOUNT,
        device=1,
        ip=None,
        target_account=None,
        target_device=2,
        detail=None,
    )

    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert list(json.loads(line).items()) == [
        ("time", FIXED_TIME),
        ("event", "device.revoked"),
        ("outcome", "ok"),
        ("request_id", "r1"),
        ("account", pseudonyms.account(ACCOUNT)),
        ("device", pseudonyms.account(ACCOUNT) + "/1"),
        ("ip", None),
        ("target_account", None),
        # A target device without a target account is one of the account's own.
        ("target_device", pseudonyms.account(ACCOUNT) + "/2"),
        ("detail", None),
    ]


def test_every_event_name_and_outcome_is_well_formed() -> None:
    for name in events.EVENTS:
        assert events.check_event(name) == name
    for outcome in (events.OUTCOME_OK, events.OUTCOME_REJECTED, events.OUTCOME_FAILED):
        assert events.check_outcome(outcome) == outcome


@pytest.mark.parametrize("name", ["Auth.Rejected", "auth rejected", "auth", "auth.", "a.b\n"])
def test_malformed_event_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="event name"):
        events.check_event(name)


@pytest.mark.parametrize("outcome", ["OK", "ok!", "", "x" * 33])
def test_malformed_outcomes_are_refused(outcome: str) -> None:
    with pytest.raises(ValueError, match="outcome"):
        events.check_outcome(outcome)

"""Scrubbing: turning what a caller knows into what the audit log may hold.

The audit log never holds a raw account id, device key, push token or IP
address. Instead:

- an account becomes ``acct_`` + the first 16 bytes (hex) of
  ``HMAC-SHA256(key, "account:" + id)``. The key is ``PQMSG_AUDIT_KEY``, so
  the same account always maps to the same pseudonym and an operator who
  holds the key can find one account's events, while a reader of the file
  alone cannot;
- a device becomes ``<account pseudonym>/<device number>`` (device numbers
  are small per-account counters, meaningless without the account);
- an IP address is truncated to its network: IPv4 to the /24, IPv6 to the
  /48 (``203.0.113.0/24``, ``2001:db8:abcd::/48``); anything unparsable is
  written as ``invalid``;
- ``detail`` keeps only the keys in :data:`DETAIL_KEYS`, and of those only
  integers, booleans, nulls and short word-like strings (reason tokens);
  any other value becomes ``[redacted]``. A caller cannot leak an identifier
  through ``detail`` by accident;
- a request id is written as is when it is at most 26 characters of
  ``[A-Za-z0-9_-]`` (the server's own 24-hex ids, ULIDs); anything else is
  client-chosen text that could be a UUID, an address or a token, so it is
  written as ``req_<hex>`` (the same HMAC: an operator holding the key and
  the id can still find it).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final

import attrs

DetailValue = str | int | bool | None

DETAIL_KEYS: Final = frozenset({"reason", "limiter", "count", "kind", "provider", "status"})
"""The ``detail`` keys that reach the file; every other key is dropped."""

REDACTED: Final = "[redacted]"
INVALID_IP: Final = "invalid"
NO_ACCOUNT: Final = "-"
"""Stands for the account of a device recorded without its account."""

PSEUDONYM_BYTES: Final = 16
KEY_BYTES: Final = 32
IPV4_PREFIX: Final = 24
IPV6_PREFIX: Final = 48

_TOKEN_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
_REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,26}")


def random_key() -> bytes:
    """A fresh pseudonym key, for a process that was given none."""
    return secrets.token_bytes(KEY_BYTES)


def truncate_ip(ip: str) -> str:
    """The /24 (IPv4) or /48 (IPv6) network of ``ip``, or ``"invalid"``.

    IPv4-mapped IPv6 addresses count as IPv4; a zone id is dropped.
    """
    try:
        address = ipaddress.ip_address(ip.strip().partition("%")[0])
    except ValueError:
        return INVALID_IP
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = IPV4_PREFIX if address.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network((address, prefix), strict=False))


def format_time(unix_s: float) -> str:
    """RFC 3339 UTC with milliseconds: ``2026-01-02T03:04:05.678Z``."""
    moment = datetime.fromtimestamp(unix_s, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def scrub_detail(detail: Mapping[str, DetailValue]) -> dict[str, DetailValue]:
    """The allow-listed, identifier-free part of ``detail``."""
    kept: dict[str, DetailValue] = {}
    for name in sorted(DETAIL_KEYS.intersection(detail)):
        value = detail[name]
        if value is None or isinstance(value, bool | int):
            kept[name] = value
        elif isinstance(value, str) and _TOKEN_RE.fullmatch(value):
            kept[name] = value
        else:
            kept[name] = REDACTED
    return kept


@attrs.frozen
class Pseudonymizer:
    """Keyed pseudonyms: stable for one key, unlinkable without it."""

    key: bytes = attrs.field(repr=False)

    def _digest(self, kind: str, value: str) -> str:
        message = f"{kind}:{value}".encode("utf-8", "surrogatepass")
        return hmac.new(self.key, message, hashlib.sha256).digest()[:PSEUDONYM_BYTES].hex()

    def account(self, account: str) -> str:
        """``acct_<hex>`` for an account id (UUIDs compare case-insensitively)."""
        return "acct_" + self._digest("account", account.strip().lower())

    def device(self, account: str | None, device: int) -> str:
        """``<account pseudonym>/<device>``; ``-/<device>`` without an account."""
        owner = NO_ACCOUNT if account is None else self.account(account)
        return f"{owner}/{int(device)}"

    def request_id(self, request_id: str) -> str:
        """A short, safe request id as is, anything else as ``req_<hex>``."""
        if _REQUEST_ID_RE.fullmatch(request_id):
            return request_id
        return "req_" + self._digest("request", request_id)

    def line(
        self,
        *,
        time: float,
        event: str,
        outcome: str,
        request_id: str | None,
        account: str | None,
        device: int | None,
        ip: str | None,
        target_account: str | None,
        target_device: int | None,
        detail: Mapping[str, DetailValue] | None,
    ) -> bytes:
        """One audit record as a JSON line (every key always present, null when unknown).

        A ``target_device`` without ``target_account`` is a device of
        ``account`` (revoking one's own other device). ``event`` and
        ``outcome`` must already be checked tokens.
        """
        record = {
            "time": format_time(time),
            "event": event,
            "outcome": outcome,
            "request_id": None if request_id is None else self.request_id(request_id),
            "account": None if account is None else self.account(account),
            "device": None if device is None else self.device(account, device),
            "ip": None if ip is None else truncate_ip(ip),
            "target_account": None if target_account is None else self.account(target_account),
            "target_device": (
                None
                if target_device is None
                else self.device(target_account or account, target_device)
            ),
            "detail": None if detail is None else scrub_detail(detail),
        }
        return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"

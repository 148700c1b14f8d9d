"""Device keys remembered between requests, for sends, fetches and acks.

These are the requests whose storage call can re-check their device
cheaply: in the same statement or transaction as the work itself, the
storage checks that the device is still active and still has the key the
signature was verified with (``store_messages(..., sender_key=...)``,
``fetch_messages`` and ``ack_messages`` with ``device_key=...``). So such a
request may verify its signature against a key remembered from an earlier
request instead of reading the device from the database first:

- a revocation or account deletion committed on any replica refuses the
  device's next such request at the storage, with the reason the full
  checks would have given, and the entry is forgotten;
- any other refusal of a request verified this way (bad input, replay,
  rate limit) first reads the device, so a revoked device hears
  ``revoked``, in the contract's order, not the later refusal;
- a signature that does not verify against the remembered key falls back to
  the database, which answers with the current key.

Only active devices are remembered, at most ``capacity`` of them (the
oldest entry goes first). ``capacity`` 0 turns it off.
"""

from __future__ import annotations

import attrs


@attrs.define
class CachedDevice:
    device_key: bytes
    #: When this replica last recorded the device as seen (``touch_device``).
    last_seen_at: float | None


@attrs.define
class DeviceKeyCache:
    """Active devices' keys by ``(account, device)``; bounded, oldest out first."""

    capacity: int
    _entries: dict[tuple[str, int], CachedDevice] = attrs.field(factory=dict, init=False)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, account: str, device: int) -> CachedDevice | None:
        return self._entries.get((account, device))

    def put(self, account: str, device: int, device_key: bytes, last_seen_at: float | None) -> None:
        if self.capacity <= 0:
            return
        key = (account, device)
        if key not in self._entries and len(self._entries) >= self.capacity:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = CachedDevice(device_key, last_seen_at)

    def seen(self, account: str, device: int, now: float) -> None:
        """The device was recorded as seen at ``now``."""
        entry = self._entries.get((account, device))
        if entry is not None:
            entry.last_seen_at = now

    def forget(self, account: str, device: int) -> None:
        self._entries.pop((account, device), None)

    def forget_account(self, account: str) -> None:
        for key in [key for key in self._entries if key[0] == account]:
            del self._entries[key]

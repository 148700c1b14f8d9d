"""Device keys remembered between requests, for the send path.

A send is the one request whose write can re-check its device cheaply: the
storage checks, in the same transaction as the copies it queues, that the
sending device is still active and still has the key the signature was
verified with (``Storage.store_messages(..., sender_key=...)``). So a send
may verify its signature against a key remembered from an earlier request
instead of reading the device from the database first:

- a revocation or account deletion committed on any replica refuses the
  next send at the store, with the reason the full checks would have given,
  and the entry is forgotten;
- any other refusal of a send verified this way (bad input, replay, rate
  limit) first reads the device, so a revoked device hears ``revoked``, in
  the contract's order, not the later refusal;
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
    hits: int = attrs.field(default=0, init=False)
    misses: int = attrs.field(default=0, init=False)

    def get(self, account: str, device: int) -> CachedDevice | None:
        entry = self._entries.get((account, device))
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

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

    def statistics(self) -> dict[str, int]:
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses}

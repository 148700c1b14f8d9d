"""The storage contract: one async interface for the whole relay.

Every backend (embedded SQLite, PostgreSQL) implements :class:`Storage`, and
the contract test suite (``tests/storage/contract.py``) runs unchanged
against each. Backends keep every multi-row change in one transaction, so a
call either happens completely or not at all, and a call that returns has
been durably committed.

Identifiers: ``account`` is the lowercase hyphenated UUID string, ``device``
a positive int. Times are wall-clock Unix seconds (float), passed in by the
caller (``now``), so backends never read the clock themselves.

Failures: domain failures raise :mod:`pqmsg.errors` classes named in each
method's docstring; a backend that cannot reach its database raises
:class:`pqmsg.errors.StorageUnavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import attrs

from pqmsg.errors import AuthError, device_reject

PrekeyKind = Literal["ec", "pq"]
PushProvider = Literal["fcm", "apns"]


@attrs.frozen
class DeviceAuth:
    """What request authentication needs to know about a device."""

    device_key: bytes
    revoked: bool
    last_seen_at: float | None


def device_refusal(found: DeviceAuth | None, device_key: bytes) -> AuthError | None:
    """What §3's checks 3-5 say now of a signature that verified with ``device_key``.

    ``found`` is the device as stored now; None when the device may still
    sign with that key.
    """
    if found is None:
        return device_reject("unknown_device")
    if found.revoked:
        return device_reject("revoked")
    if found.device_key != device_key:
        return device_reject("signature")
    return None


@attrs.frozen
class DeviceInfo:
    device: int
    name: str | None
    created_at: float
    last_seen_at: float | None


@attrs.frozen
class NewDevice:
    """A device key with its certificate, as registration and linking store it."""

    device_key: bytes
    certificate: bytes
    name: str | None


@attrs.frozen
class SignedKey:
    """A signed prekey: X25519 (``spk``) or ML-KEM (``pqspk``)."""

    key_id: int
    public_key: bytes
    signature: bytes


@attrs.frozen
class OneTimeKey:
    """A one-time prekey; ``signature`` is None for X25519 ones."""

    key_id: int
    public_key: bytes
    signature: bytes | None = None


@attrs.frozen
class KeyUpload:
    """An already-verified ``PUT /v1/keys`` body."""

    signed_prekey: SignedKey | None = None
    pq_last_resort: SignedKey | None = None
    one_time_prekeys: tuple[OneTimeKey, ...] = ()
    pq_one_time_prekeys: tuple[OneTimeKey, ...] = ()


@attrs.frozen
class KeyCounts:
    one_time_prekeys: int
    pq_one_time_prekeys: int


@attrs.frozen
class KeyStatus:
    counts: KeyCounts
    signed_prekey_created_at: float | None
    has_pq_last_resort: bool


@attrs.frozen
class DeviceBundle:
    device: int
    signed_prekey: SignedKey | None
    one_time_prekey: OneTimeKey | None
    pq_prekey: OneTimeKey | None
    pq_last_resort: bool


@attrs.frozen
class Bundle:
    identity_key: bytes
    devices: tuple[DeviceBundle, ...]


@attrs.frozen
class OutgoingCopy:
    """One recipient device's copy of a send."""

    device: int
    ciphertext: bytes
    pq_epoch: int | None = None


@attrs.frozen
class StoreResult:
    stored: int
    # True when ``(sender account, id)`` was seen within the idempotency
    # window: nothing was stored this time.
    duplicate: bool
    # How many (sender device, recipient device) pairs saw their PQ ratchet
    # epoch grow with this send.
    ratchet_advances: int
    # The recipient devices that got a copy (for wake-ups).
    devices: tuple[int, ...]


@attrs.frozen
class Sender:
    account: str
    device: int


@attrs.frozen
class QueuedMessage:
    id: str  # server-assigned per copy; what the recipient acks
    sender: Sender
    ciphertext: bytes
    pq_epoch: int | None
    server_ts: float


@attrs.frozen
class PushTarget:
    provider: PushProvider
    token: str


@attrs.frozen
class ProvisioningGrant:
    """A still-valid provisioning token, looked up before linking."""

    account: str
    identity_key: bytes
    expires_at: float


class Storage(Protocol):
    """The relay's persistent state. See the module docstring for the rules."""

    # -- accounts and devices -------------------------------------------------

    async def create_account(
        self, account: str, identity_key: bytes, device: NewDevice, *, now: float
    ) -> None:
        """Create ``account`` with device 1."""

    async def delete_account(self, account: str) -> tuple[int, ...]:
        """Delete the account and everything it owns; returns its device ids.

        Its devices become unknown (``get_device_auth`` returns None).
        """

    async def get_identity_key(self, account: str) -> bytes | None:
        """The account's identity key, or None if there is no such account."""

    async def get_device_auth(self, account: str, device: int) -> DeviceAuth | None:
        """The device's key and revocation state, or None if unknown."""

    async def touch_device(self, account: str, device: int, *, now: float) -> None:
        """Record that the device was seen (``last_seen_at``); a revoked device is left as it is."""

    async def list_devices(self, account: str) -> tuple[DeviceInfo, ...]:
        """Active (not revoked) devices, by device id."""

    async def active_device_ids(self, account: str) -> tuple[int, ...]:
        """Ids of the active devices (empty for an unknown account)."""

    async def revoke_device(self, account: str, device: int, *, now: float) -> bool:
        """Revoke a device: delete its keys, queue, push token and tokens.

        Returns False if the device was unknown or already revoked. Device ids
        are never reused.
        """

    async def create_provisioning_token(
        self, account: str, token_hash: bytes, *, expires_at: float
    ) -> None:
        """Store a single-use provisioning token (by its SHA-256)."""

    async def get_provisioning_grant(
        self, token_hash: bytes, *, now: float
    ) -> ProvisioningGrant | None:
        """The unexpired, unused token's account, or None."""

    async def link_device(self, token_hash: bytes, device: NewDevice, *, now: float) -> int:
        """Consume the token and create the next device; returns its id.

        Raises :class:`pqmsg.errors.Forbidden` (reason ``provisioning_token``)
        when the token is unknown, used or expired at ``now``; then nothing
        is stored. Consuming is atomic: of two concurrent links with one
        token, exactly one succeeds.
        """

    # -- keys -----------------------------------------------------------------

    async def put_keys(
        self, account: str, device: int, upload: KeyUpload, *, max_per_kind: int, now: float
    ) -> KeyCounts:
        """Store verified keys; signed ones replace, one-time ones append.

        Raises :class:`pqmsg.errors.Conflict` with reason ``duplicate_prekey``
        when a one-time key id is already stored (or repeated in the upload),
        and reason ``prekey_limit`` when a pool would exceed ``max_per_kind``;
        then nothing is stored.
        """

    async def key_status(self, account: str, device: int) -> KeyStatus:
        """Remaining one-time keys and the signed prekey's age."""

    async def take_bundle(self, account: str, device: int | None) -> Bundle | None:
        """Hand out a bundle for one device, or every active device (None).

        Each one-time key (EC and PQ) is removed as it is handed out, at most
        once even under concurrent calls. With the PQ pool empty the
        last-resort key is served with ``pq_last_resort=True``. Returns None
        when the account or the device is unknown or revoked.
        """

    async def count_stale_signed_prekeys(self, *, older_than: float) -> int:
        """Active devices whose signed prekey was stored before ``older_than``."""

    # -- messages -------------------------------------------------------------

    async def store_messages(
        self,
        sender: Sender,
        message_id: str,
        recipient: str,
        copies: Sequence[OutgoingCopy],
        *,
        now: float,
        idempotency_window_s: float,
        sender_key: bytes | None = None,
    ) -> StoreResult:
        """Queue one copy per recipient device, durably, all or nothing.

        With ``sender_key``, first (in the same transaction) raises
        :class:`pqmsg.errors.AuthError` as request authentication would:
        ``unknown_device`` unless the sending device exists, ``revoked`` if
        it was revoked, ``signature`` if its key is not ``sender_key``; then
        nothing is stored. A retry of ``(sender.account, message_id)`` within the window returns
        the first result with ``duplicate=True`` and stores nothing. Raises
        :class:`pqmsg.errors.DeviceMismatch` unless the copies address exactly
        the recipient's active devices (checked in the same transaction), and
        :class:`pqmsg.errors.NotFound` for an unknown recipient.
        """

    async def fetch_messages(
        self, account: str, device: int, *, limit: int, device_key: bytes | None = None
    ) -> tuple[tuple[QueuedMessage, ...], bool]:
        """The oldest unacknowledged messages in store order, and whether more wait.

        With ``device_key``, first refuses as ``store_messages`` refuses a
        sender: :class:`pqmsg.errors.AuthError` unless the device is active
        with that key, checked with the read.
        """

    async def ack_messages(
        self, account: str, device: int, ids: Sequence[str], *, device_key: bytes | None = None
    ) -> int:
        """Remove those messages from the device's queue; unknown ids are ignored.

        ``device_key`` as for :meth:`fetch_messages`; a refusal removes nothing.
        """

    async def purge_idempotency(self, *, older_than: float) -> int:
        """Forget send ids recorded before ``older_than``; returns how many."""

    # -- push -----------------------------------------------------------------

    async def set_push_target(self, account: str, device: int, target: PushTarget) -> None: ...

    async def delete_push_target(self, account: str, device: int) -> bool: ...

    async def get_push_target(self, account: str, device: int) -> PushTarget | None: ...

    async def drop_push_token(self, target: PushTarget) -> int:
        """Remove a token the provider reported dead, wherever it is stored."""

    # -- lifecycle ------------------------------------------------------------

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the database answers."""


@attrs.frozen
class PoolStatistics:
    """Connections of a backend: ``in_use`` serve a call now, ``idle`` wait."""

    idle: int
    in_use: int
    max_size: int
    waiting: int  # calls waiting for a connection


class Backend(Storage, Protocol):
    """A storage backend as the storage service owns it."""

    name: str

    def pool_statistics(self) -> PoolStatistics: ...

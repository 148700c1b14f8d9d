"""Configuration: one frozen :class:`Settings` with nested frozen sections.

Every setting has a ``PQMSG_*`` environment variable. Only the entry point
reads ``os.environ`` (``Settings.from_env(os.environ)``); tests build
``Settings(...)`` directly. Units are part of the field names.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

FsyncPolicy = Literal["always", "interval", "never"]
FailurePolicy = Literal["open", "closed"]

DEFAULT_BIND = "127.0.0.1:8080"
DEFAULT_DATA_DIR = Path("pqmsg-data")


class SettingsError(ValueError):
    """A setting has a value the server cannot run with."""


@attrs.frozen
class HttpSettings:
    binds: tuple[str, ...] = (DEFAULT_BIND,)
    certfile: Path | None = None
    keyfile: Path | None = None
    max_in_flight: int = 256
    max_long_polls: int = 20_000
    grace_period_s: float = 10.0
    keep_alive_s: float = 75.0
    max_body_bytes: int = 2 * 1024 * 1024
    workers: int = 1


@attrs.frozen
class StorageSettings:
    # None selects the embedded SQLite database under ``data_dir``.
    database_url: str | None = None
    pool_min_size: int = 2
    pool_max_size: int = 10
    query_timeout_s: float = 5.0
    cleanup_interval_s: float = 60.0


#: The replay window's margin over twice the skew window (see AuthSettings).
REPLAY_MARGIN_S = 60


@attrs.frozen
class AuthSettings:
    """Request authentication windows.

    A timestamp is accepted for ``2 * skew_window_s`` of server time, so a
    nonce must be remembered at least that long; PROTOCOL.md asks for
    strictly longer. Its stated default (600 s against a 300 s skew) is not
    strictly longer, so the default here is ``2 * skew + 60`` = 660 s, and a
    configured skew without a configured replay window moves it along.
    """

    skew_window_s: int = 300
    replay_window_s: int = 2 * 300 + REPLAY_MARGIN_S
    provisioning_token_ttl_s: int = 600
    last_seen_resolution_s: int = 60
    #: Active devices whose keys a replica remembers for sends (0: none).
    device_key_cache: int = 10_000
    #: Signature-check helper processes per worker (None: auto, one on
    #: PostgreSQL when a CPU is spare; 0: checks on the event loop). See
    #: pqmsg.nurseries.verifier.
    verify_processes: int | None = None


@attrs.frozen
class RateLimit:
    """A token bucket: ``burst`` requests at once, refilled at ``per_s``."""

    per_s: float
    burst: int


@attrs.frozen
class LimitSettings:
    redis_url: str | None = None
    key_prefix: str = "pqmsg:"
    registration: RateLimit = RateLimit(per_s=0.2, burst=10)
    provisioning: RateLimit = RateLimit(per_s=0.1, burst=5)
    bundle: RateLimit = RateLimit(per_s=2.0, burst=30)
    send: RateLimit = RateLimit(per_s=50.0, burst=200)
    # What a limiter does when Redis cannot be reached. The replay cache
    # always fails closed; see pqmsg.nurseries.replay.
    registration_on_failure: FailurePolicy = "closed"
    provisioning_on_failure: FailurePolicy = "closed"
    bundle_on_failure: FailurePolicy = "open"
    send_on_failure: FailurePolicy = "open"
    redis_timeout_s: float = 0.5


@attrs.frozen
class KeySettings:
    max_per_upload: int = 100
    max_stored_per_kind: int = 1000
    low_water_mark: int = 20
    signed_prekey_max_age_s: int = 7 * 24 * 3600
    stale_scan_interval_s: float = 60.0


@attrs.frozen
class MessageSettings:
    max_ciphertext_bytes: int = 256 * 1024
    max_fetch: int = 500
    max_wait_s: int = 30
    idempotency_window_s: int = 24 * 3600


@attrs.frozen
class StreamSettings:
    """WebSocket delivery (``GET /v1/stream``); see :mod:`pqmsg.routes.stream`.

    A stream holds at most ``max_unacked`` messages (and about
    ``max_unacked_bytes`` of ciphertext) delivered but not yet acknowledged;
    past that it waits for acks. A client that keeps messages waiting that
    way for ``ack_timeout_s``, or whose frame the server cannot write within
    ``send_timeout_s``, is disconnected (slow consumer), and so is a client
    that sends nothing (not even a pong) for ``idle_timeout_s``.
    """

    max_streams: int = 20_000
    ping_interval_s: float = 25.0
    idle_timeout_s: float = 60.0
    send_timeout_s: float = 10.0
    ack_timeout_s: float = 60.0
    max_unacked: int = 100
    max_unacked_bytes: int = 1024 * 1024


@attrs.frozen
class BreakerSettings:
    window_s: float = 30.0
    min_requests: int = 5
    failure_ratio: float = 0.5
    cool_down_s: float = 30.0
    half_open_probes: int = 1


@attrs.frozen
class PushSettings:
    fcm_endpoint: str = "https://fcm.googleapis.com"
    fcm_token_url: str = "https://oauth2.googleapis.com/token"
    fcm_credentials: Path | None = None
    apns_endpoint: str = "https://api.push.apple.com"
    apns_key_file: Path | None = None
    apns_key_id: str | None = None
    apns_team_id: str | None = None
    apns_topic: str | None = None
    request_timeout_s: float = 10.0
    queue_size: int = 10_000
    coalesce_s: float = 30.0
    breaker: BreakerSettings = BreakerSettings()


@attrs.frozen
class AuditSettings:
    # HMAC key for pseudonyms; None derives a per-process random key (the
    # pseudonyms are then only stable for one process lifetime).
    key: bytes | None = attrs.field(default=None, repr=False)
    fsync: FsyncPolicy = "interval"
    fsync_interval_s: float = 1.0
    max_segment_bytes: int = 64 * 1024 * 1024
    queue_size: int = 10_000
    enqueue_timeout_s: float = 0.25


@attrs.frozen
class Settings:
    data_dir: Path = DEFAULT_DATA_DIR
    log_level: str = "INFO"
    http: HttpSettings = HttpSettings()
    storage: StorageSettings = StorageSettings()
    auth: AuthSettings = AuthSettings()
    limits: LimitSettings = LimitSettings()
    keys: KeySettings = KeySettings()
    messages: MessageSettings = MessageSettings()
    stream: StreamSettings = StreamSettings()
    push: PushSettings = PushSettings()
    audit: AuditSettings = AuditSettings()

    def validate(self) -> Settings:
        """Check what single fields cannot: raise SettingsError, else return self.

        Called once the whole configuration is assembled (by the entry point
        and by :func:`pqmsg.server.serve`), so it can be built field by field.
        """
        if self.auth.replay_window_s <= 2 * self.auth.skew_window_s:
            raise SettingsError(
                "PQMSG_REPLAY_WINDOW_S must be longer than twice PQMSG_AUTH_SKEW_S "
                f"({self.auth.replay_window_s} <= 2 * {self.auth.skew_window_s})"
            )
        if self.http.max_in_flight < 1:
            raise SettingsError("PQMSG_MAX_IN_FLIGHT must be at least 1")
        if self.stream.idle_timeout_s <= self.stream.ping_interval_s:
            raise SettingsError(
                "PQMSG_STREAM_IDLE_TIMEOUT_S must be longer than PQMSG_STREAM_PING_INTERVAL_S"
            )
        if (self.http.certfile is None) != (self.http.keyfile is None):
            raise SettingsError("--certfile and --keyfile go together")
        return self

    @property
    def sqlite_path(self) -> Path:
        """Where the embedded database lives (``sqlite:///path`` or the data dir)."""
        url = self.storage.database_url
        if url and url.startswith("sqlite:///"):
            return Path(url.removeprefix("sqlite:///"))
        return self.data_dir / "pqmsg.sqlite3"

    @property
    def uses_postgres(self) -> bool:
        url = self.storage.database_url or ""
        return url.startswith(("postgresql://", "postgres://"))

    @property
    def audit_dir(self) -> Path:
        return self.data_dir / "audit"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from ``PQMSG_*`` variables (see :data:`ENVIRONMENT`)."""
        settings: Settings = cls()
        for name, (path, parse, _help) in ENVIRONMENT.items():
            raw = environ.get(name)
            if raw is None or raw == "":
                continue
            try:
                value = parse(raw)
            except (ValueError, binascii.Error) as exc:
                raise SettingsError(f"{name}: {exc}") from exc
            settings = _replace(settings, path, value)
        if environ.get("PQMSG_AUTH_SKEW_S") and not environ.get("PQMSG_REPLAY_WINDOW_S"):
            skew = settings.auth.skew_window_s
            settings = _replace(settings, "auth.replay_window_s", 2 * skew + REPLAY_MARGIN_S)
        return settings

    def replace(self, path: str, value: Any) -> Settings:
        """A copy with the dotted ``path`` (``"http.binds"``) set to ``value``."""
        replaced: Settings = _replace(self, path, value)
        return replaced


def _replace(obj: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    if not rest:
        return attrs.evolve(obj, **{head: value})
    return attrs.evolve(obj, **{head: _replace(getattr(obj, head), rest, value)})


def _binds(raw: str) -> tuple[str, ...]:
    binds = tuple(part.strip() for part in raw.split(",") if part.strip())
    for bind in binds:
        host, sep, port = bind.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"bind must be HOST:PORT, got {bind!r}")
    return binds


def _rate(raw: str) -> RateLimit:
    """``"PER_S/BURST"``, e.g. ``"0.2/10"``."""
    per_s, sep, burst = raw.partition("/")
    if not sep:
        raise ValueError(f"rate limit must be PER_S/BURST, got {raw!r}")
    limit = RateLimit(per_s=float(per_s), burst=int(burst))
    if limit.per_s <= 0 or limit.burst < 1:
        raise ValueError(f"rate limit must be positive, got {raw!r}")
    return limit


def _policy(raw: str) -> FailurePolicy:
    if raw not in ("open", "closed"):
        raise ValueError(f"failure policy must be 'open' or 'closed', got {raw!r}")
    return raw  # type: ignore[return-value]


def _fsync(raw: str) -> FsyncPolicy:
    if raw not in ("always", "interval", "never"):
        raise ValueError(f"fsync policy must be always, interval or never, got {raw!r}")
    return raw  # type: ignore[return-value]


def _audit_key(raw: str) -> bytes:
    """The key as hex or unpadded base64url; at least 16 bytes."""
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    if len(key) < 16:
        raise ValueError("the audit key must be at least 16 bytes")
    return key


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(f"must be a positive integer, got {raw!r}")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"must be 0 or more, got {raw!r}")
    return value


def _auto_or_count(raw: str) -> int | None:
    if raw.strip().lower() == "auto":
        return None
    value = int(raw)
    if not 0 <= value <= 64:
        raise ValueError(f"must be auto or 0 to 64, got {raw!r}")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError(f"must be positive, got {raw!r}")
    return value


def _optional_str(raw: str) -> str:
    return raw


_Parse = Callable[[str], Any]

#: Environment variable -> (settings path, parser, help text).
ENVIRONMENT: dict[str, tuple[str, _Parse, str]] = {
    "PQMSG_DATA_DIR": ("data_dir", Path, "directory of the embedded database and audit log"),
    "PQMSG_LOG_LEVEL": ("log_level", str.upper, "DEBUG, INFO, WARNING or ERROR"),
    "PQMSG_BIND": ("http.binds", _binds, "comma-separated HOST:PORT list"),
    "PQMSG_CERTFILE": ("http.certfile", Path, "TLS certificate chain (PEM); enables TLS"),
    "PQMSG_KEYFILE": ("http.keyfile", Path, "TLS private key (PEM)"),
    "PQMSG_MAX_IN_FLIGHT": ("http.max_in_flight", _positive_int, "requests served at once before 503"),
    "PQMSG_MAX_LONG_POLLS": ("http.max_long_polls", _positive_int, "parked long polls at once"),
    "PQMSG_GRACE_PERIOD_S": ("http.grace_period_s", _positive_float, "shutdown drain deadline"),
    "PQMSG_KEEP_ALIVE_S": ("http.keep_alive_s", _positive_float, "idle connection timeout"),
    "PQMSG_WORKERS": ("http.workers", _positive_int, "worker processes (pqmsg serve --workers)"),
    "PQMSG_DATABASE_URL": ("storage.database_url", _optional_str, "sqlite:///PATH or postgresql://..."),
    "PQMSG_DB_POOL_MIN": ("storage.pool_min_size", _positive_int, "PostgreSQL pool minimum"),
    "PQMSG_DB_POOL_MAX": ("storage.pool_max_size", _positive_int, "PostgreSQL pool maximum"),
    "PQMSG_DB_TIMEOUT_S": ("storage.query_timeout_s", _positive_float, "deadline of one storage call"),
    "PQMSG_AUTH_SKEW_S": ("auth.skew_window_s", _positive_int, "accepted clock skew of signed requests"),
    "PQMSG_REPLAY_WINDOW_S": ("auth.replay_window_s", _positive_int, "how long a nonce is remembered"),
    "PQMSG_DEVICE_KEY_CACHE": (
        "auth.device_key_cache", _non_negative_int, "device keys remembered for sends (0: off)"
    ),
    "PQMSG_VERIFY_PROCESSES": (
        "auth.verify_processes", _auto_or_count, "signature-check helper processes per worker (auto, 0: none)"
    ),
    "PQMSG_REDIS_URL": ("limits.redis_url", _optional_str, "redis://... for shared limits and nonces"),
    "PQMSG_REDIS_PREFIX": ("limits.key_prefix", str, "prefix of every Redis key"),
    "PQMSG_RATE_REGISTRATION": ("limits.registration", _rate, "per client IP, PER_S/BURST"),
    "PQMSG_RATE_PROVISIONING": (
        "limits.provisioning", _rate, "tokens per account, links per client IP, PER_S/BURST"
    ),
    "PQMSG_RATE_BUNDLE": ("limits.bundle", _rate, "per requesting device and target, PER_S/BURST"),
    "PQMSG_RATE_SEND": ("limits.send", _rate, "per sender device, PER_S/BURST"),
    "PQMSG_RATE_REGISTRATION_ON_FAILURE": ("limits.registration_on_failure", _policy, "open or closed"),
    "PQMSG_RATE_PROVISIONING_ON_FAILURE": ("limits.provisioning_on_failure", _policy, "open or closed"),
    "PQMSG_RATE_BUNDLE_ON_FAILURE": ("limits.bundle_on_failure", _policy, "open or closed"),
    "PQMSG_RATE_SEND_ON_FAILURE": ("limits.send_on_failure", _policy, "open or closed"),
    "PQMSG_SIGNED_PREKEY_MAX_AGE_S": ("keys.signed_prekey_max_age_s", _positive_int, "rotation limit"),
    "PQMSG_PREKEY_LOW_WATER": ("keys.low_water_mark", _positive_int, "replenish below this count"),
    "PQMSG_STREAM_MAX": ("stream.max_streams", _positive_int, "open WebSocket streams at once"),
    "PQMSG_STREAM_PING_INTERVAL_S": (
        "stream.ping_interval_s",
        _positive_float,
        "the server sends a ping frame this often",
    ),
    "PQMSG_STREAM_IDLE_TIMEOUT_S": (
        "stream.idle_timeout_s",
        _positive_float,
        "a stream whose client sent nothing for this long is closed",
    ),
    "PQMSG_STREAM_SEND_TIMEOUT_S": (
        "stream.send_timeout_s",
        _positive_float,
        "a frame not written within this closes the stream (slow consumer)",
    ),
    "PQMSG_STREAM_ACK_TIMEOUT_S": (
        "stream.ack_timeout_s",
        _positive_float,
        "a full unacked window with messages waiting this long closes the stream",
    ),
    "PQMSG_STREAM_MAX_UNACKED": (
        "stream.max_unacked",
        _positive_int,
        "messages delivered on a stream and not yet acknowledged",
    ),
    "PQMSG_STREAM_MAX_UNACKED_BYTES": (
        "stream.max_unacked_bytes",
        _positive_int,
        "ciphertext bytes delivered on a stream and not yet acknowledged",
    ),
    "PQMSG_FCM_ENDPOINT": ("push.fcm_endpoint", str, "FCM HTTP v1 base URL"),
    "PQMSG_FCM_TOKEN_URL": ("push.fcm_token_url", str, "OAuth2 token endpoint"),
    "PQMSG_FCM_CREDENTIALS": ("push.fcm_credentials", Path, "service-account JSON file; enables FCM"),
    "PQMSG_APNS_ENDPOINT": ("push.apns_endpoint", str, "APNs base URL"),
    "PQMSG_APNS_KEY_FILE": ("push.apns_key_file", Path, ".p8 signing key; enables APNs"),
    "PQMSG_APNS_KEY_ID": ("push.apns_key_id", str, "APNs key id"),
    "PQMSG_APNS_TEAM_ID": ("push.apns_team_id", str, "Apple team id"),
    "PQMSG_APNS_TOPIC": ("push.apns_topic", str, "apns-topic (the app's bundle id)"),
    "PQMSG_PUSH_COALESCE_S": ("push.coalesce_s", _positive_float, "at most one wake-up per device per interval"),
    "PQMSG_PUSH_QUEUE_SIZE": ("push.queue_size", _positive_int, "bounded wake-up queue"),
    "PQMSG_PUSH_BREAKER_WINDOW_S": ("push.breaker.window_s", _positive_float, "failure-rate window"),
    "PQMSG_PUSH_BREAKER_FAILURE_RATIO": ("push.breaker.failure_ratio", _positive_float, "opens above this share"),
    "PQMSG_PUSH_BREAKER_MIN_REQUESTS": ("push.breaker.min_requests", _positive_int, "requests before it may open"),
    "PQMSG_PUSH_BREAKER_COOL_DOWN_S": ("push.breaker.cool_down_s", _positive_float, "open before half-open"),
    "PQMSG_AUDIT_KEY": ("audit.key", _audit_key, "HMAC key of audit pseudonyms (hex or base64url)"),
    "PQMSG_AUDIT_FSYNC": ("audit.fsync", _fsync, "always, interval or never"),
    "PQMSG_AUDIT_FSYNC_INTERVAL_S": ("audit.fsync_interval_s", _positive_float, "fsync period (interval policy)"),
    "PQMSG_AUDIT_ENQUEUE_TIMEOUT_S": (
        "audit.enqueue_timeout_s", _positive_float, "how long a request waits on a full audit queue"
    ),
    "PQMSG_AUDIT_SEGMENT_BYTES": ("audit.max_segment_bytes", _positive_int, "rotate segments at this size"),
    "PQMSG_AUDIT_QUEUE_SIZE": ("audit.queue_size", _positive_int, "bounded audit queue"),
}

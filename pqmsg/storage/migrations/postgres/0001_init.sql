-- The relay's schema on PostgreSQL. Times are Unix seconds (double
-- precision, as the storage API passes them); keys and ciphertexts are
-- opaque bytea. Every per-device table cascades from devices, so deleting
-- an account removes everything it owns in one statement.

CREATE TABLE accounts (
    account      uuid PRIMARY KEY,
    identity_key bytea NOT NULL,
    -- The id the next linked device gets; device ids are never reused.
    next_device  integer NOT NULL DEFAULT 2,
    created_at   double precision NOT NULL
);

CREATE TABLE devices (
    account      uuid NOT NULL REFERENCES accounts ON DELETE CASCADE,
    device       integer NOT NULL CHECK (device > 0),
    device_key   bytea NOT NULL,
    certificate  bytea NOT NULL,
    name         text,
    created_at   double precision NOT NULL,
    last_seen_at double precision,
    revoked_at   double precision,
    PRIMARY KEY (account, device)
);

CREATE TABLE provisioning_tokens (
    token_hash bytea PRIMARY KEY,
    account    uuid NOT NULL REFERENCES accounts ON DELETE CASCADE,
    expires_at double precision NOT NULL,
    used       boolean NOT NULL DEFAULT false
);
CREATE INDEX provisioning_tokens_account ON provisioning_tokens (account);

-- The signed X25519 prekey (kind 'spk') and the ML-KEM last-resort key
-- (kind 'pqlr') of a device: one of each, replaced on upload.
CREATE TABLE signed_prekeys (
    account    uuid NOT NULL,
    device     integer NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('spk', 'pqlr')),
    key_id     bigint NOT NULL,
    public_key bytea NOT NULL,
    signature  bytea NOT NULL,
    created_at double precision NOT NULL,
    PRIMARY KEY (account, device, kind),
    FOREIGN KEY (account, device) REFERENCES devices ON DELETE CASCADE
);
CREATE INDEX signed_prekeys_age ON signed_prekeys (kind, created_at);

-- One-time prekeys, handed out at most once: X25519 ('ec', no signature)
-- and ML-KEM ('pq', signed). seq keeps upload order for hand-out.
CREATE TABLE one_time_prekeys (
    account    uuid NOT NULL,
    device     integer NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('ec', 'pq')),
    key_id     bigint NOT NULL,
    seq        bigserial NOT NULL,
    public_key bytea NOT NULL,
    signature  bytea,
    PRIMARY KEY (account, device, kind, key_id),
    FOREIGN KEY (account, device) REFERENCES devices ON DELETE CASCADE
);
CREATE INDEX one_time_prekeys_order ON one_time_prekeys (account, device, kind, seq);

CREATE TABLE push_targets (
    account  uuid NOT NULL,
    device   integer NOT NULL,
    provider text NOT NULL CHECK (provider IN ('fcm', 'apns')),
    token    text NOT NULL,
    PRIMARY KEY (account, device),
    FOREIGN KEY (account, device) REFERENCES devices ON DELETE CASCADE
);
CREATE INDEX push_targets_token ON push_targets (provider, token);

-- Queued copies. seq is the store order; (recipient, seq) serves fetches
-- and id serves acks, so both cost the same with a thousand or a million
-- queued rows.
CREATE TABLE messages (
    id                uuid PRIMARY KEY,
    seq               bigserial NOT NULL,
    recipient_account uuid NOT NULL,
    recipient_device  integer NOT NULL,
    sender_account    uuid NOT NULL,
    sender_device     integer NOT NULL,
    ciphertext        bytea NOT NULL,
    pq_epoch          bigint,
    server_ts         double precision NOT NULL,
    FOREIGN KEY (recipient_account, recipient_device) REFERENCES devices ON DELETE CASCADE
);
CREATE UNIQUE INDEX messages_queue ON messages (recipient_account, recipient_device, seq);

-- Send ids seen within the idempotency window, with the first result.
CREATE TABLE sent_messages (
    sender_account   uuid NOT NULL,
    message_id       text NOT NULL,
    created_at       double precision NOT NULL,
    stored           integer NOT NULL DEFAULT 0,
    ratchet_advances integer NOT NULL DEFAULT 0,
    devices          integer[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (sender_account, message_id)
);
CREATE INDEX sent_messages_created ON sent_messages (created_at);

-- The highest PQ ratchet epoch seen per (sender device, recipient device).
CREATE TABLE pq_epochs (
    recipient_account uuid NOT NULL,
    recipient_device  integer NOT NULL,
    sender_account    uuid NOT NULL,
    sender_device     integer NOT NULL,
    epoch             bigint NOT NULL,
    PRIMARY KEY (recipient_account, recipient_device, sender_account, sender_device),
    FOREIGN KEY (recipient_account, recipient_device) REFERENCES devices ON DELETE CASCADE
);
-- The sender side is cleaned up explicitly (revocation, account deletion).
CREATE INDEX pq_epochs_sender ON pq_epochs (sender_account, sender_device);

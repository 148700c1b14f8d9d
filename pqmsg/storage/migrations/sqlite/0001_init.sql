-- The relay's schema, version 1 (SQLite).
--
-- Times are wall-clock Unix seconds (REAL). Ownership runs through foreign
-- keys with ON DELETE CASCADE, so deleting an account row removes its
-- devices and, through them, their keys, queued messages and push targets.
-- A revoked device keeps its row (revoked_at set) so its id is never reused
-- and its later requests are told "revoked", not "unknown".

CREATE TABLE accounts (
    id           TEXT PRIMARY KEY,          -- lowercase hyphenated UUID
    identity_key BLOB NOT NULL,
    created_at   REAL NOT NULL,
    next_device  INTEGER NOT NULL DEFAULT 2 -- device ids are never reused
);

CREATE TABLE devices (
    account      TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    device       INTEGER NOT NULL,
    device_key   BLOB NOT NULL,
    certificate  BLOB NOT NULL,
    name         TEXT,
    created_at   REAL NOT NULL,
    last_seen_at REAL,
    revoked_at   REAL,
    PRIMARY KEY (account, device)
);

CREATE TABLE provisioning_tokens (
    token_hash BLOB PRIMARY KEY,            -- SHA-256 of the token
    account    TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    expires_at REAL NOT NULL,
    used       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX provisioning_tokens_account ON provisioning_tokens (account);

-- The current signed prekeys: 'spk' (X25519) and 'pqlr' (ML-KEM last resort).
CREATE TABLE signed_prekeys (
    account    TEXT NOT NULL,
    device     INTEGER NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('spk', 'pqlr')),
    key_id     INTEGER NOT NULL,
    public_key BLOB NOT NULL,
    signature  BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (account, device, kind),
    FOREIGN KEY (account, device) REFERENCES devices (account, device) ON DELETE CASCADE
);
CREATE INDEX signed_prekeys_spk_age ON signed_prekeys (created_at) WHERE kind = 'spk';

-- One-time prekeys, handed out oldest first (rowid order) and deleted as
-- they go. Ids are unique per device and kind.
CREATE TABLE one_time_prekeys (
    account    TEXT NOT NULL,
    device     INTEGER NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('ec', 'pq')),
    key_id     INTEGER NOT NULL,
    public_key BLOB NOT NULL,
    signature  BLOB,                        -- NULL for 'ec'
    UNIQUE (account, device, kind, key_id),
    FOREIGN KEY (account, device) REFERENCES devices (account, device) ON DELETE CASCADE
);
-- Every index ends with the rowid, so this one serves "oldest key first".
CREATE INDEX one_time_prekeys_pool ON one_time_prekeys (account, device, kind);

-- The queue. seq gives store order; id is what the recipient acks.
CREATE TABLE messages (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE, -- server-assigned uuid4 per copy
    recipient_account TEXT NOT NULL,
    recipient_device  INTEGER NOT NULL,
    sender_account    TEXT NOT NULL,
    sender_device     INTEGER NOT NULL,
    ciphertext        BLOB NOT NULL,
    pq_epoch          INTEGER,
    server_ts         REAL NOT NULL,
    FOREIGN KEY (recipient_account, recipient_device)
        REFERENCES devices (account, device) ON DELETE CASCADE
);
CREATE INDEX messages_queue ON messages (recipient_account, recipient_device, seq);

-- Send ids seen recently, so a retried send is not stored twice.
CREATE TABLE sends (
    sender_account TEXT NOT NULL,
    id             TEXT NOT NULL,
    created_at     REAL NOT NULL,
    -- The first result, returned again to a retry:
    stored           INTEGER NOT NULL,
    ratchet_advances INTEGER NOT NULL,
    devices          TEXT NOT NULL,         -- recipient device ids, comma-separated
    PRIMARY KEY (sender_account, id)
);
CREATE INDEX sends_created_at ON sends (created_at);

-- The highest PQ ratchet epoch seen per (sender device, recipient device).
CREATE TABLE pq_epochs (
    sender_account    TEXT NOT NULL,
    sender_device     INTEGER NOT NULL,
    recipient_account TEXT NOT NULL,
    recipient_device  INTEGER NOT NULL,
    epoch             INTEGER NOT NULL,
    PRIMARY KEY (sender_account, sender_device, recipient_account, recipient_device)
) WITHOUT ROWID;
CREATE INDEX pq_epochs_recipient ON pq_epochs (recipient_account, recipient_device);

CREATE TABLE push_targets (
    account  TEXT NOT NULL,
    device   INTEGER NOT NULL,
    provider TEXT NOT NULL CHECK (provider IN ('fcm', 'apns')),
    token    TEXT NOT NULL,
    PRIMARY KEY (account, device),
    FOREIGN KEY (account, device) REFERENCES devices (account, device) ON DELETE CASCADE
);
CREATE INDEX push_targets_token ON push_targets (provider, token);

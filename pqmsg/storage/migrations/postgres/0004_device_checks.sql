-- Requests that re-check their device in their own statement.
--
-- A send's, fetch's or ack's signature may have been verified against a key
-- the replica remembered from an earlier request
-- (pqmsg/protocol/keycache.py). device_refusal() says whether the device
-- still signs with that key; the overloads of store_messages() (0002) and
-- store_messages_batch() (0003) below take the key and, before anything
-- else, refuse the send when it does not (the relay's fetch and ack
-- statements call device_refusal() themselves):
--
--   'device_unknown'  no such device (or account) any more;
--   'device_revoked'  the device was revoked;
--   'device_key'      the device's key is not the one given (its row was
--                     replaced, say by a restore or an account created
--                     again under the same id).
--
-- A refusal has written nothing and taken no lock. A NULL key skips the
-- check: the send runs exactly as the function without the key.
--
-- Revocation and deletion commit on any replica; the next send checked
-- here sees them (each statement inside the function takes a fresh
-- snapshot). A revocation that commits while a send is between this check
-- and its commit is ordered after that send, as it would be had the send
-- committed a moment earlier.
--
-- The earlier signatures stay, so replicas still running the previous
-- release keep working during a rolling upgrade.

CREATE FUNCTION device_refusal(p_account uuid, p_device integer, p_key bytea)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN d.device IS NULL THEN 'device_unknown'
        WHEN d.revoked_at IS NOT NULL THEN 'device_revoked'
        WHEN d.device_key <> p_key THEN 'device_key'
    END
    FROM (VALUES (1)) AS one (x)
    LEFT JOIN devices d ON d.account = p_account AND d.device = p_device
$$;

CREATE FUNCTION store_messages(
    p_sender_account uuid,
    p_sender_device  integer,
    p_message_id     text,
    p_recipient      uuid,
    p_now            double precision,
    p_stale_before   double precision,
    p_ids            uuid[],
    p_devices        integer[],
    p_ciphertexts    bytea[],
    p_epochs         bigint[],
    p_sender_key     bytea,
    OUT outcome        text,
    OUT stored_count   integer,
    OUT advances       integer,
    OUT stored_devices integer[],
    OUT missing        integer[],
    OUT extra          integer[]
) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF p_sender_key IS NOT NULL THEN
        outcome := device_refusal(p_sender_account, p_sender_device, p_sender_key);
        IF outcome IS NOT NULL THEN
            RETURN;
        END IF;
    END IF;
    SELECT s.outcome, s.stored_count, s.advances, s.stored_devices, s.missing, s.extra
    INTO outcome, stored_count, advances, stored_devices, missing, extra
    FROM store_messages(p_sender_account, p_sender_device, p_message_id, p_recipient,
                        p_now, p_stale_before, p_ids, p_devices, p_ciphertexts,
                        p_epochs) AS s;
END;
$$;

CREATE FUNCTION store_messages_batch(
    p_sender_accounts uuid[],
    p_sender_devices  integer[],
    p_message_ids     text[],
    p_recipients      uuid[],
    p_nows            double precision[],
    p_stale_befores   double precision[],
    p_bounds          integer[],
    p_ids             uuid[],
    p_devices         integer[],
    p_ciphertexts     bytea[],
    p_epochs          bigint[],
    p_sender_keys     bytea[]
) RETURNS TABLE (
    item           integer,
    outcome        text,
    stored_count   integer,
    advances       integer,
    stored_devices integer[],
    missing        integer[],
    extra          integer[]
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    i  integer;
    lo integer;
    hi integer;
    r  record;
BEGIN
    IF cardinality(p_bounds) <> cardinality(p_message_ids) + 1
       OR cardinality(p_sender_keys) <> cardinality(p_message_ids) THEN
        RAISE EXCEPTION 'store_messages_batch: % bounds and % keys for % sends',
            cardinality(p_bounds), cardinality(p_sender_keys), cardinality(p_message_ids);
    END IF;
    FOR i IN 1 .. cardinality(p_message_ids) LOOP
        lo := p_bounds[i] + 1;
        hi := p_bounds[i + 1];
        SELECT s.* INTO r
        FROM store_messages(p_sender_accounts[i], p_sender_devices[i], p_message_ids[i],
                            p_recipients[i], p_nows[i], p_stale_befores[i],
                            p_ids[lo:hi], p_devices[lo:hi], p_ciphertexts[lo:hi],
                            p_epochs[lo:hi], p_sender_keys[i]) AS s;
        item := i;
        outcome := r.outcome;
        stored_count := r.stored_count;
        advances := r.advances;
        stored_devices := r.stored_devices;
        missing := r.missing;
        extra := r.extra;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- A send in one round trip: store_messages() does what the relay used to
-- do in eight statements between BEGIN and COMMIT. Called as one statement,
-- it runs in that statement's implicit transaction: it commits (durably,
-- synchronous_commit on) when the call returns, or not at all.
--
-- It never raises for a refused send: it answers with an outcome and the
-- details the caller turns into the error, and has written nothing by
-- then (only the account lock is taken), so a refusal burns neither the
-- send id nor ratchet state.
--
-- Outcomes:
--   'stored'          the copies were queued; stored_count, advances and
--                     stored_devices describe them;
--   'duplicate'       (sender, id) was seen within the window: the first
--                     send's result, nothing stored;
--   'no_recipient'    no such recipient account;
--   'device_mismatch' the copies do not address exactly the recipient's
--                     active devices; missing and extra list the
--                     differences, sorted.
--
-- Order: lock the recipient's account row FOR SHARE (membership changes
-- take it FOR UPDATE, also first), so the device set cannot change until
-- commit; read it; look for an earlier send with this id (a retry gets the
-- first result even if the devices changed since); refuse; claim the id;
-- insert the copies, raise the PQ epochs; record the result on the claim.
--
-- Concurrent sends with one id: the claim's unique index makes the later
-- one wait for the earlier one's commit; it then reads the earlier one's
-- recorded result and answers 'duplicate'. The function is VOLATILE, so
-- each statement takes a fresh snapshot and sees what was committed.

CREATE FUNCTION store_messages(
    p_sender_account uuid,
    p_sender_device  integer,
    p_message_id     text,
    p_recipient      uuid,
    p_now            double precision,
    -- now minus the idempotency window: older claims no longer count
    p_stale_before   double precision,
    -- one element per copy, in copy order
    p_ids            uuid[],
    p_devices        integer[],
    p_ciphertexts    bytea[],
    p_epochs         bigint[],
    OUT outcome        text,
    OUT stored_count   integer,
    OUT advances       integer,
    OUT stored_devices integer[],
    OUT missing        integer[],
    OUT extra          integer[]
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    recipient_found boolean;
    active          integer[];
    claimed         boolean;
BEGIN
    -- The recipient's device set, which cannot change until commit.
    PERFORM 1 FROM accounts a WHERE a.account = p_recipient FOR SHARE;
    recipient_found := FOUND;
    active := ARRAY(SELECT d.device FROM devices d
                    WHERE d.account = p_recipient AND d.revoked_at IS NULL);

    -- A retry of a committed send gets the first result whatever changed
    -- since. Read after the lock: a send with this id that committed
    -- before a membership change this send had to wait for is seen here.
    SELECT 'duplicate', s.stored, s.ratchet_advances, s.devices
    INTO outcome, stored_count, advances, stored_devices
    FROM sent_messages s
    WHERE s.sender_account = p_sender_account AND s.message_id = p_message_id
      AND s.created_at >= p_stale_before;
    IF FOUND THEN
        RETURN;
    END IF;

    IF NOT recipient_found THEN
        outcome := 'no_recipient';
        RETURN;
    END IF;
    missing := ARRAY(SELECT a FROM unnest(active) AS a WHERE a <> ALL (p_devices) ORDER BY a);
    extra := ARRAY(SELECT x FROM unnest(p_devices) AS x WHERE x <> ALL (active) ORDER BY x);
    IF cardinality(missing) > 0 OR cardinality(extra) > 0 THEN
        outcome := 'device_mismatch';
        RETURN;
    END IF;

    -- Claim the id. A claim older than the window no longer counts (purge
    -- may lag). A conflict means a concurrent send with this id committed
    -- first: answer with its result. Should that record vanish before it
    -- is read (purged, or its sender deleted), claim again.
    DELETE FROM sent_messages s
    WHERE s.sender_account = p_sender_account AND s.message_id = p_message_id
      AND s.created_at < p_stale_before;
    LOOP
        INSERT INTO sent_messages (sender_account, message_id, created_at)
        VALUES (p_sender_account, p_message_id, p_now)
        ON CONFLICT (sender_account, message_id) DO NOTHING
        RETURNING true INTO claimed;
        EXIT WHEN claimed;
        SELECT 'duplicate', s.stored, s.ratchet_advances, s.devices
        INTO outcome, stored_count, advances, stored_devices
        FROM sent_messages s
        WHERE s.sender_account = p_sender_account AND s.message_id = p_message_id;
        IF FOUND THEN
            RETURN;
        END IF;
    END LOOP;

    INSERT INTO messages (id, recipient_account, recipient_device, sender_account,
                          sender_device, ciphertext, pq_epoch, server_ts)
    SELECT c.id, p_recipient, c.device, p_sender_account, p_sender_device,
           c.ciphertext, c.pq_epoch, p_now
    FROM unnest(p_ids, p_devices, p_ciphertexts, p_epochs) WITH ORDINALITY
         AS c(id, device, ciphertext, pq_epoch, ord)
    ORDER BY c.ord;

    -- Counts the pairs whose stored epoch grew, including pairs seen the
    -- first time.
    WITH incoming AS (
        SELECT e.device, max(e.epoch) AS epoch
        FROM unnest(p_devices, p_epochs) AS e(device, epoch)
        WHERE e.epoch IS NOT NULL
        GROUP BY e.device
    ), raised AS (
        INSERT INTO pq_epochs AS p (recipient_account, recipient_device, sender_account,
                                    sender_device, epoch)
        SELECT p_recipient, i.device, p_sender_account, p_sender_device, i.epoch
        FROM incoming i
        ON CONFLICT (recipient_account, recipient_device, sender_account, sender_device)
        DO UPDATE SET epoch = EXCLUDED.epoch WHERE p.epoch < EXCLUDED.epoch
        RETURNING 1
    )
    SELECT count(*) INTO advances FROM raised;

    outcome := 'stored';
    stored_count := cardinality(p_devices);
    stored_devices := p_devices;
    UPDATE sent_messages s
    SET stored = stored_count, ratchet_advances = advances, devices = stored_devices
    WHERE s.sender_account = p_sender_account AND s.message_id = p_message_id;
END;
$$;

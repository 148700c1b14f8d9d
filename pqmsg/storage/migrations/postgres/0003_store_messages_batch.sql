-- Several sends in one statement: store_messages_batch() runs
-- store_messages() (migration 0002) for each send, in the order given, in
-- the one implicit transaction of the calling statement. The relay uses it
-- to coalesce the sends that arrive together (pqmsg/storage/pgbatch.py):
-- one round trip and one WAL flush for all of them.
--
-- Each send gets the outcome it would get alone, as one row tagged with its
-- position (1-based) in the arrays. A later send in the batch sees what an
-- earlier one wrote (a repeated id answers 'duplicate' with the first
-- result). An error in any send rolls back the whole statement; the caller
-- then runs the sends again one by one.
--
-- Send i's copies are elements p_bounds[i] + 1 .. p_bounds[i + 1] of the
-- copy arrays (p_bounds has one more element than there are sends).
--
-- Locks: every send takes its recipient's account row FOR SHARE and
-- row locks on its claim and its pq_epochs pairs. The caller orders the
-- sends by recipient, then sender, so two batches that touch the same rows
-- take them in the same order; a deadlock that still happens is broken by
-- the server, and the caller retries the sends one by one.

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
    p_epochs          bigint[]
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
    IF cardinality(p_bounds) <> cardinality(p_message_ids) + 1 THEN
        RAISE EXCEPTION 'store_messages_batch: % bounds for % sends',
            cardinality(p_bounds), cardinality(p_message_ids);
    END IF;
    FOR i IN 1 .. cardinality(p_message_ids) LOOP
        lo := p_bounds[i] + 1;
        hi := p_bounds[i + 1];
        SELECT s.* INTO r
        FROM store_messages(p_sender_accounts[i], p_sender_devices[i], p_message_ids[i],
                            p_recipients[i], p_nows[i], p_stale_befores[i],
                            p_ids[lo:hi], p_devices[lo:hi], p_ciphertexts[lo:hi],
                            p_epochs[lo:hi]) AS s;
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

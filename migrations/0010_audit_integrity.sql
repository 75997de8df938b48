-- Audit integrity.
--
-- 1. Which audit key keyed each event's hash (HMAC-SHA-256, event_store::hash); NULL for
--    events recorded unkeyed (before this migration, or in development mode without a key).
ALTER TABLE events ADD COLUMN hash_kid text;

-- 2. Events are append-only: no role may change or remove them through SQL. The owner of the
--    table can still disable these triggers (or drop the table); the keyed chain and the
--    signed checkpoints outside the database (`shop audit verify --checkpoint`) detect that.
CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER events_no_update_or_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();

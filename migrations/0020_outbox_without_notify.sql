-- The outbox no longer wakes its readers with NOTIFY: PostgreSQL serializes the commits of
-- notifying transactions, which capped the write path (issue 17). The relay and the saga's
-- feed poll with an adaptive wait instead (event_store::wake), hinted by appends in their
-- own process.
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION outbox_notify();

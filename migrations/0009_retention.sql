-- Retention (the `retention` role of `shop run`) deletes idempotency keys and inbox rows by
-- age; these indexes let it find the old rows without scanning the tables.
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
CREATE INDEX saga_inbox_received_at ON saga_inbox (received_at);
CREATE INDEX participant_inbox_received_at ON participant_inbox (received_at);

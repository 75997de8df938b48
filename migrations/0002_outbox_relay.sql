-- Outbox relay support.
-- Rows set aside after a permanent broker rejection block later rows of their ordering key
-- to the same destination
-- (per-key order is never broken); the relay finds those keys through this index.
CREATE INDEX outbox_failed_idx ON outbox (destination, ordering_key) WHERE failed_at IS NOT NULL AND published_at IS NULL;
-- The relay reads pending rows in id order.
CREATE INDEX outbox_pending_id_idx ON outbox (id) WHERE published_at IS NULL AND failed_at IS NULL;

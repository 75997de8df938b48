-- Replay discipline: a side-effecting consumer starts from a recorded position, never from
-- the beginning of history. The saga's feed position was created at (0, 0) (migration 0006),
-- so a first deployment of the saga onto a store that already held orders would have started
-- a saga (reserved stock, authorized a payment) for every historical order. A position that
-- never moved is set to the store's head: only orders placed after this point start sagas.
-- A store that was empty keeps (0, 0), which is its head. Events of transactions still open
-- while this runs (writers running during the upgrade) would be behind the new position:
-- upgrade with the command API stopped, as docs/operations.md says.
UPDATE saga_feed_position AS f
SET cursor_tx = h.tx_id, cursor_pos = h.position
FROM (SELECT tx_id, position FROM events ORDER BY tx_id DESC, position DESC LIMIT 1) AS h
WHERE f.id = 1 AND f.cursor_tx = '0'::xid8 AND f.cursor_pos = 0;

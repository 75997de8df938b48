-- The participant commands the saga orchestrator sent and that await a reply, by message id.
-- A reply names the command it answers (its `causation_id` header); one that answers no
-- command sent for that order and step is dead-lettered instead of moving a saga, so nobody
-- who can publish to the replies queue can confirm an order that no participant handled.
-- Rows are pruned with the inbox rows (retention).
CREATE TABLE saga_commands (
    message_id uuid        PRIMARY KEY,
    order_id   uuid        NOT NULL,
    step       text        NOT NULL CHECK (step IN ('inventory', 'payment', 'shipment')),
    sent_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX saga_commands_sent_at ON saga_commands (sent_at);

-- Read side: projection checkpoints and the order summary read model.

-- Where each projection is, per Kafka partition: the next offset to apply. Written in the
-- same transaction as the read-model change it covers, so a crash never double-applies.
CREATE TABLE projection_checkpoints (
    projection  text   NOT NULL,
    topic       text   NOT NULL,
    partition   int    NOT NULL,
    next_offset bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);

-- One row per order. `version` is the last applied stream version: an event at or below it
-- is a redelivery and changes nothing.
CREATE TABLE order_summary (
    order_id            uuid        PRIMARY KEY,
    customer_id         text        NOT NULL,
    status              text        NOT NULL,
    currency            text        NOT NULL,
    total_minor         bigint      NOT NULL,
    items               jsonb       NOT NULL,
    cancellation_reason text,
    version             bigint      NOT NULL,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    -- [{"status": "...", "at": "..."}] in order.
    timeline            jsonb       NOT NULL DEFAULT '[]'::jsonb
);

CREATE INDEX order_summary_customer_idx ON order_summary (customer_id, created_at DESC, order_id);
CREATE INDEX order_summary_status_idx ON order_summary (status, created_at DESC, order_id);

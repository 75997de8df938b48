-- The event store: the source of truth. One row per event, append-only.
--
-- position      global order of insertion (identity). Positions become visible out of order
--               when transactions commit out of order, so readers of the global feed never
--               page by position alone: they page by (tx_id, position) and only read rows
--               whose transaction is older than every transaction still running
--               (tx_id < pg_snapshot_xmin(pg_current_snapshot())). That feed has no gaps.
-- tx_id         the appending transaction (pg_current_xact_id()), see above.
-- stream_version 1, 2, 3... per stream; UNIQUE(stream_id, stream_version) is the optimistic
--               concurrency check: a second writer of the same version gets a unique violation
--               on events_stream_version_key, which the store maps to a typed conflict.
-- prev_hash/hash per-stream SHA-256 chain: hash = sha256(prev_hash || canonical row content),
--               so editing, deleting or reordering a stored event is detected by `shop audit verify`.
CREATE TABLE events (
    position        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx_id           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream_id       uuid        NOT NULL,
    stream_type     text        NOT NULL,
    stream_version  bigint      NOT NULL CHECK (stream_version > 0),
    event_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL CHECK (schema_version > 0),
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    prev_hash       bytea       NOT NULL,
    hash            bytea       NOT NULL,
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version),
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);

-- The gap-free global feed pages on (tx_id, position).
CREATE INDEX events_feed_idx ON events (tx_id, position);

-- Transactional outbox: one row per message to publish, written in the same transaction as
-- the events it announces. The relay publishes rows of one ordering key in id order.
CREATE TABLE outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      uuid        NOT NULL UNIQUE,
    destination     text        NOT NULL CHECK (destination IN ('kafka', 'amqp')),
    -- Kafka topic (without prefix) or AMQP exchange.
    target          text        NOT NULL,
    -- Kafka message key / AMQP routing key.
    routing_key     text        NOT NULL,
    -- Per-key ordering is guaranteed for rows sharing this key (the order id).
    ordering_key    text        NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    payload         bytea       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    failed_at       timestamptz
);

CREATE INDEX outbox_pending_idx ON outbox (ordering_key, id) WHERE published_at IS NULL;
CREATE INDEX outbox_published_idx ON outbox (published_at) WHERE published_at IS NOT NULL;

-- Wake the relay when outbox rows commit. NOTIFY is transactional (delivered at commit) and
-- folded per transaction, so a per-statement trigger costs one notification per append.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END $$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Idempotency keys of commands: the first response is stored in the same transaction as the
-- events, so a retried request (even after a restart) gets exactly that response back.
CREATE TABLE idempotency_keys (
    principal       text        NOT NULL,
    key             text        NOT NULL,
    request_hash    bytea       NOT NULL,
    response_status smallint    NOT NULL,
    response_body   jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal, key)
);

-- One row per stream: its head. Appends update it in the same statement that inserts the
-- events, which serialises writers of one stream (row lock) and gives two more guarantees:
--  * head_hash/version anchor the hash chain, so deleting the newest events is detected too;
--  * last_tx only grows: an append from a transaction older than the stream's last writer is
--    refused as a conflict (and retried by the caller in a new transaction), so a stream's
--    versions are in tx_id order and the (tx_id, position) feed never reorders a stream.
CREATE TABLE streams (
    stream_id   uuid   PRIMARY KEY,
    stream_type text   NOT NULL,
    version     bigint NOT NULL,
    head_hash   bytea  NOT NULL,
    last_tx     xid8   NOT NULL
);

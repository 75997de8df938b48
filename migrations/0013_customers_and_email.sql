-- Customer profiles (owned by the write side): where notifications go. A checkout never
-- carries the email address; the email group looks it up here when it sends.
CREATE TABLE customers (
    customer_id     text        PRIMARY KEY,
    name            text        NOT NULL,
    email           text        NOT NULL,
    default_address jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The email group's inbox (owned by notifications): one row per order event it handled, by
-- event id, written in the transaction that moves its checkpoint. An event with a row is
-- never handled again, whatever Kafka redelivers, replays or a group reset brings back.
CREATE TABLE email_inbox (
    event_id    uuid        PRIMARY KEY,
    order_id    uuid        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('order_confirmed', 'order_cancelled')),
    -- sent: the SMTP server accepted it; no_address: the customer has no profile;
    -- dead: the server refused it for good (e.g. an unknown address).
    outcome     text        NOT NULL CHECK (outcome IN ('sent', 'no_address', 'dead')),
    recipient   text,
    error       text,
    handled_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX email_inbox_dead ON email_inbox (handled_at) WHERE outcome = 'dead';

-- Checkout saga runtime. The saga's own state is an event stream in `events` (stream type
-- `checkout_saga`); these tables hold what the orchestrator and the stand-in participants
-- need besides it.

-- Replies the orchestrator has handled (deduplication by message id), written in the same
-- transaction as the saga's events.
CREATE TABLE saga_inbox (
    message_id  uuid PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- The one armed step deadline per running saga; survives restarts.
CREATE TABLE saga_deadlines (
    order_id uuid PRIMARY KEY,
    step     text        NOT NULL,
    attempt  int         NOT NULL,
    due_at   timestamptz NOT NULL
);
CREATE INDEX saga_deadlines_due_idx ON saga_deadlines (due_at);

-- Where the orchestrator is in the event store's gap-free feed (it starts sagas from
-- OrderPlaced and learns of cancellations from it).
CREATE TABLE saga_feed_position (
    id         int    PRIMARY KEY CHECK (id = 1),
    cursor_tx  xid8   NOT NULL,
    cursor_pos bigint NOT NULL
);
INSERT INTO saga_feed_position VALUES (1, '0', 0);

-- Stand-in participants. Each handles a command once per message id.
CREATE TABLE participant_inbox (
    participant text NOT NULL,
    message_id  uuid NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (participant, message_id)
);

CREATE TABLE inventory_stock (
    sku      text   PRIMARY KEY,
    on_hand  bigint NOT NULL CHECK (on_hand >= 0),
    reserved bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0)
);

-- One reservation per order: held until released (compensation) or kept (confirmed order).
CREATE TABLE inventory_reservations (
    order_id       uuid PRIMARY KEY,
    reservation_id text        NOT NULL,
    lines          jsonb       NOT NULL,
    status         text        NOT NULL CHECK (status IN ('held', 'released')),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The payment ledger: one authorization per order, voided by compensation.
CREATE TABLE payments (
    order_id         uuid PRIMARY KEY,
    authorization_id text        NOT NULL,
    amount_minor     bigint      NOT NULL,
    currency         text        NOT NULL,
    status           text        NOT NULL CHECK (status IN ('authorized', 'voided')),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shipments (
    order_id    uuid PRIMARY KEY,
    shipment_id text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

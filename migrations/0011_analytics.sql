-- Live analytics (read-side/src/analytics): the `analytics` consumer group folds the
-- `user-activity` topic and the order-events topic into counters. Every row here is derived
-- from those two topics alone, so a rebuild (truncate, then replay both topics from offset 0
-- in a new consumer group) gives the same rows for what the topics still hold.

-- Which consumer group (`analytics.v<version>`) is current; a rebuild moves it on. Its
-- per-partition positions are in `projection_checkpoints` under the name `analytics`.
CREATE TABLE analytics_state (
    id              int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    version         int NOT NULL DEFAULT 1,
    last_rebuilt_at timestamptz
);
INSERT INTO analytics_state (id) VALUES (1);

-- Every event id already counted: a message published twice (the relay after a crash, a
-- client retrying with its own event id) is counted once. Pruned after the topics' retention.
CREATE TABLE analytics_seen (
    event_id uuid PRIMARY KEY,
    seen_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX analytics_seen_seen_at ON analytics_seen (seen_at);

-- All-time counters per product (catalog SKUs only: ingestion refuses others).
CREATE TABLE analytics_products (
    sku                text PRIMARY KEY,
    views              bigint NOT NULL DEFAULT 0,
    add_to_carts       bigint NOT NULL DEFAULT 0,
    remove_from_carts  bigint NOT NULL DEFAULT 0,
    orders             bigint NOT NULL DEFAULT 0,
    units              bigint NOT NULL DEFAULT 0
);

-- Tumbling one-minute windows in event time, shop-wide; pruned after 24 hours.
CREATE TABLE analytics_minutes (
    minute             timestamptz PRIMARY KEY,
    page_views         bigint NOT NULL DEFAULT 0,
    product_views      bigint NOT NULL DEFAULT 0,
    searches           bigint NOT NULL DEFAULT 0,
    add_to_carts       bigint NOT NULL DEFAULT 0,
    remove_from_carts  bigint NOT NULL DEFAULT 0,
    checkouts_started  bigint NOT NULL DEFAULT 0,
    orders_placed      bigint NOT NULL DEFAULT 0,
    orders_confirmed   bigint NOT NULL DEFAULT 0,
    orders_cancelled   bigint NOT NULL DEFAULT 0,
    late_events        bigint NOT NULL DEFAULT 0
);

-- When each user and session was last active (event time), for "active in the last five
-- minutes"; pruned after 24 hours.
CREATE TABLE analytics_presence (
    kind      text NOT NULL CHECK (kind IN ('user', 'session')),
    id        text NOT NULL,
    last_seen timestamptz NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE INDEX analytics_presence_last_seen ON analytics_presence (kind, last_seen);

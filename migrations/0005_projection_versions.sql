-- Versioned projections, so any projection can be rebuilt by replay without downtime.
--
-- A projection's tables are `<base>_v<N>`; a view `<base>` selects from the active version.
-- Readers (GraphQL) and the live projector use the views (simple views are updatable in
-- PostgreSQL, including INSERT ... ON CONFLICT and SELECT ... FOR UPDATE). A rebuild fills
-- `<base>_v<N+1>` from the event store, then repoints the views in one transaction.

CREATE TABLE projections (
    name               text PRIMARY KEY,
    active_version     int  NOT NULL,
    -- The rebuild in progress or interrupted (NULL when none).
    rebuild_version    int,
    rebuild_state      text CHECK (rebuild_state IN ('running', 'failed')),
    rebuild_cursor_tx  xid8,
    rebuild_cursor_pos bigint,
    rebuild_processed  bigint NOT NULL DEFAULT 0,
    rebuild_total      bigint,
    rebuild_started_at timestamptz,
    rebuild_updated_at timestamptz,
    rebuild_error      text,
    last_rebuilt_at    timestamptz
);

ALTER TABLE order_summary RENAME TO order_summary_v1;
CREATE VIEW order_summary AS SELECT * FROM order_summary_v1;

-- Sales per product per hour, net of cancellations, bucketed by the hour the order was placed.
-- `sales_orders` keeps what each order contributed (and its stream version, for idempotency)
-- so a cancellation can take exactly that back out.
CREATE TABLE sales_orders_v1 (
    order_id    uuid        PRIMARY KEY,
    version     bigint      NOT NULL,
    placed_hour timestamptz NOT NULL,
    currency    text        NOT NULL,
    -- [{"sku": "...", "quantity": n, "line_total_minor": n}]
    lines       jsonb       NOT NULL,
    cancelled   boolean     NOT NULL DEFAULT false
);
CREATE VIEW sales_orders AS SELECT * FROM sales_orders_v1;

CREATE TABLE sales_by_product_hour_v1 (
    hour          timestamptz NOT NULL,
    sku           text        NOT NULL,
    currency      text        NOT NULL,
    units         bigint      NOT NULL,
    revenue_minor bigint      NOT NULL,
    orders        bigint      NOT NULL,
    PRIMARY KEY (hour, sku, currency)
);
CREATE VIEW sales_by_product_hour AS SELECT * FROM sales_by_product_hour_v1;

INSERT INTO projections (name, active_version) VALUES ('order_summary', 1), ('sales_by_product', 1);

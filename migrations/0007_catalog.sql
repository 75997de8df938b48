-- The shop's catalog, owned by the write side: what may be bought, at which price, in which
-- currency. A checkout names products and quantities; the command API prices it from here
-- and the OrderPlaced event records the prices used, so changing a price never changes a
-- placed order. Prices are bounded so no order total can overflow 64-bit minor units.
CREATE TABLE catalog_products (
    sku         text PRIMARY KEY CHECK (sku ~ '^[A-Za-z0-9._-]{1,64}$'),
    name        text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    price_minor bigint      NOT NULL CHECK (price_minor BETWEEN 0 AND 100000000000),
    currency    char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    active      boolean     NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Crypto-shredding of personal data (docs/security.md, "Erasure").

-- Customers' data keys (owned by platform::vault): one active key per customer, wrapped by
-- the master key (MASTER_KEYS, never in the database). Deleting a customer's row is what
-- forgetting them means: every box their key sealed, wherever it was copied, stops opening.
CREATE TABLE customer_keys (
    key_id      uuid        PRIMARY KEY,
    customer_id text        NOT NULL UNIQUE,
    -- The master key (kid) that wrapped it, so a rotated master key still unwraps old keys.
    master_kid  text        NOT NULL,
    -- 12-byte nonce || AES-256-GCM ciphertext and tag of the 32-byte data key.
    wrapped     bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- Start-up checks that every master key named here is configured (platform::vault::check).
CREATE INDEX customer_keys_master ON customer_keys (master_kid);

-- Payment tokens (owned by orders::payment_tokens): a checkout's token waits here, never in
-- an event or a message; the event carries `payment_ref`. The payment participant takes the
-- row (deletes it) when it authorizes; retention deletes what nobody took. The token itself
-- is sealed with the customer's data key (a backup or the WAL holds only ciphertext).
CREATE TABLE payment_tokens (
    payment_ref  uuid        PRIMARY KEY,
    order_id     uuid        NOT NULL,
    customer_id  text        NOT NULL,
    sealed_token jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- No index but the key: the table holds only tokens not yet taken (a few seconds' worth of
-- checkouts), so retention and erasure scan it, and every checkout saves two index writes.

-- Who was forgotten, and when (owned by write-side customers): no personal data, only the
-- pseudonymous id an operator or a test can check.
CREATE TABLE customer_erasures (
    customer_id  text        PRIMARY KEY,
    keys_deleted integer     NOT NULL,
    -- Who asked (`operator:<id>` over the API, `cli` for `shop customers forget`).
    erased_by    text        NOT NULL,
    erased_at    timestamptz NOT NULL DEFAULT now()
);

-- The email group no longer keeps recipients: the address is the profile's, which erasure
-- deletes.
UPDATE email_inbox SET recipient = NULL WHERE recipient IS NOT NULL;

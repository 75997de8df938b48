-- The operator console (owned by the console crate; docs/operations.md, "The console").

-- Signed-in operators. The cookie holds a random secret; only its SHA-256 is stored, so a
-- copy of this table signs nobody in. A session ends with the bearer token it was opened
-- with (expires_at = the token's exp) or when the operator signs out.
CREATE TABLE console_sessions (
    token_hash  bytea       PRIMARY KEY,
    actor       text        NOT NULL,
    -- Every form the console serves carries this; a POST without it is refused.
    csrf        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX console_sessions_expires_at ON console_sessions (expires_at);

-- What operators did through the console: who, when, what, why and how it ended. Never
-- updated or deleted by the console; the activity page reads it newest first.
CREATE TABLE console_actions (
    id       bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    actor    text        NOT NULL,
    action   text        NOT NULL,
    target   text        NOT NULL,
    -- The order the action was about, when there is one (an order's page lists them).
    order_id uuid,
    reason   text        NOT NULL,
    outcome  text        NOT NULL,
    -- What the operator changed, e.g. a corrected payload (JSON), when an action has one.
    detail   jsonb
);
CREATE INDEX console_actions_order ON console_actions (order_id) WHERE order_id IS NOT NULL;

-- Read-side dead letters: events a projection could not apply (undecodable, unknown schema
-- version, an invariant the projection cannot apply). Later events of the same stream are
-- parked behind an open dead letter so per-order order is never broken; other orders flow on.
CREATE TABLE dead_letters (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection      text        NOT NULL,
    stream_id       uuid,
    stream_version  bigint,
    event_id        uuid,
    topic           text        NOT NULL,
    partition       int         NOT NULL,
    "offset"        bigint      NOT NULL,
    error_class     text        NOT NULL,
    error_message   text        NOT NULL,
    attempts        int         NOT NULL,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at  timestamptz NOT NULL DEFAULT now(),
    payload         bytea       NOT NULL,
    status          text        NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'replayed', 'discarded')),
    resolved_at     timestamptz
);
CREATE INDEX dead_letters_open_idx ON dead_letters (projection, stream_id) WHERE status = 'open';

CREATE TABLE parked_events (
    projection     text   NOT NULL,
    stream_id      uuid   NOT NULL,
    stream_version bigint NOT NULL,
    topic          text   NOT NULL,
    partition      int    NOT NULL,
    "offset"       bigint NOT NULL,
    payload        bytea  NOT NULL,
    parked_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, stream_id, stream_version)
);

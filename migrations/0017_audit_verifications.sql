-- Verifications of the audit trail an operator asked for on the console's Audit page (owned
-- by the console crate). The `audit-verifier` role of `shop run` takes a `requested` one,
-- marks it `running` and counts its progress; one whose runner stopped updating it (the
-- process died) is taken again from the start. `broken` lists the streams whose chain
-- breaks: {stream_id, stream_type, version, problem}.
CREATE TABLE audit_verifications (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    requested_by  text        NOT NULL,
    reason        text        NOT NULL DEFAULT '',
    since         timestamptz,
    until         timestamptz,
    state         text        NOT NULL DEFAULT 'requested'
                  CHECK (state IN ('requested', 'running', 'done')),
    streams       integer     NOT NULL DEFAULT 0,
    checked       integer     NOT NULL DEFAULT 0,
    events        bigint      NOT NULL DEFAULT 0,
    broken        jsonb       NOT NULL DEFAULT '[]',
    requested_at  timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    updated_at    timestamptz,
    finished_at   timestamptz
);
-- At most one verification waits or runs at a time (it reads the whole range).
CREATE UNIQUE INDEX audit_verifications_one_open ON audit_verifications ((true))
    WHERE state IN ('requested', 'running');

//! Appending events and their outbox messages in one statement.
//!
//! The statement moves the stream's head row (insert for a new stream, conditional update
//! otherwise) and, only if that succeeded, inserts the events and the outbox rows. If the head
//! did not move (another writer took the expected version, or a younger transaction already
//! wrote the stream), nothing is written and the caller gets a conflict. Everything happens in
//! the caller's transaction, so more rows (an idempotency record) can join it.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, types::Json};
use uuid::Uuid;

use crate::{
    NewEvent, StoreError,
    hash::{self, HashInput},
    outbox::OutboxMessage,
};

#[derive(Debug, Clone, PartialEq)]
pub struct AppendOutcome {
    /// The stream's version after the append.
    pub version: i64,
    /// The new head hash (pass it as `prev_hash` to the next append).
    pub head_hash: Vec<u8>,
    pub recorded_at: DateTime<Utc>,
}

/// What the caller knows of the stream's head: its version and hash (`0` and
/// [`crate::hash::GENESIS`] for a stream that does not exist yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub version: i64,
    pub head_hash: Vec<u8>,
}

impl Expected {
    pub fn new_stream() -> Self {
        Self {
            version: 0,
            head_hash: crate::hash::GENESIS.to_vec(),
        }
    }
}

const INSERT_EVENTS_AND_OUTBOX: &str = r#"
, ev AS (
    INSERT INTO events (stream_id, stream_type, stream_version, event_id, event_type,
                        schema_version, payload, metadata, recorded_at, prev_hash, hash,
                        hash_kid)
    SELECT $1, $2, x.v, x.id, x.t, x.sv, x.p, x.m, $3, x.ph, x.h, $22::text
    FROM unnest($4::bigint[], $5::uuid[], $6::text[], $7::int[], $8::jsonb[], $9::jsonb[],
                $10::bytea[], $11::bytea[]) AS x(v, id, t, sv, p, m, ph, h)
    WHERE EXISTS (SELECT 1 FROM head)
    RETURNING 1
), ob AS (
    INSERT INTO outbox (message_id, destination, target, routing_key, ordering_key, headers, payload)
    SELECT * FROM unnest($12::uuid[], $13::text[], $14::text[], $15::text[], $16::text[],
                         $17::jsonb[], $18::bytea[])
    WHERE EXISTS (SELECT 1 FROM head)
    RETURNING 1
)
-- ev and ob run to completion whether or not they are read (data-modifying CTEs).
SELECT count(*) FROM head
"#;

/// Appends `events` to the stream if it is at `expected`, with `outbox` messages, in the
/// caller's transaction, recorded now (see [`append_at`]).
pub async fn append(
    conn: &mut PgConnection,
    stream_id: Uuid,
    stream_type: &str,
    expected: &Expected,
    events: &[NewEvent],
    outbox: &[OutboxMessage],
) -> Result<AppendOutcome, StoreError> {
    append_at(
        conn,
        stream_id,
        stream_type,
        expected,
        events,
        outbox,
        now_micros(),
    )
    .await
}

// Long on purpose: one SQL statement and the column arrays it binds; the statement and its
// binds must be read together to check that every column gets the right array.
/// [`append`] with the recorded time chosen by the caller (from [`now_micros`]), for callers
/// that put the time into the outbox messages too. It is part of the hash, so it must have
/// microsecond precision, like `timestamptz`.
pub async fn append_at(
    conn: &mut PgConnection,
    stream_id: Uuid,
    stream_type: &str,
    expected: &Expected,
    events: &[NewEvent],
    outbox: &[OutboxMessage],
    recorded_at: DateTime<Utc>,
) -> Result<AppendOutcome, StoreError> {
    if events.is_empty() {
        return Ok(AppendOutcome {
            version: expected.version,
            head_hash: expected.head_hash.clone(),
            recorded_at,
        });
    }
    let n = events.len();
    let mut versions = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut schema_versions = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut metadatas = Vec::with_capacity(n);
    let mut prev_hashes = Vec::with_capacity(n);
    let mut hashes = Vec::with_capacity(n);
    let mut prev = expected.head_hash.clone();
    let mut kid = None;
    for (i, e) in events.iter().enumerate() {
        let version = expected.version + 1 + i as i64;
        let metadata = serde_json::to_value(&e.metadata).expect("metadata serializes");
        let (hash, signed_by) = hash::sign(
            &prev,
            &HashInput {
                stream_id,
                stream_version: version,
                event_id: e.event_id,
                event_type: &e.event_type,
                schema_version: e.schema_version,
                payload: &e.payload,
                metadata: &metadata,
                recorded_at,
            },
        );
        kid = signed_by;
        versions.push(version);
        ids.push(e.event_id);
        types.push(e.event_type.as_str());
        schema_versions.push(e.schema_version);
        payloads.push(Json(e.payload.clone()));
        metadatas.push(Json(metadata));
        prev_hashes.push(std::mem::replace(&mut prev, hash.clone()));
        hashes.push(hash);
    }
    let new_version = expected.version + n as i64;

    // $21 (the expected version) is only compared when the stream exists; the new-stream
    // statement still names it so that $22 (the audit key's kid) has a place.
    let head = if expected.version == 0 {
        "WITH head AS (
            INSERT INTO streams (stream_id, stream_type, version, head_hash, last_tx)
            SELECT $1, $2, $19, $20, pg_current_xact_id() WHERE $21::bigint = 0
            ON CONFLICT (stream_id) DO NOTHING
            RETURNING 1)"
    } else {
        "WITH head AS (
            UPDATE streams SET version = $19, head_hash = $20, last_tx = pg_current_xact_id()
            WHERE stream_id = $1 AND version = $21 AND last_tx < pg_current_xact_id()
            RETURNING 1)"
    };
    let sql = format!("{head}{INSERT_EVENTS_AND_OUTBOX}");
    let q = sqlx::query_scalar::<_, i64>(&sql)
        .bind(stream_id)
        .bind(stream_type)
        .bind(recorded_at)
        .bind(&versions)
        .bind(&ids)
        .bind(&types)
        .bind(&schema_versions)
        .bind(&payloads)
        .bind(&metadatas)
        .bind(&prev_hashes)
        .bind(&hashes)
        .bind(outbox.iter().map(|m| m.message_id).collect::<Vec<_>>())
        .bind(
            outbox
                .iter()
                .map(|m| m.destination.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(outbox.iter().map(|m| m.target.as_str()).collect::<Vec<_>>())
        .bind(
            outbox
                .iter()
                .map(|m| m.routing_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            outbox
                .iter()
                .map(|m| m.ordering_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            outbox
                .iter()
                .map(|m| Json(m.headers.clone()))
                .collect::<Vec<Json<Value>>>(),
        )
        .bind(
            outbox
                .iter()
                .map(|m| m.payload.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(new_version)
        .bind(&prev)
        .bind(expected.version)
        .bind(kid);
    let moved = q
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| map_conflict(e, stream_id, expected.version))?;
    if moved == 0 {
        return Err(StoreError::Conflict {
            stream_id,
            expected: expected.version,
        });
    }
    // Readers of the feed and the outbox in this process look again shortly (they find the
    // rows once the caller commits).
    crate::wake::appended();
    Ok(AppendOutcome {
        version: new_version,
        head_hash: prev,
        recorded_at,
    })
}

/// The events table's own unique key is a second line of defence behind the head row.
fn map_conflict(e: sqlx::Error, stream_id: Uuid, expected: i64) -> StoreError {
    if let sqlx::Error::Database(db) = &e
        && db.constraint() == Some("events_stream_version_key")
    {
        return StoreError::Conflict {
            stream_id,
            expected,
        };
    }
    StoreError::Database(e)
}

/// The current time truncated to microseconds (what `timestamptz` keeps).
pub fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).expect("current time is in range")
}

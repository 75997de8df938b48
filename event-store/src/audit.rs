//! Verifying the per-stream hash chain (`shop audit verify`).
//!
//! For each stream, events must have versions 1..n without gaps, each `prev_hash` must equal
//! the previous event's `hash`, each `hash` must match the recomputed one, and the last event
//! must match the head row in `streams` (version and hash), which catches a deleted tail.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    StoredEvent,
    hash::{GENESIS, recompute},
    read::load_stream,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Break {
    /// The event's stored hash is not the hash of its content.
    ContentChanged,
    /// The event does not link to the event before it (reordered or something removed).
    ChainBroken,
    /// A version is missing or out of place.
    VersionGap { expected: i64 },
    /// The stream ends before the version its head records (events deleted at the end).
    Truncated { head_version: i64 },
    /// Events exist but the stream has no head row.
    MissingHead,
    /// The event is keyed by an audit key this process does not hold: it cannot be checked.
    KeyUnavailable { kid: String },
    /// An unkeyed event after a keyed one (in its stream, or anywhere in the store): the
    /// chain was recomputed without the key.
    Downgraded,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenAt {
    pub stream_id: Uuid,
    /// Version of the first event that fails (for `Truncated`, the first missing version).
    pub stream_version: i64,
    pub position: Option<i64>,
    pub event_id: Option<Uuid>,
    pub problem: Break,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamReport {
    pub stream_id: Uuid,
    pub events: usize,
    pub broken: Option<BrokenAt>,
}

/// Checks the events of one stream as loaded, against its head row. `keyed_from` is the
/// position of the store's first keyed event: every event after it is keyed, so an unkeyed
/// one there is a rewrite without the key even when its whole stream is consistent (a stream
/// rewritten unkeyed, then appended to by the application, would otherwise pass for one
/// older than the keys).
pub fn check_chain(
    stream_id: Uuid,
    events: &[StoredEvent],
    head: Option<(i64, Vec<u8>)>,
    keyed_from: Option<i64>,
) -> Option<BrokenAt> {
    let mut prev = GENESIS.to_vec();
    let mut keyed_before = false;
    let at = |e: &StoredEvent, problem| BrokenAt {
        stream_id,
        stream_version: e.stream_version,
        position: Some(e.position),
        event_id: Some(e.event_id),
        problem,
    };
    for (i, e) in events.iter().enumerate() {
        let expected = i as i64 + 1;
        if e.stream_version != expected {
            return Some(at(e, Break::VersionGap { expected }));
        }
        if e.prev_hash != prev {
            return Some(at(e, Break::ChainBroken));
        }
        let recomputed = recompute(e.hash_kid.as_deref(), &prev, &e.hash_input());
        let recomputed = match recomputed {
            Ok(h) => h,
            Err(kid) => return Some(at(e, Break::KeyUnavailable { kid })),
        };
        if recomputed != e.hash || e.stream_id != stream_id {
            return Some(at(e, Break::ContentChanged));
        }
        let after_keys = keyed_before || keyed_from.is_some_and(|k| e.position > k);
        if after_keys && e.hash_kid.is_none() {
            return Some(at(e, Break::Downgraded));
        }
        keyed_before |= e.hash_kid.is_some();
        prev = e.hash.clone();
    }
    match head {
        None if !events.is_empty() => Some(at(&events[0], Break::MissingHead)),
        Some((version, hash)) if version != events.len() as i64 || hash != prev => Some(BrokenAt {
            stream_id,
            stream_version: events.len() as i64 + 1,
            position: None,
            event_id: None,
            problem: Break::Truncated {
                head_version: version,
            },
        }),
        _ => None,
    }
}

/// Verifies one stream.
pub async fn verify_stream(
    conn: &mut PgConnection,
    stream_id: Uuid,
) -> Result<StreamReport, sqlx::Error> {
    let from = keyed_from(conn).await?;
    verify_stream_keyed_from(conn, stream_id, from).await
}

/// The position of the store's first keyed event, if any (what [`check_chain`] takes).
pub async fn keyed_from(conn: &mut PgConnection) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT min(position) FROM events WHERE hash_kid IS NOT NULL")
        .fetch_one(conn)
        .await
}

/// Verifies one stream, given the store's [`keyed_from`] (read once for many streams).
pub async fn verify_stream_keyed_from(
    conn: &mut PgConnection,
    stream_id: Uuid,
    keyed_from: Option<i64>,
) -> Result<StreamReport, sqlx::Error> {
    let (events, _) = load_stream(conn, stream_id).await?;
    let head: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, head_hash FROM streams WHERE stream_id = $1")
            .bind(stream_id)
            .fetch_optional(&mut *conn)
            .await?;
    let broken = check_chain(stream_id, &events, head, keyed_from);
    Ok(StreamReport {
        stream_id,
        events: events.len(),
        broken,
    })
}

/// The streams with an event recorded in `[since, until)`, in the order they began (every
/// stream, head rows without events included, when neither bound is given): what a
/// verification of a range goes through, one stream at a time.
pub async fn streams_in(
    conn: &mut PgConnection,
    since: Option<chrono::DateTime<chrono::Utc>>,
    until: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<Vec<Uuid>, sqlx::Error> {
    if since.is_none() && until.is_none() {
        return sqlx::query_scalar(
            "SELECT stream_id FROM (SELECT stream_id, min(position) AS first FROM events GROUP BY stream_id
               UNION ALL SELECT stream_id, NULL FROM streams s
                 WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.stream_id = s.stream_id)) x
             ORDER BY first NULLS LAST",
        )
        .fetch_all(conn)
        .await;
    }
    sqlx::query_scalar(
        "SELECT stream_id FROM events
         WHERE ($1::timestamptz IS NULL OR recorded_at >= $1) AND ($2::timestamptz IS NULL OR recorded_at < $2)
         GROUP BY stream_id ORDER BY min(position)",
    )
    .bind(since)
    .bind(until)
    .fetch_all(conn)
    .await
}

/// Verifies every stream (of `stream_type`, when given); returns the broken ones and the
/// number of streams checked.
pub async fn verify_all(
    conn: &mut PgConnection,
    stream_type: Option<&str>,
) -> Result<(Vec<StreamReport>, usize), sqlx::Error> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT stream_id FROM streams WHERE $1::text IS NULL OR stream_type = $1
         UNION SELECT DISTINCT stream_id FROM events WHERE $1::text IS NULL OR stream_type = $1",
    )
    .bind(stream_type)
    .fetch_all(&mut *conn)
    .await?;
    let from = keyed_from(conn).await?;
    let mut broken = Vec::new();
    for id in &ids {
        let report = verify_stream_keyed_from(conn, *id, from).await?;
        if report.broken.is_some() {
            broken.push(report);
        }
    }
    Ok((broken, ids.len()))
}

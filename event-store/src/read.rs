//! Reading: one stream (to decide a command), and the global feed (to replay everything).

use sqlx::{PgConnection, Row, postgres::PgRow};
use uuid::Uuid;

use crate::{StoredEvent, append::Expected};

const COLUMNS: &str = "position, stream_id, stream_type, stream_version, event_id, event_type, \
                       schema_version, payload, metadata, recorded_at, prev_hash, hash, hash_kid";

fn from_row(r: &PgRow) -> Result<StoredEvent, sqlx::Error> {
    Ok(StoredEvent {
        position: r.try_get("position")?,
        stream_id: r.try_get("stream_id")?,
        stream_type: r.try_get("stream_type")?,
        stream_version: r.try_get("stream_version")?,
        event_id: r.try_get("event_id")?,
        event_type: r.try_get("event_type")?,
        schema_version: r.try_get("schema_version")?,
        payload: r.try_get("payload")?,
        metadata: r.try_get("metadata")?,
        recorded_at: r.try_get("recorded_at")?,
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
        hash_kid: r.try_get("hash_kid")?,
    })
}

/// All events of a stream in version order, and what to expect when appending to it next.
pub async fn load_stream(
    conn: &mut PgConnection,
    stream_id: Uuid,
) -> Result<(Vec<StoredEvent>, Expected), sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM events WHERE stream_id = $1 ORDER BY stream_version"
    ))
    .bind(stream_id)
    .fetch_all(&mut *conn)
    .await?;
    let events = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    let expected = match events.last() {
        Some(e) => Expected {
            version: e.stream_version,
            head_hash: e.hash.clone(),
        },
        None => Expected::new_stream(),
    };
    Ok((events, expected))
}

/// One event of a stream by version, if stored.
pub async fn load_event(
    conn: &mut PgConnection,
    stream_id: Uuid,
    version: i64,
) -> Result<Option<StoredEvent>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM events WHERE stream_id = $1 AND stream_version = $2"
    ))
    .bind(stream_id)
    .bind(version)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(from_row).transpose()
}

/// Every event of several streams, by stream then version, in one query.
pub async fn load_streams(
    conn: &mut PgConnection,
    stream_ids: &[Uuid],
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM events WHERE stream_id = ANY($1) ORDER BY stream_id, stream_version"
    ))
    .bind(stream_ids)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(from_row).collect()
}

/// Where a feed reader is: the `(tx_id, position)` of the last event it has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct FeedCursor {
    pub tx_id: u64,
    pub position: i64,
}

/// How many events the store holds (a rebuild's progress total).
pub async fn count_events(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut *conn)
        .await
}

/// A point in the feed's time: every transaction that had started by now is below it.
/// [`feed_reached`] tells when the feed horizon has passed it, i.e. every event committed
/// before the mark was taken is readable by [`read_feed`].
pub async fn feed_mark(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    let xmax: String = sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
        .fetch_one(&mut *conn)
        .await?;
    xmax.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// Whether every transaction that had started when `mark` was taken has ended (the feed's
/// horizon is past it). A long transaction anywhere in the cluster holds this back.
pub async fn feed_reached(conn: &mut PgConnection, mark: u64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8")
        .bind(mark.to_string())
        .fetch_one(&mut *conn)
        .await
}

/// The next `limit` events of the global feed after `after`.
///
/// Only transactions that finished before every still-running one are read
/// (`tx_id < pg_snapshot_xmin`): an event whose transaction commits late has a smaller
/// `tx_id` than its neighbours, and would be skipped forever by a reader paging on position.
/// Here it is simply not visible yet, and is read in its place once it commits. Within one
/// stream, versions are in `(tx_id, position)` order (guaranteed by the append).
pub async fn read_feed(
    conn: &mut PgConnection,
    after: FeedCursor,
    limit: i64,
) -> Result<(Vec<StoredEvent>, FeedCursor), sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS}, tx_id::text AS tx FROM events
         WHERE (tx_id, position) > ($1::text::xid8, $2)
           AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY tx_id, position
         LIMIT $3"
    ))
    .bind(after.tx_id.to_string())
    .bind(after.position)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let mut cursor = after;
    let mut events = Vec::with_capacity(rows.len());
    for r in &rows {
        let tx: String = r.try_get("tx")?;
        let e = from_row(r)?;
        cursor = FeedCursor {
            tx_id: tx.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            position: e.position,
        };
        events.push(e);
    }
    Ok((events, cursor))
}

/// A stream's newest event, as the operator console lists streams that stopped moving.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Head {
    pub stream_id: Uuid,
    pub version: i64,
    pub event_type: String,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
}

/// Streams of `stream_type` whose newest event is none of `final_types` and was recorded
/// before `idle_since`, the longest idle first, at most `limit`. Reads every head of that
/// type (no index on the type): an operator's query, not a hot path.
pub async fn idle_heads(
    conn: &mut PgConnection,
    stream_type: &str,
    final_types: &[&str],
    idle_since: chrono::DateTime<chrono::Utc>,
    limit: i64,
) -> Result<Vec<Head>, sqlx::Error> {
    sqlx::query_as(
        "SELECT s.stream_id, s.version, e.event_type, e.recorded_at
         FROM streams s JOIN events e ON e.stream_id = s.stream_id AND e.stream_version = s.version
         WHERE s.stream_type = $1 AND e.event_type <> ALL($2) AND e.recorded_at < $3
         ORDER BY e.recorded_at LIMIT $4",
    )
    .bind(stream_type)
    .bind(final_types)
    .bind(idle_since)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await
}

/// The newest event of each of `stream_ids` that exists.
pub async fn heads(conn: &mut PgConnection, stream_ids: &[Uuid]) -> Result<Vec<Head>, sqlx::Error> {
    sqlx::query_as(
        "SELECT s.stream_id, s.version, e.event_type, e.recorded_at
         FROM streams s JOIN events e ON e.stream_id = s.stream_id AND e.stream_version = s.version
         WHERE s.stream_id = ANY($1)",
    )
    .bind(stream_ids)
    .fetch_all(&mut *conn)
    .await
}

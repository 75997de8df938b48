//! The transactional outbox: the one owner of the `outbox` table.
//!
//! Writers put messages here in the transaction that makes them true ([`crate::append`]
//! with its events, or [`enqueue`] alone, e.g. a saga participant's reply); the relay reads
//! pending rows in id order ([`next_batch`]) and records what happened to them. Every
//! statement on the table is in this module, so its shape and its indexes are decided in
//! one place.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row, postgres::PgRow, types::Json};
use uuid::Uuid;

/// Where a message goes: the order event stream or the saga's exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    Kafka,
    Amqp,
}

impl Destination {
    pub const ALL: [Destination; 2] = [Destination::Kafka, Destination::Amqp];

    /// The name stored in `outbox.destination` (and used as a metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            Destination::Kafka => "kafka",
            Destination::Amqp => "amqp",
        }
    }
}

impl std::str::FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| format!("unknown outbox destination {s:?}"))
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message for the relay to publish, written atomically with the events.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    pub message_id: Uuid,
    pub destination: Destination,
    /// Kafka topic (without the deployment prefix) or AMQP exchange.
    pub target: String,
    /// Kafka key or AMQP routing key.
    pub routing_key: String,
    /// Messages sharing this key are published in the order they were written.
    pub ordering_key: String,
    pub headers: Value,
    pub payload: Vec<u8>,
}

/// Puts messages in the outbox without appending events (e.g. a saga participant's reply,
/// whose effect lives in its own tables), in the caller's transaction.
pub async fn enqueue(conn: &mut PgConnection, outbox: &[OutboxMessage]) -> Result<(), sqlx::Error> {
    if outbox.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO outbox (message_id, destination, target, routing_key, ordering_key, headers, payload)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::bytea[])",
    )
    .bind(outbox.iter().map(|m| m.message_id).collect::<Vec<_>>())
    .bind(outbox.iter().map(|m| m.destination.as_str()).collect::<Vec<_>>())
    .bind(outbox.iter().map(|m| m.target.as_str()).collect::<Vec<_>>())
    .bind(outbox.iter().map(|m| m.routing_key.as_str()).collect::<Vec<_>>())
    .bind(outbox.iter().map(|m| m.ordering_key.as_str()).collect::<Vec<_>>())
    .bind(outbox.iter().map(|m| Json(m.headers.clone())).collect::<Vec<Json<Value>>>())
    .bind(outbox.iter().map(|m| m.payload.as_slice()).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A pending row, as the relay reads it.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub message_id: Uuid,
    pub destination: Destination,
    pub target: String,
    pub routing_key: String,
    pub ordering_key: String,
    pub headers: Value,
    pub payload: Vec<u8>,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
}

/// A row set aside after a permanent rejection.
#[derive(Debug, Clone)]
pub struct FailedRow {
    pub id: i64,
    pub message_id: Uuid,
    pub destination: Destination,
    pub target: String,
    pub ordering_key: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub failed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub headers: Value,
    pub payload: Vec<u8>,
}

/// The next pending rows in id order (= append order per key), skipping keys that are
/// blocked behind a failed row to the same destination (Kafka and RabbitMQ orders are
/// independent: a stuck saga command does not hold back the order's events).
pub async fn next_batch(pool: &PgPool, limit: i64) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, message_id, destination, target, routing_key, ordering_key, headers, payload,
                attempts, created_at
         FROM outbox o
         WHERE published_at IS NULL AND failed_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM outbox f
                           WHERE f.destination = o.destination
                             AND f.ordering_key = o.ordering_key
                             AND f.failed_at IS NOT NULL AND f.published_at IS NULL)
         ORDER BY id
         LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(OutboxRow {
                id: r.try_get("id")?,
                message_id: r.try_get("message_id")?,
                destination: destination(r)?,
                target: r.try_get("target")?,
                routing_key: r.try_get("routing_key")?,
                ordering_key: r.try_get("ordering_key")?,
                headers: r.try_get("headers")?,
                payload: r.try_get("payload")?,
                attempts: r.try_get("attempts")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect()
}

pub async fn mark_published(pool: &PgPool, ids: &[i64]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE outbox SET published_at = now(), attempts = attempts + 1, last_error = NULL
         WHERE id = ANY($1)",
    )
    .bind(ids)
    .execute(pool)
    .await?;
    Ok(())
}

/// Sets a row aside for good: it and the later rows of its key wait for an operator.
pub async fn mark_failed(pool: &PgPool, id: i64, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox SET failed_at = now(), attempts = attempts + 1, last_error = $2 WHERE id = $1")
        .bind(id)
        .bind(error)
        .execute(pool)
        .await?;
    Ok(())
}

/// Counts a transient failure; the row stays pending and is retried.
pub async fn record_attempt(pool: &PgPool, ids: &[i64], error: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = ANY($1)")
        .bind(ids)
        .bind(error)
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn list_failed(pool: &PgPool) -> Result<Vec<FailedRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, message_id, destination, target, ordering_key, attempts, last_error, failed_at,
                created_at, headers, payload
         FROM outbox WHERE failed_at IS NOT NULL AND published_at IS NULL ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(FailedRow {
                id: r.try_get("id")?,
                message_id: r.try_get("message_id")?,
                destination: destination(r)?,
                target: r.try_get("target")?,
                ordering_key: r.try_get("ordering_key")?,
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
                failed_at: r.try_get("failed_at")?,
                created_at: r.try_get("created_at")?,
                headers: r.try_get("headers")?,
                payload: r.try_get("payload")?,
            })
        })
        .collect()
}

/// Puts a failed row back in line; returns false if there is no such failed row.
pub async fn retry_failed(pool: &PgPool, id: i64) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE outbox SET failed_at = NULL WHERE id = $1 AND failed_at IS NOT NULL AND published_at IS NULL",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Deletes published rows older than `retention`; returns how many.
pub async fn prune(pool: &PgPool, retention: std::time::Duration) -> Result<u64, sqlx::Error> {
    let r =
        sqlx::query("DELETE FROM outbox WHERE published_at < now() - make_interval(secs => $1)")
            .bind(retention.as_secs_f64())
            .execute(pool)
            .await?;
    Ok(r.rows_affected())
}

/// Unpublished rows of one destination and target (topic or exchange).
#[derive(Debug, Clone)]
pub struct TargetBacklog {
    pub destination: Destination,
    pub target: String,
    /// Waiting for the relay (including those held behind a failed row).
    pub pending: i64,
    /// Set aside after a permanent rejection, waiting for an operator.
    pub failed: i64,
    pub oldest: DateTime<Utc>,
}

/// The unpublished rows per destination and target, the oldest backlog first.
pub async fn backlog_by_target(pool: &PgPool) -> Result<Vec<TargetBacklog>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT destination, target, count(*) FILTER (WHERE failed_at IS NULL) AS pending,
                count(*) FILTER (WHERE failed_at IS NOT NULL) AS failed, min(created_at) AS oldest
         FROM outbox WHERE published_at IS NULL GROUP BY destination, target ORDER BY oldest",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(TargetBacklog {
                destination: destination(r)?,
                target: r.try_get("target")?,
                pending: r.try_get("pending")?,
                failed: r.try_get("failed")?,
                oldest: r.try_get("oldest")?,
            })
        })
        .collect()
}

/// One unpublished row as an operator sees it.
#[derive(Debug, Clone)]
pub struct UnpublishedRow {
    pub id: i64,
    pub message_id: Uuid,
    pub destination: Destination,
    pub target: String,
    pub ordering_key: String,
    pub attempts: i32,
    /// The last broker error (a transient one while the row is still pending).
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub failed_at: Option<DateTime<Utc>>,
    /// A failed row of the same key and destination holds it back ([`next_batch`]).
    pub blocked: bool,
}

/// The oldest unpublished rows, failed ones included, oldest first; `destination` narrows.
pub async fn oldest_unpublished(
    pool: &PgPool,
    destination_filter: Option<Destination>,
    limit: i64,
) -> Result<Vec<UnpublishedRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, message_id, destination, target, ordering_key, attempts, last_error, created_at,
                failed_at,
                failed_at IS NULL AND EXISTS (
                    SELECT 1 FROM outbox f
                    WHERE f.destination = o.destination AND f.ordering_key = o.ordering_key
                      AND f.failed_at IS NOT NULL AND f.published_at IS NULL AND f.id < o.id
                ) AS blocked
         FROM outbox o
         WHERE published_at IS NULL AND ($1::text IS NULL OR destination = $1)
         ORDER BY id LIMIT $2",
    )
    .bind(destination_filter.map(Destination::as_str))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(UnpublishedRow {
                id: r.try_get("id")?,
                message_id: r.try_get("message_id")?,
                destination: destination(r)?,
                target: r.try_get("target")?,
                ordering_key: r.try_get("ordering_key")?,
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
                created_at: r.try_get("created_at")?,
                failed_at: r.try_get("failed_at")?,
                blocked: r.try_get("blocked")?,
            })
        })
        .collect()
}

/// Pending rows and the age of the oldest one, in seconds.
pub async fn backlog(pool: &PgPool) -> Result<(i64, f64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0)
         FROM outbox WHERE published_at IS NULL",
    )
    .fetch_one(pool)
    .await
}

/// The `destination` column as the enum; an unknown name is a decode error, not a string
/// compared somewhere else.
fn destination(r: &PgRow) -> Result<Destination, sqlx::Error> {
    let name: String = r.try_get("destination")?;
    name.parse().map_err(|e: String| sqlx::Error::ColumnDecode {
        index: "destination".into(),
        source: e.into(),
    })
}

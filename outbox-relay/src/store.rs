//! The relay's SQL over the `outbox` table, in one place.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Row};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub message_id: Uuid,
    pub destination: String,
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
    pub destination: String,
    pub target: String,
    pub ordering_key: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub failed_at: Option<DateTime<Utc>>,
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
                destination: r.try_get("destination")?,
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
        "SELECT id, message_id, destination, target, ordering_key, attempts, last_error, failed_at
         FROM outbox WHERE failed_at IS NOT NULL AND published_at IS NULL ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(FailedRow {
                id: r.try_get("id")?,
                message_id: r.try_get("message_id")?,
                destination: r.try_get("destination")?,
                target: r.try_get("target")?,
                ordering_key: r.try_get("ordering_key")?,
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
                failed_at: r.try_get("failed_at")?,
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

/// Pending rows and the age of the oldest one, in seconds.
pub async fn backlog(pool: &PgPool) -> Result<(i64, f64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0)
         FROM outbox WHERE published_at IS NULL",
    )
    .fetch_one(pool)
    .await
}

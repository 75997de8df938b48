//! Every SQL statement on the analytics tables (migration 0011): counting each event id
//! once, adding a batch's [`Changes`], the reads GraphQL serves, the reset of a rebuild and
//! pruning by age.

use std::collections::HashSet;

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::{PgConnection, PgPool, Row as _};
use uuid::Uuid;

use super::fold::{Changes, MINUTE_COLUMNS, MinuteDelta, PRODUCT_COLUMNS, ProductDelta};

/// Records `ids` as counted; returns those that were not yet (the ones to count now).
pub async fn first_seen(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let new: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO analytics_seen (event_id) SELECT DISTINCT unnest($1::uuid[])
         ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    Ok(new.into_iter().collect())
}

/// `INSERT ... SELECT * FROM unnest(key, columns...) ON CONFLICT (key) DO UPDATE SET c = t.c +
/// EXCLUDED.c`, one array per column.
fn upsert_sql(table: &str, key: &str, key_type: &str, columns: &[&str]) -> String {
    let names = columns.join(", ");
    let arrays: Vec<String> = (0..columns.len())
        .map(|i| format!("${}::bigint[]", i + 2))
        .collect();
    let sums: Vec<String> = columns
        .iter()
        .map(|c| format!("{c} = t.{c} + EXCLUDED.{c}"))
        .collect();
    format!(
        "INSERT INTO {table} AS t ({key}, {names}) SELECT * FROM unnest($1::{key_type}[], {})
         ON CONFLICT ({key}) DO UPDATE SET {}",
        arrays.join(", "),
        sums.join(", ")
    )
}

/// Adds a batch's changes: products, then minutes, then presence, each in key order.
pub async fn apply(conn: &mut PgConnection, changes: &Changes) -> Result<(), sqlx::Error> {
    if !changes.products.is_empty() {
        let sql = upsert_sql("analytics_products", "sku", "text", &PRODUCT_COLUMNS);
        let mut q = sqlx::query(&sql).bind(changes.products.keys().cloned().collect::<Vec<_>>());
        for c in 0..PRODUCT_COLUMNS.len() {
            q = q.bind(changes.products.values().map(|d| d[c]).collect::<Vec<_>>());
        }
        q.execute(&mut *conn).await?;
    }
    if !changes.minutes.is_empty() {
        let sql = upsert_sql(
            "analytics_minutes",
            "minute",
            "timestamptz",
            &MINUTE_COLUMNS,
        );
        let mut q = sqlx::query(&sql).bind(changes.minutes.keys().copied().collect::<Vec<_>>());
        for c in 0..MINUTE_COLUMNS.len() {
            q = q.bind(changes.minutes.values().map(|d| d[c]).collect::<Vec<_>>());
        }
        q.execute(&mut *conn).await?;
    }
    if !changes.presence.is_empty() {
        sqlx::query(
            "INSERT INTO analytics_presence AS p (kind, id, last_seen)
             SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])
             ON CONFLICT (kind, id) DO UPDATE SET last_seen = GREATEST(p.last_seen, EXCLUDED.last_seen)",
        )
        .bind(changes.presence.keys().map(|k| k.0.to_owned()).collect::<Vec<_>>())
        .bind(changes.presence.keys().map(|k| k.1.clone()).collect::<Vec<_>>())
        .bind(changes.presence.values().copied().collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The consumer group generation (`analytics.v<version>`) and when it was last rebuilt.
pub async fn state(pool: &PgPool) -> Result<(i32, Option<DateTime<Utc>>), sqlx::Error> {
    sqlx::query_as("SELECT version, last_rebuilt_at FROM analytics_state WHERE id = 1")
        .fetch_one(pool)
        .await
}

/// A rebuild's reset, in one transaction: every counter, every counted id and the
/// checkpoints go, and the generation moves on, so a new consumer group replays both topics
/// from their first offsets. Returns the new generation.
pub async fn reset(pool: &PgPool, consumer: &str) -> Result<i32, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Serialises with the consumer's batches (they lock the state row too).
    let version: i32 = sqlx::query_scalar(
        "UPDATE analytics_state SET version = version + 1, last_rebuilt_at = now() WHERE id = 1 RETURNING version",
    )
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "TRUNCATE analytics_products, analytics_minutes, analytics_presence, analytics_seen",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1")
        .bind(consumer)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(version)
}

/// Locks the state row for a batch's transaction and returns the current generation: a
/// batch of an older one (a reset happened meanwhile) must not be written.
pub async fn lock_generation(conn: &mut PgConnection) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT version FROM analytics_state WHERE id = 1 FOR SHARE")
        .fetch_one(&mut *conn)
        .await
}

/// Deletes minutes and presence older than `windows`, and counted ids older than `seen`
/// (beyond the topics' retention, nothing can be delivered again). Rows per table.
pub async fn prune(
    pool: &PgPool,
    windows: TimeDelta,
    seen: TimeDelta,
) -> Result<Vec<(&'static str, u64)>, sqlx::Error> {
    let now = Utc::now();
    let minutes = sqlx::query("DELETE FROM analytics_minutes WHERE minute < $1")
        .bind(now - windows)
        .execute(pool)
        .await?
        .rows_affected();
    let presence = sqlx::query("DELETE FROM analytics_presence WHERE last_seen < $1")
        .bind(now - windows)
        .execute(pool)
        .await?
        .rows_affected();
    // In batches until none is left (at most a million rows a pass), so pruning keeps up
    // with any ingestion rate without one long transaction.
    let mut ids = 0;
    for _ in 0..100 {
        let n = sqlx::query(
            "DELETE FROM analytics_seen WHERE event_id IN (
                 SELECT event_id FROM analytics_seen WHERE seen_at < $1 LIMIT 10000)",
        )
        .bind(now - seen)
        .execute(pool)
        .await?
        .rows_affected();
        ids += n;
        if n < 10_000 {
            break;
        }
    }
    Ok(vec![
        ("analytics_minutes", minutes),
        ("analytics_presence", presence),
        ("analytics_seen", ids),
    ])
}

/// One product's all-time counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductRow {
    pub sku: String,
    pub counts: ProductDelta,
}

/// The products with the most views (then SKU), at most `limit`, or the one `sku`.
pub async fn products(
    pool: &PgPool,
    sku: Option<&str>,
    limit: i64,
) -> Result<Vec<ProductRow>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT sku, {} FROM analytics_products WHERE ($1::text IS NULL OR sku = $1)
         ORDER BY views DESC, sku LIMIT $2",
        PRODUCT_COLUMNS.join(", ")
    ))
    .bind(sku)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let mut counts = ProductDelta::default();
            for (i, c) in PRODUCT_COLUMNS.iter().enumerate() {
                counts[i] = r.try_get(*c)?;
            }
            Ok(ProductRow {
                sku: r.try_get("sku")?,
                counts,
            })
        })
        .collect()
}

/// One minute's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MinuteRow {
    pub minute: DateTime<Utc>,
    pub counts: MinuteDelta,
}

/// The minutes with `from <= minute < to`, in order.
pub async fn minutes(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<MinuteRow>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT minute, {} FROM analytics_minutes WHERE minute >= $1 AND minute < $2 ORDER BY minute",
        MINUTE_COLUMNS.join(", ")
    ))
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let mut counts = MinuteDelta::default();
            for (i, c) in MINUTE_COLUMNS.iter().enumerate() {
                counts[i] = r.try_get(*c)?;
            }
            Ok(MinuteRow {
                minute: r.try_get("minute")?,
                counts,
            })
        })
        .collect()
}

/// Users and sessions active (in event time) since `since`.
pub async fn active_since(pool: &PgPool, since: DateTime<Utc>) -> Result<(i64, i64), sqlx::Error> {
    // One count per kind, each an index range on (kind, last_seen).
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM analytics_presence WHERE kind = 'user' AND last_seen >= $1),
                (SELECT count(*) FROM analytics_presence WHERE kind = 'session' AND last_seen >= $1)",
    )
    .bind(since)
    .fetch_one(pool)
    .await
}

/// Every row of every analytics table as text, in key order: what a replay must reproduce.
pub async fn snapshot(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let mut out = Vec::new();
    for (table, key) in [
        ("analytics_products", "sku"),
        ("analytics_minutes", "minute"),
        ("analytics_presence", "kind, id"),
    ] {
        let rows: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT '{table}: ' || t::text FROM {table} t ORDER BY {key}"
        ))
        .fetch_all(pool)
        .await?;
        out.extend(rows);
    }
    Ok(out)
}

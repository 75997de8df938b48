//! Every SQL statement on the order-summary tables: the projection's batched writes (upsert
//! and NOTIFY live, COPY into a rebuild's version) and the reads the GraphQL API serves.
//!
//! One place per store, so the column list, the row decoding and the locking rule are written
//! once; callers (the batch apply, GraphQL) see rows, not SQL.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{PgConnection, PgPool, Row as _};
use uuid::Uuid;

use super::fold::Row;
use crate::projection::Target;

/// Base name of the projection's one table (a view on the active version).
pub const TABLE: &str = "order_summary";

/// The NOTIFY channel announcing committed status changes (payload: order id, status, version).
pub const STATUS_CHANNEL: &str = "order_status_changed";

const COLUMNS: &str = "order_id, customer_id, status, currency, total_minor, items, cancellation_reason, \
                       version, created_at, updated_at, timeline";

/// The rows of `ids` in `table` (of `target`), locked as [`Target::row_lock`] says.
pub(super) async fn load(
    conn: &mut PgConnection,
    target: Target,
    table: &str,
    ids: &[Uuid],
) -> Result<Vec<Row>, sqlx::Error> {
    let loaded = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM {table} WHERE order_id = ANY($1) {}",
        target.row_lock()
    ))
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    loaded.iter().map(from_row).collect()
}

/// Announces committed changes on [`STATUS_CHANNEL`] (delivered when the transaction commits).
pub(super) async fn announce(conn: &mut PgConnection, rows: &[&Row]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let notes: Vec<String> = rows
        .iter()
        .map(|r| {
            json!({"order_id": r.order_id, "status": r.status, "version": r.version}).to_string()
        })
        .collect();
    sqlx::query(&format!(
        "SELECT pg_notify('{STATUS_CHANNEL}', n) FROM unnest($1::text[]) AS n"
    ))
    .bind(&notes)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub(super) async fn delete(
    conn: &mut PgConnection,
    table: &str,
    ids: &[Uuid],
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("DELETE FROM {table} WHERE order_id = ANY($1)"))
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Bulk-inserts new rows with `COPY ... FROM STDIN` (text format).
pub(super) async fn copy_in(
    conn: &mut PgConnection,
    table: &str,
    rows: &[&Row],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut buf = String::with_capacity(rows.len() * 600);
    for r in rows {
        let fields = [
            Some(r.order_id.to_string()),
            Some(r.customer_id.clone()),
            Some(r.status.clone()),
            Some(r.currency.clone()),
            Some(r.total_minor.to_string()),
            Some(r.items.to_string()),
            r.cancellation_reason.clone(),
            Some(r.version.to_string()),
            Some(r.created_at.to_rfc3339()),
            Some(r.updated_at.to_rfc3339()),
            Some(r.timeline.to_string()),
        ];
        for (i, f) in fields.iter().enumerate() {
            if i > 0 {
                buf.push('\t');
            }
            match f {
                None => buf.push_str("\\N"),
                Some(v) => copy_escape(&mut buf, v),
            }
        }
        buf.push('\n');
    }
    let mut copy = conn
        .copy_in_raw(&format!("COPY {table} ({COLUMNS}) FROM STDIN"))
        .await?;
    copy.send(buf.as_bytes()).await?;
    copy.finish().await?;
    Ok(())
}

/// COPY text format: backslash, tab, newline and carriage return are escaped.
fn copy_escape(buf: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => buf.push_str("\\\\"),
            '\t' => buf.push_str("\\t"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            c => buf.push(c),
        }
    }
}

/// Inserts new rows and updates the changing columns of existing ones, in one statement.
pub(super) async fn upsert(
    conn: &mut PgConnection,
    table: &str,
    rows: &[&Row],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    macro_rules! col {
        ($f:ident) => {
            rows.iter().map(|r| r.$f.clone()).collect::<Vec<_>>()
        };
    }
    sqlx::query(&format!(
        "INSERT INTO {table} ({COLUMNS})
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::jsonb[],
                              $7::text[], $8::bigint[], $9::timestamptz[], $10::timestamptz[], $11::jsonb[])
         ON CONFLICT (order_id) DO UPDATE SET
             status = EXCLUDED.status, cancellation_reason = EXCLUDED.cancellation_reason,
             version = EXCLUDED.version, updated_at = EXCLUDED.updated_at, timeline = EXCLUDED.timeline"
    ))
    .bind(col!(order_id))
    .bind(col!(customer_id))
    .bind(col!(status))
    .bind(col!(currency))
    .bind(col!(total_minor))
    .bind(col!(items))
    .bind(col!(cancellation_reason))
    .bind(col!(version))
    .bind(col!(created_at))
    .bind(col!(updated_at))
    .bind(col!(timeline))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn from_row(r: &sqlx::postgres::PgRow) -> Result<Row, sqlx::Error> {
    Ok(Row {
        order_id: r.try_get("order_id")?,
        customer_id: r.try_get("customer_id")?,
        status: r.try_get("status")?,
        currency: r.try_get("currency")?,
        total_minor: r.try_get("total_minor")?,
        items: r.try_get("items")?,
        cancellation_reason: r.try_get("cancellation_reason")?,
        version: r.try_get("version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        timeline: r.try_get("timeline")?,
    })
}

/// Why a read for the API failed. Kept apart because the API reports them differently: a
/// failed query as `INTERNAL` (logged, cause hidden), a row that does not decode with the
/// decoding error's own message.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("database: {0}")]
    Database(#[source] sqlx::Error),
    #[error(transparent)]
    Decode(sqlx::Error),
}

/// The order's row, if any (through the view on the active version).
pub async fn find(pool: &PgPool, order_id: Uuid) -> Result<Option<Row>, ReadError> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM {TABLE} WHERE order_id = $1"
    ))
    .bind(order_id)
    .fetch_optional(pool)
    .await
    .map_err(ReadError::Database)?;
    row.as_ref()
        .map(from_row)
        .transpose()
        .map_err(ReadError::Decode)
}

/// Which orders [`page`] lists; `None` filters nothing.
#[derive(Debug, Clone, Default)]
pub struct OrderFilter<'a> {
    pub customer_id: Option<String>,
    pub status: Option<&'a str>,
    /// Keyset position: orders strictly older than this `(created_at, order_id)`.
    pub after: Option<(DateTime<Utc>, Uuid)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub rows: Vec<Row>,
    pub has_next_page: bool,
}

/// Up to `first` orders matching `filter`, newest first (`created_at`, then `order_id`). One
/// more row is read to tell whether there is a next page; it is not decoded.
pub async fn page(pool: &PgPool, filter: OrderFilter<'_>, first: u32) -> Result<Page, ReadError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM {TABLE}
         WHERE ($1::text IS NULL OR customer_id = $1)
           AND ($2::text IS NULL OR status = $2)
           AND ($3::timestamptz IS NULL OR (created_at, order_id) < ($3, $4))
         ORDER BY created_at DESC, order_id DESC
         LIMIT $5"
    ))
    .bind(filter.customer_id)
    .bind(filter.status)
    .bind(filter.after.map(|(t, _)| t))
    .bind(filter.after.map(|(_, id)| id))
    .bind(i64::from(first) + 1)
    .fetch_all(pool)
    .await
    .map_err(ReadError::Database)?;
    let has_next_page = rows.len() > first as usize;
    let rows = rows
        .iter()
        .take(first as usize)
        .map(from_row)
        .collect::<Result<_, _>>()
        .map_err(ReadError::Decode)?;
    Ok(Page {
        rows,
        has_next_page,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_copy_would_misread() {
        let mut buf = String::new();
        copy_escape(&mut buf, "a\\b\tc\nd\re");
        assert_eq!(buf, "a\\\\b\\tc\\nd\\re");
    }
}

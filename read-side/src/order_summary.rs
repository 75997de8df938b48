//! The order-summary projection: one row per order with status, lines, totals, cancellation
//! reason and the timeline of status changes.
//!
//! The fold is pure ([`fold`]); [`apply_batch`] loads the touched rows, folds the events in
//! order and writes the changed rows back with one statement, so the live projector (one
//! event) and a rebuild (thousands) share every line of logic.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use domain::order::{OrderEvent, OrderStatus};
use serde_json::{Value, json};
use sqlx::{PgConnection, Row as _};
use uuid::Uuid;

use crate::{
    envelope::Envelope,
    projection::{Applied, ApplyError, Decoded, Target, next_version, touched_orders},
};

pub const NAME: &str = "order_summary";

/// The NOTIFY channel announcing committed status changes (payload: order id, status, version).
pub const STATUS_CHANNEL: &str = "order_status_changed";

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub order_id: Uuid,
    pub customer_id: String,
    pub status: String,
    pub currency: String,
    pub total_minor: i64,
    pub items: Value,
    pub cancellation_reason: Option<String>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub timeline: Value,
}

/// Applies `event` to the order's row in place (`None`: no row yet). An already applied
/// event changes nothing; on an error the row is untouched.
pub fn fold(
    row: &mut Option<Row>,
    env: &Envelope,
    event: &OrderEvent,
) -> Result<Applied, ApplyError> {
    if !next_version(env, row.as_ref().map_or(0, |r| r.version))? {
        return Ok(Applied::Duplicate);
    }
    let step = |status: OrderStatus| json!({"status": status.as_str(), "at": env.recorded_at});
    let Some(current) = row else {
        let OrderEvent::Placed(p) = event else {
            // Version 1 of an order is always OrderPlaced; anything else is a gap before it.
            return Err(ApplyError::Gap {
                order_id: env.stream_id,
                got: env.stream_version,
                at: 0,
            });
        };
        let items: Vec<Value> = p
            .lines
            .iter()
            .map(|l| json!({"sku": l.sku, "quantity": l.quantity, "unit_price_minor": l.unit_price_minor, "line_total_minor": l.line_total_minor}))
            .collect();
        *row = Some(Row {
            order_id: env.stream_id,
            customer_id: p.customer_id.as_str().to_owned(),
            status: OrderStatus::Pending.as_str().to_owned(),
            currency: p.currency.as_str().to_owned(),
            total_minor: p.total_minor.get(),
            items: Value::Array(items),
            cancellation_reason: None,
            version: env.stream_version,
            created_at: env.recorded_at,
            updated_at: env.recorded_at,
            timeline: json!([step(OrderStatus::Pending)]),
        });
        return Ok(Applied::Applied);
    };
    let (status, reason) = match event {
        OrderEvent::Placed(_) => (OrderStatus::Pending, None),
        OrderEvent::InventoryReserved(_) => (OrderStatus::InventoryReserved, None),
        OrderEvent::PaymentAuthorized(_) => (OrderStatus::PaymentAuthorized, None),
        OrderEvent::Confirmed(_) => (OrderStatus::Confirmed, None),
        OrderEvent::Cancelled(c) => (OrderStatus::Cancelled, Some(c.reason.as_str().to_owned())),
    };
    current.status = status.as_str().to_owned();
    if reason.is_some() {
        current.cancellation_reason = reason;
    }
    current.version = env.stream_version;
    current.updated_at = env.recorded_at;
    if let Value::Array(steps) = &mut current.timeline {
        steps.push(step(status));
    }
    Ok(Applied::Applied)
}

const COLUMNS: &str = "order_id, customer_id, status, currency, total_minor, items, cancellation_reason, \
                       version, created_at, updated_at, timeline";

/// Applies `events` in order to the order-summary table of `target`.
pub async fn apply_batch(
    conn: &mut PgConnection,
    target: Target,
    events: &[Decoded],
) -> Result<Vec<Applied>, ApplyError> {
    let table = target.table("order_summary");
    let ids = touched_orders(events);
    let loaded = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM {table} WHERE order_id = ANY($1) {}",
        target.row_lock()
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut rows: HashMap<Uuid, Option<Row>> = HashMap::with_capacity(ids.len());
    for r in &loaded {
        let row = from_row(r)?;
        rows.insert(row.order_id, Some(row));
    }
    let existing: std::collections::HashSet<Uuid> = rows.keys().copied().collect();
    let mut changed: Vec<Uuid> = Vec::new();
    let mut outcomes = Vec::with_capacity(events.len());
    for d in events {
        let row = rows.entry(d.env.stream_id).or_default();
        let outcome = fold(row, &d.env, &d.event)?;
        if outcome == Applied::Applied {
            changed.push(d.env.stream_id);
        }
        outcomes.push(outcome);
    }
    changed.sort_unstable();
    changed.dedup();
    let (updated, inserted): (Vec<&Row>, Vec<&Row>) = changed
        .iter()
        .filter_map(|id| rows[id].as_ref())
        .partition(|r| existing.contains(&r.order_id));
    if target == Target::Live {
        let all: Vec<&Row> = updated.into_iter().chain(inserted).collect();
        store(conn, &table, &all).await?;
        if !all.is_empty() {
            let notes: Vec<String> = all
                .iter()
                .map(|r| {
                    json!({"order_id": r.order_id, "status": r.status, "version": r.version})
                        .to_string()
                })
                .collect();
            sqlx::query(&format!(
                "SELECT pg_notify('{STATUS_CHANNEL}', n) FROM unnest($1::text[]) AS n"
            ))
            .bind(&notes)
            .execute(&mut *conn)
            .await?;
        }
    } else {
        // A rebuild is the only writer of its tables: rows it wrote before are deleted and
        // every changed row is COPYed in, much cheaper than upserting them one by one.
        if !updated.is_empty() {
            let ids: Vec<Uuid> = updated.iter().map(|r| r.order_id).collect();
            sqlx::query(&format!("DELETE FROM {table} WHERE order_id = ANY($1)"))
                .bind(&ids)
                .execute(&mut *conn)
                .await?;
        }
        let all: Vec<&Row> = updated.into_iter().chain(inserted).collect();
        copy_in(conn, &table, &all).await?;
    }
    Ok(outcomes)
}

/// Bulk-inserts new rows with `COPY ... FROM STDIN` (text format).
async fn copy_in(conn: &mut PgConnection, table: &str, rows: &[&Row]) -> Result<(), sqlx::Error> {
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

async fn store(conn: &mut PgConnection, table: &str, rows: &[&Row]) -> Result<(), sqlx::Error> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::fixtures::{cancelled, placed, reserved};

    fn run(events: &[Decoded]) -> Result<Row, ApplyError> {
        let mut row: Option<Row> = None;
        for d in events {
            fold(&mut row, &d.env, &d.event)?;
        }
        Ok(row.expect("a row"))
    }

    #[test]
    fn copy_text_escapes_what_copy_would_misread() {
        let mut buf = String::new();
        copy_escape(&mut buf, "a\\b\tc\nd\re");
        assert_eq!(buf, "a\\\\b\\tc\\nd\\re");
    }

    #[test]
    fn a_placed_then_cancelled_order_has_its_lines_reason_and_timeline() {
        let id = Uuid::now_v7();
        let row = run(&[
            placed(id, "2026-11-22T10:15:00Z"),
            cancelled(id, 2, "2026-11-22T10:20:00Z"),
        ])
        .unwrap();
        assert_eq!(row.status, "CANCELLED");
        assert_eq!(row.total_minor, 2999);
        assert_eq!(row.cancellation_reason.as_deref(), Some("changed my mind"));
        assert_eq!(row.version, 2);
        assert_eq!(row.items[0]["sku"], "SKU-1");
        assert_eq!(row.timeline.as_array().unwrap().len(), 2);
        assert_eq!(row.timeline[1]["status"], "CANCELLED");
        assert_eq!(row.updated_at.to_rfc3339(), "2026-11-22T10:20:00+00:00");
    }

    #[test]
    fn redelivered_events_change_nothing_and_gaps_are_refused() {
        let id = Uuid::now_v7();
        let p = placed(id, "2026-11-22T10:15:00Z");
        let r = reserved(id, 2, "2026-11-22T10:16:00Z");
        let once = run(&[p.clone(), r.clone()]).unwrap();
        assert_eq!(
            run(&[p.clone(), r.clone(), p.clone(), r.clone()]).unwrap(),
            once
        );
        let gap = run(&[p, cancelled(id, 3, "2026-11-22T10:17:00Z")]);
        assert!(
            matches!(gap, Err(ApplyError::Gap { got: 3, at: 1, .. })),
            "{gap:?}"
        );
        let headless = run(&[r]);
        assert!(matches!(
            headless,
            Err(ApplyError::Gap { got: 2, at: 0, .. })
        ));
    }
}

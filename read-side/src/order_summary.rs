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
    projection::{Applied, ApplyError, Decoded, Target, next_version},
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

/// The row after `event`; `Ok(None)` when the event is already applied.
pub fn fold(
    row: Option<&Row>,
    env: &Envelope,
    event: &OrderEvent,
) -> Result<Option<Row>, ApplyError> {
    if !next_version(env, row.map_or(0, |r| r.version))? {
        return Ok(None);
    }
    let step = |status: OrderStatus| json!({"status": status.as_str(), "at": env.recorded_at});
    let Some(row) = row else {
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
        return Ok(Some(Row {
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
        }));
    };
    let (status, reason) = match event {
        OrderEvent::Placed(_) => (OrderStatus::Pending, None),
        OrderEvent::InventoryReserved(_) => (OrderStatus::InventoryReserved, None),
        OrderEvent::PaymentAuthorized(_) => (OrderStatus::PaymentAuthorized, None),
        OrderEvent::Confirmed(_) => (OrderStatus::Confirmed, None),
        OrderEvent::Cancelled(c) => (OrderStatus::Cancelled, Some(c.reason.as_str().to_owned())),
    };
    let mut next = row.clone();
    next.status = status.as_str().to_owned();
    next.cancellation_reason = reason.or(next.cancellation_reason);
    next.version = env.stream_version;
    next.updated_at = env.recorded_at;
    if let Value::Array(steps) = &mut next.timeline {
        steps.push(step(status));
    }
    Ok(Some(next))
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
    let mut ids: Vec<Uuid> = events.iter().map(|d| d.env.stream_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let loaded = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM {table} WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE"
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut rows: HashMap<Uuid, Row> = HashMap::with_capacity(ids.len());
    for r in &loaded {
        let row = from_row(r)?;
        rows.insert(row.order_id, row);
    }
    let mut changed: Vec<Uuid> = Vec::new();
    let mut outcomes = Vec::with_capacity(events.len());
    for d in events {
        match fold(rows.get(&d.env.stream_id), &d.env, &d.event)? {
            Some(row) => {
                changed.push(row.order_id);
                rows.insert(row.order_id, row);
                outcomes.push(Applied::Applied);
            }
            None => outcomes.push(Applied::Duplicate),
        }
    }
    changed.sort_unstable();
    changed.dedup();
    let changed: Vec<&Row> = changed.iter().map(|id| &rows[id]).collect();
    store(conn, &table, &changed).await?;
    if target == Target::Live && !changed.is_empty() {
        let notes: Vec<String> = changed
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
    Ok(outcomes)
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
            if let Some(next) = fold(row.as_ref(), &d.env, &d.event)? {
                row = Some(next);
            }
        }
        Ok(row.expect("a row"))
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

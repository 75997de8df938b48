//! Sales per product per hour: units, revenue (minor units) and orders per SKU and currency,
//! bucketed by the hour the order was placed, net of cancellations.
//!
//! `sales_orders` remembers what each order contributed, so a cancellation takes exactly that
//! back out, and carries the stream version for idempotency. Bucket changes are summed in
//! memory per batch and written in key order (concurrent writers never deadlock).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use domain::order::OrderEvent;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Row as _};
use uuid::Uuid;

use crate::{
    envelope::Envelope,
    projection::{Applied, ApplyError, Decoded, Target, next_version, touched_orders},
};

pub const NAME: &str = "sales_by_product";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub sku: String,
    pub quantity: i64,
    pub line_total_minor: i64,
}

/// What one order contributes to the buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderSales {
    pub order_id: Uuid,
    pub version: i64,
    pub placed_hour: DateTime<Utc>,
    pub currency: String,
    pub lines: Vec<Line>,
    pub cancelled: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delta {
    pub units: i64,
    pub revenue_minor: i64,
    pub orders: i64,
}

/// (hour, sku, currency)
pub type BucketKey = (DateTime<Utc>, String, String);

fn add(deltas: &mut BTreeMap<BucketKey, Delta>, o: &OrderSales, sign: i64) {
    for l in &o.lines {
        let d = deltas
            .entry((o.placed_hour, l.sku.clone(), o.currency.clone()))
            .or_default();
        d.units += sign * l.quantity;
        d.revenue_minor += sign * l.line_total_minor;
        d.orders += sign;
    }
}

pub fn hour_of(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(TimeDelta::hours(1)).unwrap_or(at)
}

/// The order's contribution after `event`, adding the bucket changes to `deltas`;
/// `Ok(None)` when the event is already applied.
pub fn fold(
    row: Option<&OrderSales>,
    env: &Envelope,
    event: &OrderEvent,
    deltas: &mut BTreeMap<BucketKey, Delta>,
) -> Result<Option<OrderSales>, ApplyError> {
    if !next_version(env, row.map_or(0, |r| r.version))? {
        return Ok(None);
    }
    let next = match (row, event) {
        (None, OrderEvent::Placed(p)) => {
            let o = OrderSales {
                order_id: env.stream_id,
                version: env.stream_version,
                placed_hour: hour_of(env.recorded_at),
                currency: p.currency.as_str().to_owned(),
                lines: p
                    .lines
                    .iter()
                    .map(|l| Line {
                        sku: l.sku.as_str().to_owned(),
                        quantity: l.quantity.get(),
                        line_total_minor: l.line_total_minor.get(),
                    })
                    .collect(),
                cancelled: false,
            };
            add(deltas, &o, 1);
            o
        }
        (None, _) => {
            return Err(ApplyError::Gap {
                order_id: env.stream_id,
                got: env.stream_version,
                at: 0,
            });
        }
        (Some(o), OrderEvent::Cancelled(_)) if !o.cancelled => {
            add(deltas, o, -1);
            OrderSales {
                version: env.stream_version,
                cancelled: true,
                ..o.clone()
            }
        }
        (Some(o), _) => OrderSales {
            version: env.stream_version,
            ..o.clone()
        },
    };
    Ok(Some(next))
}

/// Applies `events` in order to the sales tables of `target`.
pub async fn apply_batch(
    conn: &mut PgConnection,
    target: Target,
    events: &[Decoded],
) -> Result<Vec<Applied>, ApplyError> {
    let (orders_table, buckets_table) = (
        target.table("sales_orders"),
        target.table("sales_by_product_hour"),
    );
    let ids = touched_orders(events);
    let loaded = sqlx::query(&format!(
        "SELECT order_id, version, placed_hour, currency, lines, cancelled FROM {orders_table}
         WHERE order_id = ANY($1) {}",
        target.row_lock()
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut rows: HashMap<Uuid, OrderSales> = HashMap::with_capacity(ids.len());
    for r in &loaded {
        let lines: serde_json::Value = r.try_get("lines")?;
        let o = OrderSales {
            order_id: r.try_get("order_id")?,
            version: r.try_get("version")?,
            placed_hour: r.try_get("placed_hour")?,
            currency: r.try_get("currency")?,
            lines: serde_json::from_value(lines).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            cancelled: r.try_get("cancelled")?,
        };
        rows.insert(o.order_id, o);
    }
    let mut deltas = BTreeMap::new();
    let mut changed = Vec::new();
    let mut outcomes = Vec::with_capacity(events.len());
    for d in events {
        match fold(rows.get(&d.env.stream_id), &d.env, &d.event, &mut deltas)? {
            Some(o) => {
                changed.push(o.order_id);
                rows.insert(o.order_id, o);
                outcomes.push(Applied::Applied);
            }
            None => outcomes.push(Applied::Duplicate),
        }
    }
    changed.sort_unstable();
    changed.dedup();
    if !changed.is_empty() {
        let rs: Vec<&OrderSales> = changed.iter().map(|id| &rows[id]).collect();
        sqlx::query(&format!(
            "INSERT INTO {orders_table} (order_id, version, placed_hour, currency, lines, cancelled)
             SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::timestamptz[], $4::text[], $5::jsonb[], $6::bool[])
             ON CONFLICT (order_id) DO UPDATE SET version = EXCLUDED.version, cancelled = EXCLUDED.cancelled"
        ))
        .bind(rs.iter().map(|o| o.order_id).collect::<Vec<_>>())
        .bind(rs.iter().map(|o| o.version).collect::<Vec<_>>())
        .bind(rs.iter().map(|o| o.placed_hour).collect::<Vec<_>>())
        .bind(rs.iter().map(|o| o.currency.clone()).collect::<Vec<_>>())
        .bind(rs.iter().map(|o| serde_json::json!(o.lines)).collect::<Vec<_>>())
        .bind(rs.iter().map(|o| o.cancelled).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    let deltas: Vec<_> = deltas
        .into_iter()
        .filter(|(_, d)| *d != Delta::default())
        .collect();
    if !deltas.is_empty() {
        sqlx::query(&format!(
            "INSERT INTO {buckets_table} AS b (hour, sku, currency, units, revenue_minor, orders)
             SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[])
             ON CONFLICT (hour, sku, currency) DO UPDATE SET
                 units = b.units + EXCLUDED.units,
                 revenue_minor = b.revenue_minor + EXCLUDED.revenue_minor,
                 orders = b.orders + EXCLUDED.orders"
        ))
        .bind(deltas.iter().map(|((h, _, _), _)| *h).collect::<Vec<_>>())
        .bind(deltas.iter().map(|((_, s, _), _)| s.clone()).collect::<Vec<_>>())
        .bind(deltas.iter().map(|((_, _, c), _)| c.clone()).collect::<Vec<_>>())
        .bind(deltas.iter().map(|(_, d)| d.units).collect::<Vec<_>>())
        .bind(deltas.iter().map(|(_, d)| d.revenue_minor).collect::<Vec<_>>())
        .bind(deltas.iter().map(|(_, d)| d.orders).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::fixtures::{cancelled, placed, reserved};

    fn run(events: &[Decoded]) -> BTreeMap<BucketKey, Delta> {
        let mut rows: HashMap<Uuid, OrderSales> = HashMap::new();
        let mut deltas = BTreeMap::new();
        for d in events {
            if let Some(next) =
                fold(rows.get(&d.env.stream_id), &d.env, &d.event, &mut deltas).unwrap()
            {
                rows.insert(next.order_id, next);
            }
        }
        deltas.retain(|_, d| *d != Delta::default());
        deltas
    }

    #[test]
    fn sales_are_bucketed_by_the_hour_placed_and_net_of_cancellations() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let buckets = run(&[
            placed(a, "2026-11-22T10:15:00Z"),
            placed(b, "2026-11-22T10:59:59Z"),
            reserved(a, 2, "2026-11-22T11:01:00Z"),
            // Cancelled in the next hour: taken out of the hour it was placed in.
            cancelled(b, 2, "2026-11-22T11:05:00Z"),
            // A redelivered cancellation does not take it out twice.
            cancelled(b, 2, "2026-11-22T11:05:00Z"),
        ]);
        let hour: DateTime<Utc> = "2026-11-22T10:00:00Z".parse().unwrap();
        assert_eq!(
            buckets,
            BTreeMap::from([
                (
                    (hour, "SKU-1".into(), "EUR".into()),
                    Delta {
                        units: 2,
                        revenue_minor: 2500,
                        orders: 1
                    }
                ),
                (
                    (hour, "SKU-2".into(), "EUR".into()),
                    Delta {
                        units: 1,
                        revenue_minor: 499,
                        orders: 1
                    }
                ),
            ])
        );
    }

    #[test]
    fn a_fully_cancelled_hour_nets_to_nothing() {
        let a = Uuid::now_v7();
        assert!(
            run(&[
                placed(a, "2026-11-22T10:15:00Z"),
                cancelled(a, 2, "2026-11-22T10:16:00Z")
            ])
            .is_empty()
        );
    }
}

//! Sales' fold: what one event changes in an order's contribution and in the hourly buckets,
//! in memory.
//!
//! Kept apart from the SQL ([`super::repo`]) so it is pure and tested without a database,
//! and so the live projector and a rebuild share it (see [`super::apply_batch`]).

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use domain::order::OrderEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    envelope::Envelope,
    projection::{ApplyError, next_version},
};

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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::projection::{
        Decoded,
        fixtures::{cancelled, placed, reserved},
    };

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

//! The order summary's fold: one event applied to an order's row, in memory.
//!
//! Kept apart from the SQL ([`super::repo`]) so it is pure and tested without a database,
//! and so the live projector and a rebuild share it (see [`super::apply_batch`]).

use chrono::{DateTime, Utc};
use domain::order::{OrderEvent, OrderStatus};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    envelope::Envelope,
    projection::{Applied, ApplyError, next_version},
};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::{
        Decoded,
        fixtures::{cancelled, placed, reserved},
    };

    fn run(events: &[Decoded]) -> Result<Row, ApplyError> {
        let mut row: Option<Row> = None;
        for d in events {
            fold(&mut row, &d.env, &d.event)?;
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

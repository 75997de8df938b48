//! The order-summary projection: one row per order with status, lines, totals, cancellation
//! reason and the timeline of status changes.
//!
//! Idempotent per stream version: an event at or below the row's version is a redelivery and
//! is skipped; the next version is applied; a version further ahead means an earlier event is
//! missing (it cannot happen with per-order ordering, so it is reported, not guessed at).

use domain::order::{OrderEvent, OrderStatus};
use serde_json::json;
use sqlx::PgConnection;

use crate::envelope::Envelope;

pub const NAME: &str = "order_summary";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    /// Already applied (redelivery or replay).
    Duplicate,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("order {order_id}: event version {got} arrived while the projection is at {at}")]
    Gap {
        order_id: uuid::Uuid,
        got: i64,
        at: i64,
    },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Applies one event inside the caller's transaction.
pub async fn apply(
    conn: &mut PgConnection,
    env: &Envelope,
    event: &OrderEvent,
) -> Result<Applied, ApplyError> {
    let current: Option<i64> =
        sqlx::query_scalar("SELECT version FROM order_summary WHERE order_id = $1 FOR UPDATE")
            .bind(env.stream_id)
            .fetch_optional(&mut *conn)
            .await?;
    let at = current.unwrap_or(0);
    if env.stream_version <= at {
        return Ok(Applied::Duplicate);
    }
    if env.stream_version != at + 1 {
        return Err(ApplyError::Gap {
            order_id: env.stream_id,
            got: env.stream_version,
            at,
        });
    }
    let step = |status: OrderStatus| json!([{"status": status.as_str(), "at": env.recorded_at}]);
    match event {
        OrderEvent::Placed(p) => {
            let items: Vec<_> = p
                .lines
                .iter()
                .map(|l| json!({"sku": l.sku, "quantity": l.quantity, "unit_price_minor": l.unit_price_minor, "line_total_minor": l.line_total_minor}))
                .collect();
            sqlx::query(
                "INSERT INTO order_summary (order_id, customer_id, status, currency, total_minor, items,
                                            version, created_at, updated_at, timeline)
                 VALUES ($1, $2, 'PENDING', $3, $4, $5, $6, $7, $7, $8)",
            )
            .bind(env.stream_id)
            .bind(p.customer_id.as_str())
            .bind(p.currency.as_str())
            .bind(p.total_minor.get())
            .bind(json!(items))
            .bind(env.stream_version)
            .bind(env.recorded_at)
            .bind(step(OrderStatus::Pending))
            .execute(&mut *conn)
            .await?;
        }
        other => {
            let (status, reason) = match other {
                OrderEvent::InventoryReserved(_) => (OrderStatus::InventoryReserved, None),
                OrderEvent::PaymentAuthorized(_) => (OrderStatus::PaymentAuthorized, None),
                OrderEvent::Confirmed(_) => (OrderStatus::Confirmed, None),
                OrderEvent::Cancelled(c) => {
                    (OrderStatus::Cancelled, Some(c.reason.as_str().to_owned()))
                }
                OrderEvent::Placed(_) => unreachable!("handled above"),
            };
            sqlx::query(
                "UPDATE order_summary
                 SET status = $2, cancellation_reason = COALESCE($3, cancellation_reason), version = $4,
                     updated_at = $5, timeline = timeline || $6
                 WHERE order_id = $1",
            )
            .bind(env.stream_id)
            .bind(status.as_str())
            .bind(reason)
            .bind(env.stream_version)
            .bind(env.recorded_at)
            .bind(step(status))
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(Applied::Applied)
}

//! An order's audit trail: its stored events and whether their hash chain verifies; and a
//! customer's: each of her orders with its chain's verdict.
//!
//! The trail is read from the event store (the source of truth), not from a projection; this
//! module is the read side's one way in, so the GraphQL API neither opens connections nor
//! knows which store calls make a trail.
//!
//! Sealed personal data stays sealed here (operators read what happened, not where it was
//! shipped), and the values of a forgotten customer are shown as `"erased"`; the hash and
//! its verification cover the stored ciphertext, which erasure does not change.

use event_store::{StoredEvent, audit::StreamReport};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug)]
pub struct Trail {
    /// Every event of the order's stream, in version order.
    pub events: Vec<StoredEvent>,
    /// The hash chain recomputed against the stream head.
    pub report: StreamReport,
}

/// The order's events and the verification of their chain, on one connection.
pub async fn trail(pool: &PgPool, order_id: Uuid) -> Result<Trail, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let (mut events, _) = event_store::load_stream(&mut conn, order_id).await?;
    platform::vault::mark_erased(&mut conn, events.iter_mut().map(|e| &mut e.payload)).await?;
    let report = event_store::audit::verify_stream(&mut conn, order_id).await?;
    Ok(Trail { events, report })
}

/// One of a customer's orders as the audit sees it.
#[derive(Debug)]
pub struct OrderAudit {
    pub order_id: Uuid,
    /// The stream's newest event (`None`: the store has no such stream any more).
    pub head: Option<event_store::read::Head>,
    pub report: StreamReport,
}

/// The orders of `customer_id`, newest first (at most `limit`), each with its chain verified
/// against the event store. Which orders are hers is read from the order-summary read model
/// (its customer index: the store has none, and the write path pays for every index); what
/// is verified is the store's.
pub async fn customer_trail(
    pool: &PgPool,
    customer_id: &str,
    limit: i64,
) -> Result<Vec<OrderAudit>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT order_id FROM order_summary WHERE customer_id = $1
         ORDER BY created_at DESC, order_id LIMIT $2",
    )
    .bind(customer_id)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let mut heads: std::collections::HashMap<Uuid, event_store::read::Head> =
        event_store::read::heads(&mut conn, &ids)
            .await?
            .into_iter()
            .map(|h| (h.stream_id, h))
            .collect();
    let mut out = Vec::with_capacity(ids.len());
    for order_id in ids {
        let report = event_store::audit::verify_stream(&mut conn, order_id).await?;
        out.push(OrderAudit {
            order_id,
            head: heads.remove(&order_id),
            report,
        });
    }
    Ok(out)
}

//! An order's audit trail: its stored events and whether their hash chain verifies.
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

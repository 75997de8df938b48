//! What every projection of the order stream shares: its identifier ([`Kind`]), the contract
//! it implements ([`Projection`]), the batch types, the per-version idempotency rule and the
//! lock that keeps writes off a projection while it is switched.
//!
//! Every projection folds order events in stream-version order and is idempotent per version.
//! It is applied in batches (one event from the live projector, thousands from a rebuild)
//! through one code path, so a rebuilt read model is exactly the live one. A projection's
//! tables are versioned (`<base>_v<N>`, see migration 0005): the live projector writes through
//! the views that point at the active version, a rebuild writes the next version directly.
//!
//! This module names no model: the models depend on it, and [`crate::registry`] (above both)
//! lists them, so the dependency runs one way.

use domain::order::OrderEvent;
use futures::future::BoxFuture;
use sqlx::PgConnection;

use crate::envelope::Envelope;

/// A projection of the order stream, by the name it is stored under (checkpoints, consumer
/// groups, the `projections` table). Its implementation is found in [`crate::registry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    OrderSummary,
    SalesByProduct,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::OrderSummary, Kind::SalesByProduct];

    pub const fn name(self) -> &'static str {
        match self {
            Kind::OrderSummary => "order_summary",
            Kind::SalesByProduct => "sales_by_product",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// What every read model implements, so the projector, dead-letter handling and rebuilds
/// drive any of them through [`crate::registry`] without naming them.
pub trait Projection: Send + Sync {
    fn kind(&self) -> Kind;

    fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// Base names of the projection's tables. The first holds one row per order with the
    /// last applied `version`; a rebuild's final catch-up compares it between versions.
    fn tables(&self) -> &'static [&'static str];

    /// Applies `events` (in feed order) inside the caller's transaction. All or nothing: a
    /// gap in any stream fails the whole batch.
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        target: Target,
        events: &'a [Decoded],
    ) -> BoxFuture<'a, Result<Vec<Applied>, ApplyError>>;
}

/// Advisory-lock namespace of the rebuild lock (one per projection): taken by
/// [`crate::rebuild`], looked up (not taken) by [`crate::status`].
pub(crate) const REBUILD_LOCK_NS: i32 = 0x5245_4255; // "REBU"

/// Advisory-lock namespace of the projections' switch lock.
const SWITCH_LOCK_NS: i32 = 0x5052_4f4a; // "PROJ"

/// Taken (shared) first by every transaction that writes a projection through its views; a
/// rebuild's switch takes it exclusively, so no write lands on the old version mid-switch.
pub async fn lock_for_write(conn: &mut PgConnection, kind: Kind) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1, hashtext($2))")
        .bind(SWITCH_LOCK_NS)
        .bind(kind.name())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The exclusive side of [`lock_for_write`], held by a rebuild's switch transaction.
pub async fn lock_for_switch(conn: &mut PgConnection, kind: Kind) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(SWITCH_LOCK_NS)
        .bind(kind.name())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Which version of a projection's tables to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The active version, through the views; changes are announced (NOTIFY) on commit.
    Live,
    /// A specific version being rebuilt; nothing is announced (a rebuild has no side effects).
    Version(i32),
}

impl Target {
    pub fn table(self, base: &str) -> String {
        match self {
            Target::Live => base.to_owned(),
            Target::Version(v) => versioned(base, v),
        }
    }

    /// The clause that locks the rows a batch loads: live writers lock them in id order (a
    /// dead-letter replay may touch the same order); a rebuild is the only writer of its
    /// version.
    pub fn row_lock(self) -> &'static str {
        match self {
            Target::Live => "ORDER BY order_id FOR UPDATE",
            Target::Version(_) => "",
        }
    }
}

/// The distinct orders a batch touches, sorted.
pub fn touched_orders(events: &[Decoded]) -> Vec<uuid::Uuid> {
    let mut ids: Vec<_> = events.iter().map(|d| d.env.stream_id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

pub fn versioned(base: &str, version: i32) -> String {
    format!("{base}_v{version}")
}

/// An event ready to apply.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub env: Envelope,
    pub event: OrderEvent,
}

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

/// The per-version idempotency rule: at or below the applied version is a duplicate
/// (`Ok(false)`), the next version applies (`Ok(true)`), anything further is a gap.
pub fn next_version(env: &Envelope, at: i64) -> Result<bool, ApplyError> {
    if env.stream_version <= at {
        Ok(false)
    } else if env.stream_version == at + 1 {
        Ok(true)
    } else {
        Err(ApplyError::Gap {
            order_id: env.stream_id,
            got: env.stream_version,
            at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_by_name() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.name()), Some(k));
        }
        assert_eq!(Kind::parse("nope"), None);
    }

    #[test]
    fn targets_name_live_views_or_versioned_tables() {
        assert_eq!(Target::Live.table("order_summary"), "order_summary");
        assert_eq!(
            Target::Version(3).table("order_summary"),
            "order_summary_v3"
        );
    }
}

/// Envelopes for the folds' unit tests, built from wire JSON like real messages.
#[cfg(test)]
pub(crate) mod fixtures {
    use chrono::{DateTime, Utc};
    use serde_json::json;
    use uuid::Uuid;

    use super::Decoded;
    use crate::envelope::{Envelope, OrderEnvelope};

    pub fn event(
        id: Uuid,
        version: i64,
        at: &str,
        event_type: &str,
        payload: serde_json::Value,
    ) -> Decoded {
        let env = Envelope {
            event_id: Uuid::new_v4(),
            event_type: event_type.into(),
            schema_version: if event_type == "OrderPlaced" { 2 } else { 1 },
            stream_id: id,
            stream_type: "order".into(),
            stream_version: version,
            recorded_at: at.parse::<DateTime<Utc>>().unwrap(),
            metadata: serde_json::Value::Null,
            payload,
        };
        let event = env.event().expect("fixture decodes");
        Decoded { env, event }
    }

    /// SKU-1 x2 at 1250, SKU-2 x1 at 499, in EUR.
    pub fn placed(id: Uuid, at: &str) -> Decoded {
        event(
            id,
            1,
            at,
            "OrderPlaced",
            json!({
                "order_id": id, "customer_id": "alice", "currency": "EUR",
                "lines": [
                    {"sku": "SKU-1", "quantity": 2, "unit_price_minor": 1250, "line_total_minor": 2500},
                    {"sku": "SKU-2", "quantity": 1, "unit_price_minor": 499, "line_total_minor": 499}
                ],
                "total_minor": 2999,
                "shipping_address": {"name": "Ada", "line1": "1 Main St", "city": "Berlin", "postal_code": "10115", "country": "DE"},
                "payment_token": "tok_visa"
            }),
        )
    }

    pub fn reserved(id: Uuid, version: i64, at: &str) -> Decoded {
        event(
            id,
            version,
            at,
            "InventoryReserved",
            json!({"order_id": id, "reservation_id": "r-1"}),
        )
    }

    pub fn cancelled(id: Uuid, version: i64, at: &str) -> Decoded {
        event(
            id,
            version,
            at,
            "OrderCancelled",
            json!({
                "order_id": id, "reason": "changed my mind", "cancelled_by": "customer", "previous_status": "PENDING"
            }),
        )
    }
}

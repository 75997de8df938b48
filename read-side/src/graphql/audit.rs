//! The audit trail over GraphQL: `auditTrail`, for operators.
//!
//! Only the GraphQL types and the resolver; the events and the verification of their hash
//! chain come from [`crate::audit`] (the event store, not a projection).

use async_graphql::{Context, ID, Json, Object, SimpleObject};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{
    access::operator,
    errors::{internal, parse_id},
};
use crate::audit;

#[derive(SimpleObject)]
pub struct AuditEntry {
    pub position: i64,
    pub stream_version: i64,
    pub event_type: String,
    pub schema_version: i32,
    pub recorded_at: DateTime<Utc>,
    pub payload: Json<serde_json::Value>,
    pub metadata: Json<serde_json::Value>,
    /// SHA-256 chain hash, hex.
    pub hash: String,
}

#[derive(SimpleObject)]
pub struct AuditTrail {
    pub entries: Vec<AuditEntry>,
    /// The hash chain recomputes and matches the stream head.
    pub verified: bool,
    /// Stream version of the first broken event, when not verified.
    pub broken_at: Option<i64>,
}

/// The audit queries, merged into the schema's `QueryRoot`.
#[derive(Default)]
pub struct AuditQuery;

#[Object]
impl AuditQuery {
    /// Every stored event of an order with its metadata and hash, and whether the hash chain
    /// verifies. Operators only.
    #[graphql(complexity = "20 * child_complexity")]
    async fn audit_trail(
        &self,
        ctx: &Context<'_>,
        order_id: ID,
    ) -> async_graphql::Result<AuditTrail> {
        operator(ctx, "the audit trail")?;
        let id = parse_id(&order_id)?;
        let pool = ctx.data::<PgPool>()?;
        let audit::Trail { events, report } = audit::trail(pool, id).await.map_err(internal)?;
        Ok(AuditTrail {
            entries: events
                .into_iter()
                .map(|e| AuditEntry {
                    position: e.position,
                    stream_version: e.stream_version,
                    event_type: e.event_type,
                    schema_version: e.schema_version,
                    recorded_at: e.recorded_at,
                    payload: Json(e.payload),
                    metadata: Json(e.metadata),
                    hash: hex::encode(e.hash),
                })
                .collect(),
            verified: report.broken.is_none(),
            broken_at: report.broken.map(|b| b.stream_version),
        })
    }
}

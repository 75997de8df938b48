//! An order's stream in the event store: load it into the aggregate, append new events
//! with their outbox messages.

use domain::{
    order::{self, Order, OrderEvent},
    values::OrderId,
    wire,
};
use event_store::{Expected, Metadata, StoreError};
use sqlx::PgConnection;

use crate::records::{ORDER_STREAM, order_records};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("order {order_id} has an unreadable event: {error}")]
    Unreadable { order_id: OrderId, error: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// The order's state (`Order::NotPlaced` for an unknown id) and what to expect when appending.
pub async fn load(
    conn: &mut PgConnection,
    order_id: OrderId,
) -> Result<(Order, Expected), LoadError> {
    let (stored, expected) = event_store::load_stream(conn, order_id.0).await?;
    let events = stored
        .iter()
        .map(|e| wire::decode(&e.event_type, e.schema_version, &e.payload))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LoadError::Unreadable {
            order_id,
            error: e.to_string(),
        })?;
    Ok((order::replay(&events), expected))
}

/// Appends `events` (with their Kafka outbox messages) if the stream is at `expected`;
/// returns the new version.
#[tracing::instrument(name = "append", skip_all, fields(order_id = %order_id, expected = expected.version, events = events.len(), trace_id = tracing::field::Empty, span_id = tracing::field::Empty))]
pub async fn append(
    conn: &mut PgConnection,
    order_id: OrderId,
    expected: &Expected,
    events: &[OrderEvent],
    metadata: &Metadata,
) -> Result<i64, StoreError> {
    platform::trace::record_ids(&tracing::Span::current());
    let recorded_at = event_store::now_micros();
    let (stored, outbox) = order_records(
        order_id,
        expected.version + 1,
        events,
        metadata,
        recorded_at,
    );
    let out = event_store::append_at(
        conn,
        order_id.0,
        ORDER_STREAM,
        expected,
        &stored,
        &outbox,
        recorded_at,
    )
    .await?;
    Ok(out.version)
}

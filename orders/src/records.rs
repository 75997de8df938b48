//! From order events to what is stored and what is published.
//!
//! Each order event becomes one row in `events` and one outbox message for the Kafka topic
//! `orders.events`, keyed by order id. The message value is the event's
//! [`Envelope`](event_store::Envelope) and its headers are the envelope's: both built by
//! the event store, the one place that knows the wire shape. The outbox message id is the
//! event id: consumers deduplicate on it.

use chrono::{DateTime, Utc};
use domain::{order::OrderEvent, values::OrderId, wire};
use event_store::{Destination, Envelope, Metadata, NewEvent, OutboxMessage};
use uuid::Uuid;

/// Stream type of orders in the event store.
pub const ORDER_STREAM: &str = "order";
/// Topic of order events (the deployment's prefix is added by the relay).
pub const ORDER_EVENTS_TOPIC: &str = "orders.events";

/// The stored events and outbox messages for `events`, the first of which gets version
/// `first_version`.
pub fn order_records(
    order_id: OrderId,
    first_version: i64,
    events: &[OrderEvent],
    metadata: &Metadata,
    recorded_at: DateTime<Utc>,
) -> (Vec<NewEvent>, Vec<OutboxMessage>) {
    let mut stored = Vec::with_capacity(events.len());
    let mut outbox = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let enc = wire::encode(e);
        let event = NewEvent {
            event_id: Uuid::now_v7(),
            event_type: enc.event_type.to_owned(),
            schema_version: enc.schema_version,
            payload: enc.payload,
            metadata: metadata.clone(),
        };
        let envelope = Envelope::of_new(
            order_id.0,
            ORDER_STREAM,
            first_version + i as i64,
            &event,
            recorded_at,
        );
        outbox.push(OutboxMessage {
            message_id: event.event_id,
            destination: Destination::Kafka,
            target: ORDER_EVENTS_TOPIC.to_owned(),
            routing_key: order_id.to_string(),
            ordering_key: order_id.to_string(),
            headers: envelope.headers(),
            payload: envelope.to_bytes(),
        });
        stored.push(event);
    }
    (stored, outbox)
}

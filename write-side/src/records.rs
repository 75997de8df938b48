//! From domain events to what is stored and what is published.
//!
//! Each order event becomes one row in `events` and one outbox message for the Kafka topic
//! `orders.events`, keyed by order id. The message value is the envelope
//! (`schemas/envelope.v1.json`): the stored event with its metadata. The headers repeat what
//! consumers route and deduplicate on, so they need not parse the value first. The outbox
//! message id is the event id: consumers deduplicate on it.

use chrono::{DateTime, SecondsFormat, Utc};
use domain::{order::OrderEvent, values::OrderId, wire};
use event_store::{Destination, Metadata, NewEvent, OutboxMessage};
use serde_json::{Value, json};
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
        let envelope = envelope(
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
            headers: kafka_headers(&event),
            payload: serde_json::to_vec(&envelope).expect("envelope serializes"),
        });
        stored.push(event);
    }
    (stored, outbox)
}

pub fn envelope(
    stream_id: Uuid,
    stream_type: &str,
    version: i64,
    e: &NewEvent,
    recorded_at: DateTime<Utc>,
) -> Value {
    json!({
        "event_id": e.event_id,
        "event_type": e.event_type,
        "schema_version": e.schema_version,
        "stream_id": stream_id,
        "stream_type": stream_type,
        "stream_version": version,
        "recorded_at": recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        "metadata": e.metadata,
        "payload": e.payload,
    })
}

fn kafka_headers(e: &NewEvent) -> Value {
    let mut h = json!({
        "event_id": e.event_id.to_string(),
        "event_type": e.event_type,
        "schema_version": e.schema_version.to_string(),
        "correlation_id": e.metadata.correlation_id.to_string(),
        "causation_id": e.metadata.causation_id.to_string(),
        "content-type": "application/json",
    });
    if let Some(tp) = &e.metadata.traceparent {
        h["traceparent"] = json!(tp);
    }
    h
}

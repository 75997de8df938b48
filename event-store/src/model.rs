//! Rows going into and coming out of the store (outbox rows: [`crate::outbox`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Who and what caused an event; stored with it and carried to every broker message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The business transaction (for orders: the order id).
    pub correlation_id: Uuid,
    /// The message or request that caused this event.
    pub causation_id: Uuid,
    /// `role:subject` of the caller, e.g. `customer:c-42`, or `system:saga`.
    pub actor: String,
    /// W3C trace context of the request, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The command's idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
}

/// An event to append. Its version is given by its place in the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: Value,
    pub metadata: Metadata,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub position: i64,
    pub stream_id: Uuid,
    pub stream_type: String,
    pub stream_version: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: Value,
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
    /// The audit key that keyed `hash` (`None`: recorded unkeyed).
    pub hash_kid: Option<String>,
}

//! The envelope every order event travels in (`schemas/envelope.v1.json`).

use chrono::{DateTime, Utc};
use domain::{order::OrderEvent, wire};
use serde::Deserialize;
use uuid::Uuid;

#[derive(Debug, Clone, Deserialize)]
pub struct Envelope {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub stream_id: Uuid,
    pub stream_version: i64,
    pub recorded_at: DateTime<Utc>,
    pub payload: serde_json::Value,
}

/// Why a message could not be turned into a domain event (a poison message).
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("undecodable envelope: {0}")]
    Undecodable(#[from] serde_json::Error),
    #[error(transparent)]
    Event(#[from] wire::DecodeError),
}

impl Envelope {
    pub fn parse(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// The envelope of an event as stored (the source of truth, for replays and rebuilds).
    pub fn from_stored(e: event_store::StoredEvent) -> Self {
        Self {
            event_id: e.event_id,
            event_type: e.event_type,
            schema_version: e.schema_version,
            stream_id: e.stream_id,
            stream_version: e.stream_version,
            recorded_at: e.recorded_at,
            payload: e.payload,
        }
    }

    /// The domain event, upcast to the newest version of its type.
    pub fn event(&self) -> Result<OrderEvent, EnvelopeError> {
        Ok(wire::decode(
            &self.event_type,
            self.schema_version,
            &self.payload,
        )?)
    }
}

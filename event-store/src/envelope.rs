//! The one envelope every stored event travels in (`schemas/envelope.v1.json`), and the one
//! place broker message headers are built.
//!
//! The same shape goes to Kafka (the message value), is rebuilt from the store for replays
//! and rebuilds, and is what dead letters keep, so producers and consumers cannot drift
//! apart. Headers repeat what consumers route and deduplicate on
//! (ids, type, correlation, causation, trace context), so they need not parse the body.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::{NewEvent, StoredEvent};

/// A stored event with its place in its stream and its metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub stream_id: Uuid,
    #[serde(default)]
    pub stream_type: String,
    pub stream_version: i64,
    #[serde(serialize_with = "micros")]
    pub recorded_at: DateTime<Utc>,
    #[serde(default)]
    pub metadata: Value,
    pub payload: Value,
}

fn micros<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

impl Envelope {
    /// The envelope of an event about to be appended at `version` of its stream.
    pub fn of_new(
        stream_id: Uuid,
        stream_type: &str,
        version: i64,
        e: &NewEvent,
        recorded_at: DateTime<Utc>,
    ) -> Self {
        Self {
            event_id: e.event_id,
            event_type: e.event_type.clone(),
            schema_version: e.schema_version,
            stream_id,
            stream_type: stream_type.to_owned(),
            stream_version: version,
            recorded_at,
            metadata: serde_json::to_value(&e.metadata).expect("metadata serializes"),
            payload: e.payload.clone(),
        }
    }

    /// The envelope of an event as stored (the source of truth, for replays and rebuilds).
    pub fn from_stored(e: StoredEvent) -> Self {
        Self {
            event_id: e.event_id,
            event_type: e.event_type,
            schema_version: e.schema_version,
            stream_id: e.stream_id,
            stream_type: e.stream_type,
            stream_version: e.stream_version,
            recorded_at: e.recorded_at,
            metadata: e.metadata,
            payload: e.payload,
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("envelope serializes")
    }

    /// The Kafka headers of this event.
    /// Read straight from the metadata the envelope holds (no second decode of it: this
    /// runs for every appended event).
    pub fn headers(&self) -> Value {
        let mut h = Headers::default()
            .with("event_id", self.event_id.to_string())
            .with("event_type", &self.event_type)
            .with("schema_version", self.schema_version.to_string())
            .with("content-type", "application/json");
        for name in ["causation_id", "correlation_id", "traceparent"] {
            if let Some(v) = self.metadata[name].as_str() {
                h = h.with(name, v);
            }
        }
        h.into_value()
    }
}

/// Headers of a broker message: its cause and trace context, plus what its kind adds.
#[derive(Debug, Clone, Default)]
pub struct Headers(Map<String, Value>);

impl Headers {
    pub fn new(causation_id: Option<Uuid>, traceparent: Option<&str>) -> Self {
        let mut h = Self::default();
        if let Some(c) = causation_id {
            h = h.with("causation_id", c.to_string());
        }
        if let Some(t) = traceparent {
            h = h.with("traceparent", t);
        }
        h
    }

    /// Adds a string header.
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.0.insert(name.to_owned(), json!(value.into()));
        self
    }

    pub fn into_value(self) -> Value {
        Value::Object(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Metadata;

    fn event() -> NewEvent {
        NewEvent {
            event_id: Uuid::now_v7(),
            event_type: "OrderPlaced".into(),
            schema_version: 2,
            payload: json!({"a": 1}),
            metadata: Metadata {
                correlation_id: Uuid::now_v7(),
                causation_id: Uuid::now_v7(),
                actor: "customer:c-1".into(),
                traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
                command_id: None,
            },
        }
    }

    #[test]
    fn an_envelope_round_trips_and_keeps_microseconds() {
        let e = event();
        let at = crate::now_micros();
        let env = Envelope::of_new(Uuid::now_v7(), "order", 3, &e, at);
        let back = Envelope::parse(&env.to_bytes()).unwrap();
        assert_eq!(back, env);
        let v: Value = serde_json::from_slice(&env.to_bytes()).unwrap();
        assert_eq!(v["stream_version"], 3);
        assert!(v["recorded_at"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn kafka_headers_carry_ids_cause_and_trace() {
        let e = event();
        let env = Envelope::of_new(Uuid::now_v7(), "order", 1, &e, crate::now_micros());
        let h = env.headers();
        assert_eq!(h["event_id"], e.event_id.to_string());
        assert_eq!(h["event_type"], "OrderPlaced");
        assert_eq!(h["schema_version"], "2");
        assert_eq!(h["causation_id"], e.metadata.causation_id.to_string());
        assert_eq!(h["correlation_id"], e.metadata.correlation_id.to_string());
        assert_eq!(h["traceparent"], e.metadata.traceparent.clone().unwrap());
        assert_eq!(h["content-type"], "application/json");
    }
}

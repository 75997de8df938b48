//! The per-stream hash chain: `hash = SHA-256(prev_hash || canonical(event))`.
//!
//! The canonical form must come out identical when computed at append time (from the values
//! the writer holds) and at verification time (from what PostgreSQL returns). JSON is written
//! with object keys sorted recursively and no whitespace, which does not depend on how jsonb
//! stored the keys nor on serde_json's map ordering feature; time is whole microseconds (the
//! precision of `timestamptz`).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The `prev_hash` of a stream's first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// The parts of a stored event that the chain covers.
#[derive(Clone, Copy)]
pub struct HashInput<'a> {
    pub stream_id: Uuid,
    pub stream_version: i64,
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub schema_version: i32,
    pub payload: &'a Value,
    pub metadata: &'a Value,
    pub recorded_at: DateTime<Utc>,
}

pub fn chain_hash(prev_hash: &[u8], e: &HashInput<'_>) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(prev_hash);
    h.update(e.stream_id.as_bytes());
    h.update(e.stream_version.to_be_bytes());
    h.update(e.event_id.as_bytes());
    // Length-prefixed strings so field boundaries cannot shift.
    for part in [
        e.event_type.as_bytes(),
        canonical_json(e.payload).as_bytes(),
        canonical_json(e.metadata).as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(e.schema_version.to_be_bytes());
    h.update(e.recorded_at.timestamp_micros().to_be_bytes());
    h.finalize().to_vec()
}

/// JSON with keys sorted at every level and no insignificant whitespace.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_ignores_key_order() {
        let a = json!({"b": 1, "a": {"d": [1, {"y": 2, "x": 1}], "c": "s"}});
        let b: Value =
            serde_json::from_str(r#"{"a":{"c":"s","d":[1,{"x":1,"y":2}]},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"c":"s","d":[1,{"x":1,"y":2}]},"b":1}"#
        );
    }

    #[test]
    fn any_change_changes_the_hash() {
        let payload = json!({"x": 1});
        let meta = json!({});
        let at = DateTime::from_timestamp_micros(1_700_000_000_000_000).unwrap();
        let base = HashInput {
            stream_id: Uuid::from_u128(1),
            stream_version: 1,
            event_id: Uuid::from_u128(2),
            event_type: "T",
            schema_version: 1,
            payload: &payload,
            metadata: &meta,
            recorded_at: at,
        };
        let h = chain_hash(&GENESIS, &base);
        let other_payload = json!({"x": 2});
        assert_ne!(
            h,
            chain_hash(
                &GENESIS,
                &HashInput {
                    payload: &other_payload,
                    ..base
                }
            )
        );
        assert_ne!(
            h,
            chain_hash(
                &GENESIS,
                &HashInput {
                    stream_version: 2,
                    ..base
                }
            )
        );
        assert_ne!(
            h,
            chain_hash(
                &GENESIS,
                &HashInput {
                    recorded_at: at + chrono::Duration::microseconds(1),
                    ..base
                }
            )
        );
        assert_eq!(h, chain_hash(&GENESIS, &base));
        assert_ne!(h, chain_hash(&[1; 32], &base));
    }
}

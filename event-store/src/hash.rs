//! The per-stream hash chain: `hash = HMAC-SHA-256(key, prev_hash || canonical(event))`,
//! keyed by the process's audit key (named by `hash_kid` on every event), or
//! `SHA-256(prev_hash || canonical(event))` for events recorded without a key (before keys
//! existed, or in development mode without one).
//!
//! Why keyed: an unkeyed chain only proves that nobody edited an event *without* also
//! recomputing the chain, and whoever can write the database can recompute it. The key lives
//! outside the database (`AUDIT_KEYS_FILE`, `platform::keys`), so rewriting history needs the
//! key too. The process installs its keys once at start ([`install_chain_keys`]), like its
//! logger: every append in the process signs with the first key, and verification finds any
//! listed key by name.
//!
//! The canonical form must come out identical when computed at append time (from the values
//! the writer holds) and at verification time (from what PostgreSQL returns). JSON is written
//! with object keys sorted recursively and no whitespace, which does not depend on how jsonb
//! stored the keys nor on serde_json's map ordering feature; time is whole microseconds (the
//! precision of `timestamptz`).

use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
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

/// Feeds what the chain covers, in order, to `update`.
fn feed(prev_hash: &[u8], e: &HashInput<'_>, mut update: impl FnMut(&[u8])) {
    update(prev_hash);
    update(e.stream_id.as_bytes());
    update(&e.stream_version.to_be_bytes());
    update(e.event_id.as_bytes());
    // Length-prefixed strings so field boundaries cannot shift.
    for part in [
        e.event_type.as_bytes(),
        canonical_json(e.payload).as_bytes(),
        canonical_json(e.metadata).as_bytes(),
    ] {
        update(&(part.len() as u64).to_be_bytes());
        update(part);
    }
    update(&e.schema_version.to_be_bytes());
    update(&e.recorded_at.timestamp_micros().to_be_bytes());
}

impl crate::StoredEvent {
    /// What the chain covers of this stored event.
    pub fn hash_input(&self) -> HashInput<'_> {
        HashInput {
            stream_id: self.stream_id,
            stream_version: self.stream_version,
            event_id: self.event_id,
            event_type: &self.event_type,
            schema_version: self.schema_version,
            payload: &self.payload,
            metadata: &self.metadata,
            recorded_at: self.recorded_at,
        }
    }
}

/// The unkeyed link: SHA-256 (events recorded without a key).
pub fn chain_hash(prev_hash: &[u8], e: &HashInput<'_>) -> Vec<u8> {
    let mut h = Sha256::new();
    feed(prev_hash, e, |b| h.update(b));
    h.finalize().to_vec()
}

/// The keyed link: HMAC-SHA-256 with `secret`.
pub fn keyed_chain_hash(secret: &[u8], prev_hash: &[u8], e: &HashInput<'_>) -> Vec<u8> {
    let mut h = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    feed(prev_hash, e, |b| h.update(b));
    h.finalize().into_bytes().to_vec()
}

/// The audit keys of this process, the first one signing.
#[derive(Clone, PartialEq, Eq)]
pub struct ChainKeys(Vec<(String, Vec<u8>)>);

impl std::fmt::Debug for ChainKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.0.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_tuple("ChainKeys").field(&kids).finish()
    }
}

impl ChainKeys {
    /// `(kid, secret)` pairs, the first one signing; `None` if empty.
    pub fn new(keys: Vec<(String, Vec<u8>)>) -> Option<Self> {
        (!keys.is_empty()).then_some(Self(keys))
    }

    fn signing(&self) -> (&str, &[u8]) {
        let (kid, secret) = &self.0[0];
        (kid, secret)
    }

    fn get(&self, kid: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k == kid)
            .map(|(_, s)| s.as_slice())
    }
}

static KEYS: OnceLock<ChainKeys> = OnceLock::new();

/// Installing other keys after some were installed (a process has one set).
#[derive(Debug, thiserror::Error)]
#[error("other audit keys are installed already ({0:?})")]
pub struct KeysAlreadyInstalled(ChainKeys);

/// Makes `keys` the process's audit keys: appends sign with the first, verification finds
/// any. Installing the same keys again is a no-op; other keys are refused.
pub fn install_chain_keys(keys: ChainKeys) -> Result<(), KeysAlreadyInstalled> {
    let installed = KEYS.get_or_init(|| keys.clone());
    if *installed == keys {
        Ok(())
    } else {
        Err(KeysAlreadyInstalled(installed.clone()))
    }
}

/// The link for a new event: keyed with the signing key when keys are installed (and its
/// kid), unkeyed otherwise.
pub fn sign(prev_hash: &[u8], e: &HashInput<'_>) -> (Vec<u8>, Option<&'static str>) {
    match KEYS.get() {
        Some(keys) => {
            let (kid, secret) = keys.signing();
            (keyed_chain_hash(secret, prev_hash, e), Some(kid))
        }
        None => (chain_hash(prev_hash, e), None),
    }
}

/// The link a stored event should have, recomputed with the key its `hash_kid` names;
/// `Err(kid)` when this process does not hold that key.
pub fn recompute(
    kid: Option<&str>,
    prev_hash: &[u8],
    e: &HashInput<'_>,
) -> Result<Vec<u8>, String> {
    match kid {
        None => Ok(chain_hash(prev_hash, e)),
        Some(kid) => KEYS
            .get()
            .and_then(|k| k.get(kid))
            .map(|secret| keyed_chain_hash(secret, prev_hash, e))
            .ok_or_else(|| kid.to_owned()),
    }
}

/// The kid of the key that signs (appends and checkpoints), if keys are installed.
pub fn signing_kid() -> Option<&'static str> {
    KEYS.get().map(|keys| keys.signing().0)
}

/// HMAC-SHA-256 of `message` with the key named `kid`, or with the signing key when `kid` is
/// `None` (returning its kid): signs and checks audit checkpoints.
pub fn mac(kid: Option<&str>, message: &[u8]) -> Option<(String, Vec<u8>)> {
    let keys = KEYS.get()?;
    let (kid, secret) = match kid {
        Some(kid) => (kid, keys.get(kid)?),
        None => keys.signing(),
    };
    let mut h = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    h.update(message);
    Some((kid.to_owned(), h.finalize().into_bytes().to_vec()))
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
        // Keyed: another key, or no key, gives another link.
        let k1 = keyed_chain_hash(b"key-one", &GENESIS, &base);
        assert_ne!(k1, keyed_chain_hash(b"key-two", &GENESIS, &base));
        assert_ne!(k1, h);
        assert_eq!(k1, keyed_chain_hash(b"key-one", &GENESIS, &base));
    }
}

//! The vault: per-customer data keys that seal personal data, wrapped by a master key kept
//! outside the database, and deleted to forget a customer (crypto-shredding).
//!
//! Why: events are append-only and hash-chained, and copies of them live in Kafka, RabbitMQ,
//! dead letters and saga state. Deleting one key is the only erasure that reaches every copy
//! at once without rewriting history. So personal data is written only as a
//! [`domain::personal::Sealed`] box: AES-256-GCM under the customer's data key, with a context
//! (e.g. `order:<id>:shipping_address`) as associated data so a box cannot be moved into
//! another event and still open.
//!
//! Keys: each customer has one active data key (`customer_keys`, owned by this module: no
//! other code reads or writes that table). It is stored wrapped (AES-256-GCM) by a key-
//! encryption key derived from the master key (`MASTER_KEYS` / `MASTER_KEYS_FILE`, the
//! [`crate::keys`] convention: the first key wraps new data keys, every key unwraps, so a
//! master-key rotation keeps old data keys readable). Whoever reads the database alone holds
//! only wrapped keys and ciphertext.
//!
//! Forgetting deletes the customer's keys: from then on [`Vault::open`] answers `None`
//! ("erased") for every box they sealed, wherever it is stored. A customer who comes back
//! later gets a new key, which opens nothing sealed before.

use std::collections::HashSet;

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, Payload},
};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use domain::personal::{ERASED, Sealed};
use hmac::{Hmac, Mac};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use sha2::Sha256;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::keys::{KeyError, Keyring};

/// The keyring name: `MASTER_KEYS` / `MASTER_KEYS_FILE`.
pub const MASTER: &str = "MASTER";

/// Labels the key-encryption key derived from a master secret (so the same secret used
/// elsewhere by mistake would still give a different key).
const KEK_LABEL: &[u8] = b"shop/customer-data-key-wrapping/v1";

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// A data key is wrapped by a master key this process does not hold.
    #[error("data key {key_id} is wrapped by master key `{kid}`, which is not configured")]
    UnknownMasterKey { key_id: Uuid, kid: String },
    /// The configured master key of this name does not unwrap the keys it wrapped.
    #[error(
        "master key `{0}` does not unwrap the data keys it wrapped: a wrong secret under that name?"
    )]
    WrongMasterKey(String),
    /// A wrapped key or a box does not open: altered, or moved from another context.
    #[error("{0} does not authenticate (altered or moved)")]
    Tampered(&'static str),
    /// Opened, but not the type expected (no detail: serde's message could quote the
    /// decrypted value).
    #[error("a sealed value is not valid JSON of its type")]
    Decode,
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// The key-encryption keys, derived from the master keyring; the first wraps.
pub struct MasterKeys {
    keys: Vec<(String, Aes256Gcm)>,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("MasterKeys").field("kids", &kids).finish()
    }
}

impl MasterKeys {
    pub fn from_keyring(ring: &Keyring) -> Self {
        let keys = ring
            .entries()
            .into_iter()
            .map(|(kid, secret)| {
                let mut mac =
                    <Hmac<Sha256> as Mac>::new_from_slice(&secret).expect("any key length");
                mac.update(KEK_LABEL);
                let kek = mac.finalize().into_bytes();
                (kid, Aes256Gcm::new(&kek))
            })
            .collect();
        Self { keys }
    }

    /// The master keys configured by `MASTER_KEYS` or `MASTER_KEYS_FILE`; required (there is
    /// no default, in development either: scripts/lib.sh makes one per checkout).
    pub fn configured(
        inline: Option<&str>,
        file: Option<&std::path::Path>,
    ) -> Result<Self, KeyError> {
        Keyring::configured(MASTER, inline, file)?
            .map(|ring| Self::from_keyring(&ring))
            .ok_or_else(|| KeyError::Missing {
                name: MASTER.into(),
                hint: "the key that wraps customers' data keys; scripts/lib.sh makes one".into(),
            })
    }

    /// The kids of the configured master keys.
    pub fn kids(&self) -> Vec<String> {
        self.keys.iter().map(|(k, _)| k.clone()).collect()
    }

    /// A wrapped key is bound to its id and its customer: a row moved to another customer
    /// (so that forgetting the first would miss it) no longer unwraps.
    fn binding(key_id: Uuid, customer_id: &str) -> Vec<u8> {
        let mut aad = key_id.as_bytes().to_vec();
        aad.extend_from_slice(customer_id.as_bytes());
        aad
    }

    fn wrap(&self, key_id: Uuid, customer_id: &str, key: &[u8; 32]) -> (String, Vec<u8>) {
        let (kid, kek) = &self.keys[0];
        let nonce: [u8; 12] = rand::random();
        let mut out = nonce.to_vec();
        out.extend(
            kek.encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: key,
                    aad: &Self::binding(key_id, customer_id),
                },
            )
            .expect("AES-GCM encrypts any key"),
        );
        (kid.clone(), out)
    }

    fn unwrap(
        &self,
        key_id: Uuid,
        customer_id: &str,
        kid: &str,
        wrapped: &[u8],
    ) -> Result<DataKey, VaultError> {
        let (_, kek) = self.keys.iter().find(|(k, _)| k == kid).ok_or_else(|| {
            VaultError::UnknownMasterKey {
                key_id,
                kid: kid.to_owned(),
            }
        })?;
        if wrapped.len() < 12 {
            return Err(VaultError::Tampered("a wrapped data key"));
        }
        let (nonce, ciphertext) = wrapped.split_at(12);
        let key = kek
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &Self::binding(key_id, customer_id),
                },
            )
            .map_err(|_| VaultError::Tampered("a wrapped data key"))?;
        let cipher =
            Aes256Gcm::new_from_slice(&key).map_err(|_| VaultError::Tampered("a data key"))?;
        Ok(DataKey { key_id, cipher })
    }
}

/// One customer's data key, unwrapped: seals and opens boxes.
#[derive(Clone)]
pub struct DataKey {
    pub key_id: Uuid,
    cipher: Aes256Gcm,
}

impl DataKey {
    /// A random key that is never stored (tests and benchmarks).
    pub fn ephemeral() -> Self {
        let key: [u8; 32] = rand::random();
        Self {
            key_id: Uuid::now_v7(),
            cipher: Aes256Gcm::new(&key.into()),
        }
    }

    /// Seals `value` as JSON, bound to `context`.
    pub fn seal<T: Serialize>(&self, context: &str, value: &T) -> Sealed {
        let plaintext = serde_json::to_vec(value).expect("personal values serialize");
        let nonce: [u8; 12] = rand::random();
        let ciphertext = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plaintext,
                    aad: context.as_bytes(),
                },
            )
            .expect("AES-GCM encrypts any message");
        Sealed {
            key_id: self.key_id,
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(ciphertext),
        }
    }

    /// Opens a box this key sealed under `context`.
    pub fn open<T: DeserializeOwned>(
        &self,
        context: &str,
        sealed: &Sealed,
    ) -> Result<T, VaultError> {
        let tampered = || VaultError::Tampered("a sealed value");
        if sealed.key_id != self.key_id {
            return Err(tampered());
        }
        let nonce = B64.decode(&sealed.nonce).map_err(|_| tampered())?;
        let ciphertext = B64.decode(&sealed.ciphertext).map_err(|_| tampered())?;
        if nonce.len() != 12 {
            return Err(tampered());
        }
        let plaintext = self
            .cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| tampered())?;
        serde_json::from_slice(&plaintext).map_err(|_| VaultError::Decode)
    }
}

/// The vault: the master keys and the `customer_keys` table behind them.
#[derive(Clone)]
pub struct Vault {
    master: std::sync::Arc<MasterKeys>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.master.fmt(f)
    }
}

impl Vault {
    pub fn new(master: MasterKeys) -> Self {
        Self {
            master: std::sync::Arc::new(master),
        }
    }

    /// The customer's active data key, made (and stored wrapped) on first use. Concurrent
    /// first uses agree on one key: the loser of the insert reads the winner's.
    ///
    /// Call it outside the transaction that writes what the key seals, so a new key commits
    /// at once: an erasure running alongside then sees it and deletes it (what it sealed is
    /// unreadable, as it should be). A key made inside a longer transaction would be
    /// invisible to that erasure until the commit, and would outlive it.
    pub async fn key_for(
        &self,
        conn: &mut PgConnection,
        customer_id: &str,
    ) -> Result<DataKey, VaultError> {
        if let Some(key) = self.active_key(conn, customer_id).await? {
            return Ok(key);
        }
        let key_id = Uuid::now_v7();
        let secret: [u8; 32] = rand::random();
        let (kid, wrapped) = self.master.wrap(key_id, customer_id, &secret);
        sqlx::query(
            "INSERT INTO customer_keys (key_id, customer_id, master_kid, wrapped)
             VALUES ($1, $2, $3, $4) ON CONFLICT (customer_id) DO NOTHING",
        )
        .bind(key_id)
        .bind(customer_id)
        .bind(&kid)
        .bind(&wrapped)
        .execute(&mut *conn)
        .await?;
        self.active_key(conn, customer_id)
            .await?
            .ok_or(VaultError::Tampered("a data key that was just stored"))
    }

    async fn active_key(
        &self,
        conn: &mut PgConnection,
        customer_id: &str,
    ) -> Result<Option<DataKey>, VaultError> {
        let row: Option<(Uuid, String, Vec<u8>)> = sqlx::query_as(
            "SELECT key_id, master_kid, wrapped FROM customer_keys WHERE customer_id = $1",
        )
        .bind(customer_id)
        .fetch_optional(&mut *conn)
        .await?;
        row.map(|(id, kid, wrapped)| self.master.unwrap(id, customer_id, &kid, &wrapped))
            .transpose()
    }

    /// The data key `key_id`, or `None` once its customer was forgotten.
    pub async fn key(
        &self,
        conn: &mut PgConnection,
        key_id: Uuid,
    ) -> Result<Option<DataKey>, VaultError> {
        let row: Option<(String, String, Vec<u8>)> = sqlx::query_as(
            "SELECT customer_id, master_kid, wrapped FROM customer_keys WHERE key_id = $1",
        )
        .bind(key_id)
        .fetch_optional(&mut *conn)
        .await?;
        row.map(|(customer, kid, wrapped)| self.master.unwrap(key_id, &customer, &kid, &wrapped))
            .transpose()
    }

    /// Checks, before a process seals or opens anything, that the configured master keys
    /// unwrap the stored data keys: every master key named by a stored data key is
    /// configured, and each configured one unwraps a key it wrapped. A wrong or missing
    /// master key would otherwise fail every checkout's shipment, one message at a time.
    pub async fn check(&self, conn: &mut PgConnection) -> Result<(), VaultError> {
        let kids = self.master.kids();
        let unknown: Option<(Uuid, String)> = sqlx::query_as(
            "SELECT key_id, master_kid FROM customer_keys WHERE master_kid <> ALL($1) LIMIT 1",
        )
        .bind(&kids)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some((key_id, kid)) = unknown {
            return Err(VaultError::UnknownMasterKey { key_id, kid });
        }
        for kid in &kids {
            let sample: Option<(Uuid, String, Vec<u8>)> = sqlx::query_as(
                "SELECT key_id, customer_id, wrapped FROM customer_keys WHERE master_kid = $1 LIMIT 1",
            )
            .bind(kid)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some((key_id, customer, wrapped)) = sample {
                self.master
                    .unwrap(key_id, &customer, kid, &wrapped)
                    .map_err(|_| VaultError::WrongMasterKey(kid.clone()))?;
            }
        }
        Ok(())
    }

    /// Opens a box, or `None` when its key was deleted (the customer was forgotten).
    pub async fn open<T: DeserializeOwned>(
        &self,
        conn: &mut PgConnection,
        context: &str,
        sealed: &Sealed,
    ) -> Result<Option<T>, VaultError> {
        match self.key(conn, sealed.key_id).await? {
            Some(key) => key.open(context, sealed).map(Some),
            None => Ok(None),
        }
    }
}

/// Deletes the customer's data keys: everything they sealed becomes unreadable everywhere.
/// Returns how many keys went (0 when already forgotten or never keyed).
pub async fn forget(conn: &mut PgConnection, customer_id: &str) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM customer_keys WHERE customer_id = $1")
            .bind(customer_id)
            .execute(&mut *conn)
            .await?
            .rows_affected(),
    )
}

/// Which of `key_ids` still exist (their customers were not forgotten), asked at once.
pub async fn live_keys(
    conn: &mut PgConnection,
    key_ids: &[Uuid],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    Ok(
        sqlx::query_scalar("SELECT key_id FROM customer_keys WHERE key_id = ANY($1)")
            .bind(key_ids)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect(),
    )
}

/// A stored message as an operator sees it (`shop dlq show`, the console): when it is JSON,
/// the value with [`mark_erased`] applied; `None` when it is not JSON (shown as text).
pub async fn shown_message(
    conn: &mut PgConnection,
    body: &[u8],
) -> Result<Option<Value>, sqlx::Error> {
    let Ok(mut value) = serde_json::from_slice::<Value>(body) else {
        return Ok(None);
    };
    mark_erased(conn, [&mut value]).await?;
    Ok(Some(value))
}

/// Replaces, in a payload shown to a person (audit trail, dead letters), every sealed box whose
/// key is gone by `"erased"`; boxes still keyed stay as ciphertext (nothing here decrypts).
/// Needs no master key: only whether each key still exists, asked once for all `values`.
pub async fn mark_erased<'v>(
    conn: &mut PgConnection,
    values: impl IntoIterator<Item = &'v mut Value>,
) -> Result<(), sqlx::Error> {
    let values: Vec<&mut Value> = values.into_iter().collect();
    let mut ids = Vec::new();
    for v in &values {
        visit_sealed(v, &mut |s| ids.push(s.key_id));
    }
    if ids.is_empty() {
        return Ok(());
    }
    let live = live_keys(conn, &ids).await?;
    for v in values {
        replace_erased(v, &live);
    }
    Ok(())
}

/// The `{"sealed": {..}}` objects in `value`, depth first.
fn visit_sealed(value: &Value, f: &mut impl FnMut(Sealed)) {
    match value {
        Value::Object(map) => {
            if let Some(s) = as_sealed(value) {
                f(s);
                return;
            }
            map.values().for_each(|v| visit_sealed(v, f));
        }
        Value::Array(items) => items.iter().for_each(|v| visit_sealed(v, f)),
        _ => {}
    }
}

fn as_sealed(value: &Value) -> Option<Sealed> {
    let map = value.as_object()?;
    if map.len() != 1 {
        return None;
    }
    serde_json::from_value(map.get("sealed")?.clone()).ok()
}

fn replace_erased(value: &mut Value, live: &HashSet<Uuid>) {
    if let Some(s) = as_sealed(value) {
        if !live.contains(&s.key_id) {
            *value = Value::String(ERASED.into());
        }
        return;
    }
    match value {
        Value::Object(map) => map.values_mut().for_each(|v| replace_erased(v, live)),
        Value::Array(items) => items.iter_mut().for_each(|v| replace_erased(v, live)),
        _ => {}
    }
}

/// Tests that need a vault without a configured master key.
pub fn ephemeral() -> Vault {
    Vault::new(MasterKeys::from_keyring(&Keyring::ephemeral(
        "master-ephemeral",
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_box_opens_only_with_its_key_and_context() {
        let key = DataKey::ephemeral();
        let sealed = key.seal("order:1:address", &json!({"line1": "1 Main St"}));
        assert!(!sealed.ciphertext.contains("Main"));
        let back: Value = key.open("order:1:address", &sealed).unwrap();
        assert_eq!(back["line1"], "1 Main St");
        assert!(key.open::<Value>("order:2:address", &sealed).is_err());
        let other = DataKey::ephemeral();
        assert!(other.open::<Value>("order:1:address", &sealed).is_err());
        let mut altered = sealed.clone();
        altered.ciphertext = B64.encode(b"0123456789abcdef0123456789");
        assert!(key.open::<Value>("order:1:address", &altered).is_err());
    }

    #[test]
    fn wrapped_keys_unwrap_under_any_configured_master_key_and_only_for_their_id() {
        let old = Keyring::parse_inline("MASTER", "m-1=0123456789abcdef0123456789abcdef").unwrap();
        let rotated = Keyring::parse_inline(
            "MASTER",
            "m-2=fedcba9876543210fedcba9876543210,m-1=0123456789abcdef0123456789abcdef",
        )
        .unwrap();
        let id = Uuid::now_v7();
        let (kid, wrapped) = MasterKeys::from_keyring(&old).wrap(id, "alice", &[7; 32]);
        assert_eq!(kid, "m-1");
        let after_rotation = MasterKeys::from_keyring(&rotated);
        assert!(after_rotation.unwrap(id, "alice", &kid, &wrapped).is_ok());
        assert!(
            after_rotation
                .unwrap(Uuid::now_v7(), "alice", &kid, &wrapped)
                .is_err()
        );
        // Moved to another customer, it does not unwrap.
        assert!(
            after_rotation
                .unwrap(id, "mallory", &kid, &wrapped)
                .is_err()
        );
        assert!(matches!(
            MasterKeys::from_keyring(
                &Keyring::parse_inline("MASTER", "m-3=fedcba9876543210fedcba9876543210").unwrap()
            )
            .unwrap(id, "alice", &kid, &wrapped),
            Err(VaultError::UnknownMasterKey { .. })
        ));
        assert_eq!(after_rotation.wrap(id, "alice", &[7; 32]).0, "m-2");
    }

    #[test]
    fn erased_boxes_are_replaced_and_live_ones_kept() {
        let (gone, kept) = (DataKey::ephemeral(), DataKey::ephemeral());
        let mut v = json!({
            "a": {"sealed": serde_json::to_value(gone.seal("x", &1)).unwrap()},
            "b": [{"sealed": serde_json::to_value(kept.seal("x", &2)).unwrap()}],
            "c": {"sealed": "not a box"},
        });
        let mut ids = Vec::new();
        visit_sealed(&v, &mut |s| ids.push(s.key_id));
        assert_eq!(ids.len(), 2);
        replace_erased(&mut v, &HashSet::from([kept.key_id]));
        assert_eq!(v["a"], json!(ERASED));
        assert!(v["b"][0]["sealed"]["ciphertext"].is_string());
        assert_eq!(v["c"], json!({"sealed": "not a box"}));
    }
}

//! Signed audit checkpoints: the head (version and hash) of every stream and the global
//! position at one moment, signed with the audit key, kept outside the database.
//!
//! Why: the chain inside the database proves each stream is consistent with itself, so it
//! cannot see what was removed whole (a stream, events and head) or cut consistently (a tail
//! removed and the head row moved back), and an unkeyed chain can be recomputed by whoever
//! writes the database. A checkpoint written to a file the database cannot reach fixes a
//! point in history: every stream it names must still exist, reach at least its version, and
//! have the same hash there; and no event after `keyed_from` may be unkeyed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::hash::{self, canonical_json};

/// The format name written into every checkpoint.
pub const FORMAT: &str = "shop-audit-checkpoint/1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHead {
    pub stream_id: Uuid,
    pub version: i64,
    /// Hex of the hash of the event at `version`.
    pub head: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub format: String,
    pub created_at: DateTime<Utc>,
    /// The highest event position committed when it was taken.
    pub position: i64,
    /// Position of the first keyed event then; no event from there on may be unkeyed.
    pub keyed_from: Option<i64>,
    pub streams: Vec<StreamHead>,
    /// The audit key that signed it.
    pub kid: String,
    /// Hex HMAC-SHA-256 of the canonical JSON of every other field.
    pub mac: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("no audit key is installed: checkpoints are signed (AUDIT_KEYS_FILE)")]
    NoKey,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// What a checkpoint shows about the database now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The checkpoint's own signature does not verify (or names a key not held).
    BadSignature,
    /// A stream the checkpoint names has no events any more.
    StreamDeleted { stream_id: Uuid },
    /// A stream ends before the version the checkpoint saw.
    Truncated {
        stream_id: Uuid,
        checkpoint_version: i64,
        now: i64,
    },
    /// The event at the checkpoint's version has another hash: history before it changed.
    Rewritten { stream_id: Uuid, version: i64 },
    /// An event after `keyed_from` carries no key: recomputed without it.
    Unkeyed { position: i64, stream_id: Uuid },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::BadSignature => write!(
                f,
                "BadSignature: the checkpoint's signature does not verify with the audit keys"
            ),
            Finding::StreamDeleted { stream_id } => write!(f, "StreamDeleted {stream_id}"),
            Finding::Truncated {
                stream_id,
                checkpoint_version,
                now,
            } => write!(
                f,
                "Truncated {stream_id}: version {checkpoint_version} then, {now} event(s) now"
            ),
            Finding::Rewritten { stream_id, version } => write!(
                f,
                "Rewritten {stream_id}: the event at version {version} is not the one checkpointed"
            ),
            Finding::Unkeyed {
                position,
                stream_id,
            } => write!(
                f,
                "Unkeyed {stream_id}: the event at position {position} carries no audit key"
            ),
        }
    }
}

impl Finding {
    /// The stream it is about, if any.
    pub fn stream_id(&self) -> Option<Uuid> {
        match self {
            Finding::BadSignature => None,
            Finding::StreamDeleted { stream_id }
            | Finding::Truncated { stream_id, .. }
            | Finding::Rewritten { stream_id, .. }
            | Finding::Unkeyed { stream_id, .. } => Some(*stream_id),
        }
    }
}

/// The bytes the MAC covers: every field but `mac`, as canonical JSON.
fn signed_bytes(c: &Checkpoint) -> Vec<u8> {
    let mut v = serde_json::to_value(c).expect("a checkpoint serializes");
    v.as_object_mut().expect("an object").remove("mac");
    canonical_json(&v).into_bytes()
}

/// Takes a checkpoint of the committed state, signed with the signing audit key.
pub async fn take(conn: &mut PgConnection) -> Result<Checkpoint, CheckpointError> {
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let heads: Vec<(Uuid, i64, Vec<u8>)> =
        sqlx::query_as("SELECT stream_id, version, head_hash FROM streams ORDER BY stream_id")
            .fetch_all(&mut *tx)
            .await?;
    let (position, keyed_from): (Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT max(position), min(position) FILTER (WHERE hash_kid IS NOT NULL) FROM events",
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut c = Checkpoint {
        format: FORMAT.into(),
        created_at: Utc::now(),
        position: position.unwrap_or(0),
        keyed_from,
        streams: heads
            .into_iter()
            .map(|(stream_id, version, head)| StreamHead {
                stream_id,
                version,
                head: hex::encode(head),
            })
            .collect(),
        kid: String::new(),
        mac: String::new(),
    };
    c.kid = hash::signing_kid()
        .ok_or(CheckpointError::NoKey)?
        .to_owned();
    let (_, mac) = hash::mac(Some(&c.kid), &signed_bytes(&c)).ok_or(CheckpointError::NoKey)?;
    c.mac = hex::encode(mac);
    Ok(c)
}

/// Whether the checkpoint's signature verifies with the key it names.
pub fn signature_ok(c: &Checkpoint) -> bool {
    let Ok(claimed) = hex::decode(&c.mac) else {
        return false;
    };
    match hash::mac(Some(&c.kid), &signed_bytes(c)) {
        // Constant-time comparison is not needed here: the verifier holds the key, the file
        // is not an oracle an attacker can query.
        Some((_, mac)) => c.format == FORMAT && mac == claimed,
        None => false,
    }
}

/// Everything the checkpoint shows to be wrong with the database now (empty: consistent with
/// it). Check each stream's own chain too (`audit::verify_all`): this compares only what the
/// checkpoint fixed.
pub async fn compare(conn: &mut PgConnection, c: &Checkpoint) -> Result<Vec<Finding>, sqlx::Error> {
    if !signature_ok(c) {
        return Ok(vec![Finding::BadSignature]);
    }
    // Every checkpointed stream's event count and hash at its version, in one query.
    let ids: Vec<Uuid> = c.streams.iter().map(|s| s.stream_id).collect();
    let versions: Vec<i64> = c.streams.iter().map(|s| s.version).collect();
    let now: Vec<(i64, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events e WHERE e.stream_id = c.id),
                (SELECT hash FROM events e WHERE e.stream_id = c.id AND e.stream_version = c.v)
         FROM unnest($1::uuid[], $2::bigint[]) WITH ORDINALITY AS c(id, v, n)
         ORDER BY c.n",
    )
    .bind(&ids)
    .bind(&versions)
    .fetch_all(&mut *conn)
    .await?;
    let mut findings = Vec::new();
    for (s, (count, hash)) in c.streams.iter().zip(now) {
        if count == 0 {
            findings.push(Finding::StreamDeleted {
                stream_id: s.stream_id,
            });
        } else if count < s.version || hash.is_none() {
            findings.push(Finding::Truncated {
                stream_id: s.stream_id,
                checkpoint_version: s.version,
                now: count,
            });
        } else if hash.map(hex::encode).as_deref() != Some(s.head.as_str()) {
            findings.push(Finding::Rewritten {
                stream_id: s.stream_id,
                version: s.version,
            });
        }
    }
    if let Some(from) = c.keyed_from {
        let unkeyed: Vec<(i64, Uuid)> = sqlx::query_as(
            "SELECT position, stream_id FROM events
             WHERE position >= $1 AND hash_kid IS NULL ORDER BY position LIMIT 100",
        )
        .bind(from)
        .fetch_all(&mut *conn)
        .await?;
        findings.extend(
            unkeyed
                .into_iter()
                .map(|(position, stream_id)| Finding::Unkeyed {
                    position,
                    stream_id,
                }),
        );
    }
    Ok(findings)
}

//! Poison events: dead letters, parking, replay and discard.
//!
//! An event a projection cannot apply for a reason retrying will not fix (undecodable bytes,
//! an unknown type or schema version, an invariant violation such as a version gap) becomes a
//! `dead_letters` row in the same transaction that moves the checkpoint past it, and is
//! published to `orders.events.dlq` with an envelope of headers. Later events of the same
//! stream are parked behind it (per-order order is never broken); other streams flow on.
//! Transient failures (the database) are not dead-lettered: the caller retries them.
//!
//! `replay` re-applies a dead letter, reading the event from the event store when the stream
//! is known (so a corrupted message is repaired from the source of truth), then releases the
//! parked events in version order. `discard` gives up on it and releases them the same way.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::{
    envelope::{Envelope, EnvelopeError, OrderEnvelope},
    projection::{self, Applied, ApplyError, Decoded, Kind, Target},
    registry,
};

/// One consumed message.
#[derive(Debug, Clone)]
pub struct Incoming<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    Applied,
    Duplicate,
    Parked,
    DeadLettered(Box<DeadLetter>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: i64,
    pub projection: String,
    pub stream_id: Option<Uuid>,
    pub stream_version: Option<i64>,
    pub event_id: Option<Uuid>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub error_class: String,
    pub error_message: String,
    pub attempts: i32,
    pub first_failed_at: DateTime<Utc>,
    pub last_failed_at: DateTime<Utc>,
    pub status: String,
    pub payload: Vec<u8>,
}

struct Poison {
    class: &'static str,
    message: String,
    /// Attempts so far and when the first failed (`None`: this one, now).
    attempts: i32,
    first_failed_at: Option<DateTime<Utc>>,
}

impl Poison {
    fn new(class: &'static str, message: String) -> Self {
        Self {
            class,
            message,
            attempts: 1,
            first_failed_at: None,
        }
    }
}

fn envelope_poison(e: &EnvelopeError) -> Poison {
    use domain::wire::DecodeError;
    let class = match e {
        EnvelopeError::Undecodable(_) => "undecodable",
        EnvelopeError::Event(DecodeError::UnknownType(_)) => "unknown_event_type",
        EnvelopeError::Event(DecodeError::UnsupportedVersion { .. }) => "unknown_schema_version",
        EnvelopeError::Event(DecodeError::Invalid { .. }) => "invalid_payload",
    };
    Poison::new(class, e.to_string())
}

/// Applies one message to a projection (through its live views), parking or dead-lettering it
/// when it cannot be applied. `Err` is a transient failure: roll back and retry.
pub async fn process(
    conn: &mut PgConnection,
    kind: Kind,
    msg: &Incoming<'_>,
) -> Result<Processed, sqlx::Error> {
    let projection = kind.name();
    let env = match crate::envelope::parse(msg.payload) {
        Ok(env) => env,
        Err(e) => return dead_letter(conn, projection, msg, None, envelope_poison(&e)).await,
    };
    if has_open_dead_letter(conn, projection, env.stream_id).await? {
        sqlx::query(
            r#"INSERT INTO parked_events (projection, stream_id, stream_version, topic, partition, "offset", payload)
               VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING"#,
        )
        .bind(projection)
        .bind(env.stream_id)
        .bind(env.stream_version)
        .bind(msg.topic)
        .bind(msg.partition)
        .bind(msg.offset)
        .bind(msg.payload)
        .execute(&mut *conn)
        .await?;
        metrics::counter!("projection_parked_total", "projection" => projection.to_owned())
            .increment(1);
        return Ok(Processed::Parked);
    }
    apply_envelope(conn, kind, msg, env).await
}

async fn apply_envelope(
    conn: &mut PgConnection,
    kind: Kind,
    msg: &Incoming<'_>,
    env: Envelope,
) -> Result<Processed, sqlx::Error> {
    let projection = kind.name();
    let event = match env.event() {
        Ok(ev) => ev,
        Err(e) => {
            return dead_letter(conn, projection, msg, Some(&env), envelope_poison(&e)).await;
        }
    };
    let decoded = [Decoded { env, event }];
    let env = &decoded[0].env;
    let applied = registry::get(kind)
        .apply(conn, Target::Live, &decoded)
        .await;
    match applied.map(|o| o[0]) {
        Ok(Applied::Applied) => Ok(Processed::Applied),
        Ok(Applied::Duplicate) => Ok(Processed::Duplicate),
        Err(ApplyError::Database(e)) => Err(e),
        Err(e @ ApplyError::Gap { .. }) => {
            dead_letter(
                conn,
                projection,
                msg,
                Some(env),
                Poison::new("invariant", e.to_string()),
            )
            .await
        }
    }
}

async fn has_open_dead_letter(
    conn: &mut PgConnection,
    projection: &str,
    stream_id: Uuid,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM dead_letters WHERE projection = $1 AND stream_id = $2 AND status = 'open')")
        .bind(projection)
        .bind(stream_id)
        .fetch_one(&mut *conn)
        .await
}

const COLUMNS: &str = r#"id, projection, stream_id, stream_version, event_id, topic, partition, "offset", error_class,
    error_message, attempts, first_failed_at, last_failed_at, status, payload"#;

fn from_row(r: &sqlx::postgres::PgRow) -> Result<DeadLetter, sqlx::Error> {
    Ok(DeadLetter {
        id: r.try_get("id")?,
        projection: r.try_get("projection")?,
        stream_id: r.try_get("stream_id")?,
        stream_version: r.try_get("stream_version")?,
        event_id: r.try_get("event_id")?,
        topic: r.try_get("topic")?,
        partition: r.try_get("partition")?,
        offset: r.try_get("offset")?,
        error_class: r.try_get("error_class")?,
        error_message: r.try_get("error_message")?,
        attempts: r.try_get("attempts")?,
        first_failed_at: r.try_get("first_failed_at")?,
        last_failed_at: r.try_get("last_failed_at")?,
        status: r.try_get("status")?,
        payload: r.try_get("payload")?,
    })
}

/// Dead-letters a message whose projection failed with `error` of `class` (a transient one
/// `attempts` times since `first_failed_at`, or a poison one at once: data the database
/// refuses), so its partition can move on. Parks like any other dead letter.
pub async fn dead_letter_failed(
    conn: &mut PgConnection,
    kind: Kind,
    msg: &Incoming<'_>,
    class: platform::errors::ErrorClass,
    error: &str,
    attempts: i32,
    first_failed_at: DateTime<Utc>,
) -> Result<Processed, sqlx::Error> {
    let env = crate::envelope::parse(msg.payload).ok();
    let poison = Poison {
        attempts,
        first_failed_at: Some(first_failed_at),
        ..Poison::new(class.as_str(), error.to_owned())
    };
    dead_letter(conn, kind.name(), msg, env.as_ref(), poison).await
}

async fn dead_letter(
    conn: &mut PgConnection,
    projection: &str,
    msg: &Incoming<'_>,
    env: Option<&Envelope>,
    poison: Poison,
) -> Result<Processed, sqlx::Error> {
    tracing::error!(projection, topic = msg.topic, partition = msg.partition, offset = msg.offset,
        class = poison.class, error = %poison.message, "dead-lettering an event");
    let row = sqlx::query(&format!(
        r#"INSERT INTO dead_letters (projection, stream_id, stream_version, event_id, topic, partition, "offset",
                                     error_class, error_message, attempts, payload, first_failed_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, COALESCE($12, now()))
           RETURNING {COLUMNS}"#
    ))
    .bind(projection)
    .bind(env.map(|e| e.stream_id))
    .bind(env.map(|e| e.stream_version))
    .bind(env.map(|e| e.event_id))
    .bind(msg.topic)
    .bind(msg.partition)
    .bind(msg.offset)
    .bind(poison.class)
    .bind(&poison.message)
    .bind(poison.attempts)
    .bind(msg.payload)
    .bind(poison.first_failed_at)
    .fetch_one(&mut *conn)
    .await?;
    metrics::counter!("projection_dead_letters_total", "projection" => projection.to_owned(), "class" => poison.class)
        .increment(1);
    Ok(Processed::DeadLettered(Box::new(from_row(&row)?)))
}

pub async fn list(pool: &PgPool, only_open: bool) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM dead_letters WHERE NOT $1 OR status = 'open' ORDER BY id"
    ))
    .bind(only_open)
    .fetch_all(pool)
    .await?;
    rows.iter().map(from_row).collect()
}

pub async fn get(pool: &PgPool, id: i64) -> Result<Option<DeadLetter>, sqlx::Error> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM dead_letters WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// The events parked behind each open dead letter's stream, per projection and stream (what
/// a replay or discard releases), as `(projection, stream_id, parked versions)`.
pub async fn parked(pool: &PgPool) -> Result<Vec<(String, Uuid, Vec<i64>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT projection, stream_id, array_agg(stream_version ORDER BY stream_version)
         FROM parked_events GROUP BY projection, stream_id",
    )
    .fetch_all(pool)
    .await
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no open dead letter with id {0}")]
    NotOpen(i64),
    #[error("dead letter {id} names an unknown projection `{projection}`")]
    UnknownProjection { id: i64, projection: String },
    #[error("replaying dead letter {id} failed again: {class}: {message}")]
    StillFailing {
        id: i64,
        class: String,
        message: String,
    },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Re-applies an open dead letter (from the event store when its stream is known), then the
/// events parked behind it. Returns how many parked events were released.
pub async fn replay(pool: &PgPool, id: i64) -> Result<usize, ResolveError> {
    resolve(pool, id, true).await
}

/// Gives up on an open dead letter and releases the events parked behind it.
pub async fn discard(pool: &PgPool, id: i64) -> Result<usize, ResolveError> {
    resolve(pool, id, false).await
}

async fn resolve(pool: &PgPool, id: i64, reapply: bool) -> Result<usize, ResolveError> {
    let projection: String =
        sqlx::query_scalar("SELECT projection FROM dead_letters WHERE id = $1 AND status = 'open'")
            .bind(id)
            .fetch_optional(pool)
            .await?
            .ok_or(ResolveError::NotOpen(id))?;
    let kind =
        Kind::parse(&projection).ok_or(ResolveError::UnknownProjection { id, projection })?;
    let mut tx = pool.begin().await?;
    // The switch lock first, like the projector, so a rebuild's switch cannot interleave.
    projection::lock_for_write(&mut tx, kind).await?;
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM dead_letters WHERE id = $1 AND status = 'open' FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ResolveError::NotOpen(id))?;
    let dl = from_row(&row)?;
    let status = if reapply { "replayed" } else { "discarded" };
    sqlx::query("UPDATE dead_letters SET status = $2, resolved_at = now() WHERE id = $1")
        .bind(id)
        .bind(status)
        .execute(&mut *tx)
        .await?;
    let msg = Incoming {
        topic: &dl.topic,
        partition: dl.partition,
        offset: dl.offset,
        payload: &dl.payload,
    };
    if reapply {
        let env = match (dl.stream_id, dl.stream_version) {
            (Some(s), Some(v)) => from_event_store(&mut tx, s, v).await?,
            _ => None,
        };
        let outcome = match env {
            Some(env) => apply_envelope(&mut tx, kind, &msg, env).await?,
            None => process(&mut tx, kind, &msg).await?,
        };
        if let Processed::DeadLettered(again) = outcome {
            drop(tx);
            sqlx::query("UPDATE dead_letters SET attempts = attempts + 1, last_failed_at = now(), error_message = $2 WHERE id = $1")
                .bind(id)
                .bind(&again.error_message)
                .execute(pool)
                .await?;
            return Err(ResolveError::StillFailing {
                id,
                class: again.error_class,
                message: again.error_message,
            });
        }
    }
    let released = match dl.stream_id {
        Some(stream) => release_parked(&mut tx, kind, stream).await?,
        None => 0,
    };
    tx.commit().await?;
    Ok(released)
}

/// The event as stored, in envelope form.
async fn from_event_store(
    conn: &mut PgConnection,
    stream_id: Uuid,
    version: i64,
) -> Result<Option<Envelope>, sqlx::Error> {
    Ok(event_store::load_event(conn, stream_id, version)
        .await?
        .map(Envelope::from_stored))
}

/// Applies the parked events of a stream in version order until one fails again (it becomes
/// the new dead letter and the rest stay parked behind it).
async fn release_parked(
    conn: &mut PgConnection,
    kind: Kind,
    stream_id: Uuid,
) -> Result<usize, sqlx::Error> {
    let projection = kind.name();
    let parked = sqlx::query(
        r#"DELETE FROM parked_events WHERE projection = $1 AND stream_id = $2
           RETURNING stream_version, topic, partition, "offset", payload"#,
    )
    .bind(projection)
    .bind(stream_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut parked: Vec<(i64, String, i32, i64, Vec<u8>)> = parked
        .iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                r.try_get(1)?,
                r.try_get(2)?,
                r.try_get(3)?,
                r.try_get(4)?,
            ))
        })
        .collect::<Result<_, sqlx::Error>>()?;
    parked.sort_by_key(|p| p.0);
    let mut released = 0;
    for (_, topic, partition, offset, payload) in &parked {
        let msg = Incoming {
            topic,
            partition: *partition,
            offset: *offset,
            payload,
        };
        if matches!(
            process(conn, kind, &msg).await?,
            Processed::Applied | Processed::Duplicate
        ) {
            released += 1;
        }
    }
    Ok(released)
}

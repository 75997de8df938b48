//! The PostgreSQL event store and transactional outbox shared by every service.
//!
//! Streams are generic (an order, a saga): this crate knows rows, versions, hashes and
//! outbox messages, not orders. Callers open a transaction, [`append`] events together with
//! the outbox messages that announce them (one statement, one round trip), add whatever else
//! must be atomic with them (an idempotency record), and commit.
//!
//! # Guarantees
//! - Optimistic concurrency: an append states the version it expects; if another writer got
//!   there first the append writes nothing and returns [`StoreError::Conflict`].
//! - Gap-free global feed ([`read_feed`]): pages by `(tx_id, position)` and only returns rows of
//!   transactions older than every running one, so a late-committing transaction is never
//!   skipped, and each stream comes out in version order.
//! - Tamper evidence: a per-stream chain (HMAC-SHA-256 with the audit key held outside the
//!   database, SHA-256 for events recorded without one) anchored in the `streams` head row;
//!   [`audit::verify_stream`] reports the first broken event; [`checkpoint`]s signed with the
//!   audit key fix every stream's head outside the database. Events are append-only (a
//!   trigger refuses UPDATE, DELETE and TRUNCATE).
//!
//! # Layout
//! - [`model`]: rows in and out (`NewEvent`, `StoredEvent`, `Metadata`).
//! - [`envelope`]: the one envelope of an event on the wire, and broker message headers.
//! - [`outbox`]: the outbox table, its one owner: messages in, the relay's reads and marks.
//! - [`hash`]: canonical encoding and the chain hash.
//! - [`append`](mod@append): the one-statement append (events + outbox rows).
//! - [`group`]: group commit, concurrent commands written in one transaction.
//! - [`read`]: loading a stream (or one event, or several streams), the global feed.
//! - [`wake`]: how the outbox's and the feed's readers wait between polls (no NOTIFY).
//! - [`audit`]: hash-chain verification.
//! - [`checkpoint`]: signed checkpoints of every stream's head, and comparing one with now.
#![forbid(unsafe_code)]

pub mod append;
pub mod audit;
pub mod checkpoint;
pub mod envelope;
pub mod group;
pub mod hash;
pub mod model;
pub mod outbox;
pub mod read;
pub mod wake;

pub use append::{
    APPEND_PARAMS, Append, AppendBatch, AppendOutcome, Expected, append, append_at, append_many,
    now_micros,
};
pub use envelope::{Envelope, Headers};
pub use model::{Metadata, NewEvent, StoredEvent};
pub use outbox::{Destination, OutboxMessage, enqueue};
pub use read::{
    FeedCursor, count_events, feed_mark, feed_reached, load_event, load_stream, load_streams,
    read_feed,
};

/// Errors of the store. A conflict is an expected outcome of concurrency, not a failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("stream {stream_id} is not at version {expected}")]
    Conflict {
        stream_id: uuid::Uuid,
        expected: i64,
    },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

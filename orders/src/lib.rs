//! The order stream: the one place an order is loaded, decided and appended.
//!
//! Two callers decide commands on the order aggregate: the command API (checkout, cancel on
//! behalf of a customer or an operator) and the checkout saga (confirm, or cancel after a
//! failed step). Both need the same three steps in the caller's transaction: load the
//! stream into [`domain::order::Order`], run the pure decision, append the events with their
//! Kafka outbox messages under optimistic concurrency. Keeping them here (and not in the HTTP
//! crate) lets the saga depend on the order stream without depending on HTTP, and gives the
//! `order` streams and the `orders.events` topic one owner.
//!
//! # Layout
//! - [`records`]: order events -> stored events + outbox messages (the wire envelope).
//! - [`stream`]: loading an order, appending its events.
//! - [`payment_tokens`]: checkouts' payment tokens, held out of events until the payment
//!   participant takes them.
//! - [`execute`] / [`decide_and_append`]: load (or take a loaded state), decide, append.
#![forbid(unsafe_code)]

pub mod payment_tokens;
pub mod records;
pub mod stream;

use domain::{
    order::{self, Order, OrderCommand, OrderRejected},
    values::OrderId,
};
use event_store::{Expected, Metadata, StoreError};
use sqlx::PgConnection;

pub use records::{ORDER_EVENTS_TOPIC, ORDER_STREAM, order_records};
pub use stream::{LoadError, append, load};

/// Why a command on an order wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// The aggregate refused the command (a business outcome, not a failure).
    #[error(transparent)]
    Rejected(#[from] OrderRejected),
    /// Another writer appended to the order first; reload and decide again.
    #[error("the order was changed concurrently")]
    Conflict,
    /// A stored event of the order cannot be decoded.
    #[error("{0}")]
    Unreadable(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<LoadError> for OrderError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Database(e) => OrderError::Database(e),
            unreadable => OrderError::Unreadable(unreadable.to_string()),
        }
    }
}

impl From<StoreError> for OrderError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => OrderError::Conflict,
            StoreError::Database(e) => OrderError::Database(e),
        }
    }
}

/// Decides `command` on `state` (loaded at `expected`) and appends the events; returns the
/// order's new version.
pub async fn decide_and_append(
    conn: &mut PgConnection,
    order_id: OrderId,
    state: &Order,
    expected: &Expected,
    command: OrderCommand,
    metadata: &Metadata,
) -> Result<i64, OrderError> {
    let events = order::decide(state, command)?;
    Ok(append(conn, order_id, expected, &events, metadata).await?)
}

/// Loads the order, decides `command` and appends the events, in the caller's transaction;
/// returns the order's new version.
pub async fn execute(
    conn: &mut PgConnection,
    order_id: OrderId,
    command: OrderCommand,
    metadata: &Metadata,
) -> Result<i64, OrderError> {
    let (state, expected) = load(conn, order_id).await?;
    decide_and_append(conn, order_id, &state, &expected, command, metadata).await
}

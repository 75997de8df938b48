//! The read side: Kafka projectors that build read models in PostgreSQL, and GraphQL over them.
//!
//! Each projection is its own consumer group. A message's read-model change and the
//! projection's checkpoint commit in one PostgreSQL transaction; the Kafka offset is committed
//! after it. Projections are idempotent per stream version, so redeliveries change nothing.
//!
//! Any projection can be rebuilt from the event store into a new version of its tables while
//! the current one keeps serving, then switched to atomically.
//!
//! # Layout (in data-flow order)
//! - [`envelope`]: the Kafka message value, parsed and decoded into a domain event.
//! - [`consumer`]: the projector loop (batches, checkpoints, offsets, retries, shutdown).
//! - [`dead_letters`]: poison events: dead letters, parking, replay, discard.
//! - [`projection`]: the projections and how events reach their (versioned) tables.
//! - [`order_summary`], [`sales`]: the projections' pure folds and batched writes.
//! - [`rebuild`]: rebuild by replay and the atomic switch.
//! - [`status`]: versions, positions, lag and rebuild progress.
//! - [`notify`]: committed status changes fanned out to subscriptions.
//! - [`graphql`]: the schema and the axum service (`/graphql`, `/graphql/ws`, GraphiQL).
#![forbid(unsafe_code)]

pub mod consumer;
pub mod dead_letters;
pub mod envelope;
pub mod graphql;
pub mod notify;
pub mod order_summary;
pub mod projection;
pub mod rebuild;
pub mod sales;
pub mod status;

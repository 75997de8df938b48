//! The read side: Kafka projectors that build read models in PostgreSQL, and GraphQL over them.
//!
//! Each projection is its own consumer group. A message's read-model change and the
//! projection's checkpoint commit in one PostgreSQL transaction; the Kafka offset is committed
//! after it. Projections are idempotent per stream version, so redeliveries change nothing.
//!
//! Status: the order-summary projection with dead letters, and the `order`, `orders` and
//! `auditTrail` queries are built; the other read models, subscriptions, mutations and
//! rebuild by replay are not yet (see docs/architecture.md).
//!
//! # Layout
//! - [`envelope`]: the Kafka message value, parsed and decoded into a domain event.
//! - [`order_summary`]: the order-summary projection (apply one event in a transaction).
//! - [`consumer`]: the consumer loop (checkpoints, offsets, shutdown).
//! - [`dead_letters`]: poison events: dead letters, parking, replay, discard.
//! - [`graphql`]: the schema and the axum service (`/graphql`, GraphiQL on GET).
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

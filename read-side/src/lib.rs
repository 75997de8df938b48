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
//! - [`consumer`]: the projector loop (batches, checkpoints, offsets, retries, shutdown);
//!   [`checkpoints`]: the per-partition positions every consumer here keeps in PostgreSQL.
//! - [`dead_letters`]: poison events: dead letters, parking, replay, discard.
//! - [`projection`]: what every projection shares: its [`projection::Kind`], the
//!   [`projection::Projection`] trait, batches and the idempotency rule.
//! - [`order_summary`], [`sales`]: the projections, each a pure fold and a `repo` module with
//!   all of its SQL (batched writes, and the reads GraphQL serves).
//! - [`analytics`]: the `analytics` group: user activity and order events into live
//!   counters (its own loop over two topics, counted once per event id).
//! - [`registry`]: which implementation serves each `Kind` (the one place naming every model).
//! - [`rebuild`]: rebuild by replay and the atomic switch.
//! - [`status`]: versions, positions, lag and rebuild progress.
//! - [`notify`]: committed status changes fanned out to subscriptions.
//! - [`audit`]: an order's events and the check of their hash chain, from the event store.
//! - [`checkout`]: where an order's checkout saga stands, from the saga's stream.
//! - [`graphql`]: the schema, one module per model, and the axum service (`/graphql`,
//!   `/graphql/ws`, the optional query console) and its limits.
//!
//! Dependencies run one way: `projection` names no model, the models depend on it, and
//! `registry` depends on both; `graphql` sits on top and holds no SQL.
#![forbid(unsafe_code)]

pub mod analytics;
pub mod audit;
pub mod checkout;
pub mod checkpoints;
pub mod consumer;
pub mod dead_letters;
pub mod envelope;
pub mod graphql;
pub mod notify;
pub mod order_summary;
pub mod projection;
pub mod rebuild;
pub mod registry;
pub mod sales;
pub mod status;

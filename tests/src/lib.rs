//! Helpers for integration tests against the real services started by `scripts/services.sh`.
//!
//! Every test gets its own PostgreSQL database, its own Kafka topic names and its own RabbitMQ
//! queue names (all derived from one random prefix), so tests run in parallel without seeing
//! each other. A missing service makes the helper fail the test with the address it tried:
//! nothing is skipped silently.
//!
//! # Layout (by what a helper sets up)
//! - [`db`]: [`TestDb`], a fresh, migrated database, dropped when the value is dropped;
//!   orders appended straight into the event store.
//! - [`brokers`]: [`TestKafka`] (per-test topic names, deleted afterwards), [`TestRabbit`]
//!   (a connection plus a per-test name prefix); reading envelopes back from Kafka.
//! - [`app`]: [`TestApi`] (the command API in-process) and [`ReadStack`] (relay, projectors,
//!   GraphQL).
//! - [`clients`]: [`Gql`] queries and subscriptions, a valid checkout body.
//! - [`process`]: `shop run` as a child process started like `scripts/run.sh`, and a client.
//! - [`invariants`]: whole-system invariants checked after faults.
//! - [`spans`]: which spans joined which trace.
#![forbid(unsafe_code)]

pub mod app;
pub mod brokers;
pub mod browser;
pub mod clients;
pub mod db;
pub mod invariants;
pub mod process;
pub mod spans;

pub use app::*;
pub use brokers::*;
pub use clients::*;
pub use db::*;

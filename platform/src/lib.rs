//! Shared plumbing for every shop service (write side, relay, read side, saga, participants).
//!
//! Each service binary is thin: it parses [`config`], calls [`telemetry::init`], creates one
//! [`shutdown::token`] and hands both to its library. Nothing here knows about orders.
//!
//! # Layout
//! - [`config`]: typed settings from the environment, defaults matching `scripts/`.
//! - [`telemetry`]: `tracing` set-up (JSON when stdout is not a terminal, `RUST_LOG`).
//! - [`trace`]: spans that follow a message's W3C `traceparent` across processes.
//! - [`shutdown`]: the one cancellation token, cancelled by SIGTERM or Ctrl-C.
//! - [`auth`]: bearer JWTs (HS256) with a role, shared by the command API and GraphQL.
//! - [`keys`]: the one convention for key material: named keys from the environment or a
//!   file outside the database, the first one signing, never a default.
//! - [`vault`]: per-customer data keys wrapped by the master key; sealing, opening and
//!   forgetting personal data (crypto-shredding).
//! - [`errors`]: the one classification of failures (transient, permanent, poison).
//! - [`supervisor`]: named roles restarted with backoff on transient failures; a permanent
//!   one stops the process non-zero. `/readyz` reports every role.
//! - [`limits`]: admission control of the public APIs: concurrency, per-caller rate, timeout.
//! - [`server`]: serving a router with a header-read timeout and graceful shutdown.
//! - [`ops`]: `/healthz`, `/readyz` and Prometheus `/metrics` routes for any axum server.
//! - [`db`], [`kafka`], [`amqp`]: connecting to PostgreSQL, Kafka and RabbitMQ the same way
//!   everywhere (pool sizes, idempotent producer, publisher confirms, topic creation).
#![forbid(unsafe_code)]

pub mod amqp;
pub mod auth;
pub mod config;
pub mod db;
pub mod errors;
pub mod kafka;
pub mod keys;
pub mod limits;
pub mod ops;
pub mod server;
pub mod shutdown;
pub mod supervisor;
pub mod telemetry;
pub mod trace;
pub mod vault;

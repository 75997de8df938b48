//! The checkout domain, pure and synchronous: no clock, no database, no broker.
//!
//! Everything the rules need arrives in the command; everything readers need leaves in the
//! events. The write side loads a stream, folds it with `evolve`, calls `decide`, and appends
//! what comes back; the saga runtime feeds `saga::transition` and sends what it returns.
//!
//! # Layout
//! - [`values`]: newtypes parsed at the edge (money in minor units, currency, SKU, quantity,
//!   ids, address) so invalid values cannot reach the rules.
//! - [`order`]: the order aggregate (`decide`/`evolve`), its commands, events and rejections.
//! - [`saga`]: the checkout saga as a state machine `(SagaState, Input) -> (SagaState, outputs)`.
//! - [`personal`]: personal data as events carry it: sealed boxes and payment references
//!   (crypto-shredding; the cryptography is in `platform::vault`).
//! - [`wire`]: the stored/published form of events: type names, schema versions, upcasters.
//! - [`activity`]: user activity (telemetry, never in the event store): its wire form, time
//!   bounds and derived ids.
#![forbid(unsafe_code)]

pub mod activity;
pub mod order;
pub mod personal;
pub mod saga;
pub mod values;
pub mod wire;

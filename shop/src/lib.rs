//! The `shop` binary's library: its command line ([`cli`]), the wiring of the service roles
//! ([`run`]), the operator subcommands ([`admin`]), the audit trail's keys and checkpoints
//! ([`audit`]) and retention ([`retention`]). `main.rs` only parses and dispatches;
//! everything here can be driven by tests.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod cli;
pub mod recorded;
pub mod retention;
pub mod run;

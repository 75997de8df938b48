//! The `shop` binary's library: its command line ([`cli`]), the wiring of the service roles
//! ([`run`]) and the operator subcommands ([`admin`]). `main.rs` only parses and dispatches;
//! everything here can be driven by tests.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod retention;
pub mod run;

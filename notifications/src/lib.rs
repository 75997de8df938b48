//! Notifications: the `email` consumer group, independent of the checkout saga and the
//! read side, emails a customer when her order is confirmed or cancelled, once per event.
//!
//! # Layout (in data-flow order)
//! - [`consumer`]: the group's loop: start position, inbox, send, checkpoint, breaker.
//! - [`templates`]: the emails' text (minijinja templates compiled into the binary).
//! - [`mailer`]: SMTP through lettre, failures classified, the circuit breaker.
//! - [`inbox`]: every statement on `email_inbox`.
//! - [`resend`]: an operator's second try at an email recorded dead, or its discard.
//!
//! The address comes from the customer's profile (`write_side::customers`), never from an
//! event; the order's lines and totals from the event store.
#![forbid(unsafe_code)]

pub mod consumer;
pub mod inbox;
pub mod mailer;
pub mod resend;
pub mod templates;

pub use consumer::{EmailGroup, Health, NAME, run_role};
pub use mailer::{Mailer, MailerConfig};

//! The fault tests: they stop, kill or stall the shared services (PostgreSQL, Kafka, SMTP,
//! RabbitMQ), so they are one test binary of their own (cargo runs test binaries one after
//! another, so nothing else runs meanwhile) and take [`ONE_AT_A_TIME`] each (so they do not
//! overlap one another). Every fault is undone by a guard, also when a test fails.

mod broker_outage;
mod chaos;
mod email_outage;

/// Held by every fault test for its whole run.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

//! The integration suite, one test binary (one link, one harness): every module drives the
//! real PostgreSQL, Kafka and RabbitMQ with per-test isolation (a database, topic prefix and
//! queue prefix of its own), so the tests run side by side. Modules follow the data flow:
//! services, then the event store, the command API, the relay, the read side, the saga, and
//! the real `shop` binary (its CLI, `shop run` end to end, crashes of its processes). The
//! tests that stop shared services are in `tests/faults/`.

mod services;

mod event_store;

mod command_api;

mod relay;
mod relay_kill;

mod dead_letters;
mod projections;
mod read_side;

mod activity;
mod email;
mod erasure;

mod saga;
mod saga_kill;

mod alert_rules;
mod cli;
mod product;
mod security;

mod console;

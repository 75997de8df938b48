//! The peer `shop-bench append` measures the write path against: cqrs-es 0.5 with
//! postgres-es, the most used event-sourcing framework of the Rust ecosystem, doing the same
//! new-order command against the same PostgreSQL in the same run.
//!
//! Why in the bench crate only: a user choosing a backend compares commands per second with
//! the framework she would otherwise pick, so every run prints that ratio; the production
//! `shop` binary carries none of it. To be fair the peer decides with this project's own
//! aggregate (`domain::order::decide`, sealing included) and stores the same event payload
//! and metadata; it writes what postgres-es writes (one event row, optimistic concurrency on
//! its primary key), without this project's outbox row, hash chain or idempotency record.

use std::collections::HashMap;

use cqrs_es::{
    Aggregate, AggregateError, CqrsFramework, DomainEvent, event_sink::EventSink,
    persist::PersistedEventStore,
};
use domain::order::{self, Order, OrderCommand, PlaceOrder};
use orders::order_records;
use postgres_es::PostgresEventRepository;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// The peer's order aggregate: placed once.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PeerOrder {
    placed: bool,
}

/// The stored `OrderPlaced` payload, as this project stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerEvent {
    OrderPlaced(serde_json::Value),
}

impl DomainEvent for PeerEvent {
    fn event_type(&self) -> String {
        "OrderPlaced".into()
    }

    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PeerError(String);

impl Aggregate for PeerOrder {
    const TYPE: &'static str = "order";
    type Command = PlaceOrder;
    type Event = PeerEvent;
    type Error = PeerError;
    type Services = ();

    async fn handle(
        &mut self,
        command: PlaceOrder,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), PeerError> {
        if self.placed {
            return Err(PeerError("the order is placed already".into()));
        }
        let id = command.order_id;
        let events = order::decide(&Order::NotPlaced, OrderCommand::Place(command))
            .map_err(|e| PeerError(e.to_string()))?;
        // The payload this project stores for the same event.
        let (stored, _) = order_records(
            id,
            1,
            &events,
            &crate::append::bench_metadata(id),
            event_store::now_micros(),
        );
        for e in stored {
            sink.write(PeerEvent::OrderPlaced(e.payload), self).await;
        }
        Ok(())
    }

    fn apply(&mut self, _event: PeerEvent) {
        self.placed = true;
    }
}

/// cqrs-es over postgres-es on `pool`, its tables (`peer_events`, `peer_snapshots`, as
/// postgres-es's `db/init.sql` creates them) made if missing.
pub async fn framework(
    pool: &PgPool,
) -> anyhow::Result<CqrsFramework<PeerOrder, PersistedEventStore<PostgresEventRepository, PeerOrder>>>
{
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS peer_events (
             aggregate_type text NOT NULL, aggregate_id text NOT NULL,
             sequence bigint CHECK (sequence >= 0) NOT NULL,
             event_type text NOT NULL, event_version text NOT NULL,
             payload json NOT NULL, metadata json NOT NULL,
             PRIMARY KEY (aggregate_type, aggregate_id, sequence))",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS peer_snapshots (
             aggregate_type text NOT NULL, aggregate_id text NOT NULL,
             last_sequence bigint CHECK (last_sequence >= 0) NOT NULL,
             current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
             payload json NOT NULL,
             PRIMARY KEY (aggregate_type, aggregate_id, last_sequence))",
    )
    .execute(pool)
    .await?;
    let repo =
        PostgresEventRepository::new(pool.clone()).with_tables("peer_events", "peer_snapshots");
    Ok(CqrsFramework::new(
        PersistedEventStore::new_event_store(repo),
        Vec::new(),
        (),
    ))
}

/// One new order through the peer, with the metadata this project records.
pub async fn place(
    cqrs: &CqrsFramework<PeerOrder, PersistedEventStore<PostgresEventRepository, PeerOrder>>,
    command: PlaceOrder,
) -> anyhow::Result<()> {
    let id = command.order_id;
    let m = crate::append::bench_metadata(id);
    let metadata = HashMap::from([
        ("correlation_id".to_owned(), m.correlation_id.to_string()),
        ("causation_id".to_owned(), m.causation_id.to_string()),
        ("actor".to_owned(), m.actor),
        ("traceparent".to_owned(), m.traceparent.unwrap_or_default()),
        ("command_id".to_owned(), m.command_id.unwrap_or_default()),
    ]);
    cqrs.execute_with_metadata(&id.0.to_string(), command, metadata)
        .await
        .map_err(|e: AggregateError<PeerError>| anyhow::anyhow!("cqrs-es: {e}"))
}

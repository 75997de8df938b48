//! The orchestrator: runs `domain::saga::transition` for every input and records the result.
//!
//! One transaction per input: load the saga (its stream of recorded inputs), transition,
//! append the input to the saga stream with the outgoing commands as outbox rows, apply the
//! order commands to the order aggregate (its events and their Kafka outbox rows), and arm or
//! clear the step deadline. Concurrent inputs for one saga meet at the saga stream's version
//! check; the loser retries. Inputs come from:
//! - the event store's feed: `OrderPlaced` starts a saga, a customer's or operator's
//!   `OrderCancelled` stops it (the feed position commits with the transitions);
//! - the reply queue: deduplicated by message id in `saga_inbox`, acked after commit;
//! - due deadlines in `saga_deadlines` (`FOR UPDATE SKIP LOCKED`, so instances share them).

use std::time::Duration;

use domain::{
    order::{CancelledBy, OrderCommand, OrderEvent},
    saga::{self, SagaCommand, SagaInput, SagaOrder, SagaState, Step},
    values::{OrderId, Reason},
    wire,
};
use event_store::{
    Destination, Expected, FeedCursor, Metadata, NewEvent, OutboxMessage, StoreError,
};
use platform::supervisor::RoleCtx;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use orders::OrderError;

use crate::{
    SagaConfig,
    consumer::{self, ConsumeOptions, Failure},
    topology::{Names, Reply},
};

/// Stream type of sagas in the event store.
pub const SAGA_STREAM: &str = "checkout_saga";
pub use domain::saga::{
    INPUT_RECORDED, fold_stream, parse_step, step_name, stream_id as saga_stream_id,
};

/// Step latency when a step ends, sagas started and finished.
fn record_metrics(
    before: &SagaState,
    after: &SagaState,
    step_started: Option<chrono::DateTime<chrono::Utc>>,
) {
    if let (saga::Phase::Awaiting(step), Some(started)) = (before.phase, step_started)
        && after.phase != before.phase
    {
        let took = (chrono::Utc::now() - started).to_std().unwrap_or_default();
        metrics::histogram!("saga_step_duration_seconds", "step" => step_name(step))
            .record(took.as_secs_f64());
    }
    if before.phase == saga::Phase::NotStarted {
        metrics::counter!("sagas_started_total").increment(1);
    }
    if after.is_terminal() && !before.is_terminal() {
        let outcome = if after.phase == saga::Phase::Confirmed {
            "confirmed"
        } else {
            "cancelled"
        };
        metrics::counter!("sagas_finished_total", "outcome" => outcome).increment(1);
    }
}

/// The longest wait between polls of an idle feed (an order placed by another process is
/// taken on within it).
const FEED_MAX_IDLE: Duration = Duration::from_millis(100);

/// The saga's own actor on what it records.
const SAGA_ACTOR: &str = "system:saga";

/// What [`Orchestrator::resolve_by_hand`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByHand {
    /// The waiting step was taken as done; the saga moved on.
    Resolved { step: Step },
    /// The saga waits for no step (finished, or not started).
    NotWaiting,
    /// The saga waits for another step than the one the operator resolved.
    StepChanged { waiting: Step },
}

#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    #[error("a concurrent input changed the saga; retry")]
    Conflict,
    #[error("saga of order {0} has an unreadable event: {1}")]
    Corrupt(OrderId, String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<StoreError> for SagaError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => SagaError::Conflict,
            StoreError::Database(e) => SagaError::Database(e),
        }
    }
}

#[derive(Clone)]
pub struct Orchestrator {
    pool: PgPool,
    config: SagaConfig,
    names: Names,
}

/// The saga's current state and where its stream is.
pub async fn load(
    conn: &mut PgConnection,
    order_id: OrderId,
    max_attempts: u32,
) -> Result<(SagaState, Expected), SagaError> {
    let (state, expected, _) = load_with_time(conn, order_id, max_attempts).await?;
    Ok((state, expected))
}

/// [`load`], plus when the last input was recorded (the current step's start).
async fn load_with_time(
    conn: &mut PgConnection,
    order_id: OrderId,
    max_attempts: u32,
) -> Result<(SagaState, Expected, Option<chrono::DateTime<chrono::Utc>>), SagaError> {
    let (stored, expected) = event_store::load_stream(conn, saga_stream_id(order_id)).await?;
    let last = stored.last().map(|e| e.recorded_at);
    let state = fold_stream(
        max_attempts,
        stored.into_iter().map(|e| (e.event_type, e.payload)),
    )
    .map_err(|e| SagaError::Corrupt(order_id, e.to_string()))?;
    Ok((state, expected, last))
}

impl Orchestrator {
    pub fn new(pool: PgPool, config: SagaConfig) -> Self {
        let names = Names::new(&config.queue_prefix);
        Self {
            pool,
            config,
            names,
        }
    }

    /// Applies one input in the caller's transaction. `causation` is the message or event
    /// that carried it, `trace` its W3C trace context (passed on to every message and event
    /// this input causes).
    pub async fn handle(
        &self,
        conn: &mut PgConnection,
        order_id: OrderId,
        input: SagaInput,
        causation: Uuid,
        trace: Option<String>,
    ) -> Result<(), SagaError> {
        let span = tracing::info_span!(
            "saga.step",
            %order_id,
            input = input.name(),
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        platform::trace::follow(&span, trace.as_deref());
        self.decide_and_record(conn, order_id, input, causation, trace, SAGA_ACTOR)
            .instrument(span)
            .await
    }

    /// An operator's *mark resolved*: the step the saga of `order_id` waits for was done
    /// outside the shop (stock set aside by hand, a payment taken by phone, a parcel the
    /// warehouse sent), and `reference` is its result (the reservation, authorization or
    /// shipment id). It is taken as that step's success through the saga's own decision,
    /// recorded with `actor` as its author, and the saga moves on as after a participant's
    /// reply (the next step, or the order confirmed). A participant's reply to that step
    /// arriving later is a duplicate and ignored. `causation` is the operator's action.
    /// `expected` is the step the operator saw waiting: if the saga has moved meanwhile (a
    /// participant answered, another operator acted) nothing is done, so a reference is never
    /// taken for another step than the one it was given for.
    pub async fn resolve_by_hand(
        &self,
        order_id: OrderId,
        expected: Step,
        reference: &str,
        actor: &str,
        causation: Uuid,
    ) -> Result<ByHand, SagaError> {
        for _ in 0..10 {
            let mut tx = self.pool.begin().await?;
            let (state, _) = load(&mut tx, order_id, self.config.step_attempts).await?;
            let saga::Phase::Awaiting(step) = state.phase else {
                return Ok(ByHand::NotWaiting);
            };
            if step != expected {
                return Ok(ByHand::StepChanged { waiting: step });
            }
            let result = reference.to_owned();
            let input = match step {
                Step::Inventory => SagaInput::InventoryReserved {
                    reservation_id: result,
                },
                Step::Payment => SagaInput::PaymentAuthorized {
                    authorization_id: result,
                },
                Step::Shipment => SagaInput::ShipmentCreated {
                    shipment_id: result,
                },
            };
            match self
                .decide_and_record(&mut tx, order_id, input, causation, None, actor)
                .await
            {
                Ok(()) => {
                    tx.commit().await?;
                    tracing::info!(%order_id, step = step_name(step), actor, "saga step resolved by hand");
                    return Ok(ByHand::Resolved { step });
                }
                Err(SagaError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(SagaError::Conflict)
    }

    async fn decide_and_record(
        &self,
        conn: &mut PgConnection,
        order_id: OrderId,
        input: SagaInput,
        causation: Uuid,
        trace: Option<String>,
        actor: &str,
    ) -> Result<(), SagaError> {
        let (state, expected, step_started) =
            load_with_time(conn, order_id, self.config.step_attempts).await?;
        let (decisions, commands) = saga::decide(&state, input);
        if decisions.is_empty() {
            return Ok(()); // a duplicate, a stale deadline, a reply for another step
        }
        let next = decisions.iter().fold(state.clone(), saga::evolve);
        record_metrics(&state, &next, step_started);
        let meta = Metadata {
            correlation_id: order_id.0,
            causation_id: causation,
            actor: actor.to_owned(),
            traceparent: trace.clone(),
            command_id: None,
        };
        let recorded: Vec<NewEvent> = decisions
            .iter()
            .map(|d| NewEvent {
                event_id: Uuid::now_v7(),
                event_type: d.event_type().into(),
                schema_version: 1,
                payload: serde_json::to_value(d).expect("saga decision serializes"),
                metadata: meta.clone(),
            })
            .collect();
        // Commands are caused by the last decision of this input (the step requested, or the
        // compensation started).
        let decided_by = recorded.last().expect("at least one decision").event_id;
        let (outbox, for_order) = self
            .route(conn, order_id, commands, decided_by, trace.as_deref())
            .await?;
        if next.is_terminal() {
            sqlx::query("DELETE FROM saga_deadlines WHERE order_id = $1")
                .bind(order_id.0)
                .execute(&mut *conn)
                .await?;
        }
        event_store::append(
            conn,
            saga_stream_id(order_id),
            SAGA_STREAM,
            &expected,
            &recorded,
            &outbox,
        )
        .await?;
        for c in for_order {
            self.apply_to_order(conn, order_id, c, &meta).await?;
        }
        for d in &decisions {
            match d {
                saga::SagaEvent::Completed => tracing::info!("saga completed"),
                saga::SagaEvent::CompensationStarted { reason, .. } => {
                    tracing::info!(%reason, "saga compensating")
                }
                other => tracing::debug!(decision = other.event_type(), "saga decided"),
            }
        }
        Ok(())
    }

    /// Sends each command where it goes: participants' commands become outbox rows (caused
    /// by `decided_by`), deadlines are armed, and the order's commands are returned to be
    /// applied to the order aggregate.
    async fn route(
        &self,
        conn: &mut PgConnection,
        order_id: OrderId,
        commands: Vec<SagaCommand>,
        decided_by: Uuid,
        trace: Option<&str>,
    ) -> Result<(Vec<OutboxMessage>, Vec<SagaCommand>), SagaError> {
        let mut outbox = Vec::new();
        let mut for_order = Vec::new();
        for c in commands {
            let destination = match (&c, c.participant()) {
                (_, Some((participant, _))) => participant,
                (SagaCommand::ArmDeadline { step, attempt }, None) => {
                    self.arm_deadline(conn, order_id, *step, *attempt).await?;
                    continue;
                }
                (_, None) => {
                    for_order.push(c);
                    continue;
                }
            };
            let message_id = Uuid::now_v7();
            if let Some(step) = c.requests() {
                sqlx::query(
                    "INSERT INTO saga_commands (message_id, order_id, step) VALUES ($1, $2, $3)",
                )
                .bind(message_id)
                .bind(order_id.0)
                .bind(step_name(step))
                .execute(&mut *conn)
                .await?;
            }
            outbox.push(OutboxMessage {
                message_id,
                destination: Destination::Amqp,
                target: platform::amqp::COMMANDS_EXCHANGE.to_owned(),
                routing_key: self.names.routing_key(destination),
                ordering_key: order_id.to_string(),
                headers: command_headers(decided_by, &c, trace),
                payload: serde_json::to_vec(&c).expect("saga command serializes"),
            });
        }
        Ok((outbox, for_order))
    }

    async fn arm_deadline(
        &self,
        conn: &mut PgConnection,
        order_id: OrderId,
        step: Step,
        attempt: u32,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO saga_deadlines (order_id, step, attempt, due_at) VALUES ($1, $2, $3, now() + $4)
             ON CONFLICT (order_id) DO UPDATE SET step = EXCLUDED.step, attempt = EXCLUDED.attempt, due_at = EXCLUDED.due_at",
        )
        .bind(order_id.0)
        .bind(step_name(step))
        .bind(attempt as i32)
        .bind(self.config.step_timeout)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Decides the order command on the order aggregate and appends its events. A command the
    /// order refuses (it was cancelled meanwhile) is skipped: the cancellation reaches the
    /// saga through the feed and compensates.
    async fn apply_to_order(
        &self,
        conn: &mut PgConnection,
        order_id: OrderId,
        command: SagaCommand,
        meta: &Metadata,
    ) -> Result<(), SagaError> {
        let command = match command {
            SagaCommand::MarkInventoryReserved { reservation_id, .. } => {
                OrderCommand::MarkInventoryReserved { reservation_id }
            }
            SagaCommand::MarkPaymentAuthorized {
                authorization_id, ..
            } => OrderCommand::MarkPaymentAuthorized { authorization_id },
            SagaCommand::ConfirmOrder { shipment_id, .. } => OrderCommand::Confirm { shipment_id },
            SagaCommand::CancelOrder { reason, .. } => OrderCommand::Cancel {
                reason: Reason::parse(&truncate(&reason, 500))
                    .unwrap_or_else(|_| Reason::parse("checkout failed").expect("a valid reason")),
                by: CancelledBy::System,
            },
            _ => return Ok(()),
        };
        match orders::execute(conn, order_id, command, meta).await {
            Ok(_) => Ok(()),
            Err(OrderError::Rejected(rejected)) => {
                tracing::info!(%order_id, %rejected, "the order refused a saga command; skipped");
                Ok(())
            }
            Err(OrderError::Conflict) => Err(SagaError::Conflict),
            Err(OrderError::Unreadable(e)) => Err(SagaError::Corrupt(order_id, e)),
            Err(OrderError::Database(e)) => Err(SagaError::Database(e)),
        }
    }

    /// Runs `input` in its own transaction, retrying version conflicts.
    async fn handle_in_tx(
        &self,
        order_id: OrderId,
        input: SagaInput,
        causation: Uuid,
        inbox: Option<Uuid>,
        trace: Option<String>,
    ) -> Result<(), Failure> {
        for _ in 0..10 {
            let mut tx = self.pool.begin().await?;
            if let Some(message_id) = inbox {
                let fresh = sqlx::query(
                    "INSERT INTO saga_inbox (message_id) VALUES ($1) ON CONFLICT DO NOTHING",
                )
                .bind(message_id)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if !fresh {
                    metrics::counter!("saga_duplicate_replies_total").increment(1);
                    return Ok(());
                }
            }
            match self
                .handle(&mut tx, order_id, input.clone(), causation, trace.clone())
                .await
            {
                Ok(()) => {
                    tx.commit().await?;
                    return Ok(());
                }
                Err(SagaError::Conflict) => continue,
                Err(SagaError::Database(e)) => return Err(e.into()),
                Err(e @ SagaError::Corrupt(..)) => {
                    return Err(Failure::poison("corrupt_saga", e.to_string()));
                }
            }
        }
        Err(Failure::transient(
            "the saga kept changing under this input",
        ))
    }

    /// Consumes participants' replies until `shutdown`.
    pub async fn run_replies(
        self,
        conn: std::sync::Arc<lapin::Connection>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let options = ConsumeOptions {
            queue: self.names.queue("replies"),
            dead_letter_queue: self.names.dead_letter_queue("replies"),
            max_deliveries: self.config.max_deliveries,
            retry_delays: self.config.retry_delays(),
            concurrency: self.config.concurrency,
        };
        consumer::consume(conn, options, shutdown, |m| {
            let this = self.clone();
            async move {
                let reply: Reply = serde_json::from_slice(&m.body)
                    .map_err(|e| Failure::poison("malformed_reply", e.to_string()))?;
                this.check_reply(&reply, m.causation_id).await?;
                this.handle_in_tx(
                    reply.order_id,
                    reply.input,
                    m.message_id,
                    Some(m.message_id),
                    m.traceparent,
                )
                .await
            }
        })
        .await
    }

    /// Refuses (as poison: dead-lettered with the reason) a reply that does not answer a
    /// command this orchestrator sent for the same order and step.
    async fn check_reply(&self, reply: &Reply, causation: Option<Uuid>) -> Result<(), Failure> {
        let unexpected = |why: String| Failure::poison("unexpected_reply", why);
        let step = reply.input.answers().ok_or_else(|| {
            unexpected(format!(
                "`{}` is not a participant's reply",
                reply.input.name()
            ))
        })?;
        let command = causation.ok_or_else(|| {
            unexpected("the reply names no command (`causation_id` header)".into())
        })?;
        let sent: Option<(Uuid, String)> =
            sqlx::query_as("SELECT order_id, step FROM saga_commands WHERE message_id = $1")
                .bind(command)
                .fetch_optional(&self.pool)
                .await?;
        match sent {
            Some((order, sent_step))
                if order == reply.order_id.0 && sent_step == step_name(step) =>
            {
                Ok(())
            }
            Some((order, sent_step)) => Err(unexpected(format!(
                "command {command} asked {sent_step} of order {order}; the reply answers {} of order {}",
                step_name(step),
                reply.order_id
            ))),
            None => Err(unexpected(format!(
                "command {command} was not sent by this saga"
            ))),
        }
    }

    /// Starts and stops sagas from the event store's feed until `shutdown`. Polls with an
    /// adaptive wait (`event_store::wake`): at once after finding events, idle from 1 ms up
    /// to [`FEED_MAX_IDLE`], cut short by an append in this process.
    pub async fn run_feed(self, ctx: RoleCtx) -> anyhow::Result<()> {
        let shutdown = ctx.shutdown().clone();
        let mut idle = event_store::wake::Idle::new(FEED_MAX_IDLE);
        ctx.up();
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let wait = match self.feed_page().await {
                Ok(n) if n > 0 => {
                    failures = 0;
                    idle.busy();
                    ctx.up();
                    continue;
                }
                Ok(_) => {
                    ctx.up();
                    None
                }
                Err(e) => {
                    failures += 1;
                    ctx.down(&format!("{e:#}"));
                    tracing::warn!(error = %e, "saga feed step failed");
                    Some(Duration::from_millis(100 * u64::from(failures.min(50))))
                }
            };
            match wait {
                Some(backoff) => tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                },
                None => tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = idle.wait() => {}
                },
            }
        }
        Ok(())
    }

    /// One page of the feed in one transaction with the feed position. Returns events read.
    async fn feed_page(&self) -> anyhow::Result<usize> {
        let mut tx = self.pool.begin().await?;
        let (tx_id, position): (String, i64) = sqlx::query_as(
            "SELECT cursor_tx::text, cursor_pos FROM saga_feed_position WHERE id = 1 FOR UPDATE",
        )
        .fetch_one(&mut *tx)
        .await?;
        let cursor = FeedCursor {
            tx_id: tx_id.parse()?,
            position,
        };
        let (events, next) = event_store::read_feed(&mut tx, cursor, 200).await?;
        for e in &events {
            if e.stream_type != orders::ORDER_STREAM {
                continue;
            }
            let order_id = OrderId(e.stream_id);
            let input = match wire::decode(&e.event_type, e.schema_version, &e.payload) {
                Ok(OrderEvent::Placed(p)) => SagaInput::OrderPlaced {
                    order: SagaOrder::from_lines(
                        p.order_id,
                        &p.lines,
                        p.total_minor,
                        p.currency,
                        p.payment,
                        p.shipping_address,
                    ),
                },
                Ok(OrderEvent::Cancelled(c)) if c.cancelled_by != CancelledBy::System => {
                    SagaInput::OrderCancelled
                }
                Ok(_) => continue,
                Err(err) => {
                    tracing::error!(%order_id, error = %err, "undecodable order event; the saga skips it");
                    continue;
                }
            };
            let trace = e.metadata["traceparent"].as_str().map(str::to_owned);
            match self
                .handle(&mut tx, order_id, input, e.event_id, trace)
                .await
            {
                Ok(()) => {}
                Err(SagaError::Corrupt(id, m)) => {
                    tracing::error!(order_id = %id, error = %m, "saga unreadable; skipped");
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !events.is_empty() {
            sqlx::query(
                "UPDATE saga_feed_position SET cursor_tx = $1::text::xid8, cursor_pos = $2 WHERE id = 1",
            )
            .bind(next.tx_id.to_string())
            .bind(next.position)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(events.len())
    }

    /// Fires due step deadlines until `shutdown`.
    pub async fn run_deadlines(self, ctx: RoleCtx) -> anyhow::Result<()> {
        let shutdown = ctx.shutdown().clone();
        while !shutdown.is_cancelled() {
            let fired = match self.fire_due().await {
                Ok(n) => {
                    ctx.up();
                    n
                }
                Err(e) => {
                    ctx.down(&format!("{e:#}"));
                    tracing::warn!(error = %e, "firing saga deadlines failed");
                    0
                }
            };
            if fired == 0 {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
        Ok(())
    }

    async fn fire_due(&self) -> anyhow::Result<usize> {
        let running: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_deadlines")
            .fetch_one(&self.pool)
            .await?;
        metrics::gauge!("sagas_awaiting_a_step").set(running as f64);
        let mut tx = self.pool.begin().await?;
        let due: Vec<(Uuid, String, i32)> = sqlx::query_as(
            "DELETE FROM saga_deadlines WHERE order_id IN (
                 SELECT order_id FROM saga_deadlines WHERE due_at <= now()
                 ORDER BY due_at LIMIT 50 FOR UPDATE SKIP LOCKED)
             RETURNING order_id, step, attempt",
        )
        .fetch_all(&mut *tx)
        .await?;
        for (order_id, step, attempt) in &due {
            let Some(step) = parse_step(step) else {
                continue;
            };
            let input = SagaInput::DeadlineExpired {
                step,
                attempt: *attempt as u32,
            };
            metrics::counter!("saga_deadlines_fired_total", "step" => step_name(step)).increment(1);
            match self
                .handle(&mut tx, OrderId(*order_id), input, Uuid::now_v7(), None)
                .await
            {
                Ok(()) => {}
                Err(e) => return Err(e.into()),
            }
        }
        tx.commit().await?;
        Ok(due.len())
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// AMQP headers of a command: what caused it, its type, and the trace context.
fn command_headers(causation: Uuid, c: &SagaCommand, trace: Option<&str>) -> serde_json::Value {
    let message_type = serde_json::to_value(c)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_owned))
        .unwrap_or_default();
    event_store::Headers::new(Some(causation), trace)
        .with("message_type", message_type)
        .into_value()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saga_streams_never_collide_with_orders_and_map_back() {
        let order = OrderId(Uuid::now_v7());
        let saga = saga_stream_id(order);
        assert_ne!(saga, order.0);
        assert_eq!(saga.get_version_num(), 8);
        assert_eq!(Uuid::from_u128(saga.as_u128() ^ (0xF_u128 << 76)), order.0);
    }

    #[test]
    fn steps_round_trip_by_name() {
        for s in [Step::Inventory, Step::Payment, Step::Shipment] {
            assert_eq!(parse_step(step_name(s)), Some(s));
        }
    }
}

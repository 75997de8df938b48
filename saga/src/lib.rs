//! The checkout saga runtime: the orchestrator that runs `domain::saga` against real
//! messages, and stand-in participants (inventory, payment, shipping) with real state.
//!
//! Data flow: the orchestrator reads `OrderPlaced` (and outside cancellations) from the event
//! store's gap-free feed; each transition appends the saga's event, the order's events and the
//! outgoing commands (outbox rows to RabbitMQ) in one transaction; the outbox relay publishes
//! the commands to `checkout.commands`; participants handle them once per message id and put
//! their replies in the outbox in the same transaction as their effect; the orchestrator
//! consumes the replies (inbox by message id) and acks only after its transaction commits.
//! Step deadlines live in PostgreSQL and survive restarts.
//!
//! # Layout
//! - [`topology`]: queue names, declaration, and the message formats.
//! - [`consumer`]: the shared AMQP consumer loop: retries with backoff, dead-letter queues.
//! - [`orchestrator`]: transitions, the feed and reply inputs, deadlines.
//! - [`participants`]: inventory, payment and shipping stand-ins and their failure switches.
//! - [`dead_letters`]: listing, replaying and discarding the dead-letter queues.
//! - [`retention`]: pruning the inboxes and the record of sent commands by age.
#![forbid(unsafe_code)]

pub mod consumer;
pub mod dead_letters;
pub mod orchestrator;
pub mod participants;
pub mod retention;
pub mod topology;

use std::{future::Future, sync::Arc, time::Duration};

use platform::supervisor::Supervisor;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Settings of the saga runtime.
#[derive(Debug, Clone, clap::Args)]
pub struct SagaConfig {
    /// Prefix of the saga's queue names and routing keys (isolates deployments sharing a broker).
    #[arg(
        id = "saga_queue_prefix",
        long = "saga-queue-prefix",
        env = "SAGA_QUEUE_PREFIX",
        default_value = ""
    )]
    pub queue_prefix: String,
    /// How long a step may go unanswered before it is sent again.
    #[arg(id = "saga_step_timeout", long = "saga-step-timeout", env = "SAGA_STEP_TIMEOUT", default_value = "10s", value_parser = platform::config::parse_duration)]
    pub step_timeout: Duration,
    /// How many times a step is sent before the saga compensates.
    #[arg(
        id = "saga_step_attempts",
        long = "saga-step-attempts",
        env = "SAGA_STEP_ATTEMPTS",
        default_value_t = 3
    )]
    pub step_attempts: u32,
    /// Deliveries of one message (transient failures) before it goes to the dead-letter queue.
    #[arg(
        id = "saga_max_deliveries",
        long = "saga-max-deliveries",
        env = "SAGA_MAX_DELIVERIES",
        default_value_t = 5
    )]
    pub max_deliveries: u32,
    /// First redelivery delay after a transient failure (doubles per attempt, at most 10 s).
    #[arg(id = "saga_retry_base", long = "saga-retry-base", env = "SAGA_RETRY_BASE", default_value = "200ms", value_parser = platform::config::parse_duration)]
    pub retry_base: Duration,
    /// Messages each consumer (orchestrator replies, each participant) handles at once.
    #[arg(
        id = "saga_concurrency",
        long = "saga-concurrency",
        env = "SAGA_CONCURRENCY",
        default_value_t = 8
    )]
    pub concurrency: usize,
    /// Run the stand-in participants in this process.
    #[arg(id = "saga_participants", long = "saga-participants", env = "SAGA_PARTICIPANTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub participants: bool,
    /// Lets the stand-in participants inject faults: payment tokens `tok_slow` and
    /// `tok_flaky_N`, and the two switches below. Tests turn it on; it needs development mode
    /// (SHOP_DEV_MODE), so no customer of a real deployment can slow or break a saga.
    #[arg(id = "saga_fault_injection", long = "saga-fault-injection", env = "SAGA_FAULT_INJECTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub fault_injection: bool,
    /// Fault injection: the named participant (inventory, payment, shipping) answers with
    /// malformed replies, to exercise the orchestrator's dead-letter path.
    #[arg(
        id = "saga_poison_replies_from",
        long = "saga-poison-replies-from",
        env = "SAGA_POISON_REPLIES_FROM"
    )]
    pub poison_replies_from: Option<String>,
    /// Fault injection: the named participant refuses every command as invalid (dead-letters
    /// it), like a participant with a validation bug; replay the dead letters after turning
    /// it off.
    #[arg(
        id = "saga_refuse_commands_at",
        long = "saga-refuse-commands-at",
        env = "SAGA_REFUSE_COMMANDS_AT"
    )]
    pub refuse_commands_at: Option<String>,
}

/// A saga configuration that must not run (the process does not start).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SagaConfigError {
    #[error(
        "SAGA_FAULT_INJECTION needs development mode (SHOP_DEV_MODE=true): it lets any customer slow down or fail a saga"
    )]
    FaultInjectionOutsideDevelopment,
    #[error("{0} is fault injection: set SAGA_FAULT_INJECTION=true (development mode only)")]
    SwitchWithoutFaultInjection(&'static str),
    #[error("{setting}: `{value}` is not a participant (inventory, payment, shipping)")]
    UnknownParticipant {
        setting: &'static str,
        value: String,
    },
}

impl SagaConfig {
    /// Refuses fault injection outside development mode, and its switches without it.
    pub fn check(&self, dev_mode: bool) -> Result<(), SagaConfigError> {
        if self.fault_injection && !dev_mode {
            return Err(SagaConfigError::FaultInjectionOutsideDevelopment);
        }
        for (setting, value) in [
            ("SAGA_POISON_REPLIES_FROM", &self.poison_replies_from),
            ("SAGA_REFUSE_COMMANDS_AT", &self.refuse_commands_at),
        ] {
            let Some(value) = value else { continue };
            if !self.fault_injection {
                return Err(SagaConfigError::SwitchWithoutFaultInjection(setting));
            }
            if !participants::Participant::ALL
                .iter()
                .any(|p| p.name() == value)
            {
                return Err(SagaConfigError::UnknownParticipant {
                    setting,
                    value: value.clone(),
                });
            }
        }
        Ok(())
    }

    /// The wait before each redelivery: `retry_base` doubling per attempt, at most 10 s, one
    /// per delivery after the first.
    pub fn retry_delays(&self) -> Vec<Duration> {
        (1..self.max_deliveries.max(1))
            .map(|attempt| {
                self.retry_base
                    .saturating_mul(2u32.saturating_pow(attempt.min(16) - 1))
                    .min(Duration::from_secs(10))
            })
            .collect()
    }
}

impl Default for SagaConfig {
    fn default() -> Self {
        platform::config::defaults()
    }
}

/// Runs the orchestrator (and the participants, if configured) until `shutdown`, each part
/// a supervised role ([`roles`]). Returns only at shutdown or on a permanent failure.
pub async fn run(
    pool: PgPool,
    amqp_url: String,
    config: SagaConfig,
    vault: platform::vault::Vault,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut supervisor = Supervisor::new(shutdown);
    roles(&mut supervisor, pool, amqp_url, config, vault);
    supervisor.wait().await
}

/// Adds the saga's roles to `supervisor`. The feed and the deadlines need only PostgreSQL;
/// each RabbitMQ consumer has its own connection, so a broker outage restarts those alone,
/// and each reconnects and declares its queues again when the broker is back.
/// - `saga:feed`: starts and stops sagas from the event store's feed;
/// - `saga:deadlines`: fires due step deadlines;
/// - `saga:replies`: consumes participants' replies;
/// - `saga:dlq-depth`: exports the dead-letter queues' depth;
/// - `participant:inventory|payment|shipping`: the stand-ins, when configured.
pub fn roles(
    supervisor: &mut Supervisor,
    pool: PgPool,
    amqp_url: String,
    config: SagaConfig,
    vault: platform::vault::Vault,
) {
    let orchestrator = orchestrator::Orchestrator::new(pool.clone(), config.clone());
    let o = orchestrator.clone();
    supervisor.spawn("saga:feed", move |ctx| o.clone().run_feed(ctx));
    let o = orchestrator.clone();
    supervisor.spawn("saga:deadlines", move |ctx| o.clone().run_deadlines(ctx));
    let names = topology::Names::new(&config.queue_prefix);
    let amqp = AmqpRole {
        url: amqp_url,
        names: names.clone(),
        retry_delays: config.retry_delays(),
    };
    let o = orchestrator;
    amqp.spawn(
        supervisor,
        "saga:replies",
        "checkout-saga",
        move |conn, stop| o.clone().run_replies(conn, stop),
    );
    amqp.spawn(
        supervisor,
        "saga:dlq-depth",
        "checkout-saga-dlq-depth",
        move |conn, stop| report_dead_letter_depth(conn, names.clone(), stop),
    );
    if !config.participants {
        return;
    }
    for p in participants::Participant::ALL {
        let (pool, config, vault) = (pool.clone(), config.clone(), vault.clone());
        amqp.spawn(
            supervisor,
            &format!("participant:{}", p.name()),
            &format!("participant-{}", p.name()),
            move |conn, stop| {
                participants::run(p, pool.clone(), conn, config.clone(), vault.clone(), stop)
            },
        );
    }
}

/// Where a saga role's RabbitMQ connection goes and what it declares.
#[derive(Clone)]
struct AmqpRole {
    url: String,
    names: topology::Names,
    retry_delays: Vec<Duration>,
}

impl AmqpRole {
    /// Adds a role that owns one connection (named `connection` in the broker's UI): each
    /// start connects, declares the topology, is up, and runs `work` until it ends or the
    /// connection is lost.
    fn spawn<W, Fut>(&self, supervisor: &mut Supervisor, role: &str, connection: &str, work: W)
    where
        W: Fn(Arc<lapin::Connection>, CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (this, connection, work) = (self.clone(), connection.to_owned(), Arc::new(work));
        supervisor.spawn(role, move |ctx| {
            let (this, connection, work) = (this.clone(), connection.clone(), work.clone());
            async move {
                let conn = connect(&this.url, &connection, &this.names, &this.retry_delays).await?;
                ctx.up();
                let stop = ctx.shutdown().clone();
                watched(&conn, work(conn.clone(), stop.clone()), &stop).await
            }
        });
    }
}

/// A connection with the saga's topology declared (idempotent, so every reconnect declares
/// whatever a restarted broker lost).
async fn connect(
    url: &str,
    name: &str,
    names: &topology::Names,
    retry_delays: &[Duration],
) -> anyhow::Result<Arc<lapin::Connection>> {
    let conn = Arc::new(platform::amqp::connect(url, name).await?);
    if let Err(e) = topology::declare(&conn, names, retry_delays).await {
        // PRECONDITION_FAILED here: a queue exists with other arguments (type, TTL, dead
        // lettering); redeclaring cannot fix that, a person must.
        let precondition = matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
            if matches!(p.kind(), lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::PRECONDITIONFAILED)));
        let e = anyhow::Error::from(e).context("declaring the saga's queues");
        return Err(if precondition {
            platform::errors::permanent(e)
        } else {
            e
        });
    }
    Ok(conn)
}

/// How long a stopping AMQP role may take to finish the deliveries it holds; past it they are
/// abandoned unacknowledged and the broker redelivers them (every handler is idempotent per
/// message), so a stuck broker call or handler cannot hold up the process's exit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long closing a connection may wait for the broker's answer.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `work` until it ends, the connection is lost, or it has not drained within
/// [`DRAIN_TIMEOUT`] of `stop` (whichever first), then closes the connection. A lost
/// connection is an error, so the supervisor reconnects.
async fn watched(
    conn: &lapin::Connection,
    work: impl Future<Output = anyhow::Result<()>>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let result = tokio::select! {
        r = work => r,
        e = platform::amqp::connection_lost(conn) => Err(e),
        () = async { stop.cancelled().await; tokio::time::sleep(DRAIN_TIMEOUT).await } => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "in-flight deliveries not settled in time; leaving them to the broker to redeliver");
            Ok(())
        }
    };
    platform::amqp::close(conn, CLOSE_TIMEOUT).await;
    result
}

/// Exports `saga_dlq_depth{queue}` every 10 s (passive declares: nothing is created).
async fn report_dead_letter_depth(
    conn: std::sync::Arc<lapin::Connection>,
    names: topology::Names,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    while !stop.is_cancelled() {
        for d in topology::DESTINATIONS {
            let queue = names.dead_letter_queue(d);
            let q = declared(&ch, &queue).await?;
            metrics::gauge!("saga_dlq_depth", "queue" => queue).set(f64::from(q.message_count()));
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
    ch.close(200, "shutdown".into()).await.ok();
    Ok(())
}

/// A saga queue as the broker counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    pub queue: String,
    /// A dead-letter queue (nothing consumes it; operators drain it).
    pub dead_letter: bool,
    /// Messages ready for a consumer.
    pub waiting: u32,
    pub consumers: u32,
}

/// Every destination's queue and its dead-letter queue with their depth and consumers
/// (passive declares: nothing is created; a queue that does not exist is an error).
pub async fn queue_depths(
    conn: &lapin::Connection,
    names: &topology::Names,
) -> Result<Vec<QueueDepth>, lapin::Error> {
    let ch = conn.create_channel().await?;
    let mut out = Vec::new();
    for d in topology::DESTINATIONS {
        for (queue, dead_letter) in [(names.queue(d), false), (names.dead_letter_queue(d), true)] {
            let q = declared(&ch, &queue).await?;
            out.push(QueueDepth {
                queue,
                dead_letter,
                waiting: q.message_count(),
                consumers: q.consumer_count(),
            });
        }
    }
    ch.close(200, "counted".into()).await.ok();
    Ok(out)
}

/// An existing queue as the broker counts it (a passive declare).
async fn declared(ch: &lapin::Channel, queue: &str) -> Result<lapin::Queue, lapin::Error> {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
}

/// How many sagas wait for a participant: each has one armed step deadline (the console's
/// overview).
pub async fn sagas_in_flight(pool: &sqlx::PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM saga_deadlines")
        .fetch_one(pool)
        .await
}

/// A saga waiting for a participant: the step, its attempt, and when its deadline fires.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Waiting {
    pub order_id: uuid::Uuid,
    pub step: String,
    pub attempt: i32,
    pub due_at: chrono::DateTime<chrono::Utc>,
}

/// The sagas waiting for a participant, the soonest deadline first; `step` narrows to one
/// step (`inventory`, `payment`, `shipment`), `overdue` to deadlines already past (the
/// deadlines role is behind or down).
pub async fn waiting(
    pool: &sqlx::PgPool,
    step: Option<&str>,
    overdue: bool,
    limit: i64,
) -> Result<Vec<Waiting>, sqlx::Error> {
    sqlx::query_as(
        "SELECT order_id, step, attempt, due_at FROM saga_deadlines
         WHERE ($1::text IS NULL OR step = $1) AND (NOT $2 OR due_at < now())
         ORDER BY due_at LIMIT $3",
    )
    .bind(step)
    .bind(overdue)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// How a saga ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every step succeeded; the order is confirmed.
    Completed,
    /// It gave up (a refusal, a failure, out of attempts, the order cancelled) and undid what
    /// may have been held.
    Compensated,
}

impl Outcome {
    pub const ALL: [Outcome; 2] = [Outcome::Completed, Outcome::Compensated];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Compensated => "compensated",
        }
    }

    /// The saga event that ends it this way.
    fn event_type(self) -> &'static str {
        match self {
            Outcome::Completed => "SagaCompleted",
            Outcome::Compensated => "SagaCompensationStarted",
        }
    }
}

/// A saga that ended: its order, how, why (a compensation's reason) and when.
#[derive(Debug, Clone)]
pub struct Ended {
    pub order_id: uuid::Uuid,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// The sagas that ended most recently, newest first (`outcome` narrows to one way), read
/// from the sagas' own streams in the event store.
pub async fn ended(
    pool: &sqlx::PgPool,
    outcome: Option<Outcome>,
    limit: i64,
) -> Result<Vec<Ended>, sqlx::Error> {
    let types: Vec<&str> = Outcome::ALL
        .into_iter()
        .filter(|o| outcome.is_none_or(|x| x == *o))
        .map(Outcome::event_type)
        .collect();
    let rows: Vec<(
        uuid::Uuid,
        String,
        Option<String>,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as(
        "SELECT stream_id, event_type, payload->>'reason', recorded_at FROM events
             WHERE stream_type = $1 AND event_type = ANY($2)
             ORDER BY position DESC LIMIT $3",
    )
    .bind(orchestrator::SAGA_STREAM)
    .bind(&types)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(stream, kind, reason, at)| Ended {
            // The saga's stream id is the order id with one nibble flipped: flipping it
            // again gives the order.
            order_id: domain::saga::stream_id(domain::values::OrderId(stream)),
            outcome: if kind == Outcome::Completed.event_type() {
                Outcome::Completed
            } else {
                Outcome::Compensated
            },
            reason,
            at,
        })
        .collect())
}

/// Makes a waiting saga's step deadline due now, so the deadlines role does at once what it
/// would have done when the deadline passed: send the step again as its next attempt or,
/// out of attempts, compensate. Returns the step and attempt that were waiting, `None` when
/// the saga waits for nothing (finished, or not started).
pub async fn expedite(
    pool: &sqlx::PgPool,
    order_id: uuid::Uuid,
) -> Result<Option<(String, i32)>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE saga_deadlines SET due_at = now() WHERE order_id = $1 RETURNING step, attempt",
    )
    .bind(order_id)
    .fetch_optional(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_injection_needs_development_mode_and_its_switches_need_it() {
        let on = SagaConfig {
            fault_injection: true,
            ..SagaConfig::default()
        };
        assert_eq!(
            on.check(false),
            Err(SagaConfigError::FaultInjectionOutsideDevelopment)
        );
        assert_eq!(on.check(true), Ok(()));
        assert_eq!(SagaConfig::default().check(false), Ok(()));
        let switch_alone = SagaConfig {
            refuse_commands_at: Some("shipping".into()),
            ..SagaConfig::default()
        };
        assert_eq!(
            switch_alone.check(true),
            Err(SagaConfigError::SwitchWithoutFaultInjection(
                "SAGA_REFUSE_COMMANDS_AT"
            ))
        );
        let typo = SagaConfig {
            poison_replies_from: Some("shiping".into()),
            ..on
        };
        assert!(matches!(
            typo.check(true),
            Err(SagaConfigError::UnknownParticipant { .. })
        ));
    }
}

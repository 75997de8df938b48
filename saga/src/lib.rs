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
#![forbid(unsafe_code)]

pub mod consumer;
pub mod dead_letters;
pub mod orchestrator;
pub mod participants;
pub mod topology;

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Settings of the saga runtime.
#[derive(Debug, Clone, clap::Args)]
pub struct SagaConfig {
    /// Prefix of the saga's queue names and routing keys (isolates deployments sharing a broker).
    #[arg(long, env = "SAGA_QUEUE_PREFIX", default_value = "")]
    pub queue_prefix: String,
    /// How long a step may go unanswered before it is sent again.
    #[arg(long, env = "SAGA_STEP_TIMEOUT", default_value = "10s", value_parser = platform::config::parse_duration)]
    pub step_timeout: Duration,
    /// How many times a step is sent before the saga compensates.
    #[arg(long, env = "SAGA_STEP_ATTEMPTS", default_value_t = 3)]
    pub step_attempts: u32,
    /// Deliveries of one message (transient failures) before it goes to the dead-letter queue.
    #[arg(long, env = "SAGA_MAX_DELIVERIES", default_value_t = 5)]
    pub max_deliveries: u32,
    /// First redelivery delay after a transient failure (doubles per attempt, at most 10 s).
    #[arg(long, env = "SAGA_RETRY_BASE", default_value = "200ms", value_parser = platform::config::parse_duration)]
    pub retry_base: Duration,
    /// Messages each consumer (orchestrator replies, each participant) handles at once.
    #[arg(long, env = "SAGA_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
    /// Run the stand-in participants in this process.
    #[arg(long, env = "SAGA_PARTICIPANTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub participants: bool,
    /// Stand-in switch: the named participant (inventory, payment, shipping) answers with
    /// malformed replies, to exercise the orchestrator's dead-letter path.
    #[arg(long, env = "SAGA_POISON_REPLIES_FROM")]
    pub poison_replies_from: Option<String>,
    /// Stand-in switch: the named participant refuses every command as invalid (dead-letters
    /// it), like a participant with a validation bug; replay the dead letters after turning
    /// it off.
    #[arg(long, env = "SAGA_REFUSE_COMMANDS_AT")]
    pub refuse_commands_at: Option<String>,
}

impl SagaConfig {
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
        Self {
            queue_prefix: String::new(),
            step_timeout: Duration::from_secs(10),
            step_attempts: 3,
            max_deliveries: 5,
            retry_base: Duration::from_millis(200),
            concurrency: 8,
            participants: true,
            poison_replies_from: None,
            refuse_commands_at: None,
        }
    }
}

/// Runs the orchestrator (and the participants, if configured) until `shutdown`. A broker
/// outage does not stop it: the tasks are restarted on a new connection after a backoff
/// (messages not acked meanwhile are redelivered; inputs are idempotent).
pub async fn run(
    pool: PgPool,
    amqp_url: String,
    config: SagaConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        match run_once(&pool, &amqp_url, &config, &shutdown).await {
            Ok(()) => break,
            Err(e) => {
                failures += 1;
                let wait = Duration::from_millis(250 * u64::from(failures.min(40)));
                tracing::warn!(error = %e, retry_in = ?wait, "saga runtime stopped; restarting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    tracing::info!("saga runtime stopped");
    Ok(())
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
            let q = ch
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    Default::default(),
                )
                .await?;
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

/// One connection's life: declare the topology, run every task until shutdown or the first
/// failure (which stops the others).
async fn run_once(
    pool: &PgPool,
    amqp_url: &str,
    config: &SagaConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let conn = std::sync::Arc::new(platform::amqp::connect(amqp_url, "checkout-saga").await?);
    let names = topology::Names::new(&config.queue_prefix);
    topology::declare(&conn, &names, &config.retry_delays()).await?;
    let stop = shutdown.child_token();
    let mut tasks = tokio::task::JoinSet::new();
    let orchestrator = orchestrator::Orchestrator::new(pool.clone(), config.clone());
    tasks.spawn(orchestrator.clone().run_feed(stop.clone()));
    tasks.spawn(orchestrator.clone().run_deadlines(stop.clone()));
    tasks.spawn(orchestrator.run_replies(conn.clone(), stop.clone()));
    tasks.spawn(report_dead_letter_depth(
        conn.clone(),
        names.clone(),
        stop.clone(),
    ));
    if config.participants {
        for p in participants::Participant::ALL {
            tasks.spawn(participants::run(
                p,
                pool.clone(),
                conn.clone(),
                config.clone(),
                stop.clone(),
            ));
        }
    }
    let mut result = Ok(());
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.map_err(anyhow::Error::from).and_then(|r| r) {
            stop.cancel();
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    conn.close(200, "shutdown".into()).await.ok();
    result
}

//! The outbox relay: publishes committed outbox rows to Kafka and RabbitMQ.
//!
//! # Guarantees
//! - **At least once**: a row is marked published only after the broker confirmed it (Kafka
//!   delivery report with `acks=all`, RabbitMQ publisher confirm). A crash in between
//!   republishes it; consumers deduplicate on the message id (= event id).
//! - **Per-key order**: rows are published in id order, which is append order for one key
//!   (appends to one stream are serialised by its head row). Only one relay instance publishes
//!   at a time: instances elect a leader with a PostgreSQL advisory lock held on a dedicated
//!   session; the others stand by and take over within one poll interval when the leader's
//!   session ends (crash, SIGKILL, network loss).
//! - **Failures**: a broker that is down is retried with capped exponential backoff and
//!   jitter (the backlog waits in PostgreSQL, `/readyz` reports unready). A row the broker
//!   rejects for good is set aside with its error and blocks only the later rows of its key
//!   until an operator retries it (`shop outbox failed|retry`).
//!
//! # Layout
//! - the outbox table itself belongs to [`event_store::outbox`] (all its SQL is there).
//! - [`kafka`], [`amqp`]: the two sinks; each turns rows into per-row [`Delivery`] outcomes.
//! - [`Relay::try_execute_once`]: one batch (a testable step); [`run`]: leader election,
//!   NOTIFY/poll wake-ups, backoff, pruning, metrics, shutdown.
#![forbid(unsafe_code)]

pub mod amqp;
pub mod kafka;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use rand::Rng;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use event_store::outbox::{self as store, Destination, OutboxRow};

/// The span of one row's publish: it continues the trace of whatever wrote the row (the
/// `traceparent` header the row carries).
pub(crate) fn publish_span(row: &OutboxRow) -> tracing::Span {
    let span = tracing::info_span!(
        "relay.publish",
        message_id = %row.message_id,
        destination = %row.destination,
        target = %row.target,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    platform::trace::follow(&span, row.headers["traceparent"].as_str());
    span.in_scope(|| tracing::debug!("publishing"));
    span
}

/// After this long without delivery reports the relay reports itself unready.
const STALL: Duration = Duration::from_secs(5);

/// After this long without delivery reports the Kafka producer is recreated.
const STALL_RESET: Duration = Duration::from_secs(30);

/// How long a batch in flight may take to finish once shutdown was asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Advisory lock key of relay leadership ("outbox" in ASCII).
pub const LEADER_LOCK: i64 = 0x6f7574626f78;

#[derive(Debug, Clone, clap::Args)]
pub struct RelayConfig {
    /// Rows published per batch.
    #[arg(
        id = "relay_batch_size",
        long = "relay-batch-size",
        env = "RELAY_BATCH_SIZE",
        default_value_t = 1000
    )]
    pub batch_size: i64,
    /// How often a standby instance tries to become the publishing leader.
    #[arg(id = "relay_poll_interval", long = "relay-poll-interval", env = "RELAY_POLL_INTERVAL", default_value = "1s", value_parser = platform::config::parse_duration)]
    pub poll_interval: Duration,
    /// The longest wait between polls of an idle outbox (`event_store::wake`: the wait starts
    /// at 1 ms and doubles; an append in this process cuts it short; one in another process
    /// is found within this).
    #[arg(id = "relay_max_idle", long = "relay-max-idle", env = "RELAY_MAX_IDLE", default_value = "100ms", value_parser = platform::config::parse_duration)]
    pub max_idle: Duration,
    /// Published rows are deleted after this long.
    #[arg(id = "relay_retention", long = "relay-retention", env = "RELAY_RETENTION", default_value = "24h", value_parser = platform::config::parse_duration)]
    pub retention: Duration,
    /// Longest wait between retries while a broker is failing.
    #[arg(id = "relay_max_backoff", long = "relay-max-backoff", env = "RELAY_MAX_BACKOFF", default_value = "30s", value_parser = platform::config::parse_duration)]
    pub max_backoff: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        platform::config::defaults()
    }
}

/// What a broker said about one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Published,
    /// Permanent: set the row aside.
    Rejected(String),
    /// Try again later.
    Transient(String),
    /// Not sent: an earlier row of its key failed in this batch.
    Skipped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Rows published (some rows of the batch may have failed and be counted separately).
    Did { published: usize, failed: usize },
    /// Nothing to publish.
    Idle,
}

pub struct Relay {
    pool: PgPool,
    kafka: kafka::KafkaSink,
    amqp: amqp::AmqpSink,
    cfg: RelayConfig,
    /// Up while the last batch reached its brokers.
    pub ready: Arc<AtomicBool>,
}

impl Relay {
    pub fn new(
        pool: PgPool,
        infra: &platform::config::InfraConfig,
        cfg: RelayConfig,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            pool,
            kafka: kafka::KafkaSink::new(&infra.kafka_brokers, &infra.kafka_topic_prefix)
                .context("creating the Kafka producer")?,
            amqp: amqp::AmqpSink::new(&infra.amqp_url),
            cfg,
            ready: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Publishes one batch. Transient broker failures come back as `Err` after counting the
    /// attempt on the rows (the caller backs off); permanent ones set rows aside.
    pub async fn try_execute_once(&mut self) -> anyhow::Result<Outcome> {
        let t_fetch = Instant::now();
        let rows = store::next_batch(&self.pool, self.cfg.batch_size).await?;
        if rows.is_empty() {
            return Ok(Outcome::Idle);
        }
        let fetch_took = t_fetch.elapsed();
        metrics::histogram!("outbox_batch_size").record(rows.len() as f64);
        let results = self.send(&rows).await?;
        let t_mark = Instant::now();
        let outcome = self.settle(results).await;
        metrics::histogram!("outbox_fetch_duration_seconds").record(fetch_took.as_secs_f64());
        metrics::histogram!("outbox_mark_duration_seconds").record(t_mark.elapsed().as_secs_f64());
        tracing::debug!(rows = rows.len(), fetch = ?fetch_took, total = ?t_fetch.elapsed(), mark = ?t_mark.elapsed(), "batch done");
        outcome
    }

    /// Sends `rows` to their brokers; one delivery outcome per row. `Err` when the Kafka
    /// producer stalled for good and was recreated (the rows stay pending).
    async fn send<'r>(
        &mut self,
        rows: &'r [OutboxRow],
    ) -> anyhow::Result<Vec<(&'r OutboxRow, Delivery)>> {
        let (to_kafka, to_amqp): (Vec<&OutboxRow>, Vec<&OutboxRow>) = rows
            .iter()
            .partition(|r| r.destination == Destination::Kafka);
        let mut results: Vec<(&OutboxRow, Delivery)> = Vec::with_capacity(rows.len());
        if !to_kafka.is_empty() {
            let started = Instant::now();
            // Deliveries wait (in order) while Kafka is unreachable: report unready meanwhile.
            let d = {
                let publish = self.kafka.publish(&to_kafka);
                tokio::pin!(publish);
                tokio::select! {
                    d = &mut publish => Some(d),
                    _ = tokio::time::sleep(STALL) => {
                        self.ready.store(false, Ordering::Relaxed);
                        tracing::warn!("kafka deliveries stalled; waiting for the broker");
                        tokio::time::timeout(STALL_RESET - STALL, &mut publish).await.ok()
                    }
                }
            };
            let Some(d) = d else {
                self.kafka
                    .reset()
                    .await
                    .context("recreating the Kafka producer")?;
                anyhow::bail!(
                    "no Kafka delivery report for {STALL_RESET:?}; the producer was recreated and the batch will be sent again"
                );
            };
            metrics::histogram!("outbox_send_duration_seconds", "destination" => "kafka")
                .record(started.elapsed().as_secs_f64());
            results.extend(to_kafka.into_iter().zip(d));
        }
        if !to_amqp.is_empty() {
            let started = Instant::now();
            let d = self.amqp.publish(&to_amqp).await;
            metrics::histogram!("outbox_send_duration_seconds", "destination" => "amqp")
                .record(started.elapsed().as_secs_f64());
            results.extend(to_amqp.into_iter().zip(d));
        }
        Ok(results)
    }

    /// Records the outcome of each row: published, set aside (the first rejected row of a
    /// key), or pending again; `Err` when some failed transiently (the caller backs off).
    async fn settle(&self, mut results: Vec<(&OutboxRow, Delivery)>) -> anyhow::Result<Outcome> {
        let now = chrono::Utc::now();
        let mut published = Vec::new();
        let mut transient = Vec::new();
        let mut failed = 0;
        let mut transient_error = String::new();
        // Only the first rejected row of a key is set aside; later rows of that key that were
        // also refused stay pending behind it (they were sent before the first refusal was
        // known: RabbitMQ confirms arrive after the whole batch is out).
        let mut failed_keys = std::collections::HashSet::new();
        for (row, d) in &mut results {
            if let Delivery::Rejected(_) = d
                && !failed_keys.insert((row.destination, row.ordering_key.clone()))
            {
                *d = Delivery::Skipped;
            }
        }
        for (row, d) in &results {
            let dest = row.destination.as_str();
            match d {
                Delivery::Published => {
                    published.push(row.id);
                    let age = (now - row.created_at).to_std().unwrap_or_default();
                    metrics::histogram!("outbox_publish_latency_seconds", "destination" => dest)
                        .record(age.as_secs_f64());
                }
                Delivery::Rejected(e) => {
                    tracing::error!(id = row.id, message_id = %row.message_id, key = %row.ordering_key, error = %e,
                        "broker rejected an outbox message for good; its key is blocked until it is retried");
                    store::mark_failed(&self.pool, row.id, e).await?;
                    failed += 1;
                }
                Delivery::Transient(e) => {
                    transient.push(row.id);
                    transient_error.clone_from(e);
                }
                Delivery::Skipped => {}
            }
            let outcome = match d {
                Delivery::Published => "published",
                Delivery::Rejected(_) => "rejected",
                Delivery::Transient(_) => "transient_error",
                Delivery::Skipped => "skipped",
            };
            metrics::counter!("outbox_messages_total", "destination" => dest, "outcome" => outcome)
                .increment(1);
        }
        store::mark_published(&self.pool, &published).await?;
        if !transient.is_empty() {
            store::record_attempt(&self.pool, &transient, &transient_error).await?;
            self.ready.store(false, Ordering::Relaxed);
            anyhow::bail!(
                "{} message(s) not delivered: {transient_error}",
                transient.len()
            );
        }
        if !self.ready.swap(true, Ordering::Relaxed) {
            tracing::info!("brokers accept messages again");
        }
        Ok(Outcome::Did {
            published: published.len(),
            failed,
        })
    }

    /// Publishes until nothing is pending (tests and tools); stops at the first transient error.
    pub async fn drain(&mut self) -> anyhow::Result<usize> {
        let mut total = 0;
        while let Outcome::Did { published, failed } = self.try_execute_once().await? {
            total += published;
            if published == 0 && failed == 0 {
                break;
            }
        }
        Ok(total)
    }
}

/// Holds relay leadership while the session lives.
struct Leadership {
    conn: PgConnection,
}

impl Leadership {
    async fn try_acquire(url: &str) -> anyhow::Result<Option<Self>> {
        let mut conn = PgConnection::connect(url).await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK)
            .fetch_one(&mut conn)
            .await?;
        Ok(got.then_some(Self { conn }))
    }

    /// Still leader if the session answers (the lock lives exactly as long as the session).
    async fn check(&mut self) -> bool {
        self.conn.ping().await.is_ok()
    }
}

fn backoff(failures: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << failures.min(16));
    let capped = base.min(max);
    capped.mul_f64(rand::rng().random_range(0.5..1.0))
}

/// The relay as a supervised role: a new relay (producers, AMQP sink) on each start, its
/// broker readiness reported through `ready` (shared across restarts, read by `/readyz`).
pub async fn run_role(
    pool: PgPool,
    infra: platform::config::InfraConfig,
    cfg: RelayConfig,
    ready: Arc<AtomicBool>,
    ctx: platform::supervisor::RoleCtx,
) -> anyhow::Result<()> {
    let mut relay = Relay::new(pool, &infra, cfg)?;
    relay.ready = ready;
    ctx.up();
    run(relay, infra.database_url.clone(), ctx.shutdown().clone()).await
}

/// Runs the relay until `shutdown`: stands by until it is leader, then publishes batches as
/// NOTIFYs arrive (or every poll interval), backs off on broker trouble, prunes old rows and
/// exports backlog metrics. On shutdown the batch in flight is finished (or, if its broker is
/// unreachable, abandoned unmarked, to be republished by the next leader).
pub async fn run(
    mut relay: Relay,
    database_url: String,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let result = run_loop(&mut relay, database_url, shutdown).await;
    // Destroying the Kafka producer flushes and joins its threads: not on a runtime worker.
    tokio::task::spawn_blocking(move || drop(relay));
    result
}

// Long on purpose: the relay's one loop (wake-ups, leadership, backoff, pruning, metrics);
// each branch is short and they share the loop's state.
async fn run_loop(
    relay: &mut Relay,
    database_url: String,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (poll_interval, max_backoff) = (relay.cfg.poll_interval, relay.cfg.max_backoff);
    let mut idle = event_store::wake::Idle::new(relay.cfg.max_idle);
    let mut leader: Option<Leadership> = None;
    let mut failures = 0u32;
    let mut last_prune = Instant::now() - Duration::from_secs(3600);
    let mut last_stats = Instant::now() - Duration::from_secs(3600);
    while !shutdown.is_cancelled() {
        if last_stats.elapsed() >= Duration::from_secs(2) {
            if let Ok((n, age)) = store::backlog(&relay.pool).await {
                metrics::gauge!("outbox_backlog").set(n as f64);
                metrics::gauge!("outbox_oldest_unpublished_age_seconds").set(age);
            }
            last_stats = Instant::now();
        }
        let is_leader = match &mut leader {
            Some(l) => l.check().await,
            None => false,
        };
        if !is_leader {
            if leader.take().is_some() {
                tracing::warn!("lost relay leadership");
            }
            match Leadership::try_acquire(&database_url).await {
                Ok(Some(l)) => {
                    tracing::info!("became the publishing relay instance");
                    leader = Some(l);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot reach PostgreSQL for leadership"),
            }
            metrics::gauge!("outbox_relay_leader").set(if leader.is_some() { 1.0 } else { 0.0 });
            if leader.is_none() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(poll_interval) => continue,
                }
            }
        }
        if last_prune.elapsed() >= Duration::from_secs(60) {
            match store::prune(&relay.pool, relay.cfg.retention).await {
                Ok(n) if n > 0 => tracing::info!(rows = n, "pruned published outbox rows"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pruning the outbox failed"),
            }
            last_prune = Instant::now();
        }
        // On shutdown the batch in flight gets a grace period to finish (and be marked);
        // past it (a broker is down) it is abandoned unmarked and republished later.
        let batch = relay.try_execute_once();
        tokio::pin!(batch);
        let step = tokio::select! {
            r = &mut batch => r,
            _ = shutdown.cancelled() => {
                if tokio::time::timeout(SHUTDOWN_GRACE, &mut batch).await.is_err() {
                    tracing::warn!("batch in flight abandoned at shutdown; it will be republished");
                }
                break;
            }
        };
        match step {
            Ok(Outcome::Did { .. }) => {
                failures = 0;
                idle.busy();
            }
            Ok(Outcome::Idle) => {
                failures = 0;
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = idle.wait() => {}
                }
            }
            Err(e) => {
                failures += 1;
                let wait = backoff(failures, max_backoff);
                tracing::warn!(error = %e, retry_in = ?wait, "publishing failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    tracing::info!("relay stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let max = Duration::from_secs(30);
        assert!(backoff(1, max) <= Duration::from_millis(200));
        assert!(backoff(1, max) >= Duration::from_millis(100));
        for _ in 0..100 {
            let b = backoff(40, max);
            assert!(b <= max && b >= max / 2, "{b:?}");
        }
    }
}

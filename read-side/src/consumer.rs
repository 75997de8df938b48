//! The projector loop: one Kafka consumer group per projection.
//!
//! The messages that have already arrived (up to 1,000; it never waits for more) are applied
//! in one PostgreSQL transaction: skip those behind the stored per-partition checkpoint,
//! apply the rest, move the checkpoints; commit; then commit the Kafka offsets. A batch with a
//! message that needs special handling is redone one message at a time. A crash between the
//! two commits redelivers the messages, and the checkpoints (and the per-version idempotency
//! of the projection) make that a no-op. A poison message is dead-lettered
//! ([`crate::dead_letters`]) and copied to the DLQ topic. A transient failure (the database,
//! a lock held too long) is retried with capped exponential backoff, blocking its partition;
//! after `max_attempts` it is dead-lettered as `transient` so the partition moves on. When
//! even that cannot be written (the database is down) nothing is skipped: the loop keeps
//! retrying until PostgreSQL answers.

use std::time::Duration;

use platform::errors::{ErrorClass, classify};
use rdkafka::{
    Message,
    consumer::{Consumer, StreamConsumer},
    message::{Header, Headers, OwnedHeaders, OwnedMessage},
    producer::{FutureProducer, FutureRecord},
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    checkpoints,
    dead_letters::{self, DeadLetter, Incoming, Processed},
    envelope::OrderEnvelope,
    projection::{self, Kind},
    registry,
};

/// Why a message is dead-lettered after failing: its class, the error, how often since when.
struct Failed<'a> {
    class: ErrorClass,
    error: &'a str,
    attempts: u32,
    first: chrono::DateTime<chrono::Utc>,
}

/// How hard a projector tries before it dead-letters a transiently failing message.
#[derive(Debug, Clone, clap::Args)]
pub struct ProjectorConfig {
    /// Attempts at a message failing with transient errors before it is dead-lettered.
    #[arg(
        id = "projection_max_attempts",
        long = "projection-max-attempts",
        env = "PROJECTION_MAX_ATTEMPTS",
        default_value_t = 5
    )]
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to 30 s.
    #[arg(id = "projection_retry_base", long = "projection-retry-base", env = "PROJECTION_RETRY_BASE", default_value = "200ms", value_parser = platform::config::parse_duration)]
    pub retry_base: Duration,
    /// How long one message may wait for a row lock before that attempt fails.
    #[arg(id = "projection_lock_timeout", long = "projection-lock-timeout", env = "PROJECTION_LOCK_TIMEOUT", default_value = "5s", value_parser = platform::config::parse_duration)]
    pub lock_timeout: Duration,
    /// A consumer that receives nothing this long while events wait for it is restarted.
    #[arg(id = "projection_stuck_after", long = "projection-stuck-after", env = "PROJECTION_STUCK_AFTER", default_value = "30s", value_parser = platform::config::parse_duration)]
    pub stuck_after: Duration,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        platform::config::defaults()
    }
}

/// Most messages applied in one transaction.
const MAX_BATCH: usize = 1000;

pub struct Projector {
    pool: PgPool,
    consumer: StreamConsumer,
    /// High watermarks, to tell an idle consumer from a stuck one.
    watermarks: crate::status::Watermarks,
    producer: FutureProducer,
    dlq_topic: String,
    kind: Kind,
    config: ProjectorConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    Processed(Processed),
    BehindCheckpoint,
}

impl Projector {
    /// The projector of `kind`, consuming `topic` in group `<group_prefix>projection.<name>`.
    pub fn new(
        kind: Kind,
        pool: PgPool,
        brokers: &str,
        topic: &str,
        group_prefix: &str,
        config: ProjectorConfig,
    ) -> anyhow::Result<Self> {
        let group = format!("{group_prefix}projection.{}", kind.name());
        let consumer: StreamConsumer =
            platform::kafka::consumer_config(brokers, &group).create()?;
        consumer.subscribe(&[topic])?;
        Ok(Self {
            pool,
            consumer,
            watermarks: crate::status::Watermarks::new(brokers, topic)?,
            producer: platform::kafka::producer(brokers)?,
            dlq_topic: format!("{topic}.dlq"),
            kind,
            config,
        })
    }

    /// The order-summary projector with the default configuration.
    pub fn order_summary(
        pool: PgPool,
        brokers: &str,
        topic: &str,
        group_prefix: &str,
    ) -> anyhow::Result<Self> {
        Self::new(
            Kind::OrderSummary,
            pool,
            brokers,
            topic,
            group_prefix,
            ProjectorConfig::default(),
        )
    }

    /// Applies one message with its checkpoint in one transaction.
    pub async fn handle(&self, msg: &impl Message) -> anyhow::Result<Handled> {
        self.in_checkpointed_tx(msg, None)
            .instrument(self.message_span(msg))
            .await
    }

    /// The span of one message's projection: it continues the trace of the request that
    /// caused the event (the message's `traceparent` header). In a batch it covers the
    /// message's decoding; the batch is applied in one transaction after.
    fn message_span(&self, msg: &impl Message) -> tracing::Span {
        let span = tracing::info_span!(
            "projector.apply",
            projection = self.kind.name(),
            partition = msg.partition(),
            offset = msg.offset(),
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        let traceparent = msg.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == "traceparent")
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
        });
        platform::trace::follow(&span, traceparent);
        span.in_scope(|| tracing::debug!("projecting"));
        span
    }

    /// Dead-letters a message that kept failing transiently (or failed with poison), moving
    /// the checkpoint past it.
    async fn give_up(&self, msg: &impl Message, failure: Failed<'_>) -> anyhow::Result<Handled> {
        self.in_checkpointed_tx(msg, Some(failure)).await
    }

    /// Processes a message (or, with `give_up`, dead-letters it as transient) in a transaction
    /// that holds the projection's write lock, skips messages behind the stored checkpoint,
    /// and moves the checkpoint past the message.
    async fn in_checkpointed_tx(
        &self,
        msg: &impl Message,
        give_up: Option<Failed<'_>>,
    ) -> anyhow::Result<Handled> {
        let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
        let mut tx = self.begin().await?;
        let next = checkpoints::locked(&mut tx, self.kind.name(), topic, &[partition]).await?;
        if next.first().is_some_and(|(_, n)| offset < *n) {
            return Ok(Handled::BehindCheckpoint);
        }
        let incoming = Incoming {
            topic,
            partition,
            offset,
            payload: msg.payload().unwrap_or_default(),
        };
        let processed = match give_up {
            None => dead_letters::process(&mut tx, self.kind, &incoming).await?,
            Some(f) => {
                let attempts = i32::try_from(f.attempts).unwrap_or(i32::MAX);
                dead_letters::dead_letter_failed(
                    &mut tx, self.kind, &incoming, f.class, f.error, attempts, f.first,
                )
                .await?
            }
        };
        checkpoints::advance(&mut tx, self.kind.name(), topic, &[(partition, offset + 1)]).await?;
        tx.commit().await?;
        metrics::counter!("projection_events_total", "projection" => self.kind.name()).increment(1);
        if let Processed::DeadLettered(dl) = &processed {
            self.publish_dead_letter(dl).await;
        }
        Ok(Handled::Processed(processed))
    }

    /// Copies a dead letter to the DLQ topic with its envelope in headers. The `dead_letters`
    /// row (already committed) is the record operators act on; a failed copy is only logged.
    async fn publish_dead_letter(&self, dl: &DeadLetter) {
        let fields = [
            ("original_topic", dl.topic.clone()),
            ("original_partition", dl.partition.to_string()),
            ("original_offset", dl.offset.to_string()),
            ("projection", dl.projection.clone()),
            ("error_class", dl.error_class.clone()),
            ("error_message", dl.error_message.clone()),
            ("attempts", dl.attempts.to_string()),
            ("first_failure", dl.first_failed_at.to_rfc3339()),
            ("last_failure", dl.last_failed_at.to_rfc3339()),
            ("dead_letter_id", dl.id.to_string()),
        ];
        let mut headers = OwnedHeaders::new_with_capacity(fields.len());
        for (k, v) in &fields {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let key = dl.stream_id.map(|s| s.to_string()).unwrap_or_default();
        let record = FutureRecord::to(&self.dlq_topic)
            .key(&key)
            .payload(&dl.payload)
            .headers(headers);
        if let Err((e, _)) = self.producer.send(record, Duration::from_secs(10)).await {
            tracing::warn!(error = %e, id = dl.id, "copying a dead letter to the DLQ topic failed");
        }
    }

    /// The projector of `kind` as a supervised role: creates the consumer, waits until a
    /// broker answers (so the role is up only while Kafka is reachable), then consumes until
    /// shutdown. A consumer error (a broker restarting, the group coordinator moving) ends
    /// the run with that error; the supervisor starts it again after a backoff, and the
    /// PostgreSQL checkpoints make the redelivered messages no-ops.
    pub async fn run_role(
        kind: Kind,
        pool: PgPool,
        brokers: String,
        topic: String,
        group_prefix: String,
        config: ProjectorConfig,
        ctx: platform::supervisor::RoleCtx,
    ) -> anyhow::Result<()> {
        platform::kafka::wait_ready(&brokers, Duration::from_secs(10)).await?;
        let projector = Self::new(kind, pool, &brokers, &topic, &group_prefix, config)?;
        ctx.up();
        projector.run(ctx.shutdown().clone()).await
    }

    /// Consumes until `shutdown`; the message in hand is finished first. Returns the first
    /// consumer error (nothing is skipped: the offsets of unapplied messages stay
    /// uncommitted).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let result = self.consume(&shutdown).await;
        // Dropping a consumer closes it (leaving its group), which blocks the calling thread,
        // for long while the broker is down: never on a runtime worker (with two of them, two
        // projectors stalled the whole process once).
        let Self {
            consumer,
            producer,
            watermarks,
            ..
        } = self;
        tokio::task::spawn_blocking(move || drop((consumer, producer, watermarks)));
        result
    }

    async fn consume(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        use anyhow::Context;
        let name = self.kind.name();
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = tokio::time::timeout(self.config.stuck_after, self.consumer.recv()) => match m {
                    Ok(m) => m.with_context(|| format!("projector {name}: consuming from Kafka"))?.detach(),
                    Err(_) => {
                        self.check_not_stuck().await?;
                        continue;
                    }
                },
            };
            // Whatever else has already arrived joins the batch; nothing waits for more.
            let batch = checkpoints::with_arrived(&self.consumer, first, MAX_BATCH)
                .with_context(|| format!("projector {name}: consuming from Kafka"))?;
            if !self.handle_batch_with_retries(&batch, shutdown).await {
                break;
            }
            metrics::gauge!("projection_last_progress_timestamp_seconds", "projection" => name)
                .set(chrono::Utc::now().timestamp() as f64);
            checkpoints::commit_offsets(&self.consumer, &batch)?;
        }
        tracing::info!(projection = self.kind.name(), "projector stopped");
        Ok(())
    }

    /// Called when no message came for `stuck_after`: fine if nothing waits in Kafka for
    /// this consumer, an error if events wait beyond the checkpoints of its partitions (of
    /// any partition while it has none assigned). Why: after a broker stalled, a consumer
    /// was seen to lose its group coordinator and wait for it for ever without an error,
    /// while its role looked up; a new consumer (the supervisor's restart) rejoins at once.
    pub async fn check_not_stuck(&self) -> anyhow::Result<()> {
        let Some(marks) = self.watermarks.fetch().await else {
            anyhow::bail!("projector {}: the brokers do not answer", self.kind.name());
        };
        let assigned: Vec<i32> = self
            .consumer
            .assignment()?
            .elements()
            .iter()
            .map(|e| e.partition())
            .collect();
        let partitions: Vec<i32> = if assigned.is_empty() {
            marks.keys().copied().collect()
        } else {
            assigned
        };
        let checkpoints: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT partition, next_offset FROM projection_checkpoints WHERE projection = $1 AND topic = $2",
        )
        .bind(self.kind.name())
        .bind(self.watermarks.topic())
        .fetch_all(&self.pool)
        .await?;
        let lag = crate::status::lag_over(&marks, partitions, |p| {
            checkpoints.iter().find(|c| c.0 == p).map(|c| c.1)
        });
        anyhow::ensure!(
            lag == 0,
            "projector {}: no message for {:?} while {lag} event(s) wait in Kafka; the consumer is stuck",
            self.kind.name(),
            self.config.stuck_after
        );
        Ok(())
    }

    /// Applies a batch in one transaction when every message in it is ordinary; otherwise
    /// (poison, parking, a gap, or transient failures `max_attempts` times) message by
    /// message. `false` when shutdown interrupted it.
    async fn handle_batch_with_retries(
        &self,
        batch: &[OwnedMessage],
        shutdown: &CancellationToken,
    ) -> bool {
        if batch.len() > 1 {
            let mut failures = 0u32;
            loop {
                match self.handle_batch(batch).await {
                    Ok(true) => return true,
                    Ok(false) => break,
                    Err(e) => {
                        failures += 1;
                        if failures >= self.config.max_attempts {
                            break;
                        }
                        let wait = self.backoff(failures);
                        tracing::warn!(projection = self.kind.name(), messages = batch.len(),
                            attempt = failures, error = %e, retry_in = ?wait, "projecting a batch failed");
                        tokio::select! {
                            _ = shutdown.cancelled() => return false,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        }
        for m in batch {
            if !self.handle_with_retries(m, shutdown).await {
                return false;
            }
        }
        true
    }

    /// The fast path: every message of `batch` applied, with the checkpoints, in one
    /// transaction. `Ok(false)` (nothing written) when a message needs the one-by-one path.
    async fn handle_batch(&self, batch: &[OwnedMessage]) -> anyhow::Result<bool> {
        let mut tx = self.begin().await?;
        let topic = batch[0].topic();
        if batch.iter().any(|m| m.topic() != topic) {
            return Ok(false);
        }
        let mut partitions: Vec<i32> = batch.iter().map(|m| m.partition()).collect();
        partitions.sort_unstable();
        partitions.dedup();
        let stored = checkpoints::locked(&mut tx, self.kind.name(), topic, &partitions).await?;
        let next = |p: i32| stored.iter().find(|s| s.0 == p).map_or(0, |s| s.1);
        let mut decoded = Vec::with_capacity(batch.len());
        for m in batch.iter().filter(|m| m.offset() >= next(m.partition())) {
            let _span = self.message_span(m).entered();
            let Ok(env) = crate::envelope::parse(m.payload().unwrap_or_default()) else {
                return Ok(false);
            };
            let Ok(event) = env.event() else {
                return Ok(false);
            };
            decoded.push(projection::Decoded { env, event });
        }
        let streams: Vec<uuid::Uuid> = decoded.iter().map(|d| d.env.stream_id).collect();
        let blocked: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM dead_letters WHERE projection = $1 AND status = 'open' AND stream_id = ANY($2))",
        )
        .bind(self.kind.name())
        .bind(&streams)
        .fetch_one(&mut *tx)
        .await?;
        if blocked {
            return Ok(false);
        }
        match registry::get(self.kind)
            .apply(&mut tx, projection::Target::Live, &decoded)
            .await
        {
            Ok(_) => {}
            Err(projection::ApplyError::Gap { .. }) => return Ok(false),
            Err(projection::ApplyError::Database(e)) => return Err(e.into()),
        }
        let ends: Vec<(i32, i64)> = partitions
            .iter()
            .map(|p| {
                let last = batch
                    .iter()
                    .filter(|m| m.partition() == *p)
                    .map(|m| m.offset())
                    .max();
                (*p, last.unwrap_or(0) + 1)
            })
            .collect();
        checkpoints::advance(&mut tx, self.kind.name(), topic, &ends).await?;
        tx.commit().await?;
        metrics::counter!("projection_events_total", "projection" => self.kind.name())
            .increment(decoded.len() as u64);
        metrics::histogram!("projection_batch_size", "projection" => self.kind.name())
            .record(batch.len() as f64);
        Ok(true)
    }

    /// A transaction with the lock timeout set and the projection's write lock taken.
    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .bind(format!("{}ms", self.config.lock_timeout.as_millis()))
            .execute(&mut *tx)
            .await?;
        projection::lock_for_write(&mut tx, self.kind).await?;
        Ok(tx)
    }

    fn backoff(&self, failures: u32) -> Duration {
        self.config
            .retry_base
            .saturating_mul(2u32.saturating_pow(failures.min(16) - 1))
            .min(Duration::from_secs(30))
    }

    /// Handles one message, retrying transient failures with capped exponential backoff and
    /// dead-lettering it after `max_attempts`. `false` when shutdown interrupted the retries
    /// (the message is not done; its offset stays uncommitted).
    async fn handle_with_retries(&self, msg: &impl Message, shutdown: &CancellationToken) -> bool {
        let mut failures = 0u32;
        let mut first_failed_at = None;
        loop {
            let error = match self.handle(msg).await {
                Ok(_) => return true,
                Err(e) => e,
            };
            failures += 1;
            let first = *first_failed_at.get_or_insert_with(chrono::Utc::now);
            metrics::counter!("projection_retries_total", "projection" => self.kind.name())
                .increment(1);
            // Data the database refuses for this event (the one classification says poison)
            // will be refused again: dead-letter it at once.
            let class = match classify(&error) {
                ErrorClass::Poison => ErrorClass::Poison,
                _ => ErrorClass::Transient,
            };
            if class == ErrorClass::Poison || failures >= self.config.max_attempts {
                let failure = Failed {
                    class,
                    error: &format!("{error:#}"),
                    attempts: failures,
                    first,
                };
                match self.give_up(msg, failure).await {
                    Ok(_) => return true,
                    Err(e) => tracing::warn!(projection = self.kind.name(), error = %e,
                        "cannot dead-letter either; retrying until the database answers"),
                }
            }
            let wait = self.backoff(failures);
            tracing::warn!(projection = self.kind.name(), partition = msg.partition(), offset = msg.offset(),
                attempt = failures, error = %error, retry_in = ?wait, "projection failed");
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

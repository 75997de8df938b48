//! The projector loop: one Kafka consumer group per projection.
//!
//! For each message: in one PostgreSQL transaction, skip it if the stored checkpoint is past
//! its offset, apply it, and move the checkpoint; commit; then commit the Kafka offset. A crash
//! between the two commits redelivers the message, and the checkpoint (and the per-version
//! idempotency of the projection) makes that a no-op. A poison message is dead-lettered
//! ([`crate::dead_letters`]) and copied to the DLQ topic. A transient failure (the database,
//! a lock held too long) is retried with capped exponential backoff, blocking its partition;
//! after `max_attempts` it is dead-lettered as `transient` so the partition moves on. When
//! even that cannot be written (the database is down) nothing is skipped: the loop keeps
//! retrying until PostgreSQL answers.

use std::time::Duration;

use rdkafka::{
    Message,
    consumer::{CommitMode, Consumer, StreamConsumer},
    message::{BorrowedMessage, Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    dead_letters::{self, DeadLetter, Incoming, Processed},
    projection::{self, Kind},
};

/// How hard a projector tries before it dead-letters a transiently failing message.
#[derive(Debug, Clone, clap::Args)]
pub struct ProjectorConfig {
    /// Attempts at a message failing with transient errors before it is dead-lettered.
    #[arg(long, env = "PROJECTION_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to 30 s.
    #[arg(long, env = "PROJECTION_RETRY_BASE", default_value = "200ms", value_parser = platform::config::parse_duration)]
    pub retry_base: Duration,
    /// How long one message may wait for a row lock before that attempt fails.
    #[arg(long, env = "PROJECTION_LOCK_TIMEOUT", default_value = "5s", value_parser = platform::config::parse_duration)]
    pub lock_timeout: Duration,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            retry_base: Duration::from_millis(200),
            lock_timeout: Duration::from_secs(5),
        }
    }
}

pub struct Projector {
    pool: PgPool,
    consumer: StreamConsumer,
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
    pub async fn handle(&self, msg: &BorrowedMessage<'_>) -> anyhow::Result<Handled> {
        self.in_checkpointed_tx(msg, None).await
    }

    /// Dead-letters a message that kept failing transiently, moving the checkpoint past it.
    async fn give_up(
        &self,
        msg: &BorrowedMessage<'_>,
        error: &str,
        attempts: u32,
        first_failed_at: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<Handled> {
        let attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
        self.in_checkpointed_tx(msg, Some((error, attempts, first_failed_at)))
            .await
    }

    /// Processes a message (or, with `give_up`, dead-letters it as transient) in a transaction
    /// that holds the projection's write lock, skips messages behind the stored checkpoint,
    /// and moves the checkpoint past the message.
    async fn in_checkpointed_tx(
        &self,
        msg: &BorrowedMessage<'_>,
        give_up: Option<(&str, i32, chrono::DateTime<chrono::Utc>)>,
    ) -> anyhow::Result<Handled> {
        let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .bind(format!("{}ms", self.config.lock_timeout.as_millis()))
            .execute(&mut *tx)
            .await?;
        projection::lock_for_write(&mut tx, self.kind).await?;
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT next_offset FROM projection_checkpoints WHERE projection = $1 AND topic = $2 AND partition = $3 FOR UPDATE",
        )
        .bind(self.kind.name())
        .bind(topic)
        .bind(partition)
        .fetch_optional(&mut *tx)
        .await?;
        if next.is_some_and(|n| offset < n) {
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
            Some((error, attempts, first)) => {
                dead_letters::dead_letter_transient(
                    &mut tx, self.kind, &incoming, error, attempts, first,
                )
                .await?
            }
        };
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
             ON CONFLICT (projection, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
        )
        .bind(self.kind.name())
        .bind(topic)
        .bind(partition)
        .bind(offset + 1)
        .execute(&mut *tx)
        .await?;
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

    /// Consumes until `shutdown`; the message in hand is finished first.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = self.consumer.recv() => m?,
            };
            if !self.handle_with_retries(&msg, &shutdown).await {
                break;
            }
            if let Err(e) = self.consumer.commit_message(&msg, CommitMode::Async) {
                // The checkpoint in PostgreSQL already covers it; a redelivery is skipped.
                tracing::debug!(error = %e, "kafka offset commit failed");
            }
        }
        tracing::info!(projection = self.kind.name(), "projector stopped");
        Ok(())
    }

    /// Handles one message, retrying transient failures with capped exponential backoff and
    /// dead-lettering it after `max_attempts`. `false` when shutdown interrupted the retries
    /// (the message is not done; its offset stays uncommitted).
    async fn handle_with_retries(
        &self,
        msg: &BorrowedMessage<'_>,
        shutdown: &CancellationToken,
    ) -> bool {
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
            if failures >= self.config.max_attempts {
                match self
                    .give_up(msg, &format!("{error:#}"), failures, first)
                    .await
                {
                    Ok(_) => return true,
                    Err(e) => tracing::warn!(projection = self.kind.name(), error = %e,
                        "cannot dead-letter either; retrying until the database answers"),
                }
            }
            let wait = self
                .config
                .retry_base
                .saturating_mul(2u32.saturating_pow(failures.min(16) - 1))
                .min(Duration::from_secs(30));
            tracing::warn!(projection = self.kind.name(), partition = msg.partition(), offset = msg.offset(),
                attempt = failures, error = %error, retry_in = ?wait, "projection failed");
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

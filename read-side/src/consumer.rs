//! The projector loop: one Kafka consumer group per projection.
//!
//! For each message: in one PostgreSQL transaction, skip it if the stored checkpoint is past
//! its offset, apply it, and move the checkpoint; commit; then commit the Kafka offset. A crash
//! between the two commits redelivers the message, and the checkpoint (and the per-version
//! idempotency of the projection) makes that a no-op. A poison message is dead-lettered
//! ([`crate::dead_letters`]) and copied to the DLQ topic; a transient failure (the database)
//! is retried with backoff, and blocks its partition meanwhile.

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
    order_summary,
};

pub struct Projector {
    pool: PgPool,
    consumer: StreamConsumer,
    producer: FutureProducer,
    dlq_topic: String,
    name: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    Processed(Processed),
    BehindCheckpoint,
}

impl Projector {
    /// The order-summary projector, consuming `topic` in group `<group_prefix>order_summary`.
    pub fn order_summary(
        pool: PgPool,
        brokers: &str,
        topic: &str,
        group_prefix: &str,
    ) -> anyhow::Result<Self> {
        let group = format!("{group_prefix}projection.{}", order_summary::NAME);
        let consumer: StreamConsumer =
            platform::kafka::consumer_config(brokers, &group).create()?;
        consumer.subscribe(&[topic])?;
        Ok(Self {
            pool,
            consumer,
            producer: platform::kafka::producer(brokers)?,
            dlq_topic: format!("{topic}.dlq"),
            name: order_summary::NAME,
        })
    }

    /// Applies one message with its checkpoint in one transaction.
    pub async fn handle(&self, msg: &BorrowedMessage<'_>) -> anyhow::Result<Handled> {
        let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
        let mut tx = self.pool.begin().await?;
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT next_offset FROM projection_checkpoints WHERE projection = $1 AND topic = $2 AND partition = $3 FOR UPDATE",
        )
        .bind(self.name)
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
        let processed = dead_letters::process(&mut tx, self.name, &incoming).await?;
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
             ON CONFLICT (projection, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
        )
        .bind(self.name)
        .bind(topic)
        .bind(partition)
        .bind(offset + 1)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        metrics::counter!("projection_events_total", "projection" => self.name).increment(1);
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
            let mut failures = 0u32;
            loop {
                match self.handle(&msg).await {
                    Ok(_) => break,
                    Err(e) => {
                        failures += 1;
                        let wait = Duration::from_millis(100 * 2u64.pow(failures.min(8)));
                        tracing::warn!(projection = self.name, partition = msg.partition(), offset = msg.offset(), error = %e, retry_in = ?wait, "projection failed");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
            if let Err(e) = self.consumer.commit_message(&msg, CommitMode::Async) {
                // The checkpoint in PostgreSQL already covers it; a redelivery is skipped.
                tracing::debug!(error = %e, "kafka offset commit failed");
            }
        }
        tracing::info!(projection = self.name, "projector stopped");
        Ok(())
    }
}

//! Publishing outbox rows to Kafka.
//!
//! The producer is idempotent with `acks=all` and an infinite delivery timeout: while a broker
//! is unreachable librdkafka keeps retrying in order instead of failing messages, so a later
//! message of a key can never land while an earlier one was given up. A row counts as
//! published only when its delivery report says so.

use std::time::Duration;

use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{
        FutureProducer, FutureRecord, Producer, PurgeConfig, future_producer::DeliveryFuture,
    },
};
use serde_json::Value;

use event_store::outbox::OutboxRow;
use platform::errors::ErrorClass;
use tracing::Instrument;

use crate::Delivery;

pub struct KafkaSink {
    producer: FutureProducer,
    topic_prefix: String,
    brokers: String,
}

impl KafkaSink {
    pub fn new(brokers: &str, topic_prefix: &str) -> Result<Self, KafkaError> {
        let mut cfg = platform::kafka::producer_config(brokers);
        cfg.set("message.timeout.ms", "0") // never give up on a message: order over liveness
            // The relay hands over a whole batch at once and then waits for its reports, so
            // lingering only delays them: librdkafka batches what is queued anyway.
            .set("linger.ms", "0")
            .set("queue.buffering.max.messages", "200000")
            .set("queue.buffering.max.kbytes", "262144");
        Ok(Self {
            producer: cfg.create()?,
            topic_prefix: topic_prefix.to_owned(),
            brokers: brokers.to_owned(),
        })
    }

    /// Replaces the producer with a new one. Why: after a broker stalled (SIGSTOP, a frozen
    /// VM) in the middle of its start-up, an idempotent producer was seen never to deliver
    /// again although the broker was healthy. The old producer's queued messages are purged
    /// and it is destroyed (on the blocking pool: it joins its threads) before this returns.
    /// Requests it had already written to the socket may still be appended by the broker:
    /// those are duplicates of rows that are still pending and go out again from the first
    /// unpublished row of each key, so first arrivals stay in order (consumers deduplicate
    /// by event id and stream version).
    pub async fn reset(&mut self) -> Result<(), KafkaError> {
        let fresh = Self::new(&self.brokers, &self.topic_prefix)?;
        let old = std::mem::replace(self, fresh);
        let destroyed = tokio::task::spawn_blocking(move || {
            old.producer
                .purge(PurgeConfig::default().queue().inflight());
            drop(old);
        });
        if tokio::time::timeout(Duration::from_secs(30), destroyed)
            .await
            .is_err()
        {
            tracing::warn!("the stalled Kafka producer is taking long to close; going on");
        }
        Ok(())
    }

    /// Sends every row, then waits for the delivery reports, in row order. A row whose send is
    /// refused locally for good blocks the later rows of its key in this batch (`Skipped`).
    pub async fn publish(&self, rows: &[&OutboxRow]) -> Vec<Delivery> {
        let mut pending: Vec<Result<DeliveryFuture, Delivery>> = Vec::with_capacity(rows.len());
        let mut blocked_keys = std::collections::HashSet::new();
        for row in rows {
            if blocked_keys.contains(&row.ordering_key) {
                pending.push(Err(Delivery::Skipped));
                continue;
            }
            let result = self.send(row).instrument(crate::publish_span(row)).await;
            if let Err(Delivery::Rejected(_) | Delivery::Transient(_)) = &result {
                blocked_keys.insert(row.ordering_key.clone());
            }
            pending.push(result);
        }
        let mut out = Vec::with_capacity(rows.len());
        for p in pending {
            out.push(match p {
                Err(d) => d,
                Ok(fut) => match fut.await {
                    Ok(Ok(_)) => Delivery::Published,
                    Ok(Err((e, _))) => classify(&e),
                    Err(_) => Delivery::Transient("producer dropped the delivery report".into()),
                },
            });
        }
        out
    }

    async fn send(&self, row: &OutboxRow) -> Result<DeliveryFuture, Delivery> {
        let topic = format!("{}{}", self.topic_prefix, row.target);
        let mut headers = OwnedHeaders::new_with_capacity(8);
        if let Value::Object(map) = &row.headers {
            for (k, v) in map {
                let value = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                headers = headers.insert(Header {
                    key: k,
                    value: Some(value.as_bytes()),
                });
            }
        }
        loop {
            let record = FutureRecord::to(&topic)
                .key(row.routing_key.as_bytes())
                .payload(&row.payload)
                .headers(headers.clone());
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // The local queue drains as deliveries complete.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(classify(&e)),
            }
        }
    }
}

/// A send's outcome by the one classification (`platform::errors`): what the broker will
/// never take (poison, or a permanent refusal such as missing rights) sets the row aside.
fn classify(e: &KafkaError) -> Delivery {
    match platform::errors::classify_kafka(e) {
        ErrorClass::Transient => Delivery::Transient(e.to_string()),
        ErrorClass::Poison | ErrorClass::Permanent => Delivery::Rejected(e.to_string()),
    }
}

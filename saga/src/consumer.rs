//! The AMQP consumer loop shared by the orchestrator's reply queue and the participants.
//!
//! Up to `concurrency` messages at once: the handler does its work in a PostgreSQL
//! transaction and each message is acked only after its transaction commits. Outcomes:
//! - done: ack;
//! - transient failure (database down, an injected flaky error): nack with requeue after a
//!   backoff, until the message has been delivered `max_deliveries` times, then dead-letter;
//! - poison (malformed, unknown type, failed validation): dead-letter at once.
//!
//! A dead letter is the original body published to `<queue>.dlq` (persistent, confirmed)
//! with the original headers plus `original_queue`, `original_routing_key`, `error_class`,
//! `error_message`, `attempts`, `first_failure`, `last_failure`; only then is the original
//! acked. Shutdown stops taking messages and lets the one in hand finish; unacked prefetched
//! messages go back to the queue when the channel closes.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use lapin::{
    BasicProperties, Connection,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions},
    types::{AMQPValue, FieldTable},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth retrying.
    Transient(String),
    /// Retrying cannot help.
    Poison {
        class: &'static str,
        message: String,
    },
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Transient(format!("database: {e}"))
    }
}

/// What a handler gets of a delivery.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub message_id: Uuid,
    pub body: Vec<u8>,
    pub routing_key: String,
    /// This delivery's number (1 the first time).
    pub delivery: u32,
    /// W3C trace context of the message, when it has one.
    pub traceparent: Option<String>,
}

pub struct ConsumeOptions {
    pub queue: String,
    pub dead_letter_queue: String,
    pub max_deliveries: u32,
    pub retry_base: Duration,
    /// Messages handled at once.
    pub concurrency: usize,
}

/// Consumes `options.queue` until `shutdown`, calling `handle` for each message.
pub async fn consume<H, Fut>(
    conn: Arc<Connection>,
    options: ConsumeOptions,
    shutdown: CancellationToken,
    handle: H,
) -> anyhow::Result<()>
where
    H: Fn(Inbound) -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let concurrency = options.concurrency.max(1);
    let prefetch = u16::try_from(concurrency * 2).unwrap_or(u16::MAX);
    let ch = platform::amqp::consumer_channel(&conn, prefetch).await?;
    let dlq = platform::amqp::confirm_channel(&conn).await?;
    let deliveries = ch
        .basic_consume(
            options.queue.as_str().into(),
            format!("{}-{}", options.queue, Uuid::new_v4().simple())
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // First failure per message id, for the dead-letter envelope (this process's view).
    let first_failures: Mutex<HashMap<Uuid, DateTime<Utc>>> = Mutex::default();
    let (options, handle, dlq, first_failures, shutdown_ref) =
        (&options, &handle, &dlq, &first_failures, &shutdown);
    let result = deliveries
        .take_until(shutdown.cancelled())
        .map_err(anyhow::Error::from)
        .try_for_each_concurrent(concurrency, |d| async move {
            settle(options, handle, dlq, first_failures, shutdown_ref, d).await
        })
        .await;
    ch.close(200, "shutdown".into()).await.ok();
    if result.is_ok() && !shutdown.is_cancelled() {
        anyhow::bail!("the broker closed the consumer of {}", options.queue);
    }
    result
}

/// Handles one delivery and acks, requeues or dead-letters it.
async fn settle<H, Fut>(
    options: &ConsumeOptions,
    handle: &H,
    dlq: &lapin::Channel,
    first_failures: &Mutex<HashMap<Uuid, DateTime<Utc>>>,
    shutdown: &CancellationToken,
    d: Delivery,
) -> anyhow::Result<()>
where
    H: Fn(Inbound) -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let message_id = d
        .properties
        .message_id()
        .as_ref()
        .and_then(|m| Uuid::parse_str(m.as_str()).ok());
    let attempts = delivery_count(&d) + 1;
    let outcome = match message_id {
        None => Err(Failure::Poison {
            class: "missing_message_id",
            message: "the message has no UUID message_id".into(),
        }),
        Some(message_id) => {
            handle(Inbound {
                message_id,
                body: d.data.clone(),
                routing_key: d.routing_key.to_string(),
                delivery: attempts,
                traceparent: string_header(&d, "traceparent"),
            })
            .await
        }
    };
    let key = message_id.unwrap_or_default();
    match outcome {
        Ok(()) => {
            first_failures.lock().expect("failures lock").remove(&key);
            d.ack(BasicAckOptions::default()).await?;
        }
        Err(Failure::Transient(e)) if attempts < options.max_deliveries => {
            first_failures
                .lock()
                .expect("failures lock")
                .entry(key)
                .or_insert_with(Utc::now);
            metrics::counter!("saga_retries_total", "queue" => options.queue.clone()).increment(1);
            let wait = options
                .retry_base
                .saturating_mul(2u32.saturating_pow(attempts.min(16) - 1))
                .min(Duration::from_secs(10));
            tracing::warn!(queue = %options.queue, %key, attempts, error = %e, retry_in = ?wait, "transient failure; redelivering");
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            d.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await?;
        }
        Err(failure) => {
            let (class, message) = match failure {
                Failure::Transient(m) => ("transient", m),
                Failure::Poison { class, message } => (class, message),
            };
            let first = first_failures
                .lock()
                .expect("failures lock")
                .remove(&key)
                .unwrap_or_else(Utc::now);
            tracing::error!(queue = %options.queue, %key, class, error = %message, "dead-lettering a message");
            dead_letter(dlq, options, &d, class, &message, attempts, first).await?;
            metrics::counter!("saga_dead_letters_total", "queue" => options.queue.clone(), "class" => class)
                .increment(1);
            d.ack(BasicAckOptions::default()).await?;
        }
    }
    Ok(())
}

fn string_header(d: &Delivery, key: &str) -> Option<String> {
    match d.properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// Deliveries so far: quorum queues count redeliveries in `x-delivery-count`.
fn delivery_count(d: &Delivery) -> u32 {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned())
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => u32::try_from(n).ok(),
            AMQPValue::LongInt(n) => u32::try_from(n).ok(),
            AMQPValue::LongUInt(n) => Some(n),
            AMQPValue::ShortInt(n) => u32::try_from(n).ok(),
            _ => None,
        })
        .unwrap_or(0)
}

async fn dead_letter(
    ch: &lapin::Channel,
    options: &ConsumeOptions,
    d: &Delivery,
    class: &str,
    message: &str,
    attempts: u32,
    first: DateTime<Utc>,
) -> anyhow::Result<()> {
    let mut headers = d.properties.headers().clone().unwrap_or_default();
    let mut set = |k: &str, v: String| {
        headers.insert(k.into(), AMQPValue::LongString(v.into()));
    };
    set("original_queue", options.queue.clone());
    set("original_routing_key", d.routing_key.to_string());
    set("error_class", class.to_owned());
    set("error_message", message.to_owned());
    set("attempts", attempts.to_string());
    set("first_failure", first.to_rfc3339());
    set("last_failure", Utc::now().to_rfc3339());
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(id) = d.properties.message_id() {
        props = props.with_message_id(id.clone());
    }
    if let Some(c) = d.properties.correlation_id() {
        props = props.with_correlation_id(c.clone());
    }
    let confirm = ch
        .basic_publish(
            "".into(),
            options.dead_letter_queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &d.data,
            props,
        )
        .await?
        .await?;
    anyhow::ensure!(
        confirm.is_ack(),
        "the broker refused the dead letter for {}",
        options.dead_letter_queue
    );
    Ok(())
}

//! The AMQP consumer loop shared by the orchestrator's reply queue and the participants.
//!
//! Up to `concurrency` messages at once: the handler does its work in a PostgreSQL
//! transaction and each message is acked only after its transaction commits. Outcomes:
//! - done: ack;
//! - transient failure (database down, an injected flaky error): a copy goes to the retry
//!   queue of this attempt's delay (it comes back to the queue when its TTL expires) and the
//!   original is acked, until `max_deliveries` attempts, then dead-letter;
//! - poison (malformed, unknown type, failed validation): dead-letter at once.
//!
//! A dead letter is the original body published to `<queue>.dlq` (persistent, confirmed)
//! with the original headers plus `original_queue`, `original_routing_key`, `error_class`,
//! `error_message`, `attempts`, `first_failure`, `last_failure`; only then is the original
//! acked. A retry copy carries `x-retry-attempt`, `first_failure` and `original_routing_key`. Shutdown stops taking messages and lets the one in hand finish; unacked prefetched
//! messages go back to the queue when the channel closes.

use std::{future::Future, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use lapin::{
    BasicProperties, Connection,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions},
    types::{AMQPValue, FieldTable},
};
use platform::errors::ErrorClass;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Why a handler did not take a message, in the one classification of `platform::errors`:
/// a transient failure is retried (until `max_deliveries`), a poison or permanent one is
/// dead-lettered at once. `reason` names it in the dead letter's `error_class` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: ErrorClass,
    pub reason: &'static str,
    pub message: String,
}

impl Failure {
    /// Worth retrying.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Transient,
            reason: "transient",
            message: message.into(),
        }
    }

    /// This message can never be handled; `reason` says why.
    pub fn poison(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Poison,
            reason,
            message: message.into(),
        }
    }
}

/// Database errors by the one classification (`platform::errors`): data the database
/// refuses for this message (SQLSTATE 22xxx, 23xxx but a unique violation) is poison, the
/// rest (connection loss, timeouts, races, and a schema mismatch, which is an operator's
/// problem and not the message's) is retried.
impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        use platform::errors::classify_sqlstate;
        // Only what the database says about the data is the message's fault; a decode
        // error is the code's (a deploy with a type mismatch must not dead-letter every
        // message).
        let refused = match &e {
            sqlx::Error::Database(db) => db.code().map(|c| classify_sqlstate(&c)),
            _ => None,
        };
        match refused {
            Some(ErrorClass::Poison) => Failure::poison("invalid_data", format!("database: {e}")),
            _ => Failure::transient(format!("database: {e}")),
        }
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
    /// The message this one answers or was caused by (`causation_id` header), if any.
    pub causation_id: Option<Uuid>,
}

pub struct ConsumeOptions {
    pub queue: String,
    pub dead_letter_queue: String,
    pub max_deliveries: u32,
    /// Wait before each redelivery (attempt 1 waits `retry_delays[0]`, ...); one retry queue
    /// per entry is declared by [`crate::topology::declare`].
    pub retry_delays: Vec<Duration>,
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
    let tag = format!("{}-{}", options.queue, Uuid::new_v4().simple());
    let deliveries = ch
        .basic_consume(
            options.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (options, handle, publisher) = (&options, &handle, &dlq);
    let result = deliveries
        .take_until(shutdown.cancelled())
        .map_err(anyhow::Error::from)
        .try_for_each_concurrent(concurrency, |d| async move {
            settle(options, handle, publisher, d).await
        })
        .await;
    // Cancel the consumer, then close both channels, each answered by the broker, so the
    // connection closes with nothing in flight.
    ch.basic_cancel(tag.as_str().into(), Default::default())
        .await
        .ok();
    ch.close(200, "shutdown".into()).await.ok();
    dlq.close(200, "shutdown".into()).await.ok();
    if result.is_ok() && !shutdown.is_cancelled() {
        anyhow::bail!("the broker closed the consumer of {}", options.queue);
    }
    result
}

// Long on purpose: the whole fate of one delivery (ack, retry queue, dead-letter queue) in
// one place, so the at-least-once ordering of publish-then-ack is visible in one read.
/// Handles one delivery and acks it, sends it to a retry queue, or dead-letters it.
async fn settle<H, Fut>(
    options: &ConsumeOptions,
    handle: &H,
    publisher: &lapin::Channel,
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
    // Attempts so far: our retry count, or the broker's redelivery count after a crash.
    let attempts = retry_count(&d).max(delivery_count(&d)) + 1;
    let outcome = match message_id {
        None => Err(Failure::poison(
            "missing_message_id",
            "the message has no UUID message_id",
        )),
        Some(message_id) => {
            handle(Inbound {
                message_id,
                body: d.data.clone(),
                routing_key: d.routing_key.to_string(),
                delivery: attempts,
                traceparent: string_header(&d, "traceparent"),
                causation_id: string_header(&d, "causation_id")
                    .and_then(|c| Uuid::parse_str(&c).ok()),
            })
            .await
        }
    };
    let key = message_id.unwrap_or_default();
    match outcome {
        Ok(()) => {
            d.ack(BasicAckOptions::default()).await?;
        }
        Err(Failure {
            class: ErrorClass::Transient,
            message: e,
            ..
        }) if attempts < options.max_deliveries => {
            let first = first_failure(&d).unwrap_or_else(Utc::now);
            let delay =
                options.retry_delays[(attempts as usize - 1).min(options.retry_delays.len() - 1)];
            metrics::counter!("saga_retries_total", "queue" => options.queue.clone()).increment(1);
            tracing::warn!(queue = %options.queue, %key, attempts, error = %e, retry_in = ?delay, "transient failure; retrying later");
            let retry_queue = crate::topology::Names::retry_queue(&options.queue, delay);
            republish(
                publisher,
                &retry_queue,
                &d,
                &[
                    (RETRY_ATTEMPT, attempts.to_string()),
                    (FIRST_FAILURE, first.to_rfc3339()),
                    (ORIGINAL_ROUTING_KEY, original_routing_key(&d)),
                    ("last_error", e),
                ],
            )
            .await?;
            d.ack(BasicAckOptions::default()).await?;
        }
        Err(failure) => {
            let Failure {
                reason: class,
                message,
                ..
            } = failure;
            let first = first_failure(&d).unwrap_or_else(Utc::now);
            tracing::error!(queue = %options.queue, %key, class, error = %message, "dead-lettering a message");
            republish(
                publisher,
                &options.dead_letter_queue,
                &d,
                &[
                    ("original_queue", options.queue.clone()),
                    (ORIGINAL_ROUTING_KEY, original_routing_key(&d)),
                    ("error_class", class.to_owned()),
                    ("error_message", message),
                    ("attempts", attempts.to_string()),
                    (FIRST_FAILURE, first.to_rfc3339()),
                    ("last_failure", Utc::now().to_rfc3339()),
                ],
            )
            .await?;
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

/// Header names the retry path keeps on a message.
const RETRY_ATTEMPT: &str = "x-retry-attempt";
const FIRST_FAILURE: &str = "first_failure";
const ORIGINAL_ROUTING_KEY: &str = "original_routing_key";

/// Failed attempts recorded by the retry path.
fn retry_count(d: &Delivery) -> u32 {
    string_header(d, RETRY_ATTEMPT)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn first_failure(d: &Delivery) -> Option<DateTime<Utc>> {
    string_header(d, FIRST_FAILURE)?.parse().ok()
}

/// The routing key the message was first sent with (a retried message comes back with its
/// queue's name as routing key).
fn original_routing_key(d: &Delivery) -> String {
    string_header(d, ORIGINAL_ROUTING_KEY).unwrap_or_else(|| d.routing_key.to_string())
}

/// Publishes a copy of `d` straight to `queue` (default exchange), persistent and confirmed,
/// with its headers plus `extra`.
async fn republish(
    ch: &lapin::Channel,
    queue: &str,
    d: &Delivery,
    extra: &[(&str, String)],
) -> anyhow::Result<()> {
    let mut headers = d.properties.headers().clone().unwrap_or_default();
    for (k, v) in extra {
        headers.insert((*k).into(), AMQPValue::LongString(v.as_str().into()));
    }
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
            queue.into(),
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
        confirm.is_ack() && confirm.take_message().is_none(),
        "the broker refused the copy for {queue}"
    );
    Ok(())
}

//! Operator access to the saga's dead-letter queues (`shop dlq` for RabbitMQ).
//!
//! Listing takes every message of each `<queue>.dlq` without acking and then closes the
//! channel, which puts them all back: nothing is lost by looking. Replay republishes one
//! message (by its message id) to `checkout.commands` with its original routing key and the
//! same message id, confirmed, and only then acks it off the dead-letter queue; discard acks it.

use chrono::{DateTime, Utc};
use lapin::{
    BasicProperties, Channel, Connection,
    message::BasicGetMessage,
    options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions},
    types::AMQPValue,
};
use uuid::Uuid;

use crate::topology::{DESTINATIONS, Names};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpDeadLetter {
    pub queue: String,
    pub message_id: Option<Uuid>,
    /// The order the message is about (the saga sets it to the order id).
    pub correlation_id: Option<String>,
    pub original_queue: String,
    pub original_routing_key: String,
    pub error_class: String,
    pub error_message: String,
    pub attempts: String,
    pub first_failure: Option<DateTime<Utc>>,
    pub last_failure: Option<DateTime<Utc>>,
    pub body: Vec<u8>,
}

fn header(m: &BasicGetMessage, key: &str) -> String {
    m.delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(key).cloned())
        .map(|v| match v {
            AMQPValue::LongString(s) => s.to_string(),
            other => format!("{other:?}"),
        })
        .unwrap_or_default()
}

fn describe(queue: &str, m: &BasicGetMessage) -> AmqpDeadLetter {
    AmqpDeadLetter {
        queue: queue.to_owned(),
        message_id: m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| Uuid::parse_str(id.as_str()).ok()),
        correlation_id: m
            .delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string()),
        original_queue: header(m, "original_queue"),
        original_routing_key: header(m, "original_routing_key"),
        error_class: header(m, "error_class"),
        error_message: header(m, "error_message"),
        attempts: header(m, "attempts"),
        first_failure: header(m, "first_failure").parse().ok(),
        last_failure: header(m, "last_failure").parse().ok(),
        body: m.delivery.data.clone(),
    }
}

/// Takes every message of `queue` unacked on `ch` (they return when `ch` closes).
async fn take_all(ch: &Channel, queue: &str) -> Result<Vec<BasicGetMessage>, lapin::Error> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await?
    {
        out.push(m);
    }
    Ok(out)
}

/// Whether the broker says the queue does not exist (never declared: no dead letters).
fn missing_queue(e: &lapin::Error) -> bool {
    e.to_string().contains("NOT_FOUND")
}

/// Every dead letter of the saga's queues (queues never declared have none).
pub async fn list(conn: &Connection, names: &Names) -> Result<Vec<AmqpDeadLetter>, lapin::Error> {
    let mut out = Vec::new();
    for d in DESTINATIONS {
        let queue = names.dead_letter_queue(d);
        // A channel per queue: a missing queue closes the channel it was asked on.
        let ch = conn.create_channel().await?;
        match take_all(&ch, &queue).await {
            Ok(messages) => out.extend(messages.iter().map(|m| describe(&queue, m))),
            Err(e) if missing_queue(&e) => continue,
            Err(e) => return Err(e),
        }
        ch.close(200, "listed".into()).await.ok();
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no dead letter with message id {0} in the saga's dead-letter queues")]
    NotFound(Uuid),
    #[error("the broker did not confirm the replayed message")]
    NotConfirmed,
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
}

/// Republishes the dead letter `id` to its original routing key, or with `replay == false`
/// drops it. Returns what it was.
pub async fn resolve(
    conn: &Connection,
    names: &Names,
    id: Uuid,
    replay: bool,
) -> Result<AmqpDeadLetter, ResolveError> {
    let publisher = platform::amqp::confirm_channel(conn).await?;
    for d in DESTINATIONS {
        let queue = names.dead_letter_queue(d);
        let ch = conn.create_channel().await?;
        let messages = match take_all(&ch, &queue).await {
            Ok(m) => m,
            Err(e) if missing_queue(&e) => continue,
            Err(e) => return Err(e.into()),
        };
        for m in messages {
            let found = describe(&queue, &m);
            if found.message_id != Some(id) {
                continue;
            }
            if replay {
                let mut props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(id.to_string().into());
                if let Some(c) = m.delivery.properties.correlation_id() {
                    props = props.with_correlation_id(c.clone());
                }
                let confirm = publisher
                    .basic_publish(
                        platform::amqp::COMMANDS_EXCHANGE.into(),
                        found.original_routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &found.body,
                        props,
                    )
                    .await?
                    .await?;
                if !confirm.is_ack() || confirm.take_message().is_some() {
                    return Err(ResolveError::NotConfirmed);
                }
            }
            m.delivery.ack(BasicAckOptions::default()).await?;
            ch.close(200, "resolved".into()).await.ok();
            return Ok(found);
        }
        ch.close(200, "not here".into()).await.ok();
    }
    Err(ResolveError::NotFound(id))
}

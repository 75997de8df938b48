//! Operator access to the saga's dead-letter queues (`shop dlq` for RabbitMQ, the console).
//!
//! Listing takes every message of each `<queue>.dlq` without acking and then closes the
//! channel, which puts them all back: nothing is lost by looking. Replay republishes one
//! message (by its message id) to `checkout.commands` with its original routing key, the same
//! message id and its own headers (a reply's `causation_id` names the command it answers),
//! without the dead-letter bookkeeping (`attempts`, `error_class`...: a replay starts with a
//! full retry budget), confirmed, and only then acks it off the dead-letter queue; discard
//! acks it. A replay may carry an operator's correction of the body instead of the body:
//! [`check_correction`] accepts only a message of the queue's own type about the same order,
//! and the receiver still applies every check it applies to any message.

use chrono::{DateTime, Utc};
use lapin::{
    BasicProperties, Channel, Connection,
    message::BasicGetMessage,
    options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions},
    types::{AMQPValue, FieldTable},
};
use uuid::Uuid;

use crate::topology::{DESTINATIONS, Names, Reply};

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

/// What to do with a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Republish it as it is.
    Replay,
    /// Republish this body instead (checked with [`check_correction`] first).
    ReplayCorrected(Vec<u8>),
    /// Drop it.
    Discard,
}

/// Headers the consumer adds when it retries or dead-letters a message (and the broker's
/// own), left off a replayed one.
const BOOKKEEPING: [&str; 9] = [
    "original_queue",
    "original_routing_key",
    "error_class",
    "error_message",
    "attempts",
    "first_failure",
    "last_failure",
    "last_error",
    "x-retry-attempt",
];

/// The headers a replayed message carries: its own, without the bookkeeping.
fn replayed_headers(headers: Option<&FieldTable>) -> FieldTable {
    let mut out = FieldTable::default();
    if let Some(h) = headers {
        for (k, v) in h.inner() {
            let k = k.as_str();
            if !BOOKKEEPING.contains(&k) && !k.starts_with("x-") {
                out.insert(k.into(), v.clone());
            }
        }
    }
    out
}

/// Corrected bodies are at most this long.
pub const MAX_CORRECTION: usize = 64 * 1024;

/// Why an operator's correction of a dead letter is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CorrectionError {
    #[error("the correction is longer than {MAX_CORRECTION} bytes")]
    TooLong,
    #[error("the correction is not a {kind}: {why}")]
    NotTheQueuesType { kind: &'static str, why: String },
    #[error("the correction is about order {corrected}, the dead letter about order {original}")]
    OtherOrder { original: Uuid, corrected: Uuid },
    #[error("`{0}` is not one of the saga's dead-letter queues")]
    UnknownQueue(String),
}

/// Checks an operator's correction of `letter`'s body: a message of its queue's own type
/// (a participant's reply on the replies queue, a saga command on a participant's) about the
/// order the dead letter is about (its correlation id).
pub fn check_correction(
    names: &Names,
    letter: &AmqpDeadLetter,
    body: &[u8],
) -> Result<(), CorrectionError> {
    if body.len() > MAX_CORRECTION {
        return Err(CorrectionError::TooLong);
    }
    let destination = DESTINATIONS
        .into_iter()
        .find(|d| names.dead_letter_queue(d) == letter.queue)
        .ok_or_else(|| CorrectionError::UnknownQueue(letter.queue.clone()))?;
    let corrected = if destination == "replies" {
        serde_json::from_slice::<Reply>(body)
            .map(|r| r.order_id.0)
            .map_err(|e| CorrectionError::NotTheQueuesType {
                kind: "participant's reply",
                why: e.to_string(),
            })?
    } else {
        let command = serde_json::from_slice::<domain::saga::SagaCommand>(body).map_err(|e| {
            CorrectionError::NotTheQueuesType {
                kind: "saga command",
                why: e.to_string(),
            }
        })?;
        match command.participant() {
            Some((participant, order)) if participant == destination => order.0,
            _ => {
                return Err(CorrectionError::NotTheQueuesType {
                    kind: "saga command",
                    why: format!("the {destination} participant does not take it"),
                });
            }
        }
    };
    match letter
        .correlation_id
        .as_deref()
        .and_then(|c| Uuid::parse_str(c).ok())
    {
        Some(original) if original != corrected => Err(CorrectionError::OtherOrder {
            original,
            corrected,
        }),
        _ => Ok(()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no dead letter with message id {0} in the saga's dead-letter queues")]
    NotFound(Uuid),
    #[error("the broker did not confirm the replayed message")]
    NotConfirmed,
    #[error(transparent)]
    Correction(#[from] CorrectionError),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
}

/// Republishes the dead letter `id` to its original routing key (corrected, when asked),
/// or drops it. Returns what it was.
pub async fn resolve(
    conn: &Connection,
    names: &Names,
    id: Uuid,
    resolution: &Resolution,
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
            let body = match resolution {
                Resolution::Discard => None,
                Resolution::Replay => Some(found.body.as_slice()),
                Resolution::ReplayCorrected(body) => {
                    check_correction(names, &found, body)?;
                    Some(body.as_slice())
                }
            };
            if let Some(body) = body {
                let mut props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(id.to_string().into())
                    .with_headers(replayed_headers(m.delivery.properties.headers().as_ref()));
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
                        body,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn letter(names: &Names, destination: &str, order: Uuid) -> AmqpDeadLetter {
        AmqpDeadLetter {
            queue: names.dead_letter_queue(destination),
            message_id: Some(Uuid::now_v7()),
            correlation_id: Some(order.to_string()),
            original_queue: names.queue(destination),
            original_routing_key: names.routing_key(destination),
            error_class: "malformed_reply".into(),
            error_message: String::new(),
            attempts: "1".into(),
            first_failure: None,
            last_failure: None,
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn a_correction_must_be_the_queues_own_type_about_the_same_order() {
        let names = Names::new("t.");
        let order = Uuid::now_v7();
        let reply = |o: Uuid| {
            serde_json::to_vec(&json!({"order_id": o,
                "input": {"type": "inventory_reserved", "reservation_id": "r-1"}}))
            .unwrap()
        };
        let release = |o: Uuid| {
            serde_json::to_vec(&json!({"type": "release_inventory", "order_id": o})).unwrap()
        };
        let replies = letter(&names, "replies", order);
        let inventory = letter(&names, "inventory", order);
        assert_eq!(check_correction(&names, &replies, &reply(order)), Ok(()));
        assert_eq!(
            check_correction(&names, &inventory, &release(order)),
            Ok(())
        );
        let other = Uuid::now_v7();
        assert_eq!(
            check_correction(&names, &replies, &reply(other)),
            Err(CorrectionError::OtherOrder {
                original: order,
                corrected: other
            })
        );
        for (l, body) in [
            (&replies, release(order)),
            (&inventory, reply(order)),
            (&replies, b"not json".to_vec()),
            (&replies, br#"{"order_id": 1}"#.to_vec()),
        ] {
            assert!(
                matches!(
                    check_correction(&names, l, &body),
                    Err(CorrectionError::NotTheQueuesType { .. })
                ),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
        // A payment command is no correction of an inventory dead letter.
        let void = serde_json::to_vec(&json!({"type": "void_payment", "order_id": order})).unwrap();
        assert!(check_correction(&names, &inventory, &void).is_err());
        assert_eq!(
            check_correction(&names, &replies, &vec![b' '; MAX_CORRECTION + 1]),
            Err(CorrectionError::TooLong)
        );
        let mut elsewhere = replies.clone();
        elsewhere.queue = "other.dlq".into();
        assert!(matches!(
            check_correction(&names, &elsewhere, &reply(order)),
            Err(CorrectionError::UnknownQueue(_))
        ));
    }

    #[test]
    fn a_replayed_message_keeps_its_own_headers_and_drops_the_bookkeeping() {
        let mut h = FieldTable::default();
        for (k, v) in [
            ("causation_id", "c-1"),
            ("traceparent", "00-abc-def-01"),
            ("error_class", "malformed_reply"),
            ("attempts", "5"),
            ("x-retry-attempt", "4"),
            ("x-delivery-count", "2"),
            ("original_routing_key", "t.replies"),
        ] {
            h.insert(k.into(), AMQPValue::LongString(v.into()));
        }
        let kept = replayed_headers(Some(&h));
        let mut names: Vec<&str> = kept.inner().keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["causation_id", "traceparent"]);
        assert!(replayed_headers(None).inner().is_empty());
    }
}

//! Queue names, their declaration, and what travels on them.
//!
//! Commands go to the direct exchange `checkout.commands` with the participant's routing key
//! (`<prefix>inventory`, `<prefix>payment`, `<prefix>shipping`); replies with
//! `<prefix>replies`. Every input queue is a durable quorum queue with a dead-letter queue
//! `<queue>.dlq` beside it (fed by [`crate::consumer`] with an envelope of headers).
//!
//! Retries wait in classic queues `<queue>.retry.<delay>ms` with that message TTL, which
//! dead-letter expired messages back to `<queue>` through the default exchange: one queue per
//! backoff step, so a long delay never holds up a short one.
//!
//! A command's body is the `domain::saga::SagaCommand` JSON; a reply's body is [`Reply`].
//! Both carry the AMQP `message_id` (the outbox message id, for deduplication),
//! `correlation_id` (the order id) and the `causation_id` header (the message that caused it).

use domain::{saga::SagaInput, values::OrderId};
use std::time::Duration;

use lapin::{
    Connection,
    options::QueueDeclareOptions,
    types::{AMQPValue, FieldTable},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// Routing key of a destination (`inventory`, `payment`, `shipping`, `replies`).
    pub fn routing_key(&self, destination: &str) -> String {
        format!("{}{destination}", self.prefix)
    }

    pub fn queue(&self, destination: &str) -> String {
        format!("{}checkout.{destination}", self.prefix)
    }

    pub fn dead_letter_queue(&self, destination: &str) -> String {
        format!("{}.dlq", self.queue(destination))
    }

    /// Where a message waits `delay` before going back to `queue`.
    pub fn retry_queue(queue: &str, delay: Duration) -> String {
        format!("{queue}.retry.{}ms", delay.as_millis())
    }

    /// Every queue of the topology with these retry delays (for tear-down).
    pub fn all_queues(&self, retry_delays: &[Duration]) -> Vec<String> {
        DESTINATIONS
            .iter()
            .flat_map(|d| {
                let q = self.queue(d);
                let mut v = vec![q.clone(), self.dead_letter_queue(d)];
                v.extend(
                    retry_delays
                        .iter()
                        .map(|delay| Self::retry_queue(&q, *delay)),
                );
                v
            })
            .collect()
    }
}

/// Every destination with an input queue.
pub const DESTINATIONS: [&str; 4] = ["inventory", "payment", "shipping", "replies"];

/// Declares the exchange, the input queues, their retry queues (one per delay) and their
/// dead-letter queues (idempotent).
pub async fn declare(
    conn: &Connection,
    names: &Names,
    retry_delays: &[Duration],
) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await?;
    for d in DESTINATIONS {
        let queue = names.queue(d);
        platform::amqp::declare_command_queue(&ch, &queue, &names.routing_key(d)).await?;
        for delay in retry_delays {
            let mut args = FieldTable::default();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(queue.as_str().into()),
            );
            ch.queue_declare(
                Names::retry_queue(&queue, *delay).as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
        }
        ch.queue_declare(
            names.dead_letter_queue(d).as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            platform::amqp::quorum_queue_args(),
        )
        .await?;
    }
    ch.close(200, "declared".into()).await.ok();
    Ok(())
}

/// A participant's answer to the orchestrator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub order_id: OrderId,
    pub input: SagaInput,
}

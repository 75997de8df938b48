//! Queue names, their declaration, and what travels on them.
//!
//! Commands go to the direct exchange `checkout.commands` with the participant's routing key
//! (`<prefix>inventory`, `<prefix>payment`, `<prefix>shipping`); replies with
//! `<prefix>replies`. Every input queue is a durable quorum queue with a dead-letter queue
//! `<queue>.dlq` beside it (fed by [`crate::consumer`] with an envelope of headers).
//!
//! A command's body is the `domain::saga::SagaCommand` JSON; a reply's body is [`Reply`].
//! Both carry the AMQP `message_id` (the outbox message id, for deduplication),
//! `correlation_id` (the order id) and the `causation_id` header (the message that caused it).

use domain::{saga::SagaInput, values::OrderId};
use lapin::{Connection, options::QueueDeclareOptions};
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
}

/// Every destination with an input queue.
pub const DESTINATIONS: [&str; 4] = ["inventory", "payment", "shipping", "replies"];

/// Declares the exchange, the input queues and their dead-letter queues (idempotent).
pub async fn declare(conn: &Connection, names: &Names) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await?;
    for d in DESTINATIONS {
        platform::amqp::declare_command_queue(&ch, &names.queue(d), &names.routing_key(d)).await?;
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

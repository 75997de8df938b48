//! Publishing outbox rows to RabbitMQ with publisher confirms.
//!
//! Messages are persistent and mandatory: a message no queue is bound for comes back as a
//! return and is a permanent rejection, never a silent drop. A row counts as published only
//! when the broker acked it. A broken connection fails the batch as transient; the next batch
//! reconnects (the relay backs off between attempts).

use lapin::{
    BasicProperties, Channel, Confirmation, Connection, PublisherConfirm,
    options::BasicPublishOptions,
    types::{AMQPValue, FieldTable},
};
use serde_json::Value;

use event_store::outbox::OutboxRow;
use tracing::Instrument;

use crate::Delivery;

/// The exchange saga commands go to; declared by the relay so publishing never races the
/// consumers' topology set-up.
pub use platform::amqp::COMMANDS_EXCHANGE;

pub struct AmqpSink {
    url: String,
    conn: Option<(Connection, Channel)>,
}

impl AmqpSink {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            conn: None,
        }
    }

    async fn channel(&mut self) -> Result<Channel, lapin::Error> {
        if let Some((c, ch)) = &self.conn
            && c.status().connected()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        self.conn = None;
        let conn = platform::amqp::connect(&self.url, "outbox-relay").await?;
        let ch = platform::amqp::confirm_channel(&conn).await?;
        platform::amqp::declare_commands_exchange(&ch).await?;
        self.conn = Some((conn, ch.clone()));
        Ok(ch)
    }

    pub async fn publish(&mut self, rows: &[&OutboxRow]) -> Vec<Delivery> {
        let ch = match self.channel().await {
            Ok(ch) => ch,
            Err(e) => {
                return rows
                    .iter()
                    .map(|_| Delivery::Transient(format!("connecting: {e}")))
                    .collect();
            }
        };
        let mut pending: Vec<Result<PublisherConfirm, Delivery>> = Vec::with_capacity(rows.len());
        for row in rows {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(row.message_id.to_string().into())
                .with_correlation_id(row.ordering_key.clone().into())
                .with_content_type("application/json".into())
                .with_headers(headers(&row.headers));
            let r = ch
                .basic_publish(
                    row.target.as_str().into(),
                    row.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &row.payload,
                    props,
                )
                .instrument(crate::publish_span(row))
                .await;
            pending.push(r.map_err(|e| Delivery::Transient(e.to_string())));
        }
        let mut out = Vec::with_capacity(rows.len());
        let mut broken = false;
        for p in pending {
            out.push(match p {
                Err(d) => {
                    broken = true;
                    d
                }
                Ok(confirm) => match confirm.await {
                    Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => {
                        Delivery::Published
                    }
                    Ok(Confirmation::Ack(Some(ret))) | Ok(Confirmation::Nack(Some(ret))) => {
                        Delivery::Rejected(format!(
                            "returned by the broker: {} {}",
                            ret.reply_code, ret.reply_text
                        ))
                    }
                    Ok(Confirmation::Nack(None)) => {
                        Delivery::Transient("nacked by the broker".into())
                    }
                    Err(e) => {
                        broken = true;
                        Delivery::Transient(e.to_string())
                    }
                },
            });
        }
        if broken {
            self.conn = None;
        }
        out
    }
}

fn headers(v: &Value) -> FieldTable {
    let mut t = FieldTable::default();
    if let Value::Object(map) = v {
        for (k, v) in map {
            let s = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            t.insert(k.as_str().into(), AMQPValue::LongString(s.into()));
        }
    }
    t
}

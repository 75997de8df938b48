//! RabbitMQ connections and channels, configured the one way this project uses them.
//!
//! Every publishing channel has publisher confirms on (`confirm_select`), so a publish counts
//! only once the broker has taken responsibility for the message. Queues are durable quorum
//! queues: they survive a broker restart and replicate when there is more than one node.

use lapin::{
    Channel, Connection, ConnectionProperties,
    options::{BasicQosOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable},
};

pub use lapin::Error as AmqpError;

/// Opens a connection named after the service (the name shows in the management UI).
pub async fn connect(url: &str, name: &str) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props).await
}

/// A channel with publisher confirms enabled.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, AmqpError> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// A consuming channel that holds at most `prefetch` unacknowledged deliveries.
pub async fn consumer_channel(conn: &Connection, prefetch: u16) -> Result<Channel, AmqpError> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    Ok(ch)
}

/// Arguments that make a queue a quorum queue (it must also be durable, not exclusive and not
/// auto-delete).
pub fn quorum_queue_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// The exchange saga commands are published to (routing key = participant).
pub const COMMANDS_EXCHANGE: &str = "checkout.commands";

/// Declares the durable direct exchange for saga commands (idempotent).
pub async fn declare_commands_exchange(ch: &Channel) -> Result<(), AmqpError> {
    ch.exchange_declare(
        COMMANDS_EXCHANGE.into(),
        lapin::ExchangeKind::Direct,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

/// Declares a durable quorum queue bound to the commands exchange with `routing_key`
/// (and the exchange itself), idempotently.
pub async fn declare_command_queue(
    ch: &Channel,
    queue: &str,
    routing_key: &str,
) -> Result<(), AmqpError> {
    declare_commands_exchange(ch).await?;
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        quorum_queue_args(),
    )
    .await?;
    ch.queue_bind(
        queue.into(),
        COMMANDS_EXCHANGE.into(),
        routing_key.into(),
        lapin::options::QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

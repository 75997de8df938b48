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

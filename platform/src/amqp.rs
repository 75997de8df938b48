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
///
/// TLS: an `amqps://` URL is verified against the system's CAs, or against the PEM file its
/// `cacertfile` query parameter names (RabbitMQ's own URI convention), e.g.
/// `amqps://user:pass@mq.internal:5671/%2f?cacertfile=/etc/shop/rabbitmq-ca.pem`.
pub async fn connect(url: &str, name: &str) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let Some(ca_file) = query_param(url, "cacertfile") else {
        return Connection::connect(url, props).await;
    };
    let pem = std::fs::read_to_string(&ca_file).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot read the CA file named by the AMQP URL's cacertfile ({ca_file}): {e}"),
        )
    })?;
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: Some(pem),
    };
    Connection::connect_with_config(url, props, tls, lapin::runtime::default_runtime()?).await
}

/// The (percent-decoded) value of a URL's query parameter.
fn query_param(url: &str, name: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    url.query_pairs()
        .find_map(|(k, v)| (k == name).then(|| v.into_owned()))
}

/// Resolves when `conn` is lost: the connection reports an error (a reset socket, the broker
/// closing it with CONNECTION_FORCED when it stops, a missed heartbeat), or is seen not
/// connected any more. Consumers' streams do not always end when that happens, so every
/// long-running user of a connection races its work against this and reconnects.
pub async fn connection_lost(conn: &Connection) -> anyhow::Error {
    use futures::StreamExt;
    let mut events = conn.events_listener();
    let mut check = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(lapin::Event::Error(e)) => {
                    return anyhow::Error::from(e).context("RabbitMQ connection lost");
                }
                Some(_) => {}
                None => return anyhow::anyhow!("RabbitMQ connection closed"),
            },
            _ = check.tick() => {
                if !conn.status().connected() {
                    return anyhow::anyhow!("RabbitMQ connection is no longer connected");
                }
            }
        }
    }
}

/// Closes `conn`, waiting at most `timeout` for the broker's answer (a broker that is going
/// away may never send it; the socket is dropped with the connection either way).
pub async fn close(conn: &Connection, timeout: std::time::Duration) {
    match tokio::time::timeout(timeout, conn.close(200, "shutdown".into())).await {
        Ok(_) => {}
        Err(_) => tracing::warn!(
            ?timeout,
            "RabbitMQ did not answer the connection close in time"
        ),
    }
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

#[cfg(test)]
mod tests {
    use super::query_param;

    #[test]
    fn the_ca_file_is_read_from_the_urls_query() {
        let url = "amqps://u:p@mq:5671/%2f?heartbeat=10&cacertfile=%2Fetc%2Fshop%2Fca.pem";
        assert_eq!(
            query_param(url, "cacertfile").as_deref(),
            Some("/etc/shop/ca.pem")
        );
        assert_eq!(query_param(url, "heartbeat").as_deref(), Some("10"));
        assert_eq!(query_param("amqps://mq/%2f", "cacertfile"), None);
        assert_eq!(
            query_param("amqps://mq/%2f?cacertfile=/a%2", "cacertfile").as_deref(),
            Some("/a%2")
        );
    }
}

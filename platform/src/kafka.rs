//! Kafka clients configured the one way this project uses them.
//!
//! Producers are idempotent with `acks=all`, so a retried send can neither duplicate nor
//! reorder messages within a partition. Consumers never auto-commit: offsets are committed
//! by the caller after its own work is durable. Topics are created by the project itself
//! through the admin API (the broker runs with `auto.create.topics.enable=false`).

use std::time::Duration;

use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    error::{KafkaError, RDKafkaErrorCode},
    producer::{FutureProducer, Producer},
};

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("kafka client: {0}")]
    Client(#[from] KafkaError),
    #[error("creating topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("deleting topic {topic}: {code}")]
    DeleteTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("no Kafka broker answered metadata requests at {brokers} within {waited:?}: {last}")]
    Unreachable {
        brokers: String,
        waited: Duration,
        last: KafkaError,
    },
}

/// How this process's Kafka clients secure their connections (TLS), from the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// `(librdkafka property, value)` pairs added to every client.
    properties: Vec<(&'static str, String)>,
}

impl Security {
    pub fn from_config(cfg: &crate::config::InfraConfig) -> Self {
        let mut properties = vec![("security.protocol", cfg.kafka_security_protocol.clone())];
        for (key, value) in [
            ("ssl.ca.location", &cfg.kafka_ssl_ca_location),
            (
                "ssl.certificate.location",
                &cfg.kafka_ssl_certificate_location,
            ),
            ("ssl.key.location", &cfg.kafka_ssl_key_location),
        ] {
            if let Some(v) = value {
                properties.push((key, v.clone()));
            }
        }
        Self { properties }
    }
}

static SECURITY: std::sync::OnceLock<Security> = std::sync::OnceLock::new();

/// Sets how every Kafka client of this process connects (once, at start, like the logger;
/// the clients are made in many places from a broker list alone). Without it: plaintext.
pub fn configure_security(security: Security) {
    let _ = SECURITY.set(security);
}

/// Base settings every client shares.
pub fn base_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        // Loopback-only single-node broker; keep reconnects snappy.
        .set("reconnect.backoff.max.ms", "2000")
        .set("log_level", "4");
    for (key, value) in SECURITY.get().map_or(&[][..], |s| &s.properties) {
        c.set(*key, value);
    }
    c
}

/// An idempotent producer with `acks=all`.
pub fn producer_config(brokers: &str) -> ClientConfig {
    let mut c = base_config(brokers);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    c
}

pub fn producer(brokers: &str) -> Result<FutureProducer, KafkaError> {
    producer_config(brokers).create()
}

/// A consumer in `group` that never commits by itself and starts from the earliest offset
/// when the group has none.
pub fn consumer_config(brokers: &str, group: &str) -> ClientConfig {
    let mut c = base_config(brokers);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("isolation.level", "read_committed");
    c
}

/// Waits until a broker answers a metadata request, retrying until `timeout`.
pub async fn wait_ready(brokers: &str, timeout: Duration) -> Result<(), KafkaSetupError> {
    let producer: FutureProducer = base_config(brokers).create()?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let p = producer.clone();
        let res = tokio::task::spawn_blocking(move || {
            p.client()
                .fetch_metadata(None, Duration::from_secs(2))
                .map(|_| ())
        })
        .await
        .expect("metadata task panicked");
        let done = match res {
            Ok(()) => Some(Ok(())),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                Some(Err(KafkaSetupError::Unreachable {
                    brokers: brokers.to_owned(),
                    waited: timeout,
                    last: e,
                }))
            }
            Err(_) => None,
        };
        if let Some(result) = done {
            // Destroying a client joins its broker threads: not on a runtime worker.
            tokio::task::spawn_blocking(move || drop(producer));
            return result;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Creates the topics that do not exist yet, each with `partitions` partitions (replication
/// 1: a single-node cluster). Existing topics are left as they are.
pub async fn ensure_topics(
    brokers: &str,
    topics: &[String],
    partitions: i32,
) -> Result<(), KafkaSetupError> {
    let specs: Vec<(String, Vec<(&str, String)>)> =
        topics.iter().map(|t| (t.clone(), Vec::new())).collect();
    ensure_topics_with(brokers, &specs, partitions).await
}

/// [`ensure_topics`] with per-topic settings (e.g. `retention.ms`), applied when a topic is
/// created; an existing topic keeps its own (change them with `kafka-configs.sh`).
pub async fn ensure_topics_with(
    brokers: &str,
    topics: &[(String, Vec<(&str, String)>)],
    partitions: i32,
) -> Result<(), KafkaSetupError> {
    let admin: AdminClient<DefaultClientContext> = base_config(brokers).create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, config)| {
            config.iter().fold(
                NewTopic::new(t, partitions, TopicReplication::Fixed(1)),
                |topic, (k, v)| topic.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(&new, &opts).await;
    // Destroying a client joins its threads: not on a runtime worker.
    tokio::task::spawn_blocking(move || drop(admin));
    for result in results? {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(KafkaSetupError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// Deletes topics (test clean-up). Missing topics are not an error.
pub async fn delete_topics(brokers: &str, topics: &[String]) -> Result<(), KafkaSetupError> {
    let admin: AdminClient<DefaultClientContext> = base_config(brokers).create()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    for result in admin.delete_topics(&names, &AdminOptions::new()).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => return Err(KafkaSetupError::DeleteTopic { topic, code }),
        }
    }
    Ok(())
}

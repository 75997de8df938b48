//! Kafka topics and RabbitMQ names of a test's own (deleted afterwards), and reading what
//! reached Kafka.

use std::time::Duration;

use lapin::options::QueueDeleteOptions;

use crate::*;

/// Per-test Kafka topic names; the topics it created are deleted on drop.
pub struct TestKafka {
    pub brokers: String,
    pub prefix: String,
    created: Vec<String>,
}

impl TestKafka {
    pub async fn new() -> Self {
        let brokers = infra().kafka_brokers;
        platform::kafka::wait_ready(&brokers, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e} (run scripts/services.sh up)"));
        Self {
            brokers,
            prefix: format!("{}.", unique_prefix()),
            created: Vec::new(),
        }
    }

    /// The per-test name of a topic.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    /// Creates per-test topics with `partitions` partitions and returns their full names.
    pub async fn create_topics(&mut self, names: &[&str], partitions: i32) -> Vec<String> {
        let topics: Vec<String> = names.iter().map(|n| self.topic(n)).collect();
        platform::kafka::ensure_topics(&self.brokers, &topics, partitions)
            .await
            .expect("create test topics");
        self.created.extend(topics.iter().cloned());
        topics
    }
}

impl Drop for TestKafka {
    fn drop(&mut self) {
        if self.created.is_empty() {
            return;
        }
        let (brokers, topics) = (self.brokers.clone(), std::mem::take(&mut self.created));
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(platform::kafka::delete_topics(&brokers, &topics))
                .ok()
        })
        .join();
    }
}

/// A RabbitMQ connection and a per-test prefix for queue and exchange names.
pub struct TestRabbit {
    pub conn: lapin::Connection,
    pub url: String,
    pub prefix: String,
}

impl TestRabbit {
    pub async fn new() -> Self {
        let url = infra().amqp_url;
        let conn = platform::amqp::connect(&url, "shop-tests")
            .await
            .unwrap_or_else(|e| {
                panic!("cannot reach RabbitMQ at {url}: {e} (run scripts/services.sh up)")
            });
        Self {
            conn,
            url,
            prefix: format!("{}.", unique_prefix()),
        }
    }

    pub fn name(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    /// Deletes per-test queues (call at the end of a test; queues are durable).
    pub async fn delete_queues(&self, queues: &[String]) {
        let ch = self.conn.create_channel().await.expect("channel");
        for q in queues {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .expect("delete test queue");
        }
    }
}

/// A consumer of `topic` in a fresh group (so from the start).
fn reader(brokers: &str, topic: &str) -> rdkafka::consumer::StreamConsumer {
    use rdkafka::consumer::Consumer;
    let group = format!("{}check", unique_prefix());
    let consumer: rdkafka::consumer::StreamConsumer =
        platform::kafka::consumer_config(brokers, &group)
            .create()
            .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

/// Reads the whole topic (a fresh group, from the start) until `want` messages or `timeout`:
/// `(key, JSON value)` in arrival order.
pub async fn read_topic(
    brokers: &str,
    topic: &str,
    want: usize,
    timeout: Duration,
) -> Vec<(String, serde_json::Value)> {
    use rdkafka::Message;
    let consumer = reader(brokers, topic);
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < want {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => out.push((
                String::from_utf8(m.key().unwrap_or_default().to_vec()).unwrap(),
                serde_json::from_slice(m.payload().unwrap()).unwrap(),
            )),
            Ok(Err(_)) => continue,
            Err(_) => break,
        }
    }
    out
}

/// Reads envelopes from `topic` in a fresh consumer group until `want` distinct event ids
/// were seen (or 60 s passed); returns, per order id, the stream versions in arrival order
/// (duplicates included) and the set of event ids.
pub async fn consume_envelopes(
    brokers: &str,
    topic: &str,
    want: usize,
) -> (
    std::collections::HashMap<String, Vec<i64>>,
    std::collections::HashSet<String>,
) {
    use rdkafka::Message;
    let consumer = reader(brokers, topic);
    let mut per_key: std::collections::HashMap<String, Vec<i64>> = Default::default();
    let mut ids = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while ids.len() < want {
        let msg = match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => m,
            // A transport error right after a broker restart: librdkafka reconnects.
            Ok(Err(_)) => continue,
            Err(_) => break,
        };
        let key = String::from_utf8(msg.key().unwrap().to_vec()).unwrap();
        let env: serde_json::Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
        assert_eq!(
            env["stream_id"].as_str(),
            Some(key.as_str()),
            "message key is the order id"
        );
        per_key
            .entry(key)
            .or_default()
            .push(env["stream_version"].as_i64().unwrap());
        ids.insert(env["event_id"].as_str().unwrap().to_owned());
    }
    (per_key, ids)
}

/// Asserts that, ignoring redeliveries, each key's versions arrived as 1, 2, 3, ...
pub fn assert_in_version_order(
    per_key: &std::collections::HashMap<String, Vec<i64>>,
    events_per_key: i64,
) {
    for (key, versions) in per_key {
        let mut firsts = Vec::new();
        for v in versions {
            if !firsts.contains(v) {
                firsts.push(*v);
            }
        }
        assert_eq!(
            firsts,
            (1..=events_per_key).collect::<Vec<_>>(),
            "order {key} arrived as {versions:?}"
        );
    }
}

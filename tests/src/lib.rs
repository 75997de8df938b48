//! Helpers for integration tests against the real services started by `scripts/services.sh`.
//!
//! Every test gets its own PostgreSQL database, its own Kafka topic names and its own RabbitMQ
//! queue names (all derived from one random prefix), so tests run in parallel without seeing
//! each other. A missing service makes the helper fail the test with the address it tried:
//! nothing is skipped silently.
//!
//! # Layout
//! - [`TestDb`]: a fresh, migrated database, dropped when the value is dropped.
//! - [`TestKafka`]: per-test topic names, created with the admin API and deleted afterwards.
//! - [`TestRabbit`]: a connection plus a per-test name prefix; `delete_queues` removes what a
//!   test declared.
//! - [`process`]: `shop run` as a child process started like `scripts/run.sh`, and a client.
//! - [`invariants`]: whole-system invariants checked after faults.
#![forbid(unsafe_code)]

pub mod invariants;
pub mod process;
pub mod spans;

use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use platform::config::InfraConfig;
use sqlx::{Connection, Executor, PgConnection, PgPool};

/// The shared settings, read from the environment like the services read them.
pub fn infra() -> InfraConfig {
    InfraConfig::from_env().expect("invalid service environment for tests")
}

/// A short random name part, e.g. `t3f9a0c1b2d4e`.
pub fn unique_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Replaces the database name (the URL's last path segment) in a Postgres URL.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = base.rsplit_once('/').map(|(b, _)| b).unwrap_or(base);
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A database of its own for one test, with all migrations applied.
pub struct TestDb {
    pub pool: PgPool,
    pub name: String,
    pub url: String,
    admin_url: String,
}

/// Prefix of every test database; `scripts/test.sh` drops leftovers carrying it.
pub const TEST_DB_PREFIX: &str = "shoptest_";

impl TestDb {
    pub async fn new() -> Self {
        Self::with_pool_size(8).await
    }

    pub async fn with_pool_size(max: u32) -> Self {
        let admin_url = infra().database_url;
        let name = format!("{TEST_DB_PREFIX}{}", unique_prefix());
        let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!("cannot reach PostgreSQL at {admin_url}: {e} (run scripts/services.sh up)")
        });
        admin
            .execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
            .await
            .expect("create test database");
        admin.close().await.ok();
        let url = with_database(&admin_url, &name);
        let pool = platform::db::connect(&url, max)
            .await
            .expect("connect to test database");
        platform::db::migrate(&pool)
            .await
            .expect("apply migrations");
        Self {
            pool,
            name,
            url,
            admin_url,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Synchronous on purpose: async clean-up from Drop would need the test's runtime,
        // which is blocked right here. FORCE ends the pool's sessions.
        let sql = format!(r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#, self.name);
        let _ = std::process::Command::new("psql")
            .args([self.admin_url.as_str(), "-qXc", sql.as_str()])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

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

/// The command API served on a free loopback port over its own database.
pub struct TestApi {
    pub db: TestDb,
    pub base: String,
    pub http: reqwest::Client,
    pub auth: platform::auth::Authenticator,
    /// Stops the server when the `TestApi` is dropped.
    pub shutdown: tokio_util::sync::DropGuard,
}

pub const TEST_JWT_SECRET: &str = "test-secret-0123456789";

impl TestApi {
    pub async fn new() -> Self {
        Self::with_db(TestDb::with_pool_size(20).await).await
    }

    /// Starts an API instance over an existing database (e.g. to show state survives a restart).
    pub async fn with_db(db: TestDb) -> Self {
        let cfg = write_side::WriteSideConfig {
            http_addr: "127.0.0.1:0".parse().unwrap(),
            max_body_bytes: 64 * 1024,
            auth: platform::auth::AuthConfig {
                jwt_secret: TEST_JWT_SECRET.into(),
            },
        };
        let app = write_side::build(&cfg, db.pool.clone())
            .await
            .expect("bind command api");
        let base = format!("http://{}", app.local_addr());
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(app.run(shutdown.clone()));
        Self {
            db,
            base,
            http: reqwest::Client::new(),
            auth: platform::auth::Authenticator::new(TEST_JWT_SECRET),
            shutdown: shutdown.drop_guard(),
        }
    }

    pub fn token(&self, role: platform::auth::Role, subject: &str) -> String {
        self.auth.issue(subject, role, Duration::from_secs(600))
    }

    pub fn customer(&self, id: &str) -> String {
        self.token(platform::auth::Role::Customer, id)
    }

    pub fn operator(&self) -> String {
        self.token(platform::auth::Role::Operator, "ops")
    }

    /// POSTs a JSON body with a bearer token and an idempotency key.
    /// The returned future owns everything it needs, so many can run at once.
    pub fn post(
        &self,
        path: &str,
        token: &str,
        key: &str,
        body: &serde_json::Value,
    ) -> impl Future<Output = reqwest::Response> + use<> {
        let request = self
            .http
            .post(format!("{}{}", self.base, path))
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send();
        async move { request.await.expect("request") }
    }
}

/// Appends `n_orders` orders concurrently, each with three events in three transactions
/// (placed, inventory reserved, cancelled), with their outbox messages, like the command path.
/// Returns the order ids.
pub async fn append_orders(pool: &PgPool, n_orders: usize, concurrency: usize) -> Vec<uuid::Uuid> {
    use domain::{order::*, values::*};
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (pool, next) = (pool.clone(), next.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n_orders {
                    let id = OrderId(uuid::Uuid::now_v7());
                    let place = OrderCommand::Place(PlaceOrder {
                        order_id: id,
                        customer_id: CustomerId::parse("c-1").unwrap(),
                        currency: Currency::parse("EUR").unwrap(),
                        lines: vec![NewLine {
                            sku: Sku::parse("SKU-1").unwrap(),
                            quantity: Quantity::parse(1).unwrap(),
                            unit_price_minor: MinorUnits::parse(100).unwrap(),
                        }],
                        shipping_address: ShippingAddress::parse("A", "B", "C", "D", "DE").unwrap(),
                        payment_token: PaymentToken::parse("tok").unwrap(),
                    });
                    let cancel = OrderCommand::Cancel {
                        reason: Reason::parse("test").unwrap(),
                        by: CancelledBy::Customer,
                    };
                    let reserve = OrderCommand::MarkInventoryReserved {
                        reservation_id: "r".into(),
                    };
                    let mut history = Vec::new();
                    for cmd in [place, reserve, cancel] {
                        let events = decide(&replay(&history), cmd).unwrap();
                        let meta = event_store::Metadata {
                            correlation_id: id.0,
                            causation_id: uuid::Uuid::now_v7(),
                            actor: "test".into(),
                            traceparent: None,
                            command_id: None,
                        };
                        let at = event_store::now_micros();
                        let mut tx = pool.begin().await.unwrap();
                        let (_, expected) = event_store::load_stream(&mut tx, id.0).await.unwrap();
                        let (stored, outbox) =
                            orders::order_records(id, expected.version + 1, &events, &meta, at);
                        event_store::append_at(
                            &mut tx, id.0, "order", &expected, &stored, &outbox, at,
                        )
                        .await
                        .unwrap();
                        tx.commit().await.unwrap();
                        history.extend(events);
                    }
                    ids.push(id.0);
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    ids
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
    use rdkafka::{
        Message,
        consumer::{Consumer, StreamConsumer},
    };
    let group = format!("{}check", unique_prefix());
    let consumer: StreamConsumer = platform::kafka::consumer_config(brokers, &group)
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
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

/// How many messages projections have checkpointed: the sum of next offsets over all
/// partitions (partitions start at offset 0 in per-test topics).
pub async fn checkpointed(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT COALESCE(sum(next_offset), 0)::bigint FROM projection_checkpoints")
        .fetch_one(pool)
        .await
        .expect("read projection checkpoints")
}

/// Waits (at most 60 s) until projections have checkpointed at least `n` messages.
pub async fn wait_checkpointed(pool: &PgPool, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let seen = checkpointed(pool).await;
        if seen >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "projector stuck at {seen} of {n} messages"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A GraphQL client for one server.
pub struct Gql {
    pub url: String,
    pub http: reqwest::Client,
}

impl Gql {
    /// Serves `router` on an ephemeral port until `shutdown`.
    pub async fn serve(
        router: axum::Router,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/graphql", listener.local_addr().unwrap());
        tokio::spawn(
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .into_future(),
        );
        Self {
            url,
            http: reqwest::Client::new(),
        }
    }

    pub async fn query(
        &self,
        token: Option<&str>,
        query: &str,
        vars: serde_json::Value,
    ) -> serde_json::Value {
        let mut rb = self
            .http
            .post(&self.url)
            .json(&serde_json::json!({"query": query, "variables": vars}));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send().await.unwrap().json().await.unwrap()
    }

    /// Opens a `graphql-transport-ws` connection, authenticating in `connection_init` when a
    /// token is given, and
    /// starts one subscription (id "1").
    pub async fn subscribe(
        &self,
        token: Option<&str>,
        query: &str,
        vars: serde_json::Value,
    ) -> Subscription {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
        let url = self.url.replacen("http://", "ws://", 1) + "/ws";
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("websocket");
        let payload = match token {
            Some(t) => serde_json::json!({"Authorization": format!("Bearer {t}")}),
            None => serde_json::json!({}),
        };
        let init = serde_json::json!({"type": "connection_init", "payload": payload});
        ws.send(Message::text(init.to_string())).await.unwrap();
        let ack = ws.next().await.expect("ack").unwrap();
        assert!(ack.to_text().unwrap().contains("connection_ack"), "{ack}");
        let sub = serde_json::json!({"id": "1", "type": "subscribe", "payload": {"query": query, "variables": vars}});
        ws.send(Message::text(sub.to_string())).await.unwrap();
        Subscription { ws }
    }
}

/// One GraphQL subscription over WebSocket.
pub struct Subscription {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Subscription {
    /// The next `next`/`error` message's payload (at most 60 s).
    pub async fn next(&mut self) -> serde_json::Value {
        use futures::StreamExt;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(60), self.ws.next())
                .await
                .expect("no subscription message within 60 s")
                .expect("websocket closed")
                .expect("websocket error");
            let Ok(text) = msg.to_text() else { continue };
            let v: serde_json::Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(_) => continue,
            };
            match v["type"].as_str() {
                Some("next") => return v["payload"].clone(),
                Some("error") => return serde_json::json!({"errors": v["payload"]}),
                _ => {}
            }
        }
    }
}

/// The whole read path for one test: command API, relay loop, a projector per projection
/// (own consumer groups) and GraphQL with Kafka lag, on a topic of its own.
pub struct ReadStack {
    pub api: TestApi,
    pub kafka: TestKafka,
    pub topic: String,
    pub gql: Gql,
    pub shutdown: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl ReadStack {
    pub async fn start(config: read_side::consumer::ProjectorConfig) -> Self {
        let api = TestApi::new().await;
        let mut kafka = TestKafka::new().await;
        let topic = kafka
            .create_topics(&["orders.events", "orders.events.dlq"], 3)
            .await
            .remove(0);
        let infra = InfraConfig {
            kafka_topic_prefix: kafka.prefix.clone(),
            ..infra()
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let relay = outbox_relay::Relay::new(
            api.db.pool.clone(),
            &infra,
            outbox_relay::RelayConfig::default(),
        )
        .expect("relay");
        let mut tasks = vec![tokio::spawn(outbox_relay::run(
            relay,
            api.db.url.clone(),
            shutdown.clone(),
        ))];
        for kind in read_side::projection::Kind::ALL {
            let projector = read_side::consumer::Projector::new(
                kind,
                api.db.pool.clone(),
                &kafka.brokers,
                &topic,
                &kafka.prefix,
                config.clone(),
            )
            .expect("projector");
            tasks.push(tokio::spawn(projector.run(shutdown.clone())));
        }
        let graphql = read_side::graphql::GraphqlApi {
            pool: api.db.pool.clone(),
            auth: api.auth.clone(),
            watermarks: Some(read_side::status::Watermarks::new(&kafka.brokers, &topic).unwrap()),
        };
        let gql = Gql::serve(graphql.router(), shutdown.clone()).await;
        Self {
            api,
            kafka,
            topic,
            gql,
            shutdown,
            tasks,
        }
    }

    /// Stops every task and surfaces their errors.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            t.await.expect("task panicked").expect("task failed");
        }
    }

    /// Waits (at most 60 s) until every projection has checkpointed every published order
    /// event (the outbox's Kafka rows).
    pub async fn wait_caught_up(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (published, behind): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM outbox WHERE destination = 'kafka'),
                        (SELECT count(*) FROM outbox WHERE destination = 'kafka' AND published_at IS NULL)",
            )
            .fetch_one(&self.api.db.pool)
            .await
            .unwrap();
            let per_projection: Vec<i64> = sqlx::query_scalar(
                "SELECT COALESCE(sum(c.next_offset), 0)::bigint FROM projections p
                 LEFT JOIN projection_checkpoints c ON c.projection = p.name GROUP BY p.name",
            )
            .fetch_all(&self.api.db.pool)
            .await
            .unwrap();
            if behind == 0 && per_projection.iter().all(|n| *n >= published) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "read side stuck: {published} published, {behind} unpublished, checkpoints {per_projection:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A valid checkout body.
pub fn checkout_body() -> serde_json::Value {
    serde_json::json!({
        "currency": "EUR",
        "items": [
            {"sku": "SKU-1", "quantity": 2, "unit_price_minor": 1250},
            {"sku": "SKU-2", "quantity": 1, "unit_price_minor": 499}
        ],
        "shipping_address": {"name": "Ada Lovelace", "line1": "1 Main St", "city": "Berlin", "postal_code": "10115", "country": "DE"},
        "payment_token": "tok_visa"
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_name_is_replaced() {
        assert_eq!(
            super::with_database("postgres://u:p@h:5432/shop", "x"),
            "postgres://u:p@h:5432/x"
        );
        assert_eq!(
            super::with_database("postgres://u:p@h/shop?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
    }
}

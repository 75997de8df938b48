//! The system's parts served in-process for a test: the command API over its own database,
//! and the whole read path (relay, projectors, GraphQL) on a topic of its own.

use std::time::Duration;

use platform::config::InfraConfig;
use sqlx::PgPool;

use crate::*;

/// The command API served on a free loopback port over its own database.
pub struct TestApi {
    pub db: TestDb,
    pub base: String,
    pub http: reqwest::Client,
    pub auth: platform::auth::Authenticator,
    /// Stops the server when the `TestApi` is dropped.
    pub shutdown: tokio_util::sync::DropGuard,
}

/// The bearer-token keys of in-process APIs and of `shop` children (`JWT_KEYS`).
pub const TEST_JWT_KEYS: &str = "test-1=test-secret-0123456789-0123456789";

/// The audit keys of in-process appends and of `shop` children (`AUDIT_KEYS`).
pub const TEST_AUDIT_KEYS: &str = "audit-test-1=audit-secret-0123456789-0123456789";

/// The master keys of in-process APIs and sagas and of `shop` children (`MASTER_KEYS`): one
/// set, so a data key one of them stored unwraps in all of them.
pub const TEST_MASTER_KEYS: &str = "master-test-1=master-secret-0123456789-0123456789";

/// A vault over [`TEST_MASTER_KEYS`].
pub fn test_vault() -> platform::vault::Vault {
    let master = platform::vault::MasterKeys::configured(Some(TEST_MASTER_KEYS), None)
        .expect("the test master keys parse");
    platform::vault::Vault::new(master)
}

/// Installs [`TEST_AUDIT_KEYS`] for this test process (idempotent): every in-process append
/// keys its chain with them, as `shop run` does with its own.
pub fn install_test_audit_keys() {
    let ring = platform::keys::Keyring::parse_inline("AUDIT", TEST_AUDIT_KEYS).expect("test keys");
    event_store::hash::install_chain_keys(
        event_store::hash::ChainKeys::new(ring.entries()).unwrap(),
    )
    .expect("one set of audit keys per test process");
}

/// An authenticator over [`TEST_JWT_KEYS`] with the default claims.
pub fn test_auth() -> platform::auth::Authenticator {
    let cfg = platform::auth::AuthConfig::with_keys(TEST_JWT_KEYS);
    platform::auth::Authenticator::from_config(&cfg, false).expect("the test keys parse")
}

impl TestApi {
    pub async fn new() -> Self {
        Self::with_db(TestDb::with_pool_size(20).await).await
    }

    /// Starts an API instance over an existing database (e.g. to show state survives a restart).
    pub async fn with_db(db: TestDb) -> Self {
        Self::serve(db, None).await
    }

    /// An API that also ingests user activity into `topic` (`POST /activity`).
    pub async fn with_activity(db: TestDb, brokers: &str, topic: &str) -> Self {
        let ingest = write_side::activity::Ingest::new(
            brokers,
            topic,
            &write_side::activity::ActivityConfig::default(),
        )
        .expect("activity producer");
        Self::serve(db, Some(ingest)).await
    }

    async fn serve(db: TestDb, activity: Option<write_side::activity::Ingest>) -> Self {
        // The development catalog (SKU-1 at 1250, SKU-2 at 499, ... EUR), as scripts/run.sh
        // seeds it: checkouts are priced from it.
        write_side::catalog::seed(&db.pool)
            .await
            .expect("seed the catalog");
        let cfg = write_side::WriteSideConfig {
            http_addr: "127.0.0.1:0".parse().unwrap(),
            ..write_side::WriteSideConfig::default()
        };
        let mut state = write_side::http::AppState::new(db.pool.clone(), test_auth(), test_vault());
        if let Some(ingest) = activity {
            state = state.with_activity(ingest);
        }
        let app = write_side::bind(&cfg, state)
            .await
            .expect("bind command api");
        let base = format!("http://{}", app.local_addr());
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(app.run(shutdown.clone()));
        Self {
            db,
            base,
            http: reqwest::Client::new(),
            auth: test_auth(),
            shutdown: shutdown.drop_guard(),
        }
    }

    pub fn token(&self, role: platform::auth::Role, subject: &str) -> String {
        self.auth
            .issue(subject, role, Duration::from_secs(600))
            .expect("ten minutes is within the cap")
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
        Self::launch(config, false).await
    }

    /// [`ReadStack::start`] with `POST /activity` on the API and the analytics group running.
    pub async fn with_analytics() -> Self {
        Self::launch(read_side::consumer::ProjectorConfig::default(), true).await
    }

    /// The per-test `user-activity` topic.
    pub fn activity_topic(&self) -> String {
        self.kafka.topic(read_side::analytics::ACTIVITY_TOPIC)
    }

    async fn launch(config: read_side::consumer::ProjectorConfig, analytics: bool) -> Self {
        let mut kafka = TestKafka::new().await;
        let topics = kafka
            .create_topics(
                &[
                    "orders.events",
                    "orders.events.dlq",
                    read_side::analytics::ACTIVITY_TOPIC,
                ],
                3,
            )
            .await;
        let (topic, activity) = (topics[0].clone(), topics[2].clone());
        let db = TestDb::with_pool_size(20).await;
        let api = if analytics {
            TestApi::with_activity(db, &kafka.brokers, &activity).await
        } else {
            TestApi::with_db(db).await
        };
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
        if analytics {
            let (pool, brokers, prefix, stop) = (
                api.db.pool.clone(),
                kafka.brokers.clone(),
                kafka.prefix.clone(),
                shutdown.clone(),
            );
            let topics = read_side::analytics::Topics {
                activity,
                orders: topic.clone(),
            };
            tasks.push(tokio::spawn(async move {
                read_side::analytics::run(
                    pool,
                    &brokers,
                    topics,
                    &prefix,
                    config.stuck_after,
                    &stop,
                    || {},
                )
                .await
            }));
        }
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
            limits: read_side::graphql::GraphqlLimits::default(),
            admission: None,
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

//! The relay as a real process, killed with SIGKILL mid-run and restarted: every event still
//! reaches Kafka, in per-order order (at least once; duplicates allowed).

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use shop_tests::{TestDb, TestKafka, append_orders, assert_in_version_order, consume_envelopes};

fn spawn_relay(db: &TestDb, kafka: &TestKafka) -> Child {
    Command::new(env!("CARGO_BIN_EXE_shop"))
        .arg("relay")
        .env("DATABASE_URL", &db.url)
        .env("KAFKA_BROKERS", &kafka.brokers)
        .env("KAFKA_TOPIC_PREFIX", &kafka.prefix)
        .env("RELAY_OPS_ADDR", "127.0.0.1:0")
        .env("RELAY_BATCH_SIZE", "50")
        .env("RELAY_POLL_INTERVAL", "100ms")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start shop relay")
}

async fn published(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_run_and_restarted_loses_nothing_and_keeps_order() {
    let db = TestDb::with_pool_size(20).await;
    let mut kafka = TestKafka::new().await;
    let topic = kafka.create_topics(&["orders.events"], 6).await.remove(0);

    let mut relay = spawn_relay(&db, &kafka);
    let appending = tokio::spawn({
        let pool = db.pool.clone();
        async move { append_orders(&pool, 1000, 8).await }
    });
    // Kill it once it is well into the work, while appends are still running.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while published(&db).await < 300 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.kill().expect("SIGKILL");
    relay.wait().unwrap();
    let at_kill = published(&db).await;

    let mut relay = spawn_relay(&db, &kafka);
    appending.await.unwrap();
    while published(&db).await < 3000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "restarted relay did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.kill().ok();
    relay.wait().ok();
    assert!(at_kill < 3000, "the kill came too late to test anything");

    let (per_key, ids) = consume_envelopes(&kafka.brokers, &topic, 3000).await;
    assert_eq!(ids.len(), 3000, "every event id reaches Kafka");
    assert_eq!(per_key.len(), 1000);
    assert_in_version_order(&per_key, 3);
}

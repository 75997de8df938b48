//! The saga orchestrator (with the participants) as a real process, killed with SIGKILL
//! mid-run and restarted: every saga finishes, exactly once, with exact stock.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use outbox_relay::{Relay, RelayConfig};
use platform::config::InfraConfig;
use shop_tests::{TestApi, TestKafka, TestRabbit, checkout_body};
use tokio_util::sync::CancellationToken;

fn spawn_saga(api: &TestApi, rabbit: &TestRabbit) -> Child {
    Command::new(env!("CARGO_BIN_EXE_shop"))
        .arg("saga")
        .env("DATABASE_URL", &api.db.url)
        .env("AMQP_URL", &rabbit.url)
        .env("SAGA_QUEUE_PREFIX", &rabbit.prefix)
        .env("SAGA_STEP_TIMEOUT", "3s")
        .env("RUST_LOG", "warn")
        .env("MASTER_KEYS", shop_tests::TEST_MASTER_KEYS)
        .env_remove("MASTER_KEYS_FILE")
        .stdout(Stdio::null())
        .spawn()
        .expect("start shop saga")
}

async fn finished(api: &TestApi) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type IN ('OrderConfirmed', 'OrderCancelled')",
    )
    .fetch_one(&api.db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_killed_mid_run_and_restarted_finishes_every_saga_exactly_once() {
    let api = TestApi::new().await;
    let rabbit = TestRabbit::new().await;
    let names = saga::topology::Names::new(&rabbit.prefix);
    let retry_delays = saga::SagaConfig::default().retry_delays();
    saga::topology::declare(&rabbit.conn, &names, &retry_delays)
        .await
        .unwrap();
    saga::participants::set_stock(
        &api.db.pool,
        &domain::values::Sku::parse("SKU-1").unwrap(),
        10_000,
    )
    .await
    .unwrap();
    saga::participants::set_stock(
        &api.db.pool,
        &domain::values::Sku::parse("SKU-2").unwrap(),
        10_000,
    )
    .await
    .unwrap();
    let mut kafka = TestKafka::new().await;
    kafka.create_topics(&["orders.events"], 1).await;
    let infra = InfraConfig {
        kafka_topic_prefix: kafka.prefix.clone(),
        ..shop_tests::infra()
    };
    let shutdown = CancellationToken::new();
    let relay = Relay::new(
        api.db.pool.clone(),
        &infra,
        RelayConfig {
            poll_interval: Duration::from_millis(100),
            ..RelayConfig::default()
        },
    )
    .unwrap();
    let relaying = tokio::spawn(outbox_relay::run(
        relay,
        api.db.url.clone(),
        shutdown.clone(),
    ));

    let mut saga = spawn_saga(&api, &rabbit);
    let n = 200;
    let token = api.customer("c-1");
    let mut placing = Vec::new();
    for i in 0..n {
        placing.push(api.post("/orders", &token, &format!("k-{i}"), &checkout_body()));
    }
    for p in placing {
        assert_eq!(p.await.status(), 202);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while finished(&api).await < 30 {
        assert!(tokio::time::Instant::now() < deadline, "no saga finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    saga.kill().expect("SIGKILL");
    saga.wait().unwrap();
    let at_kill = finished(&api).await;
    assert!(at_kill < n, "the kill came too late to test anything");

    let mut saga = spawn_saga(&api, &rabbit);
    while finished(&api).await < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sagas did not all finish after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    saga.kill().ok();
    saga.wait().ok();
    shutdown.cancel();
    relaying.await.unwrap().unwrap();

    // Exactly once: one terminal event per order, each saga input recorded once, stock exact.
    let per_order: Vec<(String, i64)> = sqlx::query_as(
        "SELECT event_type, count(*) FROM events WHERE stream_type = 'order' GROUP BY event_type ORDER BY 1",
    )
    .fetch_all(&api.db.pool)
    .await
    .unwrap();
    let count = |t: &str| {
        per_order
            .iter()
            .find(|(e, _)| e == t)
            .map_or(0, |(_, c)| *c)
    };
    assert_eq!(count("OrderPlaced"), n);
    assert_eq!(count("OrderConfirmed"), n, "{per_order:?}");
    assert_eq!(count("OrderCancelled"), 0, "{per_order:?}");
    let repeated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT stream_id, payload->>'type', payload->>'step', payload->>'attempt'
                               FROM events WHERE stream_type = 'checkout_saga' AND payload->>'type' <> 'late_reply_compensated'
                               GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) x",
    )
    .fetch_one(&api.db.pool)
    .await
    .unwrap();
    assert_eq!(repeated, 0, "a saga recorded the same decision twice");
    let reserved: Vec<i64> =
        sqlx::query_scalar("SELECT reserved FROM inventory_stock ORDER BY sku")
            .fetch_all(&api.db.pool)
            .await
            .unwrap();
    assert_eq!(reserved, [2 * n, n]);
    let queues = names.all_queues(&retry_delays);
    rabbit.delete_queues(&queues).await;
}

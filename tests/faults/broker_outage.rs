//! A RabbitMQ outage while the relay publishes: the relay keeps retrying with backoff, reports
//! unready, commands keep being written to the outbox, and once the broker is back the backlog
//! drains in per-key order with nothing lost.

use std::{
    collections::{HashMap, HashSet},
    process::Command,
    sync::atomic::Ordering,
    time::Duration,
};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use outbox_relay::{Relay, RelayConfig};
use platform::config::InfraConfig;
use shop_tests::{TestDb, TestRabbit};
use tokio_util::sync::CancellationToken;

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("run rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

async fn insert_commands(db: &TestDb, route: &str, keys: usize, from: usize, to: usize) {
    for seq in from..to {
        for k in 0..keys {
            sqlx::query(
                "INSERT INTO outbox (message_id, destination, target, routing_key, ordering_key, headers, payload)
                 VALUES ($1, 'amqp', 'checkout.commands', $2, $3, '{}', $4)",
            )
            .bind(uuid::Uuid::now_v7())
            .bind(route)
            .bind(format!("key-{k}"))
            .bind(format!("key-{k}:{seq}").into_bytes())
            .execute(&db.pool)
            .await
            .unwrap();
        }
    }
}

async fn pending(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_stopped_and_started_during_the_run_loses_nothing_and_keeps_order() {
    let _one = crate::ONE_AT_A_TIME.lock().await;
    let db = TestDb::new().await;
    let rabbit = TestRabbit::new().await;
    let (queue, route) = (rabbit.name("outage"), rabbit.name("outage-route"));
    let ch = rabbit.conn.create_channel().await.unwrap();
    platform::amqp::declare_command_queue(&ch, &queue, &route)
        .await
        .unwrap();

    let cfg = RelayConfig {
        batch_size: 20,
        poll_interval: Duration::from_millis(50),
        max_backoff: Duration::from_secs(1),
        ..RelayConfig::default()
    };
    let relay = Relay::new(
        db.pool.clone(),
        &InfraConfig {
            ..shop_tests::infra()
        },
        cfg,
    )
    .unwrap();
    let ready = relay.ready.clone();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(outbox_relay::run(relay, db.url.clone(), shutdown.clone()));

    let (keys, per_phase) = (10, 20);
    insert_commands(&db, &route, keys, 0, per_phase).await;
    rabbitmqctl(&["stop_app"]);
    // Commands keep arriving while the broker is away; they wait in PostgreSQL.
    insert_commands(&db, &route, keys, per_phase, 2 * per_phase).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ready.load(Ordering::Relaxed) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay never noticed the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        pending(&db).await > 0,
        "the backlog should be waiting in the outbox"
    );
    let attempts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE last_error IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(attempts > 0, "failed attempts are recorded on the rows");
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    insert_commands(&db, &route, keys, 2 * per_phase, 3 * per_phase).await;

    let total = (keys * 3 * per_phase) as i64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while pending(&db).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backlog did not drain after the broker returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready.load(Ordering::Relaxed), "relay ready again");
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // Everything arrived; per key, first occurrences are in sequence order.
    let rabbit = TestRabbit::new().await;
    let ch = platform::amqp::consumer_channel(&rabbit.conn, 500)
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "check".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let mut seen: HashMap<String, Vec<usize>> = HashMap::new();
    let mut distinct = HashSet::new();
    while (distinct.len() as i64) < total {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("all messages within 10 s")
            .unwrap()
            .unwrap();
        let text = String::from_utf8(d.data.clone()).unwrap();
        let (key, seq) = text.split_once(':').unwrap();
        let seq: usize = seq.parse().unwrap();
        if distinct.insert(text.clone()) {
            seen.entry(key.to_owned()).or_default().push(seq);
        }
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    for (key, seqs) in &seen {
        assert_eq!(
            seqs,
            &(0..3 * per_phase).collect::<Vec<_>>(),
            "order broken for {key}"
        );
    }
    rabbit.delete_queues(&[queue]).await;
}

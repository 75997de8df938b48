//! The outbox relay against real PostgreSQL, Kafka and RabbitMQ.

use std::time::Duration;

use event_store::outbox as store;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use outbox_relay::{Relay, RelayConfig};
use platform::config::InfraConfig;
use shop_tests::{
    TestDb, TestKafka, TestRabbit, append_orders, assert_in_version_order, consume_envelopes,
};
use tokio_util::sync::CancellationToken;

fn infra(kafka: &TestKafka) -> InfraConfig {
    InfraConfig {
        kafka_topic_prefix: kafka.prefix.clone(),
        ..shop_tests::infra()
    }
}

fn relay_cfg() -> RelayConfig {
    RelayConfig {
        batch_size: 200,
        poll_interval: Duration::from_millis(100),
        ..RelayConfig::default()
    }
}

async fn wait_until_published(db: &TestDb) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        if pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{pending} rows still unpublished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `instances` relays while 1,000 orders (3 events each) are appended concurrently, and
/// checks every event reached Kafka, in per-order version order.
async fn publish_1000_orders_with(instances: usize) {
    let db = TestDb::with_pool_size(30).await;
    let mut kafka = TestKafka::new().await;
    let topic = kafka.create_topics(&["orders.events"], 6).await.remove(0);
    let shutdown = CancellationToken::new();
    let mut relays = Vec::new();
    for _ in 0..instances {
        let relay = Relay::new(db.pool.clone(), &infra(&kafka), relay_cfg()).unwrap();
        relays.push(tokio::spawn(outbox_relay::run(
            relay,
            db.url.clone(),
            shutdown.clone(),
        )));
    }
    let orders = append_orders(&db.pool, 1000, 16).await;
    assert_eq!(orders.len(), 1000);
    wait_until_published(&db).await;
    shutdown.cancel();
    for r in relays {
        r.await.unwrap().unwrap();
    }
    let (per_key, ids) = consume_envelopes(&kafka.brokers, &topic, 3000).await;
    assert_eq!(ids.len(), 3000, "every event id reaches Kafka");
    assert_eq!(per_key.len(), 1000);
    assert_in_version_order(&per_key, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_of_1000_orders_reaches_kafka_in_order() {
    publish_1000_orders_with(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relay_instances_keep_per_order_order() {
    publish_1000_orders_with(2).await;
}

#[tokio::test]
async fn a_rejected_message_is_set_aside_blocks_only_its_key_and_can_be_retried() {
    let db = TestDb::new().await;
    let rabbit = TestRabbit::new().await;
    let kafka = TestKafka::new().await;
    let queue = rabbit.name("inventory");
    let (good_key, bad_key) = (rabbit.name("route-ok"), rabbit.name("route-missing"));
    let ch = rabbit.conn.create_channel().await.unwrap();
    let mut relay = Relay::new(db.pool.clone(), &infra(&kafka), relay_cfg()).unwrap();

    // Two keys; the second one's routing key has no queue yet (unroutable = rejected).
    for (i, (key, route)) in [
        (&good_key, &good_key),
        (&bad_key, &bad_key),
        (&good_key, &good_key),
        (&bad_key, &bad_key),
    ]
    .into_iter()
    .enumerate()
    {
        sqlx::query(
            "INSERT INTO outbox (message_id, destination, target, routing_key, ordering_key, headers, payload)
             VALUES ($1, 'amqp', 'checkout.commands', $2, $3, '{\"n\":1}', $4)",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(route)
        .bind(key)
        .bind(format!("m{i}").into_bytes())
        .execute(&db.pool)
        .await
        .unwrap();
    }
    // The exchange as the relay declares it, and a queue for the good route only.
    platform::amqp::declare_command_queue(&ch, &queue, &good_key)
        .await
        .unwrap();
    relay.drain().await.unwrap();

    let failed = store::list_failed(&db.pool).await.unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].ordering_key, bad_key);
    assert!(
        failed[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("NO_ROUTE"),
        "{:?}",
        failed[0].last_error
    );
    let pending_bad: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE ordering_key = $1 AND published_at IS NULL",
    )
    .bind(&bad_key)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        pending_bad, 2,
        "the later message of the failed key waits behind it"
    );

    // The good key's two messages arrived, in order, persistent, with their ids.
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "t".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    for expect in ["m0", "m2"] {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(d.data, expect.as_bytes());
        assert_eq!(*d.properties.delivery_mode(), Some(2));
        assert!(d.properties.message_id().is_some());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }

    // Fix the routing, retry: the failed message and the one behind it go out, in order.
    platform::amqp::declare_command_queue(&ch, &queue, &bad_key)
        .await
        .unwrap();
    assert!(store::retry_failed(&db.pool, failed[0].id).await.unwrap());
    assert!(
        !store::retry_failed(&db.pool, failed[0].id).await.unwrap(),
        "only failed rows can be retried"
    );
    relay.drain().await.unwrap();
    for expect in ["m1", "m3"] {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(d.data, expect.as_bytes());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert!(store::list_failed(&db.pool).await.unwrap().is_empty());
    rabbit.delete_queues(&[queue]).await;
}

#[tokio::test]
async fn published_rows_are_pruned_after_the_retention() {
    let db = TestDb::new().await;
    let mut kafka = TestKafka::new().await;
    kafka.create_topics(&["orders.events"], 1).await;
    append_orders(&db.pool, 3, 1).await;
    let mut relay = Relay::new(db.pool.clone(), &infra(&kafka), relay_cfg()).unwrap();
    assert_eq!(relay.drain().await.unwrap(), 9);
    assert_eq!(
        store::prune(&db.pool, Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    sqlx::query("UPDATE outbox SET published_at = now() - interval '2 hours' WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 4)")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        store::prune(&db.pool, Duration::from_secs(3600))
            .await
            .unwrap(),
        4
    );
    let (backlog, _) = store::backlog(&db.pool).await.unwrap();
    assert_eq!(backlog, 0);
}

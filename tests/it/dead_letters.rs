//! Poison events on the read side: dead-lettered (row + DLQ topic), later events of the same
//! order parked, other orders unaffected, and replay after the fix applies them in order.

use std::time::Duration;

use outbox_relay::{Relay, RelayConfig};
use platform::config::InfraConfig;
use rdkafka::{
    Message,
    consumer::{Consumer, StreamConsumer},
    message::Headers,
};
use read_side::{consumer::Projector, dead_letters};
use shop_tests::{TestDb, TestKafka, append_orders};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn summary(db: &TestDb, id: Uuid) -> (String, i64) {
    sqlx::query_as("SELECT status, version FROM order_summary WHERE order_id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_dead_lettered_its_successors_parked_and_replay_applies_them_in_order() {
    let db = TestDb::new().await;
    let mut kafka = TestKafka::new().await;
    let topics = kafka
        .create_topics(&["orders.events", "orders.events.dlq"], 2)
        .await;
    let orders = append_orders(&db.pool, 2, 1).await;
    let (x, y) = (orders[0], orders[1]);

    // Corrupt the message of X's version 2 on its way out (the event store keeps the truth).
    sqlx::query(
        "UPDATE outbox SET payload = convert_to(replace(convert_from(payload, 'UTF8'), '\"reservation_id\"', '\"bogus\"'), 'UTF8')
         WHERE message_id = (SELECT event_id FROM events WHERE stream_id = $1 AND stream_version = 2)",
    )
    .bind(x)
    .execute(&db.pool)
    .await
    .unwrap();
    let infra = InfraConfig {
        kafka_topic_prefix: kafka.prefix.clone(),
        ..shop_tests::infra()
    };
    assert_eq!(
        Relay::new(db.pool.clone(), &infra, RelayConfig::default())
            .unwrap()
            .drain()
            .await
            .unwrap(),
        6
    );

    let shutdown = CancellationToken::new();
    let projector =
        Projector::order_summary(db.pool.clone(), &kafka.brokers, &topics[0], &kafka.prefix)
            .unwrap();
    let task = tokio::spawn(projector.run(shutdown.clone()));
    shop_tests::wait_checkpointed(&db.pool, 6).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // Y is unaffected; X stopped at version 1 with v2 dead-lettered and v3 parked.
    assert_eq!(summary(&db, y).await, ("CANCELLED".into(), 3));
    assert_eq!(summary(&db, x).await, ("PENDING".into(), 1));
    let open = dead_letters::list(&db.pool, true).await.unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    let dl = &open[0];
    assert_eq!(
        (dl.stream_id, dl.stream_version, dl.error_class.as_str()),
        (Some(x), Some(2), "invalid_payload")
    );
    assert_eq!(dl.topic, topics[0]);
    let parked: Vec<i64> =
        sqlx::query_scalar("SELECT stream_version FROM parked_events WHERE stream_id = $1")
            .bind(x)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(parked, [3]);

    // The DLQ topic has the message with its envelope in headers.
    let consumer: StreamConsumer =
        platform::kafka::consumer_config(&kafka.brokers, &format!("{}dlq-check", kafka.prefix))
            .create()
            .unwrap();
    consumer.subscribe(&[&topics[1]]).unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("dlq message")
        .unwrap();
    let header = |name: &str| {
        msg.headers().and_then(|h| {
            h.iter()
                .find(|x| x.key == name)
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
    };
    assert_eq!(header("error_class").as_deref(), Some("invalid_payload"));
    assert_eq!(header("projection").as_deref(), Some("order_summary"));
    assert_eq!(
        header("original_topic").as_deref(),
        Some(topics[0].as_str())
    );
    assert_eq!(header("original_offset"), Some(dl.offset.to_string()));
    assert_eq!(header("attempts").as_deref(), Some("1"));
    assert!(header("first_failure").is_some() && header("last_failure").is_some());
    assert_eq!(msg.key(), Some(x.to_string().as_bytes()));

    // Replay reads v2 from the event store, applies it, then releases v3.
    assert_eq!(dead_letters::replay(&db.pool, dl.id).await.unwrap(), 1);
    assert_eq!(summary(&db, x).await, ("CANCELLED".into(), 3));
    assert_eq!(
        dead_letters::get(&db.pool, dl.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        "replayed"
    );
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(parked, 0);
    assert!(matches!(
        dead_letters::replay(&db.pool, dl.id).await,
        Err(dead_letters::ResolveError::NotOpen(_))
    ));
}

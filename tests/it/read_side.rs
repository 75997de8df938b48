//! Command API -> outbox -> relay -> Kafka -> projector -> GraphQL, on the real services.

use std::time::Duration;

use outbox_relay::{Relay, RelayConfig};
use platform::config::InfraConfig;
use read_side::consumer::Projector;
use serde_json::{Value, json};
use shop_tests::{Gql, TestApi, TestKafka, checkout_body};
use tokio_util::sync::CancellationToken;

const ORDER: &str = "query($id: ID!) { order(id: $id) { id customerId status currency totalMinor
    items { sku quantity unitPriceMinor } cancellationReason version createdAt updatedAt timeline { status at } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_placed_through_the_api_becomes_visible_in_graphql_and_redelivery_changes_nothing()
{
    let api = TestApi::new().await;
    let mut kafka = TestKafka::new().await;
    let topic = kafka.create_topics(&["orders.events"], 3).await.remove(0);
    let alice = api.customer("alice");

    // Write side: place two orders, cancel one.
    let placed: Value = api
        .post("/orders", &alice, "k1", &checkout_body())
        .await
        .json()
        .await
        .unwrap();
    let id = placed["order_id"].as_str().unwrap().to_owned();
    let r = api
        .post(
            &format!("/orders/{id}/cancel"),
            &alice,
            "k2",
            &json!({"reason": "too slow"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let other: Value = api
        .post("/orders", &alice, "k3", &checkout_body())
        .await
        .json()
        .await
        .unwrap();

    // Relay and projector.
    let infra = InfraConfig {
        kafka_topic_prefix: kafka.prefix.clone(),
        ..shop_tests::infra()
    };
    let mut relay = Relay::new(api.db.pool.clone(), &infra, RelayConfig::default()).unwrap();
    assert_eq!(relay.drain().await.unwrap(), 3);
    let shutdown = CancellationToken::new();
    let projector =
        Projector::order_summary(api.db.pool.clone(), &kafka.brokers, &topic, &kafka.prefix)
            .unwrap();
    let projecting = tokio::spawn(projector.run(shutdown.clone()));

    // GraphQL.
    let router = read_side::graphql::router(api.db.pool.clone(), api.auth.clone());
    let gql = Gql::serve(router, shutdown.clone()).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let order = loop {
        let r = gql.query(Some(&alice), ORDER, json!({"id": id})).await;
        assert!(r.get("errors").is_none(), "{r}");
        if r["data"]["order"]["status"] == "CANCELLED" {
            break r["data"]["order"].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "order never became visible: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(order["id"], id.as_str());
    assert_eq!(order["customerId"], "alice");
    assert_eq!(order["currency"], "EUR");
    assert_eq!(order["totalMinor"], 2 * 1250 + 499);
    assert_eq!(
        order["items"],
        json!([{"sku": "SKU-1", "quantity": 2, "unitPriceMinor": 1250}, {"sku": "SKU-2", "quantity": 1, "unitPriceMinor": 499}])
    );
    assert_eq!(order["cancellationReason"], "too slow");
    assert_eq!(order["version"], 2);
    let statuses: Vec<&str> = order["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["PENDING", "CANCELLED"]);

    // Customers cannot read others' orders; anonymous callers and bad ids get typed errors.
    let r = gql
        .query(Some(&api.customer("mallory")), ORDER, json!({"id": id}))
        .await;
    assert_eq!(r["data"]["order"], Value::Null, "{r}");
    let r = gql.query(None, ORDER, json!({"id": id})).await;
    assert_eq!(
        r["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
        "{r}"
    );
    let r = gql.query(Some(&alice), ORDER, json!({"id": "nope"})).await;
    assert_eq!(
        r["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
        "{r}"
    );

    // The other order reaches the read model too; then list alice's orders page by page.
    let other_id = other["order_id"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while gql
        .query(Some(&alice), ORDER, json!({"id": other_id}))
        .await["data"]["order"]
        .is_null()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "second order never became visible"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An operator reads any customer's order (once projected: asked earlier it raced it).
    let r = gql
        .query(
            Some(&api.operator()),
            ORDER,
            json!({"id": other["order_id"]}),
        )
        .await;
    assert_eq!(r["data"]["order"]["status"], "PENDING", "{r}");
    const ORDERS: &str = "query($c: ID, $s: OrderStatus, $first: Int, $after: String) {
        orders(customerId: $c, status: $s, first: $first, after: $after) {
            edges { cursor node { id status } } pageInfo { hasNextPage endCursor } } }";
    let page1 = gql.query(Some(&alice), ORDERS, json!({"first": 1})).await;
    let conn = &page1["data"]["orders"];
    assert_eq!(
        conn["edges"][0]["node"]["id"],
        other_id.as_str(),
        "newest first: {page1}"
    );
    assert_eq!(conn["pageInfo"]["hasNextPage"], true);
    let page2 = gql
        .query(
            Some(&alice),
            ORDERS,
            json!({"first": 1, "after": conn["pageInfo"]["endCursor"]}),
        )
        .await;
    assert_eq!(
        page2["data"]["orders"]["edges"][0]["node"]["id"],
        id.as_str(),
        "{page2}"
    );
    assert_eq!(page2["data"]["orders"]["pageInfo"]["hasNextPage"], false);
    let cancelled = gql
        .query(Some(&alice), ORDERS, json!({"s": "CANCELLED"}))
        .await;
    assert_eq!(
        cancelled["data"]["orders"]["edges"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{cancelled}"
    );
    let r = gql
        .query(Some(&api.customer("mallory")), ORDERS, json!({}))
        .await;
    assert_eq!(
        r["data"]["orders"]["edges"],
        json!([]),
        "mallory has no orders: {r}"
    );
    let r = gql
        .query(
            Some(&api.customer("mallory")),
            ORDERS,
            json!({"c": "alice"}),
        )
        .await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "FORBIDDEN", "{r}");
    let r = gql
        .query(
            Some(&api.operator()),
            ORDERS,
            json!({"c": "alice", "first": 10}),
        )
        .await;
    assert_eq!(
        r["data"]["orders"]["edges"].as_array().unwrap().len(),
        2,
        "{r}"
    );
    let r = gql.query(Some(&alice), ORDERS, json!({"first": 0})).await;
    assert_eq!(
        r["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
        "{r}"
    );

    // Checkout progress follows the status history; another customer gets null.
    const PROGRESS: &str =
        "query($id: ID!) { checkoutProgress(orderId: $id) { orderId status inventoryReserved
        paymentAuthorized shipmentCreated confirmed cancelled cancellationReason } }";
    let r = gql.query(Some(&alice), PROGRESS, json!({"id": id})).await;
    assert_eq!(
        r["data"]["checkoutProgress"],
        json!({"orderId": id, "status": "CANCELLED", "inventoryReserved": false, "paymentAuthorized": false,
               "shipmentCreated": false, "confirmed": false, "cancelled": true, "cancellationReason": "too slow"}),
        "{r}"
    );
    let r = gql
        .query(Some(&api.customer("mallory")), PROGRESS, json!({"id": id}))
        .await;
    assert_eq!(r["data"]["checkoutProgress"], Value::Null, "{r}");

    // The audit trail comes from the event store, for operators only.
    const AUDIT: &str =
        "query($id: ID!) { auditTrail(orderId: $id) { entries { position streamVersion eventType
        schemaVersion recordedAt payload metadata hash } verified brokenAt } }";
    let r = gql
        .query(Some(&api.operator()), AUDIT, json!({"id": id}))
        .await;
    let trail = &r["data"]["auditTrail"];
    assert_eq!(trail["verified"], true, "{r}");
    assert_eq!(trail["brokenAt"], Value::Null);
    let types: Vec<&str> = trail["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["eventType"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["OrderPlaced", "OrderCancelled"]);
    assert_eq!(trail["entries"][1]["payload"]["reason"], "too slow");
    assert_eq!(trail["entries"][0]["metadata"]["actor"], "customer:alice");
    assert_eq!(trail["entries"][0]["hash"].as_str().unwrap().len(), 64);
    let r = gql.query(Some(&alice), AUDIT, json!({"id": id})).await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "FORBIDDEN", "{r}");

    // Redelivery: forget the checkpoints and consume everything again in a new group: the
    // per-version idempotency leaves the read model exactly as it was.
    shutdown.cancel();
    projecting.await.unwrap().unwrap();
    let before: Vec<Value> =
        sqlx::query_scalar("SELECT to_jsonb(s) FROM order_summary s ORDER BY order_id")
            .fetch_all(&api.db.pool)
            .await
            .unwrap();
    sqlx::query("DELETE FROM projection_checkpoints")
        .execute(&api.db.pool)
        .await
        .unwrap();
    let again = Projector::order_summary(
        api.db.pool.clone(),
        &kafka.brokers,
        &topic,
        &format!("{}again.", kafka.prefix),
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let projecting = tokio::spawn(again.run(shutdown.clone()));
    shop_tests::wait_checkpointed(&api.db.pool, 3).await;
    shutdown.cancel();
    projecting.await.unwrap().unwrap();
    let after: Vec<Value> =
        sqlx::query_scalar("SELECT to_jsonb(s) FROM order_summary s ORDER BY order_id")
            .fetch_all(&api.db.pool)
            .await
            .unwrap();
    assert_eq!(before, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_mid_stream_and_restarted_ends_with_the_same_read_model() {
    let db = shop_tests::TestDb::with_pool_size(20).await;
    let mut kafka = TestKafka::new().await;
    let topic = kafka.create_topics(&["orders.events"], 3).await.remove(0);
    shop_tests::append_orders(&db.pool, 2000, 8).await;
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
        6000
    );
    let processed = || shop_tests::checkpointed(&db.pool);

    // Abort the projector task abruptly part-way (no graceful stop: offsets may be uncommitted).
    let first =
        Projector::order_summary(db.pool.clone(), &kafka.brokers, &topic, &kafka.prefix).unwrap();
    let task = tokio::spawn(first.run(CancellationToken::new()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while processed().await < 100 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "projector made no progress"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
    let _ = task.await;
    assert!(
        processed().await < 6000,
        "the kill came too late to test anything"
    );

    // A new instance in the same group finishes the job.
    let shutdown = CancellationToken::new();
    let second =
        Projector::order_summary(db.pool.clone(), &kafka.brokers, &topic, &kafka.prefix).unwrap();
    let task = tokio::spawn(second.run(shutdown.clone()));
    while processed().await < 6000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "restarted projector did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // Every order applied exactly once: final status, version 3, three timeline entries.
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT status, version, jsonb_array_length(timeline)::bigint FROM order_summary",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2000);
    assert!(
        rows.iter().all(|r| r == &("CANCELLED".to_owned(), 3, 3)),
        "{rows:?}"
    );
}

/// A projection whose next offset fell below what Kafka still holds (retention deleted
/// events it never applied) is reported by the status (and so by `shop projections status`,
/// GraphQL and the `projection_partitions_behind_retention` metric), never skipped silently.
#[tokio::test]
async fn a_checkpoint_below_kafkas_retention_is_reported() {
    use rdkafka::{
        Offset, TopicPartitionList,
        admin::{AdminClient, AdminOptions},
        client::DefaultClientContext,
    };
    use read_side::status::{Watermarks, all};

    let db = shop_tests::TestDb::new().await;
    let mut kafka = TestKafka::new().await;
    let topic = one_partition_topic_with(&mut kafka, 5).await;
    // order_summary applied the first two; sales_by_product has applied nothing yet.
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, topic, partition, next_offset)
         VALUES ('order_summary', $1, 0, 2)",
    )
    .bind(&topic)
    .execute(&db.pool)
    .await
    .unwrap();
    let watermarks = Watermarks::new(&kafka.brokers, &topic).unwrap();
    let behind = |statuses: Vec<read_side::status::ProjectionStatus>, name: &str| {
        statuses
            .into_iter()
            .find(|p| p.name == name)
            .and_then(|p| p.behind_retention)
    };
    let before = all(&db.pool, Some(&watermarks)).await.unwrap();
    assert_eq!(behind(before, "order_summary"), Some(0));

    // Retention deletes everything before offset 4.
    let admin: AdminClient<DefaultClientContext> = platform::kafka::base_config(&kafka.brokers)
        .create()
        .unwrap();
    let mut cut = TopicPartitionList::new();
    cut.add_partition_offset(&topic, 0, Offset::Offset(4))
        .unwrap();
    admin
        .delete_records(&cut, &AdminOptions::new())
        .await
        .unwrap();
    let mut after = None;
    for _ in 0..50 {
        let statuses = all(&db.pool, Some(&watermarks)).await.unwrap();
        after = behind(statuses.clone(), "order_summary");
        if after == Some(1) {
            assert_eq!(behind(statuses, "sales_by_product"), Some(1));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        after,
        Some(1),
        "the deleted offsets 2..3 were never applied"
    );
}

/// A projector that receives nothing while events wait for it (after a broker stall a
/// consumer was seen waiting for its group coordinator for ever, without an error) says it is
/// stuck, so its role restarts it; one with nothing left to apply is merely idle.
#[tokio::test]
async fn a_projector_that_receives_nothing_while_events_wait_reports_itself_stuck() {
    let db = shop_tests::TestDb::new().await;
    let mut kafka = TestKafka::new().await;
    let topic = one_partition_topic_with(&mut kafka, 3).await;
    // Never polled: it never joins its group, like a consumer that lost its coordinator.
    let projector =
        Projector::order_summary(db.pool.clone(), &kafka.brokers, &topic, &kafka.prefix).unwrap();
    let err = projector.check_not_stuck().await.unwrap_err();
    assert!(err.to_string().contains("3 event(s) wait"), "{err}");
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, topic, partition, next_offset)
         VALUES ('order_summary', $1, 0, 3)",
    )
    .bind(&topic)
    .execute(&db.pool)
    .await
    .unwrap();
    projector.check_not_stuck().await.unwrap();
}

/// A one-partition orders topic holding `n` messages (`m0`, `m1`, ...) at offsets 0..n.
async fn one_partition_topic_with(kafka: &mut TestKafka, n: usize) -> String {
    let topic = kafka.create_topics(&["orders.events"], 1).await.remove(0);
    let producer = platform::kafka::producer(&kafka.brokers).unwrap();
    for i in 0..n {
        let payload = format!("m{i}");
        let record = rdkafka::producer::FutureRecord::to(&topic)
            .key("k")
            .payload(&payload)
            .partition(0);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
    topic
}

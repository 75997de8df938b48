//! User activity and live analytics on the real services: `POST /activity` produces to the
//! `user-activity` topic only what is valid and acknowledged, and the analytics group counts
//! activity and order events once each, the same again after a rebuild by replay.

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rdkafka::producer::FutureRecord;
use serde_json::{Value, json};
use shop_tests::{ReadStack, checkout_body, read_topic};

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// POSTs an activity batch, with a token or anonymously.
async fn send(stack: &ReadStack, token: Option<&str>, body: &Value) -> (u16, Value) {
    let mut rb = stack
        .api
        .http
        .post(format!("{}/activity", stack.api.base))
        .header("Content-Type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_batches_reach_the_topic_whole_and_acknowledged_or_not_at_all() {
    let stack = ReadStack::with_analytics().await;
    let (brokers, topic) = (stack.kafka.brokers.clone(), stack.activity_topic());
    let at = now();
    let anonymous = json!({"session_id": "sess-anon-0001", "events": [
        {"type": "page_view", "occurred_at": at, "properties": {"path": "/"}},
        {"type": "product_view", "occurred_at": at, "product_sku": "SKU-1"},
        {"type": "search", "occurred_at": at, "properties": {"query": "socks"}},
    ]});
    let (status, answer) = send(&stack, None, &anonymous).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 3);
    let alice = stack.api.customer("alice");
    let signed_in = json!({"session_id": "sess-alice-001", "events": [
        {"type": "add_to_cart", "occurred_at": at, "product_sku": "SKU-2", "event_id": uuid::Uuid::new_v4()},
    ]});
    let (status, first) = send(&stack, Some(&alice), &signed_in).await;
    assert_eq!(status, 202, "{first}");
    // Resent (a lost answer): the same event ids, so the analytics count it once.
    let (_, again) = send(&stack, Some(&alice), &signed_in).await;
    assert_eq!(first["event_ids"], again["event_ids"]);

    // One bad event refuses the whole batch, every problem named by index.
    let bad = json!({"session_id": "sess-anon-0001", "events": [
        {"type": "page_view", "occurred_at": at},
        {"type": "teleport", "occurred_at": at},
        {"type": "product_view", "occurred_at": at, "product_sku": "NO-SUCH-SKU"},
        {"type": "page_view", "occurred_at": "2999-01-01T00:00:00Z"},
        {"type": "add_to_cart", "occurred_at": at},
        {"type": "page_view", "occurred_at": "yesterday"},
    ]});
    let (status, problem) = send(&stack, None, &bad).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["type"], "/problems/invalid-activity");
    let mut indexes: Vec<u64> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    indexes.dedup();
    assert_eq!(indexes, [1, 4, 5], "schema problems first: {problem}");
    let bad_values = json!({"session_id": "sess-anon-0001", "events": [
        {"type": "page_view", "occurred_at": at},
        {"type": "product_view", "occurred_at": at, "product_sku": "NO-SUCH-SKU"},
        {"type": "page_view", "occurred_at": "2999-01-01T00:00:00Z"},
    ]});
    let (status, problem) = send(&stack, None, &bad_values).await;
    assert_eq!(status, 422, "{problem}");
    let indexes: Vec<u64> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [1, 2], "{problem}");

    // Hostile or wrong callers and bodies.
    let too_many: Vec<Value> = (0..101)
        .map(|_| json!({"type": "page_view", "occurred_at": at}))
        .collect();
    let (status, _) = send(
        &stack,
        None,
        &json!({"session_id": "sess-anon-0001", "events": too_many}),
    )
    .await;
    assert_eq!(status, 422);
    let (status, _) = send(&stack, None, &json!({"events": []})).await;
    assert_eq!(status, 422);
    let (status, _) = send(&stack, Some("not-a-token"), &anonymous).await;
    assert_eq!(status, 401);
    let (status, _) = send(&stack, Some(&stack.api.operator()), &anonymous).await;
    assert_eq!(status, 403);
    let r = stack
        .api
        .http
        .post(format!("{}/activity", stack.api.base))
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // On the topic: the 3 + 1 + 1 accepted events and nothing of the refused batches.
    let messages = read_topic(&brokers, &topic, 6, Duration::from_secs(30)).await;
    assert_eq!(messages.len(), 5, "{messages:?}");
    for (key, m) in &messages {
        match m["user_id"].as_str() {
            Some(u) => assert_eq!((key.as_str(), u), ("user:alice", "alice")),
            None => assert_eq!(key, "session:sess-anon-0001"),
        }
        // A customer's address is sealed with her key; a visitor's keeps only its network.
        match m["user_id"].as_str() {
            Some(_) => assert!(m["client_ip"]["sealed"]["ciphertext"].is_string(), "{m}"),
            None => assert_eq!(m["client_ip"], json!({"clear": "127.0.0.0/24"})),
        }
        assert!(m["received_at"].is_string());
    }
    stack.stop().await;
}

/// Waits (at most 60 s) until the analytics group has counted everything in its topics.
async fn wait_counted(stack: &ReadStack) {
    let w = read_side::status::Watermarks::new(&stack.kafka.brokers, &stack.topic).unwrap();
    let both = [w.sibling(read_side::analytics::ACTIVITY_TOPIC), w];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let lag = read_side::analytics::lag(&stack.api.db.pool, &both)
            .await
            .unwrap();
        if lag == Some(0) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "analytics stuck, lag {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const PRODUCTS: &str =
    "{ productAnalytics { sku views addToCarts removeFromCarts orders units conversionRate } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_count_each_event_once_and_a_replay_from_offset_zero_gives_the_same_rows() {
    let stack = ReadStack::with_analytics().await;
    let ops = stack.api.operator();
    let at = now();
    for (session, token) in [
        ("sess-one-0001", None),
        ("sess-two-0001", Some(stack.api.customer("bob"))),
    ] {
        let batch = json!({"session_id": session, "events": [
            {"type": "product_view", "occurred_at": at, "product_sku": "SKU-1"},
            {"type": "product_view", "occurred_at": now(), "product_sku": "SKU-1", "properties": {"n": 2}},
            {"type": "add_to_cart", "occurred_at": at, "product_sku": "SKU-1"},
            {"type": "remove_from_cart", "occurred_at": at, "product_sku": "SKU-2"},
            {"type": "checkout_started", "occurred_at": at},
        ]});
        let (status, answer) = send(&stack, token.as_deref(), &batch).await;
        assert_eq!(status, 202, "{answer}");
    }
    // Two orders of SKU-1 x2 and SKU-2 x1 (the relay publishes them to the order topic).
    let alice = stack.api.customer("alice");
    for key in ["o1", "o2"] {
        let r = stack
            .api
            .post("/orders", &alice, key, &checkout_body())
            .await;
        assert_eq!(r.status(), 202);
    }
    // A message published twice (as the relay may after a crash) counts once.
    let copies = read_topic(
        &stack.kafka.brokers,
        &stack.activity_topic(),
        10,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(copies.len(), 10);
    let producer = platform::kafka::producer(&stack.kafka.brokers).unwrap();
    let (key, dup) = &copies[0];
    producer
        .send(
            FutureRecord::to(&stack.activity_topic())
                .key(key)
                .payload(&dup.to_string()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    stack.wait_caught_up().await;
    wait_counted(&stack).await;

    let products = stack.gql.query(Some(&ops), PRODUCTS, json!({})).await;
    assert_eq!(
        products["data"]["productAnalytics"],
        json!([
            {"sku": "SKU-1", "views": 4, "addToCarts": 2, "removeFromCarts": 0, "orders": 2, "units": 4, "conversionRate": 0.5},
            {"sku": "SKU-2", "views": 0, "addToCarts": 0, "removeFromCarts": 2, "orders": 2, "units": 2, "conversionRate": null},
        ]),
        "{products}"
    );
    let live = stack
        .gql
        .query(Some(&ops), "{ liveAnalytics { activeUsers activeSessions } activityWindows { productViews addToCarts checkoutsStarted ordersPlaced } }", json!({}))
        .await;
    assert_eq!(
        live["data"]["liveAnalytics"],
        json!({"activeUsers": 1, "activeSessions": 2}),
        "{live}"
    );
    let windows = live["data"]["activityWindows"].as_array().unwrap();
    let total = |f: &str| windows.iter().map(|w| w[f].as_i64().unwrap()).sum::<i64>();
    assert_eq!(
        (
            total("productViews"),
            total("addToCarts"),
            total("checkoutsStarted"),
            total("ordersPlaced")
        ),
        (4, 2, 2, 2),
        "{live}"
    );
    // Customers may not read analytics.
    let refused = stack.gql.query(Some(&alice), PRODUCTS, json!({})).await;
    assert_eq!(
        refused["errors"][0]["extensions"]["code"], "FORBIDDEN",
        "{refused}"
    );

    // Rebuild: reset, then the group replays both topics from offset 0: the same rows.
    let before = read_side::analytics::repo::snapshot(&stack.api.db.pool)
        .await
        .unwrap();
    let rebuilt = stack
        .gql
        .query(
            Some(&ops),
            "mutation { rebuildProjection(name: \"analytics\") { name version } }",
            json!({}),
        )
        .await;
    assert_eq!(
        rebuilt["data"]["rebuildProjection"]["version"], 2,
        "{rebuilt}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    wait_counted(&stack).await;
    let after = read_side::analytics::repo::snapshot(&stack.api.db.pool)
        .await
        .unwrap();
    assert!(!before.is_empty());
    assert_eq!(before, after);
    let status = stack
        .gql
        .query(
            Some(&ops),
            "{ projections { name version lag } }",
            json!({}),
        )
        .await;
    let analytics = status["data"]["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "analytics")
        .cloned();
    assert_eq!(
        analytics,
        Some(json!({"name": "analytics", "version": 2, "lag": 0})),
        "{status}"
    );
    stack.stop().await;
}

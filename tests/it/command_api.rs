//! The command API over HTTP against a real PostgreSQL: happy path, every validation and
//! auth case, idempotency, concurrency.

use std::collections::HashSet;

use platform::auth::Role;
use serde_json::{Value, json};
use shop_tests::{TestApi, checkout_body};
use uuid::Uuid;

fn key() -> String {
    Uuid::new_v4().to_string()
}

async fn json_of(r: reqwest::Response) -> (u16, Value, reqwest::header::HeaderMap) {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, body, headers)
}

async fn place(api: &TestApi, token: &str) -> Uuid {
    let (status, body, _) =
        json_of(api.post("/orders", token, &key(), &checkout_body()).await).await;
    assert_eq!(status, 202, "{body}");
    body["order_id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn checkout_appends_the_event_and_its_outbox_message_with_full_metadata() {
    let api = TestApi::new().await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = api
        .http
        .post(format!("{}/orders", api.base))
        .bearer_auth(api.customer("cust-1"))
        .header("Idempotency-Key", "k-1")
        .header("traceparent", tp)
        .json(&checkout_body())
        .send()
        .await
        .unwrap();
    let (status, body, headers) = json_of(r).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "PENDING");
    assert_eq!(body["version"], 1);
    let id = body["order_id"].as_str().unwrap();
    assert_eq!(Uuid::parse_str(id).unwrap().get_version_num(), 7);
    assert_eq!(headers["location"], format!("/orders/{id}").as_str());

    let (event_type, payload, metadata, event_id): (String, Value, Value, Uuid) = sqlx::query_as(
        "SELECT event_type, payload, metadata, event_id FROM events WHERE stream_id = $1::uuid AND stream_version = 1",
    )
    .bind(id)
    .fetch_one(&api.db.pool)
    .await
    .unwrap();
    assert_eq!(event_type, "OrderPlaced");
    assert_eq!(payload["total_minor"], 2 * 1250 + 499);
    assert_eq!(payload["customer_id"], "cust-1");
    assert_eq!(metadata["actor"], "customer:cust-1");
    assert_eq!(metadata["traceparent"], tp);
    assert_eq!(metadata["command_id"], "k-1");
    assert_eq!(metadata["correlation_id"], id);
    // Personal data is sealed and the payment token is held apart (migration 0014).
    let text = payload.to_string();
    assert!(
        !text.contains("Ada Lovelace") && !text.contains("Main St") && !text.contains("tok_visa"),
        "{text}"
    );
    let held: Value =
        sqlx::query_scalar("SELECT sealed_token FROM payment_tokens WHERE payment_ref = $1")
            .bind(Uuid::parse_str(payload["payment"]["ref"].as_str().unwrap()).unwrap())
            .fetch_one(&api.db.pool)
            .await
            .unwrap();
    // The held token is sealed with the customer's key too; it opens for its order only.
    assert!(!held.to_string().contains("tok_visa"), "{held}");
    let sealed: domain::personal::Sealed = serde_json::from_value(held).unwrap();
    let order = domain::values::OrderId(Uuid::parse_str(id).unwrap());
    let mut conn = api.db.pool.acquire().await.unwrap();
    let token: Option<String> = shop_tests::test_vault()
        .open(
            &mut conn,
            &domain::personal::payment_token_context(order),
            &sealed,
        )
        .await
        .unwrap();
    assert_eq!(token.as_deref(), Some("tok_visa"));

    let (message_id, target, routing_key, headers, envelope): (
        Uuid,
        String,
        String,
        Value,
        Vec<u8>,
    ) = sqlx::query_as("SELECT message_id, target, routing_key, headers, payload FROM outbox")
        .fetch_one(&api.db.pool)
        .await
        .unwrap();
    assert_eq!(
        (message_id, target.as_str(), routing_key.as_str()),
        (event_id, "orders.events", id)
    );
    assert_eq!(headers["event_type"], "OrderPlaced");
    assert_eq!(headers["schema_version"], "3");
    assert_eq!(headers["traceparent"], tp);
    let envelope: Value = serde_json::from_slice(&envelope).unwrap();
    let schema: Value =
        serde_json::from_str(include_str!("../../schemas/envelope.v1.json")).unwrap();
    let errors: Vec<String> = jsonschema::validator_for(&schema)
        .unwrap()
        .iter_errors(&envelope)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(envelope["payload"], payload);
}

#[tokio::test]
async fn bad_input_gets_a_precise_problem_and_writes_nothing() {
    let api = TestApi::new().await;
    let token = api.customer("cust-1");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut b = checkout_body();
        f(&mut b);
        b
    };
    let cases: Vec<(&str, Value, u16, &str, Option<&str>)> = vec![
        (
            "unknown field",
            with(&|b| b["coupon"] = json!("X")),
            422,
            "validation-error",
            None,
        ),
        (
            "wrong type",
            with(&|b| b["items"][0]["quantity"] = json!("two")),
            422,
            "validation-error",
            None,
        ),
        (
            "missing field",
            with(&|b| {
                b.as_object_mut().unwrap().remove("payment_token");
            }),
            422,
            "validation-error",
            None,
        ),
        (
            "quantity 0",
            with(&|b| b["items"][1]["quantity"] = json!(0)),
            422,
            "validation-error",
            Some("items[1].quantity"),
        ),
        (
            "quantity 1001",
            with(&|b| b["items"][0]["quantity"] = json!(1001)),
            422,
            "validation-error",
            Some("items[0].quantity"),
        ),
        (
            "a price from the client",
            with(&|b| b["items"][0]["unit_price_minor"] = json!(0)),
            422,
            "validation-error",
            None,
        ),
        (
            "a product not for sale",
            with(&|b| b["items"][0]["sku"] = json!("SKU-404")),
            422,
            "validation-error",
            Some("items[0].sku"),
        ),
        (
            "a currency the catalog does not price in",
            with(&|b| b["currency"] = json!("USD")),
            422,
            "validation-error",
            Some("currency"),
        ),
        (
            "bad sku",
            with(&|b| b["items"][0]["sku"] = json!("a b")),
            422,
            "validation-error",
            Some("items[0].sku"),
        ),
        (
            "bad currency",
            with(&|b| b["currency"] = json!("EURO")),
            422,
            "validation-error",
            Some("currency"),
        ),
        (
            "bad country",
            with(&|b| b["shipping_address"]["country"] = json!("Germany")),
            422,
            "validation-error",
            Some("shipping_address.country"),
        ),
        (
            "empty name",
            with(&|b| b["shipping_address"]["name"] = json!("  ")),
            422,
            "validation-error",
            Some("shipping_address.name"),
        ),
        (
            "no items",
            with(&|b| b["items"] = json!([])),
            422,
            "command-rejected",
            None,
        ),
        (
            "101 lines",
            with(&|b| {
                b["items"] = json!(
                    (0..101)
                        .map(|i| json!({"sku": format!("S{i}"), "quantity": 1}))
                        .collect::<Vec<_>>()
                )
            }),
            422,
            "command-rejected",
            None,
        ),
        (
            "duplicate sku",
            with(&|b| b["items"][1]["sku"] = json!("SKU-1")),
            422,
            "command-rejected",
            None,
        ),
        (
            "a price of i64::MAX from the client",
            with(&|b| b["items"][0]["unit_price_minor"] = json!(i64::MAX)),
            422,
            "validation-error",
            None,
        ),
        (
            "not an object",
            json!([1, 2]),
            422,
            "validation-error",
            None,
        ),
        (
            "customer for another",
            with(&|b| b["customer_id"] = json!("cust-2")),
            403,
            "forbidden",
            None,
        ),
    ];
    for (name, body, status, kind, field) in cases {
        let r = api.post("/orders", &token, &key(), &body).await;
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{name}"
        );
        let (got, problem, _) = json_of(r).await;
        assert_eq!(got, status, "{name}: {problem}");
        assert_eq!(
            problem["type"],
            format!("/problems/{kind}"),
            "{name}: {problem}"
        );
        assert_eq!(problem["status"], status, "{name}");
        assert!(!problem["detail"].as_str().unwrap().is_empty(), "{name}");
        if let Some(f) = field {
            assert_eq!(problem["field"], f, "{name}: {problem}");
        }
    }

    // Transport-level problems.
    let raw = |body: &'static str, ct: Option<&'static str>, idem: bool| {
        let mut rb = api
            .http
            .post(format!("{}/orders", api.base))
            .bearer_auth(&token)
            .body(body);
        if let Some(ct) = ct {
            rb = rb.header("Content-Type", ct);
        }
        if idem {
            rb = rb.header("Idempotency-Key", key());
        }
        rb.send()
    };
    let (s, p, _) = json_of(
        raw("{\"currency\": ", Some("application/json"), true)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, p["type"].as_str()),
        (400, Some("/problems/malformed-request")),
        "{p}"
    );
    let (s, p, _) = json_of(raw("{}", None, true).await.unwrap()).await;
    assert_eq!(
        (s, p["type"].as_str()),
        (415, Some("/problems/unsupported-media-type"))
    );
    let (s, p, _) = json_of(
        api.http
            .post(format!("{}/orders", api.base))
            .bearer_auth(&token)
            .json(&checkout_body())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, p["type"].as_str()),
        (400, Some("/problems/missing-idempotency-key"))
    );
    let big = json!({"currency": "EUR", "padding": "x".repeat(100_000)});
    let (s, p, _) = json_of(api.post("/orders", &token, &key(), &big).await).await;
    assert_eq!(
        (s, p["type"].as_str()),
        (413, Some("/problems/payload-too-large")),
        "{p}"
    );
    let (s, p, _) = json_of(
        api.post(
            "/orders/not-a-uuid/cancel",
            &token,
            &key(),
            &json!({"reason": "x"}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (s, p["type"].as_str()),
        (400, Some("/problems/malformed-request"))
    );
    let (s, _, _) = json_of(api.post("/orders/x/y/z", &token, &key(), &json!({})).await).await;
    assert_eq!(s, 404);

    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&api.db.pool)
        .await
        .unwrap();
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&api.db.pool)
        .await
        .unwrap();
    assert_eq!((events, outbox), (0, 0));
}

#[tokio::test]
async fn authentication_and_authorization() {
    let api = TestApi::new().await;
    let body = checkout_body();
    // Missing, malformed, wrongly signed and expired tokens: 401.
    let r = api
        .http
        .post(format!("{}/orders", api.base))
        .header("Idempotency-Key", key())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    // Signed with the right kid but another secret.
    let forger = platform::auth::AuthConfig::with_keys("test-1=some-other-secret-0123456789-xyz");
    let forged = platform::auth::Authenticator::from_config(&forger, false)
        .unwrap()
        .issue("cust-1", Role::Customer, std::time::Duration::from_secs(60))
        .unwrap();
    for token in ["garbage", forged.as_str()] {
        let (s, p, _) = json_of(api.post("/orders", token, &key(), &body).await).await;
        assert_eq!(
            (s, p["type"].as_str()),
            (401, Some("/problems/unauthorized")),
            "{token}"
        );
    }

    // A customer cannot see or touch another customer's order: 404, not 403.
    let order = place(&api, &api.customer("alice")).await;
    let (s, p, _) = json_of(
        api.post(
            &format!("/orders/{order}/cancel"),
            &api.customer("mallory"),
            &key(),
            &json!({"reason": "mine now"}),
        )
        .await,
    )
    .await;
    assert_eq!((s, p["type"].as_str()), (404, Some("/problems/not-found")));
    // Nor can they use operator routes: 403.
    let r = api
        .http
        .get(format!("{}/admin/orders/{order}/audit", api.base))
        .bearer_auth(api.customer("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Operators can.
    let r = api
        .http
        .get(format!("{}/admin/orders/{order}/audit", api.base))
        .bearer_auth(api.operator())
        .send()
        .await
        .unwrap();
    let (s, audit, _) = json_of(r).await;
    assert_eq!(
        (s, &audit["verified"], &audit["events"]),
        (200, &json!(true), &json!(1))
    );
    // An operator must name the customer, and may cancel any order.
    let (s, p, _) = json_of(api.post("/orders", &api.operator(), &key(), &body).await).await;
    assert_eq!((s, p["field"].as_str()), (422, Some("customer_id")));
    let mut for_bob = body.clone();
    for_bob["customer_id"] = json!("bob");
    let (s, placed, _) =
        json_of(api.post("/orders", &api.operator(), &key(), &for_bob).await).await;
    assert_eq!(s, 202);
    let (_, actor): (Value, String) =
        sqlx::query_as("SELECT payload, metadata->>'actor' FROM events WHERE stream_id = $1::uuid")
            .bind(placed["order_id"].as_str().unwrap())
            .fetch_one(&api.db.pool)
            .await
            .unwrap();
    assert_eq!(actor, "operator:ops");
    let (s, _, _) = json_of(
        api.post(
            &format!("/orders/{order}/cancel"),
            &api.operator(),
            &key(),
            &json!({"reason": "fraud"}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 202);
}

#[tokio::test]
async fn idempotent_replay_returns_the_first_response_even_after_a_restart() {
    let api = TestApi::new().await;
    let token = api.customer("cust-1");
    let first = json_of(
        api.post("/orders", &token, "same-key", &checkout_body())
            .await,
    )
    .await;
    assert_eq!(first.0, 202);
    // Whitespace and key order do not make a different request.
    let reordered: Value = serde_json::from_str(&checkout_body().to_string()).unwrap();
    let again = json_of(api.post("/orders", &token, "same-key", &reordered).await).await;
    assert_eq!((again.0, &again.1), (first.0, &first.1));
    assert_eq!(again.2["location"], first.2["location"]);
    // Same key, different body: 422.
    let mut other = checkout_body();
    other["items"][0]["quantity"] = json!(3);
    let (s, p, _) = json_of(api.post("/orders", &token, "same-key", &other).await).await;
    assert_eq!(
        (s, p["type"].as_str()),
        (422, Some("/problems/idempotency-key-reused"))
    );
    // The key belongs to the caller: another customer's identical key is a new request.
    let (s, b, _) = json_of(
        api.post(
            "/orders",
            &api.customer("cust-2"),
            "same-key",
            &checkout_body(),
        )
        .await,
    )
    .await;
    assert_eq!(s, 202);
    assert_ne!(b["order_id"], first.1["order_id"]);

    // A new API process over the same database answers the same.
    let TestApi { db, .. } = api;
    let restarted = TestApi::with_db(db).await;
    let after = json_of(
        restarted
            .post("/orders", &token, "same-key", &checkout_body())
            .await,
    )
    .await;
    assert_eq!((after.0, &after.1), (first.0, &first.1));
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM streams")
        .fetch_one(&restarted.db.pool)
        .await
        .unwrap();
    assert_eq!(orders, 2);
}

#[tokio::test]
async fn concurrent_requests_with_one_idempotency_key_create_one_order() {
    let api = TestApi::new().await;
    let token = api.customer("cust-1");
    let responses = futures::future::join_all(
        (0..10).map(|_| api.post("/orders", &token, "race", &checkout_body())),
    )
    .await;
    let mut bodies = HashSet::new();
    for r in responses {
        let (s, b, _) = json_of(r).await;
        assert_eq!(s, 202, "{b}");
        bodies.insert(b.to_string());
    }
    assert_eq!(bodies.len(), 1);
    // One order, and nothing of the losers: no event, no held payment token, one record.
    let (events, tokens, keys): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM payment_tokens),
                (SELECT count(*) FROM idempotency_keys)",
    )
    .fetch_one(&api.db.pool)
    .await
    .unwrap();
    assert_eq!((events, tokens, keys), (1, 1, 1));
}

/// A client that times out and sends its cancel again while the first is still running:
/// every copy gets the first one's answer, and the order is cancelled once.
#[tokio::test]
async fn concurrent_identical_cancels_all_get_the_same_answer() {
    let api = TestApi::new().await;
    let token = api.customer("cust-1");
    let mut orders = Vec::new();
    for _ in 0..5 {
        orders.push(place(&api, &token).await);
    }
    for order in orders {
        let path = format!("/orders/{order}/cancel");
        let reason = json!({"reason": "changed my mind"});
        let race = format!("cancel-race-{order}");
        let responses =
            futures::future::join_all((0..8).map(|_| api.post(&path, &token, &race, &reason)))
                .await;
        let mut answers = HashSet::new();
        for r in responses {
            let (s, b, _) = json_of(r).await;
            answers.insert((s, b.to_string()));
        }
        assert_eq!(answers.len(), 1, "{answers:?}");
        let (status, _) = answers.into_iter().next().unwrap();
        assert!((200..300).contains(&status), "{status}");
        let cancelled: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE stream_id = $1 AND event_type = 'OrderCancelled'",
        )
        .bind(order)
        .fetch_one(&api.db.pool)
        .await
        .unwrap();
        assert_eq!(cancelled, 1);
    }
}

#[tokio::test]
async fn cancel_rules_and_optimistic_concurrency() {
    let api = TestApi::new().await;
    let token = api.customer("cust-1");
    let order = place(&api, &token).await;
    let path = format!("/orders/{order}/cancel");
    let reason = json!({"reason": "changed my mind"});
    let cancel_if = |version: &'static str, k: String| {
        api.http
            .post(format!("{}{path}", api.base))
            .bearer_auth(&token)
            .header("Idempotency-Key", k)
            .header("If-Match", version)
            .json(&reason)
            .send()
    };
    // A stale If-Match: 409.
    let (s, p, _) = json_of(cancel_if("\"7\"", key()).await.unwrap()).await;
    assert_eq!(
        (s, p["type"].as_str()),
        (409, Some("/problems/version-conflict"))
    );
    let (s, p, _) = json_of(cancel_if("seven", key()).await.unwrap()).await;
    assert_eq!(s, 400, "{p}");

    // Concurrent cancels at version 1: exactly one wins, every other one gets 409.
    let results = futures::future::join_all((0..8).map(|_| cancel_if("\"1\"", key()))).await;
    let mut statuses: Vec<u16> = results
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    statuses.sort();
    assert_eq!(statuses, [202, 409, 409, 409, 409, 409, 409, 409]);

    // Cancelling a cancelled order is a rejection, not a conflict.
    let (s, p, _) = json_of(api.post(&path, &token, &key(), &reason).await).await;
    assert_eq!(
        (s, p["type"].as_str()),
        (422, Some("/problems/command-rejected")),
        "{p}"
    );
    let (s, p, _) = json_of(
        api.post(&path, &token, &key(), &json!({"reason": ""}))
            .await,
    )
    .await;
    assert_eq!((s, p["field"].as_str()), (422, Some("reason")));
    // A NUL byte (which PostgreSQL cannot store in text) or another control character is
    // refused up front as a bad field, not a 500.
    let (s, p, _) = json_of(
        api.post(&path, &token, &key(), &json!({"reason": "a\u{0}b"}))
            .await,
    )
    .await;
    assert_eq!((s, p["field"].as_str()), (422, Some("reason")), "{p}");
    let (s, _, _) = json_of(
        api.post(
            &format!("/orders/{}/cancel", Uuid::now_v7()),
            &token,
            &key(),
            &reason,
        )
        .await,
    )
    .await;
    assert_eq!(s, 404);

    let versions: Vec<(i64, String)> = sqlx::query_as(
        "SELECT stream_version, event_type FROM events WHERE stream_id = $1 ORDER BY 1",
    )
    .bind(order)
    .fetch_all(&api.db.pool)
    .await
    .unwrap();
    assert_eq!(
        versions,
        vec![(1, "OrderPlaced".into()), (2, "OrderCancelled".into())]
    );
}

#[tokio::test]
async fn two_hundred_concurrent_checkouts_lose_and_duplicate_nothing() {
    let api = TestApi::new().await;
    let tokens: Vec<String> = (0..20).map(|i| api.customer(&format!("c{i}"))).collect();
    let responses = futures::future::join_all((0..200).map(|i| {
        api.post(
            "/orders",
            &tokens[i % 20],
            &format!("k{i}"),
            &checkout_body(),
        )
    }))
    .await;
    let mut ids = HashSet::new();
    for r in responses {
        let (s, b, _) = json_of(r).await;
        assert_eq!(s, 202, "{b}");
        ids.insert(b["order_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 200);
    let (events, distinct_streams, distinct_ids): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT stream_id), count(DISTINCT event_id) FROM events",
    )
    .fetch_one(&api.db.pool)
    .await
    .unwrap();
    assert_eq!((events, distinct_streams, distinct_ids), (200, 200, 200));
    // One outbox row per event, carrying its event id.
    let unmatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events e FULL JOIN outbox o ON o.message_id = e.event_id WHERE o.id IS NULL OR e.position IS NULL",
    )
    .fetch_one(&api.db.pool)
    .await
    .unwrap();
    assert_eq!(unmatched, 0);
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&api.db.pool)
        .await
        .unwrap();
    assert_eq!(outbox, 200);
    // Every order's payment token and idempotency record, each its own.
    let (tokens, token_orders, keys): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM payment_tokens),
                (SELECT count(DISTINCT t.order_id) FROM payment_tokens t JOIN streams s ON s.stream_id = t.order_id),
                (SELECT count(*) FROM idempotency_keys)",
    )
    .fetch_one(&api.db.pool)
    .await
    .unwrap();
    assert_eq!((tokens, token_orders, keys), (200, 200, 200));
}

#[tokio::test]
async fn ops_endpoints_and_openapi() {
    // The recorder `shop` installs at start (platform::telemetry::init).
    let handle = platform::ops::metrics_handle();
    let api = TestApi::new().await;
    place(&api, &api.customer("c")).await;
    let get = |p: &str| api.http.get(format!("{}{p}", api.base)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    // Readiness and metrics are on the ops listener, not on the public port.
    assert_eq!(get("/readyz").await.unwrap().status(), 404);
    assert_eq!(get("/metrics").await.unwrap().status(), 404);
    let metrics = handle.render();
    assert!(
        metrics.contains("commands_total{command=\"checkout\",outcome=\"accepted\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("command_duration_seconds"), "{metrics}");
    let served: Value = get("/openapi.json").await.unwrap().json().await.unwrap();
    let committed: Value =
        serde_json::from_str(include_str!("../../schemas/openapi.json")).unwrap();
    assert_eq!(served, committed);
    for path in ["/orders", "/orders/{id}/cancel", "/admin/orders/{id}/audit"] {
        assert!(
            served["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    // With the database gone, readiness says so.
    let readiness = platform::ops::Readiness::new().postgres(api.db.pool.clone());
    assert!(readiness.report().await.0);
    api.db.pool.close().await;
    let (ready, body) = readiness.report().await;
    assert!(!ready);
    assert_eq!(body["checks"]["postgres"]["status"], "down");
}

/// Prices belong to the shop: the order is placed at the catalog's prices, recorded in the
/// event, and a later price change (or a product taken off sale) changes no placed order.
#[tokio::test]
async fn checkouts_are_priced_from_the_catalog_and_keep_their_prices() {
    let api = TestApi::new().await;
    let token = api.customer("cust-1");
    let r = api
        .post("/orders", &token, "priced", &checkout_body())
        .await;
    let (status, body, _) = json_of(r).await;
    assert_eq!(status, 202, "{body}");
    let order = body["order_id"].as_str().unwrap().to_owned();
    let placed: Value = sqlx::query_scalar(
        "SELECT payload FROM events WHERE stream_id = $1::uuid AND event_type = 'OrderPlaced'",
    )
    .bind(&order)
    .fetch_one(&api.db.pool)
    .await
    .unwrap();
    // checkout_body: SKU-1 x2 and SKU-2 x1; the development catalog: 1250 and 499 EUR.
    let prices: Vec<i64> = placed["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["unit_price_minor"].as_i64().unwrap())
        .collect();
    assert_eq!(prices, [1250, 499]);
    assert_eq!(placed["total_minor"], 2999);

    // A new price applies to new orders only; a product off sale cannot be bought.
    let dearer =
        write_side::catalog::Product::parse("SKU-1", "Espresso cup", 1500, "EUR", true).unwrap();
    write_side::catalog::set(&api.db.pool, &dearer)
        .await
        .unwrap();
    let r = api
        .post("/orders", &token, "dearer", &checkout_body())
        .await;
    let (status, body, _) = json_of(r).await;
    assert_eq!(status, 202, "{body}");
    let totals: Vec<i64> = sqlx::query_scalar(
        "SELECT (payload->>'total_minor')::bigint FROM events WHERE event_type = 'OrderPlaced' ORDER BY position",
    )
    .fetch_all(&api.db.pool)
    .await
    .unwrap();
    assert_eq!(totals, [2999, 3499]);
    let off = write_side::catalog::Product::parse("SKU-2", "Saucer", 499, "EUR", false).unwrap();
    write_side::catalog::set(&api.db.pool, &off).await.unwrap();
    let r = api
        .post("/orders", &token, "off-sale", &checkout_body())
        .await;
    let (status, problem, _) = json_of(r).await;
    assert_eq!(
        (status, &problem["field"]),
        (422, &json!("items[1].sku")),
        "{problem}"
    );
}

/// The command API keeps customers' data keys in memory; a key deleted meanwhile by another
/// process (the customer forgotten) is never used again: the checkout is sealed afresh with
/// her new key, so her new order stays readable.
#[tokio::test]
async fn a_checkout_after_the_customer_was_forgotten_elsewhere_seals_with_a_live_key() {
    let api = TestApi::new().await;
    let token = api.customer("cust-1");
    let key_of = |order: String| {
        let pool = api.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT payload #>> '{shipping_address,sealed,key_id}' FROM events
                 WHERE stream_id = $1::uuid AND event_type = 'OrderPlaced'",
            )
            .bind(order)
            .fetch_one(&pool)
            .await
            .unwrap()
            .parse::<Uuid>()
            .unwrap()
        }
    };
    let r = api
        .post("/orders", &token, "before", &checkout_body())
        .await;
    let (status, body, _) = json_of(r).await;
    assert_eq!(status, 202, "{body}");
    let first = key_of(body["order_id"].as_str().unwrap().to_owned()).await;

    let mut conn = api.db.pool.acquire().await.unwrap();
    assert_eq!(
        platform::vault::forget(&mut conn, "cust-1").await.unwrap(),
        1
    );

    let r = api.post("/orders", &token, "after", &checkout_body()).await;
    let (status, body, _) = json_of(r).await;
    assert_eq!(status, 202, "{body}");
    let second = key_of(body["order_id"].as_str().unwrap().to_owned()).await;
    assert_ne!(first, second);
    let live = platform::vault::live_keys(&mut conn, &[first, second])
        .await
        .unwrap();
    assert!(live.contains(&second) && !live.contains(&first), "{live:?}");
}

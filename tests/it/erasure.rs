//! Erasure by crypto-shredding, through the real `shop` binary: a checkout's personal data is
//! sealed everywhere it is stored or published, forgetting the customer makes it unreadable
//! everywhere at once, and history still verifies, replays and answers queries.

use std::time::Duration;

use serde_json::{Value, json};
use shop_tests::process::ShopProcess;
use uuid::Uuid;

use crate::product::bin;

const STREET: &str = "7 Erasure Lane";
const NAME: &str = "Alice Liddell";
const CARD: &str = "tok_erasure_4242";

/// Counts, across every table of the test database, the rows whose text (bytea columns in
/// hex) contains `needle`; returns the tables that hold it.
async fn tables_holding(pool: &sqlx::PgPool, needle: &str) -> Vec<String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let hex = hex::encode(needle);
    let mut holding = Vec::new();
    for t in tables {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{t}\" AS r WHERE r::text LIKE $1 OR r::text LIKE $2"
        ))
        .bind(format!("%{needle}%"))
        .bind(format!("%{hex}%"))
        .fetch_one(pool)
        .await
        .unwrap();
        if n > 0 {
            holding.push(t);
        }
    }
    holding
}

async fn audit_trail(shop: &ShopProcess, operator: &str, order: Uuid) -> Value {
    let q = json!({"query": format!(
        "{{ auditTrail(orderId: \"{order}\") {{ verified entries {{ eventType payload }} }} }}"
    )});
    let r = shop.graphql(operator, &q).await;
    assert!(r["errors"].is_null(), "{r}");
    r["data"]["auditTrail"].clone()
}

#[tokio::test]
async fn a_forgotten_customer_is_unreadable_everywhere_while_history_verifies_and_replays() {
    let shop = ShopProcess::start(bin()).await;
    let alice = shop.token("customer", "alice");
    let operator = shop.token("operator", "ops");
    let r = shop
        .http
        .put(format!("{}/customers/alice", shop.api))
        .bearer_auth(&alice)
        .json(&json!({"name": NAME, "email": "alice@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A checkout with a street, a name and a card token that appear nowhere else.
    let r = shop
        .http
        .post(format!("{}/orders", shop.api))
        .bearer_auth(&alice)
        .header("Idempotency-Key", "erasure-1")
        .json(&json!({
            "currency": "EUR",
            "items": [{"sku": "SKU-1", "quantity": 1}],
            "shipping_address": {"name": NAME, "line1": STREET, "city": "Wonderland",
                                 "postal_code": "12345", "country": "GB"},
            "payment_token": CARD,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    let order: Uuid = r.json::<Value>().await.unwrap()["order_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut status = None;
    for _ in 0..240 {
        status = shop.order_status(&alice, order).await;
        if status.as_deref() == Some("CONFIRMED") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        status.as_deref(),
        Some("CONFIRMED"),
        "{}",
        shop.log_tail(30)
    );

    // Sealed everywhere the system stores or publishes it: no table holds the street or the
    // token in clear (the profile keeps the name, and nothing else), no Kafka message does,
    // and neither does the log. The token was taken by the payment participant.
    for needle in [STREET, CARD] {
        assert_eq!(
            tables_holding(&shop.db.pool, needle).await,
            Vec::<String>::new(),
            "{needle}"
        );
    }
    assert_eq!(tables_holding(&shop.db.pool, NAME).await, ["customers"]);
    let brokers = shop_tests::infra().kafka_brokers;
    let topic = format!("{}orders.events", shop.prefix);
    // Placed, reserved, authorized, confirmed.
    let messages: Vec<String> =
        shop_tests::read_topic(&brokers, &topic, 4, Duration::from_secs(60))
            .await
            .into_iter()
            .map(|(_, m)| m.to_string())
            .collect();
    assert!(messages.len() >= 4, "{messages:?}");
    for m in &messages {
        for needle in [STREET, CARD, NAME] {
            assert!(!m.contains(needle), "{needle} in a Kafka message: {m}");
        }
    }
    let log = std::fs::read_to_string(&shop.log).unwrap();
    for needle in [STREET, CARD, NAME] {
        assert!(!log.contains(needle), "{needle} in the log");
    }
    // Before erasure the box opens with the customer's key (what shipping printed).
    let placed: Value = sqlx::query_scalar(
        "SELECT payload FROM events WHERE stream_id = $1 AND stream_version = 1",
    )
    .bind(order)
    .fetch_one(&shop.db.pool)
    .await
    .unwrap();
    let sealed: domain::personal::Sealed =
        serde_json::from_value(placed["shipping_address"]["sealed"].clone()).unwrap();
    let context = domain::personal::shipping_address_context(domain::values::OrderId(order));
    let vault = shop_tests::test_vault();
    let mut conn = shop.db.pool.acquire().await.unwrap();
    let opened: Option<Value> = vault.open(&mut conn, &context, &sealed).await.unwrap();
    assert_eq!(opened.unwrap()["line1"], STREET);
    let trail = audit_trail(&shop, &operator, order).await;
    assert!(
        trail["entries"][0]["payload"]["shipping_address"]["sealed"].is_object(),
        "{trail}"
    );
    // Her activity's client address is sealed with the same key.
    let r = shop
        .http
        .post(format!("{}/activity", shop.api))
        .bearer_auth(&alice)
        .json(&json!({"session_id": "sess-erasure-1", "events": [
            {"type": "page_view", "occurred_at": chrono::Utc::now().to_rfc3339()}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let topic = format!("{}user-activity", shop.prefix);
    let activity = shop_tests::read_topic(&brokers, &topic, 1, Duration::from_secs(60)).await;
    let activity = &activity[0].1;
    let ip_box: domain::personal::Sealed =
        serde_json::from_value(activity["client_ip"]["sealed"].clone()).unwrap();
    assert_eq!(ip_box.key_id, sealed.key_id);

    // Only operators forget.
    let forget = |token: String| {
        shop.http
            .post(format!("{}/admin/customers/alice/forget", shop.api))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(forget(alice.clone()).await.unwrap().status(), 403);
    let r = forget(operator.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    let erased: Value = r.json().await.unwrap();
    assert_eq!(erased["keys_deleted"], 1, "{erased}");
    assert_eq!(erased["profile_deleted"], true, "{erased}");

    // From now on nothing opens the box, the audit view shows the field erased, the profile
    // is gone, and no table holds the name any more.
    let opened: Option<Value> = vault.open(&mut conn, &context, &sealed).await.unwrap();
    assert!(opened.is_none());
    let ip: Option<String> = vault
        .open(
            &mut conn,
            &domain::activity::client_ip_context("alice"),
            &ip_box,
        )
        .await
        .unwrap();
    assert!(ip.is_none());
    let trail = audit_trail(&shop, &operator, order).await;
    assert_eq!(
        trail["entries"][0]["payload"]["shipping_address"], "erased",
        "{trail}"
    );
    assert_eq!(trail["verified"], true, "{trail}");
    assert_eq!(
        tables_holding(&shop.db.pool, NAME).await,
        Vec::<String>::new()
    );
    let r = shop
        .http
        .get(format!("{}/customers/alice", shop.api))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // History is intact: the chain verifies (it covers the ciphertext), a rebuild by replay
    // succeeds, and the order still answers.
    let out = shop.command(&["audit", "verify"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = shop
        .command(&["projections", "rebuild", "order_summary"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("rebuilt"), "{text}");
    let mut status = None;
    for _ in 0..120 {
        status = shop.order_status(&alice, order).await;
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(status.as_deref(), Some("CONFIRMED"));

    // Forgetting again deletes nothing more and still succeeds; so does the CLI.
    let again: Value = forget(operator.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["keys_deleted"], 0, "{again}");
    let out = shop
        .command(&["customers", "forget", "alice"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let erased_by: String =
        sqlx::query_scalar("SELECT erased_by FROM customer_erasures WHERE customer_id = 'alice'")
            .fetch_one(&shop.db.pool)
            .await
            .unwrap();
    assert!(erased_by.starts_with("cli:"), "{erased_by}");
    let recorded: String = sqlx::query_scalar(
        "SELECT actor FROM console_actions WHERE action = 'forget_customer' AND target = 'customer:alice'",
    )
    .fetch_one(&shop.db.pool)
    .await
    .unwrap();
    assert_eq!(
        recorded, erased_by,
        "the CLI's erasure is in the action log"
    );

    // A master key that does not unwrap the stored data keys stops `shop run` at start, with
    // the reason, before any checkout's shipment could fail on it.
    let bob = shop.token("customer", "bob");
    let r = shop
        .http
        .post(format!("{}/activity", shop.api))
        .bearer_auth(&bob)
        .json(&json!({"session_id": "sess-erasure-2", "events": [
            {"type": "page_view", "occurred_at": chrono::Utc::now().to_rfc3339()}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    shop.terminate(Duration::from_secs(60)).await;
    for (keys, says) in [
        (
            "other-1=another-secret-0123456789-0123456789",
            "is not configured",
        ),
        (
            "master-test-1=a-wrong-secret-0123456789-0123456789",
            "does not unwrap",
        ),
    ] {
        let mut run = shop.command(&["run"]);
        run.env("MASTER_KEYS", keys);
        let out =
            ShopProcess::run_to_exit(run, &format!("shop run started with master keys {keys}"))
                .await;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success() && text.contains(says), "{text}");
    }
    shop.clean_up_brokers().await;
}

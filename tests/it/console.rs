//! The operator console in a real browser (headless Chromium over WebDriver) against the real
//! `shop run`: a customer token cannot open it; an operator signs in, finds the order a real
//! poison message stuck in the stuck-orders search, sees why, replays its dead letters with
//! one recorded action and watches the order reach its final status; a POST without the
//! session's CSRF token (or without a session) changes nothing.

use std::time::Duration;

use rdkafka::producer::FutureRecord;
use shop_tests::{browser::Browser, process::ShopProcess};
use uuid::Uuid;

use crate::product::bin;

/// Polls `what` every 200 ms until it returns `Some`, for at most `secs`.
async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn read_model(shop: &ShopProcess, id: Uuid) -> Option<(String, i64)> {
    sqlx::query_as("SELECT status, version FROM order_summary WHERE order_id = $1")
        .bind(id)
        .fetch_optional(&shop.db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_finds_a_stuck_order_in_the_console_and_recovers_it_with_one_recorded_action() {
    // tok_slow keeps the saga from finishing for step timeout x attempts (then it cancels):
    // time to put a poison message in front of the order's next event.
    let shop = ShopProcess::start_with(bin(), |_| {
        vec![
            ("SHOP_DEV_MODE".into(), "true".into()),
            ("SAGA_FAULT_INJECTION".into(), "true".into()),
            ("SAGA_STEP_TIMEOUT".into(), "2s".into()),
            ("SAGA_STEP_ATTEMPTS".into(), "2".into()),
        ]
    })
    .await;
    let customer = shop.token("customer", "c-console");
    let operator = shop.token("operator", "ops-ada");
    let order = shop.checkout(&customer, "SKU-1", "tok_slow").await;
    eventually(60, "the order projected", || read_model(&shop, order)).await;

    // A poison message: the order's first event again, its payload unreadable.
    let topic = format!("{}orders.events", shop.prefix);
    let brokers = shop_tests::infra().kafka_brokers;
    let published = shop_tests::read_topic(&brokers, &topic, 1, Duration::from_secs(30)).await;
    let (key, mut envelope) = published
        .into_iter()
        .find(|(k, _)| *k == order.to_string())
        .expect("the order's first event on the topic");
    envelope["payload"] = serde_json::json!({"poison": true});
    let producer = platform::kafka::producer(&brokers).unwrap();
    let bytes = serde_json::to_vec(&envelope).unwrap();
    producer
        .send(
            FutureRecord::to(&topic).key(&key).payload(&bytes),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    // Dead-lettered by every projection that reads it; the cancellation the saga then
    // records waits behind it, so the read model does not show it.
    for (what, table) in [
        ("the poison dead-lettered", "dead_letters"),
        ("the cancellation parked behind it", "parked_events"),
    ] {
        // Open dead letters only: none is resolved yet.
        let sql = format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE stream_id = $1)");
        eventually(60, what, || async {
            let found: bool = sqlx::query_scalar(&sql)
                .bind(order)
                .fetch_one(&shop.db.pool)
                .await
                .unwrap();
            found.then_some(())
        })
        .await;
    }
    let (held_status, _) = read_model(&shop, order).await.unwrap();
    assert_ne!(held_status, "CANCELLED");

    let console = format!("{}/console", shop.ops);
    let browser = Browser::start().await;

    // Not signed in: the console sends the browser to the sign-in form.
    browser.goto(&console).await;
    assert!(
        browser.client.current_url().await.unwrap().path() == "/console/sign-in",
        "{}",
        browser.body().await
    );
    browser.screenshot("sign-in").await;
    // A customer's token does not open it.
    browser.fill("#token", &customer).await;
    browser.click("button[type=submit]").await;
    let refused = browser.body().await;
    assert!(refused.contains("operator role"), "{refused}");
    browser.goto(&console).await;
    assert_eq!(
        browser.client.current_url().await.unwrap().path(),
        "/console/sign-in"
    );

    // An operator signs in; the session cookie is HttpOnly and SameSite=Strict.
    browser.fill("#token", &operator).await;
    browser.click("button[type=submit]").await;
    let overview = browser.body().await;
    assert!(overview.contains("Overview"), "{overview}");
    assert!(overview.contains("operator:ops-ada"), "{overview}");
    let cookie = browser
        .client
        .get_named_cookie(console::session::COOKIE)
        .await
        .unwrap();
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(
        cookie.same_site().map(|s| s.to_string()).as_deref(),
        Some("Strict")
    );
    browser.screenshot("overview").await;

    // One search lists the stuck order with its cause.
    browser.goto(&format!("{console}/orders/stuck")).await;
    let stuck = browser.body().await;
    assert!(stuck.contains(&order.to_string()), "{stuck}");
    assert!(
        stuck.contains("read-side dead letter in order_summary: invalid_payload"),
        "{stuck}"
    );
    browser.screenshot("stuck-orders").await;

    // The order's page: the read model behind the store, the dead letters, the saga's
    // timeline and the audit trail.
    browser
        .click(&format!("a[href='/console/orders/{order}']"))
        .await;
    assert!(
        browser
            .text("#read-model-status")
            .await
            .starts_with(&held_status)
    );
    let page = browser.body().await;
    assert!(page.contains("OrderCancelled"), "{page}");
    assert!(page.contains("compensation_started"), "{page}");
    assert!(
        browser.text("#audit-verdict").await.contains("verifies"),
        "{page}"
    );
    browser.screenshot("order").await;

    // The dead letters of this order, one of them inspected: the envelope and what waits.
    browser
        .goto(&format!("{console}/dead-letters?order={order}"))
        .await;
    let list = browser.body().await;
    assert!(list.contains("invalid_payload"), "{list}");
    browser.screenshot("dead-letters").await;
    browser
        .click("table.letters a[href^='/console/dead-letters/read-side/']")
        .await;
    let detail = browser.body().await;
    assert!(detail.contains("\"poison\": true"), "{detail}");
    assert!(detail.contains("Held behind it"), "{detail}");
    browser.screenshot("dead-letter").await;

    // A POST without the CSRF token is refused and changes nothing, as is one without a
    // session.
    let action = format!(
        "{}{}/replay",
        shop.ops,
        browser.client.current_url().await.unwrap().path()
    );
    let forged = shop
        .http
        .post(&action)
        .header(
            "Cookie",
            format!("{}={}", console::session::COOKIE, cookie.value()),
        )
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("why=forged")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let anonymous = shop
        .http
        .post(&action)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("why=forged&csrf=guess")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 403);
    assert_eq!(read_model(&shop, order).await.unwrap().0, held_status);

    // One action on the order's page replays every open dead letter of the order, oldest
    // first.
    browser.goto(&format!("{console}/orders/{order}")).await;
    browser
        .fill("input[name=why]", "poison from a test producer")
        .await;
    browser
        .click("form[action='/console/dead-letters/replay'] button")
        .await;
    let done = browser.body().await;
    assert!(done.contains("replayed;"), "{done}");
    assert!(!done.contains("refused"), "{done}");
    browser.screenshot("replayed").await;
    let (status, _) = eventually(30, "the read model caught up", || async {
        read_model(&shop, order)
            .await
            .filter(|(s, _)| s == "CANCELLED")
    })
    .await;
    assert_eq!(status, "CANCELLED");
    browser.goto(&format!("{console}/orders/{order}")).await;
    assert!(
        browser
            .text("#read-model-status")
            .await
            .starts_with("CANCELLED")
    );

    // Recorded: who, what, why, how it ended.
    let recorded: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT actor, action, reason, outcome FROM console_actions WHERE order_id = $1",
    )
    .bind(order)
    .fetch_all(&shop.db.pool)
    .await
    .unwrap();
    assert!(!recorded.is_empty());
    for (actor, action, reason, outcome) in &recorded {
        assert_eq!(actor, "operator:ops-ada");
        assert_eq!(action, "replay_dead_letter");
        assert_eq!(reason, "poison from a test producer");
        assert!(outcome.starts_with("ok: replayed"), "{outcome}");
    }
    browser.goto(&format!("{console}/activity")).await;
    let activity = browser.body().await;
    assert!(activity.contains("replay_dead_letter"), "{activity}");
    assert!(
        activity.contains("poison from a test producer"),
        "{activity}"
    );
    browser.screenshot("activity").await;
    // Nothing stuck any more.
    browser.goto(&format!("{console}/orders/stuck")).await;
    assert!(!browser.body().await.contains(&order.to_string()));

    // Signing out ends the session: the old cookie opens nothing.
    browser.goto(&console).await;
    browser.click("form.signout button").await;
    let after = shop
        .http
        .get(&console)
        .header(
            "Cookie",
            format!("{}={}", console::session::COOKIE, cookie.value()),
        )
        .send()
        .await
        .unwrap();
    assert!(
        after.url().path().ends_with("/sign-in"),
        "{:?}",
        after.url()
    );
    browser.close().await;
    shop.terminate(Duration::from_secs(30)).await;
}

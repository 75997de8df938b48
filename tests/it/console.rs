//! The operator console in a real browser (headless Chromium over WebDriver) against the real
//! `shop run`: a customer token cannot open it; an operator signs in, finds the order a real
//! poison message stuck in the stuck-orders search, sees why, replays its dead letters with
//! one recorded action and watches the order reach its final status; a POST without the
//! session's CSRF token (or without a session) changes nothing. An operator rebuilds a
//! projection (progress to 100%, ready and following the feed, then her switch), aborts another rebuild, retries an outbox
//! row a broker refused once the broker is fixed, and sees where a tampered order's chain
//! breaks. An operator corrects a participant's reply the saga could not read and replays
//! it: the checkout moves on, and the correction is recorded with the message before and
//! after.

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
    // Every consumer group's lag (the projections' and the email group's Kafka positions)
    // and the saga's queues with their consumers.
    for group in ["order_summary", "email"] {
        let lag = browser.text(&format!("#group-{group} .lag")).await;
        assert!(lag.parse::<i64>().is_ok(), "{group}: {lag:?}");
    }
    let queues = browser.text("table.queues").await;
    assert!(
        queues.contains(&format!("{}checkout.inventory", shop.prefix)),
        "{queues}"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_corrects_a_reply_the_saga_cannot_read_then_resolves_the_other_steps_by_hand() {
    // No participant runs: the saga waits for inventory, its deadline an hour away. The
    // test answers for the inventory participant, with a reply whose field is misnamed.
    let shop = shop_without_participants().await;
    let customer = shop.token("customer", "c-correct");
    let operator = shop.token("operator", "ops-hopper");
    let order = shop.checkout(&customer, "SKU-1", "tok_visa").await;
    let command: Uuid = eventually(60, "inventory asked", || async {
        sqlx::query_scalar(
            "SELECT message_id FROM saga_commands WHERE order_id = $1 AND step = 'inventory'",
        )
        .bind(order)
        .fetch_optional(&shop.db.pool)
        .await
        .unwrap()
    })
    .await;
    let names = saga::topology::Names::new(&shop.prefix);
    let rabbit = shop_tests::TestRabbit::new().await;
    let ch = platform::amqp::confirm_channel(&rabbit.conn).await.unwrap();
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "causation_id".into(),
        lapin::types::AMQPValue::LongString(command.to_string().into()),
    );
    let reply_id = Uuid::now_v7();
    let malformed = serde_json::json!({"order_id": order,
        "input": {"type": "inventory_reserved", "reservation": "held-by-hand"}});
    ch.basic_publish(
        platform::amqp::COMMANDS_EXCHANGE.into(),
        names.routing_key("replies").as_str().into(),
        Default::default(),
        &serde_json::to_vec(&malformed).unwrap(),
        lapin::BasicProperties::default()
            .with_message_id(reply_id.to_string().into())
            .with_correlation_id(order.to_string().into())
            .with_headers(headers),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let console = format!("{}/console", shop.ops);
    let browser = Browser::start().await;
    sign_in(&browser, &console, &operator).await;
    let letter = format!("{console}/dead-letters/saga/{reply_id}");
    eventually(60, "the reply dead-lettered", || async {
        browser
            .goto(&format!("{console}/dead-letters?source=saga&order={order}"))
            .await;
        browser
            .body()
            .await
            .contains("malformed_reply")
            .then_some(())
    })
    .await;
    browser.goto(&letter).await;
    let detail = browser.body().await;
    assert!(
        detail.contains("missing field `reservation_id`"),
        "{detail}"
    );
    browser.screenshot("dead-letter-correct").await;

    // A correction about another order is refused (400), recorded, and changes nothing.
    let corrected = |about: Uuid| {
        serde_json::json!({"order_id": about,
            "input": {"type": "inventory_reserved", "reservation_id": "held-by-hand"}})
        .to_string()
    };
    browser
        .fill("form.correct textarea", &corrected(Uuid::now_v7()))
        .await;
    browser
        .fill(
            "form.correct input[name=why]",
            "participant renamed the field",
        )
        .await;
    browser.click("form.correct button").await;
    let refused = browser.body().await;
    assert!(refused.contains("the dead letter about order"), "{refused}");
    browser.goto(&letter).await;
    assert_eq!(browser.text("dd.status").await, "open");

    // The right correction: the saga takes the reply and asks for payment next.
    browser
        .fill("form.correct textarea", &corrected(order))
        .await;
    browser
        .fill(
            "form.correct input[name=why]",
            "participant renamed the field",
        )
        .await;
    browser.click("form.correct button").await;
    let done = browser.text("td.outcome").await;
    assert!(done.contains("corrected and republished"), "{done}");
    eventually(60, "the saga asks for payment", || async {
        sqlx::query_scalar::<_, String>("SELECT step FROM saga_deadlines WHERE order_id = $1")
            .bind(order)
            .fetch_optional(&shop.db.pool)
            .await
            .unwrap()
            .filter(|s| s == "payment")
    })
    .await;
    let recorded: Vec<(String, String, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT reason, outcome, detail FROM console_actions
         WHERE action = 'correct_and_replay_dead_letter' AND order_id = $1 ORDER BY id",
    )
    .bind(order)
    .fetch_all(&shop.db.pool)
    .await
    .unwrap();
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert!(recorded[0].1.starts_with("refused: "), "{recorded:?}");
    assert!(recorded[1].1.starts_with("ok: "), "{recorded:?}");
    assert_eq!(recorded[1].0, "participant renamed the field");
    let detail = recorded[1].2.as_ref().expect("before and after recorded");
    assert_eq!(detail["before"], malformed);
    assert_eq!(detail["after"]["input"]["reservation_id"], "held-by-hand");

    // No payment participant answers: the money was taken by phone, and the warehouse sent
    // the parcel. The operator marks each step resolved with its reference (both required),
    // and the saga moves on to the order's end.
    let resolve = |reference: &'static str, why: &'static str| {
        let (browser, console) = (&browser, &console);
        async move {
            browser.goto(&format!("{console}/sagas")).await;
            let row = format!("#saga-{order} form.resolve");
            browser
                .fill(&format!("{row} input[name=reference]"), reference)
                .await;
            browser.fill(&format!("{row} input[name=why]"), why).await;
            browser.click(&format!("{row} button")).await;
            browser.text("#outcome").await
        }
    };
    // A page that showed an earlier step waiting (here: its form edited back to inventory)
    // resolves nothing: the reference is never taken for another step.
    browser.goto(&format!("{console}/sagas")).await;
    let row = format!("#saga-{order} form.resolve");
    browser
        .client
        .execute(
            &format!("document.querySelector('{row} input[name=step]').value = 'inventory';"),
            vec![],
        )
        .await
        .unwrap();
    browser
        .fill(&format!("{row} input[name=reference]"), "STALE-1")
        .await;
    browser
        .fill(&format!("{row} input[name=why]"), "stale page")
        .await;
    browser.click(&format!("{row} button")).await;
    let stale = browser.text("#outcome").await;
    assert!(
        stale.contains("has moved on: it now waits for payment"),
        "{stale}"
    );
    let paid = resolve("PHONE-AUTH-77", "paid by phone").await;
    assert!(
        paid.contains("payment marked resolved by hand (PHONE-AUTH-77)"),
        "{paid}"
    );
    eventually(60, "the saga asks for the shipment", || async {
        sqlx::query_scalar::<_, String>("SELECT step FROM saga_deadlines WHERE order_id = $1")
            .bind(order)
            .fetch_optional(&shop.db.pool)
            .await
            .unwrap()
            .filter(|s| s == "shipment")
    })
    .await;
    browser.screenshot("sagas-resolve").await;
    let shipped = resolve("DHL-123", "sent by the warehouse").await;
    assert!(shipped.contains("shipment marked resolved"), "{shipped}");
    eventually(60, "the order confirmed", || async {
        read_model(&shop, order)
            .await
            .filter(|(status, _)| status == "CONFIRMED")
    })
    .await;
    // The saga's decisions and the order's events name the operator as their author.
    let authors: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_type, metadata->>'actor' FROM events
         WHERE stream_id IN ($1, $2) AND event_type IN ('SagaStepSucceeded', 'OrderConfirmed')
         ORDER BY position",
    )
    .bind(order)
    .bind(domain::saga::stream_id(domain::values::OrderId(order)))
    .fetch_all(&shop.db.pool)
    .await
    .unwrap();
    let by_hand: Vec<_> = authors
        .iter()
        .filter(|(_, actor)| actor == "operator:ops-hopper")
        .map(|(t, _)| t.as_str())
        .collect();
    assert_eq!(
        by_hand,
        ["SagaStepSucceeded", "SagaStepSucceeded", "OrderConfirmed"],
        "{authors:?}"
    );
    // Ended, the saga waits for nothing: there is nothing left to resolve.
    browser.goto(&format!("{console}/sagas")).await;
    assert!(!browser.body().await.contains(&format!("saga-{order}")));
    let resolved: Vec<(String, String)> = sqlx::query_as(
        "SELECT reason, outcome FROM console_actions WHERE action = 'resolve_saga_step' AND order_id = $1 ORDER BY id",
    )
    .bind(order)
    .fetch_all(&shop.db.pool)
    .await
    .unwrap();
    assert_eq!(resolved.len(), 3, "{resolved:?}");
    assert!(resolved[0].1.starts_with("refused: "), "{resolved:?}");
    assert_eq!(resolved[1].0, "paid by phone");
    assert!(
        resolved[1..].iter().all(|r| r.1.starts_with("ok: ")),
        "{resolved:?}"
    );
    browser.close().await;
    shop.terminate(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_resends_an_email_the_server_refused_once_the_address_is_fixed() {
    let shop =
        ShopProcess::start_with(bin(), |_| vec![("SHOP_DEV_MODE".into(), "true".into())]).await;
    let customer = shop.token("customer", "c-mail");
    let operator = shop.token("operator", "ops-lamarr");
    let domain = format!("{}example.com", shop.prefix);
    let profile = |email: String| {
        let (shop, customer) = (&shop, &customer);
        async move {
            let r = shop
                .http
                .put(format!("{}/customers/c-mail", shop.api))
                .bearer_auth(customer)
                .json(&serde_json::json!({"name": "Hedy", "email": email}))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.status());
        }
    };
    // The server refuses `bounce*` recipients for good (550): the email is recorded dead.
    profile(format!("bounce-hedy@{domain}")).await;
    let order = shop.checkout(&customer, "SKU-1", "tok_visa").await;
    let event: Uuid = eventually(90, "the confirmation's email recorded dead", || async {
        sqlx::query_scalar(
            "SELECT event_id FROM email_inbox WHERE order_id = $1 AND outcome = 'dead'",
        )
        .bind(order)
        .fetch_optional(&shop.db.pool)
        .await
        .unwrap()
    })
    .await;

    let console = format!("{}/console", shop.ops);
    let browser = Browser::start().await;
    sign_in(&browser, &console, &operator).await;
    browser
        .goto(&format!("{console}/dead-letters?source=email"))
        .await;
    let list = browser.body().await;
    assert!(list.contains(&order.to_string()), "{list}");
    assert!(list.contains("refused"), "{list}");
    // The order is confirmed, yet stuck: its customer was never told.
    browser.goto(&format!("{console}/orders/stuck")).await;
    let stuck = browser.body().await;
    assert!(stuck.contains(&order.to_string()), "{stuck}");
    assert!(stuck.contains("email dead letter"), "{stuck}");

    let letter = format!("{console}/dead-letters/email/{event}");
    browser.goto(&letter).await;
    let detail = browser.body().await;
    assert!(detail.contains("SMTP 550"), "{detail}");
    assert!(
        !detail.contains("bounce-hedy"),
        "the address is not kept: {detail}"
    );
    browser.screenshot("dead-letter-email").await;
    // Resent as it stands, it is refused again and stays dead.
    browser
        .fill(
            "form.action[action$='/replay'] input[name=why]",
            "server fixed?",
        )
        .await;
    browser.click("form.action[action$='/replay'] button").await;
    let again = browser.text("td.outcome").await;
    assert!(again.contains("refused it again"), "{again}");
    browser.goto(&letter).await;
    assert_eq!(browser.text("dd.status").await, "open");

    // She corrects her address; the resend drafts from the profile as it is now.
    let fixed = format!("hedy@{domain}");
    profile(fixed.clone()).await;
    browser.goto(&letter).await;
    browser
        .fill(
            "form.action[action$='/replay'] input[name=why]",
            "customer corrected her address",
        )
        .await;
    browser.click("form.action[action$='/replay'] button").await;
    let sent = browser.text("td.outcome").await;
    assert!(sent.contains("sent again"), "{sent}");
    let mails = crate::email::wait_mail(&fixed, 1).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].0, format!("<{event}@shop>"));
    assert!(mails[0].1.contains("confirmed"), "{:?}", mails[0].1);
    let outcome: String = sqlx::query_scalar("SELECT outcome FROM email_inbox WHERE event_id = $1")
        .bind(event)
        .fetch_one(&shop.db.pool)
        .await
        .unwrap();
    assert_eq!(outcome, "sent");
    browser
        .goto(&format!("{console}/dead-letters?source=email"))
        .await;
    assert!(!browser.body().await.contains(&order.to_string()));
    // Settled, it is no dead letter any more: nothing is left to resend.
    browser.goto(&letter).await;
    let gone = browser.body().await;
    assert!(gone.contains("no dead letter"), "{gone}");
    let recorded: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT action, reason, outcome FROM console_actions WHERE order_id = $1 ORDER BY id",
    )
    .bind(order)
    .fetch_all(&shop.db.pool)
    .await
    .unwrap();
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert!(recorded.iter().all(|r| r.0 == "replay_dead_letter"));
    assert!(recorded[0].2.starts_with("refused: "), "{recorded:?}");
    assert_eq!(recorded[1].1, "customer corrected her address");
    assert!(recorded[1].2.starts_with("ok: sent again"), "{recorded:?}");
    browser.close().await;
    shop.terminate(Duration::from_secs(30)).await;
}

/// `shop run` with no participant: every saga waits for inventory, its deadline an hour away.
async fn shop_without_participants() -> ShopProcess {
    ShopProcess::start_with(bin(), |_| {
        vec![
            ("SHOP_DEV_MODE".into(), "true".into()),
            ("SAGA_PARTICIPANTS".into(), "false".into()),
            ("SAGA_STEP_TIMEOUT".into(), "1h".into()),
        ]
    })
    .await
}

/// Signs `browser` in to the console with `token` and checks it landed on the overview.
async fn sign_in(browser: &Browser, console: &str, token: &str) {
    browser.goto(&format!("{console}/sign-in")).await;
    browser.fill("#token", token).await;
    browser.click("button[type=submit]").await;
    let overview = browser.body().await;
    assert!(overview.contains("Overview"), "{overview}");
}

/// The projection's row on the console's Projections page: (version, state, percent shown).
async fn projection_card(browser: &Browser, console: &str) -> (String, String, Option<String>) {
    browser.goto(&format!("{console}/projections")).await;
    let card = "#projection-order_summary";
    let percent = browser
        .client
        .find_all(fantoccini::Locator::Css(&format!("{card} .percent")))
        .await
        .unwrap();
    let percent = match percent.first() {
        Some(e) => Some(e.text().await.unwrap()),
        None => None,
    };
    (
        browser.text(&format!("{card} dd.version")).await,
        browser.text(&format!("{card} dd.state")).await,
        percent,
    )
}

async fn rebuild_row(shop: &ShopProcess) -> (i32, Option<i32>) {
    sqlx::query_as(
        "SELECT active_version, rebuild_version FROM projections WHERE name = 'order_summary'",
    )
    .fetch_one(&shop.db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_rebuilds_a_projection_aborts_another_and_sees_a_tampered_order_break() {
    // No participant runs here: every saga waits for inventory, its deadline an hour away.
    let shop = shop_without_participants().await;
    let customer = shop.token("customer", "c-rebuild");
    let operator = shop.token("operator", "ops-grace");
    let mut orders = Vec::new();
    for sku in ["SKU-1", "SKU-2", "SKU-3"] {
        orders.push(shop.checkout(&customer, sku, "tok_visa").await);
    }
    for id in &orders {
        eventually(60, "the order in the read model", || async {
            read_model(&shop, *id).await
        })
        .await;
    }
    let console = format!("{}/console", shop.ops);
    let browser = Browser::start().await;
    sign_in(&browser, &console, &operator).await;

    // A rebuild started here replays the whole store, then waits, ready, for the switch.
    browser.goto(&format!("{console}/projections")).await;
    browser
        .fill(
            "#projection-order_summary input[name=why]",
            "projector fix deployed",
        )
        .await;
    browser
        .click("form[action='/console/projections/order_summary/rebuild'] button")
        .await;
    let started = browser.text("#outcome").await;
    assert!(started.contains("building version 2"), "{started}");
    let (version, state, percent) = eventually(60, "the rebuild ready at 100%", || async {
        let card = projection_card(&browser, &console).await;
        card.1.contains("ready").then_some(card)
    })
    .await;
    assert_eq!(version, "1");
    assert!(state.contains("v2 is ready"), "{state}");
    assert_eq!(percent.as_deref(), Some("100%"));
    // The old version still serves every order meanwhile, and is kept.
    for id in &orders {
        assert_eq!(read_model(&shop, *id).await.unwrap().0, "PENDING");
    }
    // Ready, the new version follows the feed: an order placed now is in it before the switch.
    let late = shop.checkout(&customer, "SKU-4", "tok_visa").await;
    orders.push(late);
    eventually(60, "the late order in the waiting version", || async {
        sqlx::query_scalar::<_, String>("SELECT status FROM order_summary_v2 WHERE order_id = $1")
            .bind(late)
            .fetch_optional(&shop.db.pool)
            .await
            .unwrap()
    })
    .await;
    browser.screenshot("projections").await;
    let card = "#projection-order_summary";
    browser
        .fill(
            &format!("{card} form[action$='/switch'] input[name=why]"),
            "v2 checked",
        )
        .await;
    browser
        .click("form[action='/console/projections/order_summary/switch'] button")
        .await;
    let switched = browser.text("#outcome").await;
    assert!(switched.contains("switching to version 2"), "{switched}");
    let (version, state, _) = eventually(60, "the rebuilt version switched in", || async {
        let card = projection_card(&browser, &console).await;
        (card.0 == "2").then_some(card)
    })
    .await;
    assert_eq!((version.as_str(), state.as_str()), ("2", "live"));
    assert_eq!(rebuild_row(&shop).await, (2, None));
    for id in &orders {
        assert_eq!(read_model(&shop, *id).await.unwrap().0, "PENDING");
    }
    let previous: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('order_summary_v1')::text")
            .fetch_one(&shop.db.pool)
            .await
            .unwrap();
    assert_eq!(previous, None, "the previous version goes once switched");

    // Another rebuild, aborted while it waits to switch: its tables go, version 2 stays.
    browser.goto(&format!("{console}/projections")).await;
    browser
        .click("form[action='/console/projections/order_summary/rebuild'] button")
        .await;
    eventually(60, "the second rebuild ready", || async {
        let card = projection_card(&browser, &console).await;
        card.1.contains("v3 is ready").then_some(())
    })
    .await;
    // Aborting needs a reason: the browser's form requires one, the server too.
    browser
        .fill(
            &format!("{card} form[action$='/abort'] input[name=why]"),
            "wrong build",
        )
        .await;
    browser
        .click("form[action='/console/projections/order_summary/abort'] button")
        .await;
    let aborted = browser.text("#outcome").await;
    assert!(aborted.contains("stops at its next batch"), "{aborted}");
    eventually(60, "the aborted rebuild cleared", || async {
        (rebuild_row(&shop).await == (2, None)).then_some(())
    })
    .await;
    let leftover: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('order_summary_v3')::text")
            .fetch_one(&shop.db.pool)
            .await
            .unwrap();
    assert_eq!(leftover, None, "the aborted version's table is dropped");
    let (version, state, percent) = projection_card(&browser, &console).await;
    assert_eq!(
        (version.as_str(), state.as_str(), percent),
        ("2", "live", None)
    );
    let recorded: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT action, reason, outcome FROM console_actions WHERE target = 'projection:order_summary' ORDER BY id",
    )
    .fetch_all(&shop.db.pool)
    .await
    .unwrap();
    let actions: Vec<&str> = recorded.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        actions,
        [
            "rebuild_projection",
            "switch_projection",
            "rebuild_projection",
            "abort_rebuild"
        ]
    );
    assert_eq!(recorded[0].1, "projector fix deployed");
    assert_eq!(recorded[1].1, "v2 checked");
    assert_eq!(recorded[3].1, "wrong build");
    assert!(
        recorded.iter().all(|r| r.2.starts_with("ok: ")),
        "{recorded:?}"
    );

    // The outbox: a message no queue is bound for is returned by the broker, a refusal for
    // good, and the next message of its order waits behind it; the page shows both. Once the
    // broker side is fixed (a queue bound), the failed row's retry publishes both.
    let rabbit = shop_tests::TestRabbit::new().await;
    let exchange = rabbit.name("console-unbound");
    let ch = rabbit.conn.create_channel().await.unwrap();
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Direct,
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    let held_order = Uuid::now_v7();
    for n in 0..2 {
        sqlx::query(
            "INSERT INTO outbox (message_id, destination, target, routing_key, ordering_key, payload)
             VALUES ($1, 'amqp', $2, 'nowhere', $3, $4)",
        )
        .bind(Uuid::now_v7())
        .bind(&exchange)
        .bind(held_order.to_string())
        .bind(format!("{{\"n\":{n}}}").into_bytes())
        .execute(&shop.db.pool)
        .await
        .unwrap();
    }
    let unpublished = || async {
        sqlx::query_as::<_, (i64, Option<chrono::DateTime<chrono::Utc>>)>(
            "SELECT id, failed_at FROM outbox WHERE target = $1 AND published_at IS NULL ORDER BY id",
        )
        .bind(&exchange)
        .fetch_all(&shop.db.pool)
        .await
        .unwrap()
    };
    let failed = eventually(60, "the relay set the refused row aside", || async {
        let rows = unpublished().await;
        rows.first().filter(|r| r.1.is_some()).map(|r| r.0)
    })
    .await;
    browser
        .goto(&format!("{console}/outbox?destination=amqp"))
        .await;
    let page = browser.body().await;
    assert!(page.contains(&exchange), "{page}");
    assert!(
        browser
            .text(&format!("#outbox-{failed} .state"))
            .await
            .contains("failed"),
        "{page}"
    );
    assert!(page.contains("held behind a failed row"), "{page}");
    browser.screenshot("outbox").await;
    let queue = ch
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        queue.name().as_str().into(),
        exchange.as_str().into(),
        "nowhere".into(),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    browser
        .click(&format!(
            "#outbox-{failed} a[href='/console/dead-letters/outbox/{failed}']"
        ))
        .await;
    browser
        .fill(
            "form[action$='/replay'] input[name=why]",
            "exchange created",
        )
        .await;
    browser.click("form[action$='/replay'] button").await;
    let done = browser.body().await;
    assert!(done.contains("put back in line"), "{done}");
    eventually(60, "both rows published", || async {
        unpublished().await.is_empty().then_some(())
    })
    .await;
    browser
        .goto(&format!("{console}/outbox?destination=amqp"))
        .await;
    assert!(!browser.body().await.contains(&exchange));
    ch.exchange_delete(exchange.as_str().into(), Default::default())
        .await
        .unwrap();

    // Sagas: a checkout waits for inventory (no participant answers); the operator retries
    // the step now instead of waiting out its deadline, and the saga sends it again as
    // attempt 2.
    let slow = orders[2];
    let attempt = || async {
        sqlx::query_scalar::<_, i32>(
            "SELECT attempt FROM saga_deadlines WHERE order_id = $1 AND step = 'inventory'",
        )
        .bind(slow)
        .fetch_optional(&shop.db.pool)
        .await
        .unwrap()
    };
    eventually(60, "the saga waiting for inventory", || async {
        attempt().await.filter(|a| *a == 1)
    })
    .await;
    browser
        .goto(&format!("{console}/sagas?step=inventory"))
        .await;
    assert_eq!(browser.text(&format!("#saga-{slow} .attempt")).await, "1");
    browser.screenshot("sagas").await;
    browser
        .fill(
            &format!("#saga-{slow} form.retry input[name=why]"),
            "provider back",
        )
        .await;
    browser
        .click(&format!("#saga-{slow} form.retry button"))
        .await;
    let outcome = browser.text("#outcome").await;
    assert!(outcome.contains("inventory attempt 1"), "{outcome}");
    eventually(60, "inventory asked again as attempt 2", || async {
        attempt().await.filter(|a| *a == 2)
    })
    .await;
    let retried: (String, String) = sqlx::query_as(
        "SELECT reason, outcome FROM console_actions WHERE action = 'retry_saga_step' AND order_id = $1",
    )
    .bind(slow)
    .fetch_one(&shop.db.pool)
    .await
    .unwrap();
    assert_eq!(retried.0, "provider back");
    assert!(retried.1.starts_with("ok: "), "{retried:?}");
    // Compensate: the operator cancels a waiting checkout; the saga releases what it holds
    // and ends compensated, the order is cancelled.
    let given_up = orders[1];
    browser.goto(&format!("{console}/sagas")).await;
    browser
        .fill(
            &format!("#saga-{given_up} form.compensate input[name=why]"),
            "customer called: cancel",
        )
        .await;
    browser
        .click(&format!("#saga-{given_up} form.compensate button"))
        .await;
    let outcome = browser.text("#outcome").await;
    assert!(outcome.contains("the order is cancelled"), "{outcome}");
    let status = eventually(60, "the saga compensated", || async {
        let c = read_side::checkout::load(&shop.db.pool, given_up)
            .await
            .unwrap();
        (c.status == read_side::checkout::Status::Compensated).then_some(c.status)
    })
    .await;
    assert_eq!(status, read_side::checkout::Status::Compensated);
    eventually(60, "the order cancelled in the read model", || async {
        read_model(&shop, given_up)
            .await
            .filter(|(s, _)| s == "CANCELLED")
    })
    .await;
    let compensated: (String, String, String) = sqlx::query_as(
        "SELECT actor, reason, outcome FROM console_actions WHERE action = 'compensate_saga' AND order_id = $1",
    )
    .bind(given_up)
    .fetch_one(&shop.db.pool)
    .await
    .unwrap();
    assert_eq!(compensated.0, "operator:ops-grace");
    assert_eq!(compensated.1, "customer called: cancel");
    assert!(compensated.2.starts_with("ok: "), "{compensated:?}");
    let actor: String = sqlx::query_scalar(
        "SELECT metadata->>'actor' FROM events WHERE stream_id = $1 AND event_type = 'OrderCancelled'",
    )
    .bind(given_up)
    .fetch_one(&shop.db.pool)
    .await
    .unwrap();
    assert_eq!(
        actor, "operator:ops-grace",
        "the cancellation names the operator"
    );
    // It is listed among the sagas recently compensated, with why; a search by its order id
    // opens the order's page, where the saga's timeline is.
    browser
        .goto(&format!("{console}/sagas?state=compensated"))
        .await;
    assert_eq!(
        browser.text(&format!("#ended-{given_up} .reason")).await,
        "order cancelled"
    );
    browser.goto(&format!("{console}/sagas")).await;
    browser
        .fill("form.filters input[name=order]", &given_up.to_string())
        .await;
    browser.click("form.filters button[type=submit]").await;
    let url = browser.client.current_url().await.unwrap();
    assert_eq!(url.path(), format!("/console/orders/{given_up}"));

    // Without a session the page is not shown.
    let anonymous = shop
        .http
        .get(format!("{console}/sagas"))
        .send()
        .await
        .unwrap();
    assert!(
        anonymous.url().path().ends_with("/sign-in"),
        "no session, no page"
    );

    // A tampered event: the order's audit trail shows where its chain breaks.
    let tampered = orders[1];
    shop.db.allow_tampering().await;
    sqlx::query(
        "UPDATE events SET payload = jsonb_set(payload, '{customer_ref}', '\"someone-else\"')
         WHERE stream_id = $1 AND stream_version = 1",
    )
    .bind(tampered)
    .execute(&shop.db.pool)
    .await
    .unwrap();
    browser.goto(&format!("{console}/orders/{tampered}")).await;
    let verdict = browser.text("#audit-verdict").await;
    assert!(verdict.contains("breaks at version 1"), "{verdict}");
    let broken = browser
        .client
        .find_all(fantoccini::Locator::Css("tr.broken"))
        .await
        .unwrap();
    assert!(!broken.is_empty(), "the rows from the break on are marked");
    browser.screenshot("tampered").await;
    // An untouched order still verifies.
    browser
        .goto(&format!("{console}/orders/{}", orders[0]))
        .await;
    assert!(browser.text("#audit-verdict").await.contains("verifies"));
    // Her orders' audit, found by her customer id in the header's box: one of them breaks.
    browser
        .fill("form.search input[name=id]", "c-rebuild")
        .await;
    browser.click("form.search button").await;
    let verdict = browser.text("#customer-verdict").await;
    assert_eq!(
        verdict,
        format!(
            "1 of her {} order(s) have a broken hash chain or are missing from the store.",
            orders.len()
        )
    );
    assert!(
        browser
            .text(&format!("#order-{tampered} .verdict"))
            .await
            .contains("breaks at version 1")
    );
    assert_eq!(
        browser
            .text(&format!("#order-{} .verdict", orders[0]))
            .await,
        "verifies"
    );
    browser.screenshot("customer").await;
    // The whole store verified from the Audit page: the tampered order is the one break.
    browser.goto(&format!("{console}/audit")).await;
    browser
        .fill("form.filters input[name=why]", "monthly check")
        .await;
    browser.click("form.filters button").await;
    let asked = browser.text("#outcome").await;
    assert!(asked.contains("asked for"), "{asked}");
    let verification: i64 = sqlx::query_scalar("SELECT max(id) FROM audit_verifications")
        .fetch_one(&shop.db.pool)
        .await
        .unwrap();
    let row = format!("#verification-{verification}");
    eventually(60, "the verification done", || async {
        browser.goto(&format!("{console}/audit")).await;
        (browser.text(&format!("{row} .state")).await == "done").then_some(())
    })
    .await;
    assert_eq!(browser.text(&format!("{row} .broken")).await, "1");
    let breaks = browser.text("table.broken").await;
    assert!(breaks.contains(&tampered.to_string()), "{breaks}");
    assert!(breaks.contains("ContentChanged"), "{breaks}");
    browser.screenshot("audit").await;
    let recorded: String =
        sqlx::query_scalar("SELECT reason FROM console_actions WHERE action = 'verify_audit'")
            .fetch_one(&shop.db.pool)
            .await
            .unwrap();
    assert_eq!(recorded, "monthly check");

    // A signed checkpoint written outside the database (where the audit-checkpoints role
    // writes them), then an order deleted from the store (its one event: no participant
    // ran): comparing that file with the store from the console shows the stream gone,
    // which no chain of what is left can.
    let out = ShopProcess::run_to_exit(
        {
            let mut c = shop.command(&["audit", "checkpoint", "--out"]);
            c.arg(&shop.checkpoints);
            c
        },
        "shop audit checkpoint",
    )
    .await;
    let written = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let file = std::path::Path::new(&written)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let cut = orders[2];
    sqlx::query("DELETE FROM events WHERE stream_id = $1")
        .bind(cut)
        .execute(&shop.db.pool)
        .await
        .unwrap();
    browser.goto(&format!("{console}/audit")).await;
    browser.click("a[href='/console/audit/checkpoints']").await;
    let row = format!("form.compare:has(input[value='{file}'])");
    browser
        .fill(&format!("{row} input[name=why]"), "after the restore")
        .await;
    browser.click(&format!("{row} button")).await;
    let found = browser.text("#comparison").await;
    assert!(found.contains("1 finding(s)"), "{found}");
    assert!(found.contains(&format!("StreamDeleted {cut}")), "{found}");
    browser.screenshot("checkpoint").await;
    let recorded: (String, String) = sqlx::query_as(
        "SELECT target, outcome FROM console_actions WHERE action = 'compare_checkpoint'",
    )
    .fetch_one(&shop.db.pool)
    .await
    .unwrap();
    assert_eq!(
        recorded,
        (format!("checkpoint:{file}"), "ok: 1 finding(s)".into())
    );

    browser.close().await;
    shop.terminate(Duration::from_secs(30)).await;
}

/// The audit-verifier's work, without a browser: a range covers only the streams with an
/// event in it, a tampered stream is listed with where it breaks, a verification whose
/// runner died is taken again from the start, one stopped by shutdown is asked for again,
/// and only one waits or runs at a time.
#[tokio::test]
async fn an_audit_verification_finds_the_tampered_streams_of_its_range_and_outlives_its_runner() {
    let db = shop_tests::TestDb::new().await;
    db.allow_tampering().await;
    let old: Vec<Uuid> = (0..2).map(|_| Uuid::now_v7()).collect();
    for s in &old {
        crate::event_store::append_n(&db, *s, 3).await.unwrap();
    }
    let since: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let new: Vec<Uuid> = (0..2).map(|_| Uuid::now_v7()).collect();
    for s in &new {
        crate::event_store::append_n(&db, *s, 3).await.unwrap();
    }
    for s in [old[0], new[1]] {
        sqlx::query(
            "UPDATE events SET payload = jsonb_set(payload, '{n}', '99') WHERE stream_id = $1 AND stream_version = 2",
        )
        .bind(s)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let ask = |since: Option<chrono::DateTime<chrono::Utc>>| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "INSERT INTO audit_verifications (requested_by, since) VALUES ('operator:t', $1) RETURNING id",
            )
            .bind(since)
            .fetch_one(&pool)
            .await
        }
    };
    type Row = (String, i32, i32, i64, serde_json::Value);
    let row = |id: i64| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, Row>(
                "SELECT state, streams, checked, events, broken FROM audit_verifications WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let running = tokio_util::sync::CancellationToken::new();

    // The range since the second pair: two streams, one broken at version 2.
    let ranged = ask(Some(since)).await.unwrap();
    assert!(
        ask(None).await.is_err(),
        "a second verification waits for the first"
    );
    assert_eq!(
        console::audit::work(&db.pool, &running).await.unwrap(),
        Some(ranged)
    );
    let (state, streams, checked, events, broken) = row(ranged).await;
    assert_eq!(
        (state.as_str(), streams, checked, events),
        ("done", 2, 2, 6)
    );
    let broken = broken.as_array().unwrap().clone();
    assert_eq!(broken.len(), 1, "{broken:?}");
    assert_eq!(broken[0]["stream_id"], new[1].to_string());
    assert_eq!(broken[0]["version"], 2);
    assert_eq!(broken[0]["problem"], "ContentChanged");
    assert_eq!(
        console::audit::work(&db.pool, &running).await.unwrap(),
        None
    );

    // The whole store, its runner dead an hour ago: taken again, from the start.
    let whole = ask(None).await.unwrap();
    sqlx::query(
        "UPDATE audit_verifications SET state = 'running', checked = 1,
            started_at = now() - interval '1 hour', updated_at = now() - interval '1 hour'
         WHERE id = $1",
    )
    .bind(whole)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        console::audit::work(&db.pool, &running).await.unwrap(),
        Some(whole)
    );
    let (state, streams, checked, _, broken) = row(whole).await;
    assert_eq!((state.as_str(), streams, checked), ("done", 4, 4));
    let mut ids: Vec<String> = broken
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["stream_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut expected = vec![old[0].to_string(), new[1].to_string()];
    expected.sort();
    assert_eq!(ids, expected);

    // Shutdown while it runs: asked for again, for the next runner.
    let stopping = ask(None).await.unwrap();
    let stopped = tokio_util::sync::CancellationToken::new();
    stopped.cancel();
    assert_eq!(
        console::audit::work(&db.pool, &stopped).await.unwrap(),
        Some(stopping)
    );
    assert_eq!(row(stopping).await.0, "requested");
}

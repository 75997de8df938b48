//! The email group on the real services: order outcomes reach the real SMTP server
//! (`scripts/smtp.sh`: OpenSMTPD, every message into `$SMTP_MAILDIR`) once per event, with the
//! event id as Message-ID; a refused address is recorded dead and the group moves on; a
//! redelivery, a group reset or a first deployment onto history sends nothing again.

use std::time::Duration;

use domain::{
    order::OrderCommand,
    values::{OrderId, Reason},
};
use outbox_relay::{Relay, RelayConfig};
use platform::config::InfraConfig;
use serde_json::{Value, json};
use shop_tests::{TestApi, TestKafka, checkout_body, unique_prefix};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Command API, relay and (once started) the email group, on a topic of their own.
struct EmailStack {
    api: TestApi,
    kafka: TestKafka,
    topic: String,
    shutdown: CancellationToken,
    group: Option<(
        CancellationToken,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    )>,
    relay: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Unique per test: the addresses it writes to.
    domain: String,
}

impl EmailStack {
    async fn start() -> Self {
        let api = TestApi::new().await;
        let mut kafka = TestKafka::new().await;
        let topic = kafka.create_topics(&["orders.events"], 3).await.remove(0);
        let infra = InfraConfig {
            kafka_topic_prefix: kafka.prefix.clone(),
            ..shop_tests::infra()
        };
        let shutdown = CancellationToken::new();
        let relay = Relay::new(api.db.pool.clone(), &infra, RelayConfig::default()).unwrap();
        let relay = tokio::spawn(outbox_relay::run(
            relay,
            api.db.url.clone(),
            shutdown.clone(),
        ));
        Self {
            api,
            kafka,
            topic,
            shutdown,
            group: None,
            relay,
            domain: format!("{}.example.com", unique_prefix()),
        }
    }

    /// Starts the email group in consumer group `<group_prefix>email`, taking its start
    /// position as `shop run` does.
    async fn start_group(&mut self, group_prefix: &str) {
        let group = notifications::EmailGroup::new(
            self.api.db.pool.clone(),
            &self.kafka.brokers,
            &self.topic,
            group_prefix,
            notifications::MailerConfig::default(),
        )
        .unwrap();
        group.start_position().await.unwrap();
        let stop = self.shutdown.child_token();
        let s = stop.clone();
        let task = tokio::spawn(async move { group.run(&s, |_| {}).await });
        self.group = Some((stop, task));
    }

    async fn stop_group(&mut self) {
        if let Some((stop, task)) = self.group.take() {
            stop.cancel();
            task.await.unwrap().unwrap();
        }
    }

    async fn stop(mut self) {
        self.stop_group().await;
        self.shutdown.cancel();
        self.relay.await.unwrap().unwrap();
    }

    fn address(&self, local: &str) -> String {
        format!("{local}@{}", self.domain)
    }

    async fn profile(&self, customer: &str, email: &str) {
        let r = self
            .api
            .http
            .put(format!("{}/customers/{customer}", self.api.base))
            .bearer_auth(self.api.customer(customer))
            .json(&json!({"name": "Ada Lovelace", "email": email}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    }

    async fn place(&self, customer: &str) -> Uuid {
        let r: Value = self
            .api
            .post(
                "/orders",
                &self.api.customer(customer),
                &Uuid::new_v4().to_string(),
                &checkout_body(),
            )
            .await
            .json()
            .await
            .unwrap();
        r["order_id"].as_str().unwrap().parse().unwrap()
    }

    /// Moves an order through the saga's steps to confirmed (as the orchestrator does).
    async fn confirm(&self, order: Uuid) -> Uuid {
        for command in [
            OrderCommand::MarkInventoryReserved {
                reservation_id: "r-1".into(),
            },
            OrderCommand::MarkPaymentAuthorized {
                authorization_id: "a-1".into(),
            },
            OrderCommand::Confirm {
                shipment_id: "s-1".into(),
            },
        ] {
            self.execute(order, command).await;
        }
        self.last_event(order).await
    }

    async fn cancel(&self, order: Uuid) -> Uuid {
        let command = OrderCommand::Cancel {
            reason: Reason::parse("changed my mind").unwrap(),
            by: domain::order::CancelledBy::Customer,
        };
        self.execute(order, command).await;
        self.last_event(order).await
    }

    async fn execute(&self, order: Uuid, command: OrderCommand) {
        let meta = event_store::Metadata {
            correlation_id: order,
            causation_id: Uuid::now_v7(),
            actor: "test".into(),
            traceparent: None,
            command_id: None,
        };
        let mut tx = self.api.db.pool.begin().await.unwrap();
        orders::execute(&mut tx, OrderId(order), command, &meta)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    async fn last_event(&self, order: Uuid) -> Uuid {
        sqlx::query_scalar(
            "SELECT event_id FROM events WHERE stream_id = $1 ORDER BY stream_version DESC LIMIT 1",
        )
        .bind(order)
        .fetch_one(&self.api.db.pool)
        .await
        .unwrap()
    }

    /// Waits (at most 60 s) until the group handled `n` events; returns their outcomes.
    async fn handled(&self, n: usize) -> Vec<(Uuid, String, Option<String>)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let rows: Vec<(Uuid, String, Option<String>)> = sqlx::query_as(
                "SELECT event_id, outcome, error FROM email_inbox ORDER BY handled_at",
            )
            .fetch_all(&self.api.db.pool)
            .await
            .unwrap();
            if rows.len() >= n {
                return rows;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "email group stuck at {rows:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the group's checkpoints cover every message in the topic.
    async fn caught_up(&self) {
        let w = read_side::status::Watermarks::new(&self.kafka.brokers, &self.topic).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let published: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM outbox WHERE destination = 'kafka' AND published_at IS NULL",
            )
            .fetch_one(&self.api.db.pool)
            .await
            .unwrap();
            let marks = w.fetch().await.unwrap();
            let at: Vec<(i32, i64)> = sqlx::query_as(
                "SELECT partition, next_offset FROM projection_checkpoints WHERE projection = 'email'",
            )
            .fetch_all(&self.api.db.pool)
            .await
            .unwrap();
            let behind = marks
                .iter()
                .any(|(p, (_, high))| at.iter().find(|c| c.0 == *p).map_or(0, |c| c.1) < *high);
            if published == 0 && !behind {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "email group behind the topic"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Undoes quoted-printable (what lettre chooses for a body with `=`): soft line breaks and
/// `=XX` escapes.
fn unquote(text: &str) -> String {
    let text = text.replace("=\r\n", "").replace("=\n", "");
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'=', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The emails the SMTP server delivered to `to`: (Message-ID, Subject, whole text).
pub(crate) fn mailbox(to: &str) -> Vec<(String, String, String)> {
    let dir = std::env::var("SMTP_MAILDIR").expect("SMTP_MAILDIR (source scripts/lib.sh)");
    let mut out = Vec::new();
    for sub in ["new", "cur"] {
        let Ok(entries) = std::fs::read_dir(format!("{dir}/{sub}")) else {
            continue;
        };
        for e in entries.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let header = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            if header("To:").contains(to) {
                out.push((header("Message-ID:"), header("Subject:"), unquote(&text)));
            }
        }
    }
    out.sort();
    out
}

/// Waits until `to` has `n` emails (at most 30 s: delivery is asynchronous in the server).
pub(crate) async fn wait_mail(to: &str, n: usize) -> Vec<(String, String, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mails = mailbox(to);
        if mails.len() >= n {
            return mails;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{to} got {} of {n} emails",
            mails.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_outcomes_are_emailed_once_each_with_the_event_id_as_message_id() {
    let mut stack = EmailStack::start().await;
    stack.start_group(&stack.kafka.prefix.clone()).await;
    let alice = stack.address("alice");
    stack.profile("alice", &alice).await;
    let (a, b) = (stack.place("alice").await, stack.place("alice").await);
    let confirmed = stack.confirm(a).await;
    let cancelled = stack.cancel(b).await;
    // Bob has no profile: nothing to send, recorded as such.
    let c = stack.place("bob").await;
    let no_address = stack.confirm(c).await;
    let handled = stack.handled(3).await;
    let outcome = |id: Uuid| handled.iter().find(|h| h.0 == id).map(|h| h.1.clone());
    assert_eq!(outcome(confirmed).as_deref(), Some("sent"), "{handled:?}");
    assert_eq!(outcome(cancelled).as_deref(), Some("sent"));
    assert_eq!(outcome(no_address).as_deref(), Some("no_address"));

    let mails = wait_mail(&alice, 2).await;
    let by_id = |id: Uuid| {
        mails
            .iter()
            .find(|m| m.0 == format!("<{id}@shop>"))
            .unwrap_or_else(|| panic!("no email with Message-ID <{id}@shop>: {mails:?}"))
    };
    let (_, subject, text) = by_id(confirmed);
    assert_eq!(subject, &format!("Your order {a} is confirmed"));
    for part in [
        "Hello Ada Lovelace",
        "2 x SKU-1 at 12.50 = 25.00 EUR",
        "1 x SKU-2 at 4.99 = 4.99 EUR",
        "Total: 29.99 EUR",
    ] {
        assert!(text.contains(part), "{part:?} missing from:\n{text}");
    }
    let (_, subject, text) = by_id(cancelled);
    assert_eq!(subject, &format!("Your order {b} was cancelled"));
    assert!(text.contains("cancelled: changed my mind"), "{text}");

    // A reset of the group (its checkpoints back to 0, a new Kafka group reading from the
    // first offset) redelivers every event: the inbox sends none again.
    stack.stop_group().await;
    sqlx::query("UPDATE projection_checkpoints SET next_offset = 0 WHERE projection = 'email'")
        .execute(&stack.api.db.pool)
        .await
        .unwrap();
    stack
        .start_group(&format!("{}reset.", stack.kafka.prefix))
        .await;
    stack.caught_up().await;
    assert_eq!(stack.handled(3).await.len(), 3);
    assert_eq!(mailbox(&alice).len(), 2, "an email was sent again");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_address_or_an_unusable_event_is_recorded_dead_and_the_group_moves_on() {
    let mut stack = EmailStack::start().await;
    stack.start_group(&stack.kafka.prefix.clone()).await;
    // The server refuses `bounce*` recipients with 550, as it would an unknown mailbox.
    let (bounce, carol) = (stack.address("bounce-dora"), stack.address("carol"));
    stack.profile("dora", &bounce).await;
    stack.profile("carol", &carol).await;
    let d = stack.place("dora").await;
    let dead = stack.confirm(d).await;
    // A confirmation of an order the store does not hold (a poison message) cannot be
    // written: recorded as dead, and it does not hold the group.
    let (ghost_event, ghost_order) = (Uuid::now_v7(), Uuid::now_v7());
    let ghost = json!({
        "event_id": ghost_event, "event_type": "OrderConfirmed", "schema_version": 1,
        "stream_id": ghost_order, "stream_type": "order", "stream_version": 4,
        "recorded_at": "2026-12-04T10:00:00.000000Z", "metadata": {},
        "payload": {"order_id": ghost_order, "shipment_id": "s-1", "total_minor": 100, "currency": "EUR"}
    });
    platform::kafka::producer(&stack.kafka.brokers)
        .unwrap()
        .send(
            rdkafka::producer::FutureRecord::to(&stack.topic)
                .key(&ghost_order.to_string())
                .payload(&ghost.to_string()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let c = stack.place("carol").await;
    let sent = stack.confirm(c).await;
    let handled = stack.handled(3).await;
    let (_, outcome, error) = handled
        .iter()
        .find(|h| h.0 == ghost_event)
        .cloned()
        .unwrap();
    assert_eq!(outcome, "dead");
    assert!(error.unwrap_or_default().contains("has no events"));
    let row = |id: Uuid| handled.iter().find(|h| h.0 == id).cloned().unwrap();
    let (_, outcome, error) = row(dead);
    assert_eq!(outcome, "dead");
    assert!(error.as_deref().unwrap_or("").contains("550"), "{error:?}");
    assert_eq!(row(sent).1, "sent");
    wait_mail(&carol, 1).await;
    assert!(mailbox(&bounce).is_empty());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploying_the_group_onto_a_system_with_history_emails_nobody_about_the_past() {
    let mut stack = EmailStack::start().await;
    let erin = stack.address("erin");
    stack.profile("erin", &erin).await;
    let old = stack.place("erin").await;
    stack.confirm(old).await;
    // The history is on the topic before the group's first start.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let w = read_side::status::Watermarks::new(&stack.kafka.brokers, &stack.topic).unwrap();
        let on_topic: i64 = w.fetch().await.unwrap().values().map(|(l, h)| h - l).sum();
        if on_topic >= 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history never reached the topic"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.start_group(&stack.kafka.prefix.clone()).await;
    let new = stack.place("erin").await;
    let confirmed = stack.confirm(new).await;
    let handled = stack.handled(1).await;
    assert_eq!(handled.iter().map(|h| h.0).collect::<Vec<_>>(), [confirmed]);
    let mails = wait_mail(&erin, 1).await;
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert_eq!(mails[0].0, format!("<{confirmed}@shop>"));
    stack.stop().await;
}

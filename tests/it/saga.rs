//! The checkout saga on the real services: command API -> event store -> orchestrator ->
//! outbox -> relay -> RabbitMQ -> participants -> replies -> orchestrator -> order events.

use std::time::Duration;

use domain::values::Sku;
use lapin::{BasicProperties, options::BasicPublishOptions};
use outbox_relay::{Relay, RelayConfig};
use platform::config::InfraConfig;
use saga::{
    SagaConfig,
    dead_letters::{CorrectionError, Resolution, ResolveError},
    participants,
    topology::Names,
};
use serde_json::{Value, json};
use shop_tests::{Gql, TestApi, TestKafka, TestRabbit, checkout_body};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct SagaStack {
    api: TestApi,
    rabbit: TestRabbit,
    gql: Gql,
    /// Deletes the per-test topic when dropped.
    _kafka: TestKafka,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// Stops only the saga runtime (see `restart_saga`).
    saga_stop: CancellationToken,
    /// The retry queues' delays, to delete them at the end.
    retry_delays: Vec<Duration>,
}

impl SagaStack {
    async fn start(config: SagaConfig) -> Self {
        Self::start_on(TestApi::new().await, config).await
    }

    /// The stack over an API (and database) prepared by the test.
    async fn start_on(api: TestApi, config: SagaConfig) -> Self {
        let rabbit = TestRabbit::new().await;
        // Test stacks may inject faults (tok_flaky_N, tok_slow, the switches).
        let config = SagaConfig {
            queue_prefix: rabbit.prefix.clone(),
            fault_injection: true,
            ..config
        };
        let pool = api.db.pool.clone();
        let retry_delays = config.retry_delays();
        // Declared up front (the runtime declares them too) so the test can watch them at once.
        saga::topology::declare(
            &rabbit.conn,
            &Names::new(&config.queue_prefix),
            &config.retry_delays(),
        )
        .await
        .unwrap();
        for (sku, qty) in [("SKU-1", 10), ("SKU-2", 10)] {
            participants::set_stock(&pool, &Sku::parse(sku).unwrap(), qty)
                .await
                .unwrap();
        }
        // Kafka rows (order events) go to a per-test topic that nobody reads here.
        let mut kafka = TestKafka::new().await;
        let topic = kafka.create_topics(&["orders.events"], 1).await.remove(0);
        let infra = InfraConfig {
            kafka_topic_prefix: kafka.prefix.clone(),
            ..shop_tests::infra()
        };
        let shutdown = CancellationToken::new();
        let relay_cfg = RelayConfig {
            poll_interval: Duration::from_millis(100),
            ..RelayConfig::default()
        };
        let relay = Relay::new(pool.clone(), &infra, relay_cfg).unwrap();
        let saga_stop = shutdown.child_token();
        let tasks = vec![
            tokio::spawn(outbox_relay::run(
                relay,
                api.db.url.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(saga::run(
                pool,
                rabbit.url.clone(),
                config,
                shop_tests::test_vault(),
                saga_stop.clone(),
            )),
        ];
        // The read side too, so outcomes can be checked where customers see them.
        let projector = read_side::consumer::Projector::order_summary(
            api.db.pool.clone(),
            &kafka.brokers,
            &topic,
            &kafka.prefix,
        )
        .unwrap();
        let mut tasks = tasks;
        tasks.insert(0, tokio::spawn(projector.run(shutdown.clone())));
        let gql = Gql::serve(
            read_side::graphql::router(api.db.pool.clone(), api.auth.clone()),
            shutdown.clone(),
        )
        .await;
        Self {
            api,
            rabbit,
            gql,
            _kafka: kafka,
            shutdown,
            tasks,
            saga_stop,
            retry_delays,
        }
    }

    /// Stops the saga runtime (gracefully) and starts it again with `config`.
    async fn restart_saga(&mut self, config: SagaConfig) {
        self.stop_saga().await;
        self.start_saga(config);
    }

    /// Stops the saga runtime (gracefully); [`Self::start_saga`] starts it again.
    async fn stop_saga(&mut self) {
        self.saga_stop.cancel();
        self.tasks.pop().unwrap().await.unwrap().unwrap();
    }

    fn start_saga(&mut self, config: SagaConfig) {
        self.saga_stop = self.shutdown.child_token();
        let config = SagaConfig {
            queue_prefix: self.rabbit.prefix.clone(),
            fault_injection: true,
            ..config
        };
        self.tasks.push(tokio::spawn(saga::run(
            self.api.db.pool.clone(),
            self.rabbit.url.clone(),
            config,
            shop_tests::test_vault(),
            self.saga_stop.clone(),
        )));
    }

    fn pool(&self) -> &PgPool {
        &self.api.db.pool
    }

    async fn checkout(&self, body: Value) -> Uuid {
        let token = self.api.customer("alice");
        let r = self
            .api
            .post("/orders", &token, &Uuid::new_v4().to_string(), &body)
            .await;
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.unwrap();
        v["order_id"].as_str().unwrap().parse().unwrap()
    }

    /// A checkout sent with a W3C `traceparent` header; returns the order id.
    async fn checkout_traced(&self, traceparent: &str, body: Value) -> Uuid {
        let r = reqwest::Client::new()
            .post(format!("{}/orders", self.api.base))
            .bearer_auth(self.api.customer("alice"))
            .header("Idempotency-Key", Uuid::new_v4().to_string())
            .header("traceparent", traceparent)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        r.json::<Value>().await.unwrap()["order_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Waits (at most 60 s) until the order's last event is terminal; returns its type and
    /// the cancellation reason.
    async fn outcome(&self, order: Uuid) -> (String, Option<String>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let last: Option<(String, Value)> = sqlx::query_as(
                "SELECT event_type, payload FROM events WHERE stream_id = $1 ORDER BY stream_version DESC LIMIT 1",
            )
            .bind(order)
            .fetch_optional(self.pool())
            .await
            .unwrap();
            if let Some((t, p)) = last
                && (t == "OrderConfirmed" || t == "OrderCancelled")
            {
                return (t, p["reason"].as_str().map(str::to_owned));
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "order {order} never finished"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn reserved(&self, sku: &str) -> i64 {
        sqlx::query_scalar("SELECT reserved FROM inventory_stock WHERE sku = $1")
            .bind(sku)
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    async fn payment(&self, order: Uuid) -> Option<String> {
        sqlx::query_scalar("SELECT status FROM payments WHERE order_id = $1")
            .bind(order)
            .fetch_optional(self.pool())
            .await
            .unwrap()
    }

    /// Waits until `check` holds (at most 60 s): compensations land after the order's end.
    async fn eventually<F, Fut>(&self, what: &str, check: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !check().await {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The decisions the order's saga recorded, as `event_type` or `event_type:kind` for
    /// a failed step.
    async fn saga_decisions(&self, order: Uuid) -> Vec<String> {
        let saga = saga::orchestrator::saga_stream_id(domain::values::OrderId(order));
        sqlx::query_scalar(
            "SELECT event_type || COALESCE(':' || (payload->>'step'), '') || COALESCE(':' || (payload->>'kind'), '')
             FROM events WHERE stream_id = $1 ORDER BY stream_version",
        )
        .bind(saga)
        .fetch_all(self.pool())
        .await
        .unwrap()
    }

    /// Publishes `body` to the replies queue as message `id` answering command `causation`
    /// (confirmed).
    async fn publish_reply(
        &self,
        ch: &lapin::Channel,
        body: &[u8],
        id: Uuid,
        causation: Option<Uuid>,
    ) {
        let key = Names::new(&self.rabbit.prefix).routing_key("replies");
        // As the relay sends it: the correlation id is the order's.
        let order = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["order_id"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let mut headers = lapin::types::FieldTable::default();
        if let Some(c) = causation {
            headers.insert(
                "causation_id".into(),
                lapin::types::AMQPValue::LongString(c.to_string().into()),
            );
        }
        ch.basic_publish(
            platform::amqp::COMMANDS_EXCHANGE.into(),
            key.as_str().into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_message_id(id.to_string().into())
                .with_correlation_id(order.into())
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    /// The message id of the last `step` command the saga sent for `order`.
    async fn command_sent(&self, order: Uuid, step: &str) -> Uuid {
        sqlx::query_scalar(
            "SELECT message_id FROM saga_commands WHERE order_id = $1 AND step = $2
             ORDER BY sent_at DESC LIMIT 1",
        )
        .bind(order)
        .bind(step)
        .fetch_one(self.pool())
        .await
        .unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            t.await.unwrap().unwrap();
        }
        let names = Names::new(&self.rabbit.prefix);
        let queues = names.all_queues(&self.retry_delays);
        self.rabbit.delete_queues(&queues).await;
    }
}

fn body(token: &str, sku2_quantity: i64) -> Value {
    let mut b = checkout_body();
    b["payment_token"] = json!(token);
    b["items"][1]["quantity"] = json!(sku2_quantity);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkouts_confirm_or_cancel_with_compensation_and_exact_stock() {
    let stack = SagaStack::start(SagaConfig {
        retry_base: Duration::from_millis(50),
        // One reply at a time, so the duplicate below is handled before its marker.
        concurrency: 1,
        ..SagaConfig::default()
    })
    .await;

    // Happy path: reserved, authorized, shipped, confirmed.
    let ok = stack.checkout(body("tok_visa", 1)).await;
    assert_eq!(stack.outcome(ok).await, ("OrderConfirmed".into(), None));
    assert_eq!(
        (stack.reserved("SKU-1").await, stack.reserved("SKU-2").await),
        (2, 1)
    );
    assert_eq!(stack.payment(ok).await.as_deref(), Some("authorized"));
    assert_eq!(
        stack.saga_decisions(ok).await,
        [
            "SagaStarted",
            "SagaStepRequested:inventory",
            "SagaStepSucceeded:inventory",
            "SagaStepRequested:payment",
            "SagaStepSucceeded:payment",
            "SagaStepRequested:shipment",
            "SagaStepSucceeded:shipment",
            "SagaCompleted",
        ]
    );
    // Visible as confirmed in GraphQL, with every step in its progress.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let progress = loop {
        let r = stack
            .gql
            .query(
                Some(&stack.api.customer("alice")),
                "query($id: ID!) { order(id: $id) { status timeline { status } }
                   checkoutProgress(orderId: $id) { inventoryReserved paymentAuthorized shipmentCreated confirmed } }",
                json!({"id": ok}),
            )
            .await;
        if r["data"]["order"]["status"] == "CONFIRMED" {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never CONFIRMED in GraphQL: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        progress["data"]["order"]["timeline"],
        json!([{"status": "PENDING"}, {"status": "INVENTORY_RESERVED"}, {"status": "PAYMENT_AUTHORIZED"}, {"status": "CONFIRMED"}])
    );
    assert_eq!(
        progress["data"]["checkoutProgress"],
        json!({"inventoryReserved": true, "paymentAuthorized": true, "shipmentCreated": true, "confirmed": true})
    );
    let order_events: Vec<String> = sqlx::query_scalar(
        "SELECT event_type FROM events WHERE stream_id = $1 ORDER BY stream_version",
    )
    .bind(ok)
    .fetch_all(stack.pool())
    .await
    .unwrap();
    assert_eq!(
        order_events,
        [
            "OrderPlaced",
            "InventoryReserved",
            "PaymentAuthorized",
            "OrderConfirmed"
        ]
    );

    // The trace context of the checkout request follows the saga's messages and events.
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = stack.checkout_traced(trace, body("tok_visa", 1)).await;
    assert_eq!(stack.outcome(traced).await.0, "OrderConfirmed");
    let traces: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT metadata->>'traceparent' FROM events WHERE stream_id = $1 OR stream_id = $2",
    )
    .bind(traced)
    .bind(saga::orchestrator::saga_stream_id(domain::values::OrderId(
        traced,
    )))
    .fetch_all(stack.pool())
    .await
    .unwrap();
    assert_eq!(traces.len(), 12, "4 order events and 8 saga decisions");
    assert!(
        traces.iter().all(|t| t.as_deref() == Some(trace)),
        "{traces:?}"
    );
    let command_traces: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT headers->>'traceparent' FROM outbox WHERE destination = 'amqp' AND ordering_key = $1",
    )
    .bind(traced.to_string())
    .fetch_all(stack.pool())
    .await
    .unwrap();
    assert_eq!(command_traces.len(), 6, "3 commands and 3 replies");
    assert!(
        command_traces.iter().all(|t| t.as_deref() == Some(trace)),
        "{command_traces:?}"
    );
    assert_eq!(
        (stack.reserved("SKU-1").await, stack.reserved("SKU-2").await),
        (4, 2)
    );

    // Out of stock (8 of SKU-2 left, 20 asked): cancelled, nothing reserved for it.
    let short = stack.checkout(body("tok_visa", 20)).await;
    let (t, reason) = stack.outcome(short).await;
    assert_eq!(t, "OrderCancelled");
    assert!(
        reason.as_deref().unwrap().contains("SKU-2 out of stock"),
        "{reason:?}"
    );
    assert_eq!(
        (stack.reserved("SKU-1").await, stack.reserved("SKU-2").await),
        (4, 2)
    );
    assert_eq!(stack.payment(short).await, None);

    // Declined: cancelled, and the reservation released.
    let declined = stack.checkout(body("tok_decline", 1)).await;
    let (t, reason) = stack.outcome(declined).await;
    assert_eq!(
        (t.as_str(), reason.as_deref()),
        ("OrderCancelled", Some("payment declined: card declined"))
    );
    stack
        .eventually("the declined order's stock is released", || async {
            (stack.reserved("SKU-1").await, stack.reserved("SKU-2").await) == (4, 2)
        })
        .await;
    // The saga's stream says why it compensated, and what it undid.
    assert_eq!(
        stack.saga_decisions(declined).await,
        [
            "SagaStarted",
            "SagaStepRequested:inventory",
            "SagaStepSucceeded:inventory",
            "SagaStepRequested:payment",
            "SagaStepFailed:payment:refused",
            "SagaCompensationStarted",
        ]
    );
    let compensation: Value = sqlx::query_scalar(
        "SELECT payload FROM events WHERE stream_id = $1 AND event_type = 'SagaCompensationStarted'",
    )
    .bind(saga::orchestrator::saga_stream_id(domain::values::OrderId(declined)))
    .fetch_one(stack.pool())
    .await
    .unwrap();
    assert_eq!(
        (
            &compensation["reason"],
            &compensation["release_inventory"],
            &compensation["void_payment"]
        ),
        (
            &json!("payment declined: card declined"),
            &json!(true),
            &json!(false)
        )
    );

    // Transient failures: retried with backoff, then confirmed.
    let flaky = stack.checkout(body("tok_flaky_2", 1)).await;
    assert_eq!(stack.outcome(flaky).await.0, "OrderConfirmed");
    assert_eq!(
        (stack.reserved("SKU-1").await, stack.reserved("SKU-2").await),
        (6, 3)
    );

    // A duplicate reply (same message id, same headers) changes nothing.
    let (reply_id, payload, causation): (Uuid, Vec<u8>, Option<String>) = sqlx::query_as(
        "SELECT message_id, payload, headers->>'causation_id' FROM outbox
         WHERE destination = 'amqp' AND routing_key = $1
         AND convert_from(payload, 'UTF8')::jsonb->>'order_id' = $2 ORDER BY id DESC LIMIT 1",
    )
    .bind(Names::new(&stack.rabbit.prefix).routing_key("replies"))
    .bind(ok.to_string())
    .fetch_one(stack.pool())
    .await
    .unwrap();
    let before = stack.saga_decisions(ok).await;
    let ch = platform::amqp::confirm_channel(&stack.rabbit.conn)
        .await
        .unwrap();
    let causation = causation.map(|c| Uuid::parse_str(&c).unwrap());
    stack
        .publish_reply(&ch, &payload, reply_id, causation)
        .await;
    // A marker behind it on the same queue: once the marker is handled, so is the duplicate
    // (one message at a time, in order). It is a fresh message with a reply the saga ignores.
    let marker = Uuid::now_v7();
    let marker_body = serde_json::to_vec(&json!({
        "order_id": flaky, "input": {"type": "shipment_created", "shipment_id": "again"}
    }))
    .unwrap();
    let shipment_command = stack.command_sent(flaky, "shipment").await;
    stack
        .publish_reply(&ch, &marker_body, marker, Some(shipment_command))
        .await;
    stack
        .eventually("the marker is handled", || async {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM saga_inbox WHERE message_id = $1")
                    .bind(marker)
                    .fetch_one(stack.pool())
                    .await
                    .unwrap();
            n == 1
        })
        .await;
    assert_eq!(stack.saga_decisions(ok).await, before);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_past_its_deadline_is_resent_then_compensated() {
    let stack = SagaStack::start(SagaConfig {
        step_timeout: Duration::from_millis(800),
        step_attempts: 2,
        retry_base: Duration::from_millis(50),
        ..SagaConfig::default()
    })
    .await;
    let slow = stack.checkout(body("tok_slow", 1)).await;
    let (t, reason) = stack.outcome(slow).await;
    assert_eq!(t, "OrderCancelled");
    assert_eq!(
        reason.as_deref(),
        Some("payment step timed out after 2 attempts")
    );
    // The late authorization is voided and the stock released.
    stack
        .eventually("the late payment is voided", || async {
            stack.payment(slow).await.as_deref() == Some("voided")
        })
        .await;
    stack
        .eventually("the stock is released", || async {
            (stack.reserved("SKU-1").await, stack.reserved("SKU-2").await) == (0, 0)
        })
        .await;
    let decisions = stack.saga_decisions(slow).await;
    assert_eq!(
        decisions
            .iter()
            .filter(|i| *i == "SagaStepFailed:payment:timed_out")
            .count(),
        2,
        "{decisions:?}"
    );
    // After the second timeout it gives up; the authorization that arrives late is voided.
    let gave_up = decisions
        .iter()
        .position(|d| d == "SagaCompensationStarted")
        .expect("compensated");
    assert!(
        decisions[gave_up + 1..]
            .iter()
            .all(|d| d == "SagaLateReplyCompensated:payment"),
        "{decisions:?}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_reply_goes_to_the_dead_letter_queue_with_its_envelope() {
    let stack = SagaStack::start(SagaConfig {
        poison_replies_from: Some("shipping".into()),
        ..SagaConfig::default()
    })
    .await;
    let order = stack.checkout(body("tok_visa", 1)).await;
    let names = Names::new(&stack.rabbit.prefix);
    let ch = platform::amqp::consumer_channel(&stack.rabbit.conn, 10)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let dead = loop {
        let got = ch
            .basic_get(
                names.dead_letter_queue("replies").as_str().into(),
                Default::default(),
            )
            .await
            .unwrap();
        if let Some(m) = got {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let headers = dead.delivery.properties.headers().clone().unwrap();
    let header = |k: &str| match headers.inner().get(k) {
        Some(lapin::types::AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(header("error_class"), "malformed_reply");
    assert_eq!(header("original_queue"), names.queue("replies"));
    assert_eq!(header("original_routing_key"), names.routing_key("replies"));
    assert_eq!(header("attempts"), "1");
    assert!(!header("first_failure").is_empty() && !header("last_failure").is_empty());
    // The saga waits at the shipment step (its deadline would re-send it).
    assert_eq!(
        stack.saga_decisions(order).await,
        [
            "SagaStarted",
            "SagaStepRequested:inventory",
            "SagaStepSucceeded:inventory",
            "SagaStepRequested:payment",
            "SagaStepSucceeded:payment",
            "SagaStepRequested:shipment",
        ]
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_checkouts_with_failures_all_end_with_exact_stock() {
    let stack = SagaStack::start(SagaConfig {
        retry_base: Duration::from_millis(20),
        ..SagaConfig::default()
    })
    .await;
    // Less stock than demand, so some orders run out.
    participants::set_stock(stack.pool(), &Sku::parse("SKU-1").unwrap(), 600)
        .await
        .unwrap();
    participants::set_stock(stack.pool(), &Sku::parse("SKU-2").unwrap(), 400)
        .await
        .unwrap();
    let tokens = ["tok_visa", "tok_visa", "tok_decline", "tok_flaky_1"];
    let mut placing = Vec::new();
    for i in 0..500usize {
        let token = tokens[i % tokens.len()];
        let sku2 = 1 + (i % 3) as i64;
        let request = stack.api.post(
            "/orders",
            &stack.api.customer(&format!("c-{}", i % 17)),
            &format!("bulk-{i}"),
            &body(token, sku2),
        );
        placing.push(tokio::spawn(async move {
            let r = request.await;
            assert_eq!(r.status(), 202);
            let v: Value = r.json().await.unwrap();
            (
                v["order_id"].as_str().unwrap().parse::<Uuid>().unwrap(),
                sku2,
            )
        }));
    }
    let mut orders = Vec::new();
    for p in placing {
        orders.push(p.await.unwrap());
    }
    let (mut sku1, mut sku2, mut confirmed) = (0, 0, 0);
    for (order, q2) in &orders {
        if stack.outcome(*order).await.0 == "OrderConfirmed" {
            confirmed += 1;
            sku1 += 2; // every order has 2 x SKU-1
            sku2 += q2;
            assert_eq!(stack.payment(*order).await.as_deref(), Some("authorized"));
        }
    }
    assert!(confirmed > 0 && confirmed < 500, "{confirmed} confirmed");
    // Compensations may still be in flight after the last order ended.
    stack
        .eventually("held stock equals the confirmed orders' lines", || async {
            (stack.reserved("SKU-1").await, stack.reserved("SKU-2").await) == (sku1, sku2)
        })
        .await;
    let (held, authorized): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM inventory_reservations WHERE status = 'held'),
                (SELECT count(*) FROM payments WHERE status = 'authorized')",
    )
    .fetch_one(stack.pool())
    .await
    .unwrap();
    assert_eq!((held, authorized), (confirmed, confirmed));
    stack.stop().await;
}

/// Whoever can publish to the replies queue cannot move a saga: a reply must answer a
/// command the orchestrator sent, for the same order and step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_that_answer_no_command_of_ours_are_dead_lettered_with_the_reason() {
    let stack = SagaStack::start(SagaConfig {
        step_timeout: Duration::from_secs(600),
        ..SagaConfig::default()
    })
    .await;
    // Out of stock: the saga ends compensated, with the inventory step answered.
    let victim = stack.checkout(body("tok_visa", 1000)).await;
    assert_eq!(stack.outcome(victim).await.0, "OrderCancelled");
    let other = stack.checkout(body("tok_visa", 1)).await;
    assert_eq!(stack.outcome(other).await.0, "OrderConfirmed");
    let before = stack.saga_decisions(victim).await;
    let inventory_of_victim = stack.command_sent(victim, "inventory").await;
    let payment_of_other = stack.command_sent(other, "payment").await;
    let ch = platform::amqp::confirm_channel(&stack.rabbit.conn)
        .await
        .unwrap();
    let forged =
        |input: Value| serde_json::to_vec(&json!({"order_id": victim, "input": input})).unwrap();
    let reserved = forged(json!({"type": "inventory_reserved", "reservation_id": "forged"}));
    let authorized = forged(json!({"type": "payment_authorized", "authorization_id": "forged"}));
    let cases = [
        (reserved.clone(), None, "names no command"),
        (reserved, Some(Uuid::now_v7()), "was not sent by this saga"),
        (authorized.clone(), Some(payment_of_other), "of order"),
        (authorized, Some(inventory_of_victim), "asked inventory"),
    ];
    let names = Names::new(&stack.rabbit.prefix);
    for (body, causation, _) in &cases {
        stack
            .publish_reply(&ch, body, Uuid::now_v7(), *causation)
            .await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let dead = loop {
        let all = saga::dead_letters::list(&stack.rabbit.conn, &names)
            .await
            .unwrap();
        if all.len() >= cases.len() {
            break all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dead-lettered: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dead.len(), cases.len(), "{dead:?}");
    for (_, _, why) in &cases {
        assert!(
            dead.iter()
                .any(|d| d.queue == names.dead_letter_queue("replies")
                    && d.error_class == "unexpected_reply"
                    && d.error_message.contains(why)),
            "{why}: {dead:?}"
        );
    }
    assert_eq!(stack.saga_decisions(victim).await, before, "the saga moved");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_command_is_dead_lettered_and_replaying_it_after_the_fix_completes_the_saga() {
    let mut stack = SagaStack::start(SagaConfig {
        refuse_commands_at: Some("shipping".into()),
        ..SagaConfig::default()
    })
    .await;
    let order = stack.checkout(body("tok_visa", 1)).await;
    let names = Names::new(&stack.rabbit.prefix);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let dead = loop {
        let all = saga::dead_letters::list(&stack.rabbit.conn, &names)
            .await
            .unwrap();
        if let Some(d) = all.into_iter().next() {
            break d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dead.queue, names.dead_letter_queue("shipping"));
    assert_eq!(dead.error_class, "refused");
    assert_eq!(dead.original_routing_key, names.routing_key("shipping"));
    // Listing put it back.
    assert_eq!(
        saga::dead_letters::list(&stack.rabbit.conn, &names)
            .await
            .unwrap()
            .len(),
        1
    );

    // The fix: shipping accepts commands again. Replay the dead letter: the saga completes.
    stack.restart_saga(SagaConfig::default()).await;
    let id = dead.message_id.expect("a message id");
    saga::dead_letters::resolve(&stack.rabbit.conn, &names, id, &Resolution::Replay)
        .await
        .unwrap();
    assert_eq!(stack.outcome(order).await.0, "OrderConfirmed");
    assert!(
        saga::dead_letters::list(&stack.rabbit.conn, &names)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        saga::dead_letters::resolve(&stack.rabbit.conn, &names, id, &Resolution::Discard).await,
        Err(saga::dead_letters::ResolveError::NotFound(_))
    ));
    stack.stop().await;
}

/// A participant's reply the orchestrator cannot read is dead-lettered; an operator's
/// correction, replayed, moves the saga: the replay keeps the reply's `causation_id` (the
/// command it answers). A correction about another order is refused and the letter stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_reply_corrected_and_replayed_completes_the_saga() {
    let stack = SagaStack::start(SagaConfig {
        refuse_commands_at: Some("shipping".into()),
        step_timeout: Duration::from_secs(600),
        ..SagaConfig::default()
    })
    .await;
    let order = stack.checkout(body("tok_visa", 1)).await;
    let names = Names::new(&stack.rabbit.prefix);
    let dead = || async {
        saga::dead_letters::list(&stack.rabbit.conn, &names)
            .await
            .unwrap()
    };
    stack
        .eventually("the shipping command refused, the saga waiting", || async {
            dead().await.iter().any(|d| d.error_class == "refused")
        })
        .await;
    let shipment = stack.command_sent(order, "shipment").await;
    let reply = |order: Uuid, field: &str| {
        serde_json::to_vec(&json!({"order_id": order,
            "input": {"type": "shipment_created", field: "shipped-by-hand"}}))
        .unwrap()
    };
    let ch = platform::amqp::confirm_channel(&stack.rabbit.conn)
        .await
        .unwrap();
    let id = Uuid::now_v7();
    stack
        .publish_reply(&ch, &reply(order, "shipment"), id, Some(shipment))
        .await;
    stack
        .eventually("the malformed reply dead-lettered", || async {
            dead().await.iter().any(|d| {
                d.message_id == Some(id)
                    && d.error_class == "malformed_reply"
                    && d.queue == names.dead_letter_queue("replies")
            })
        })
        .await;

    let elsewhere = Uuid::now_v7();
    let refused = saga::dead_letters::resolve(
        &stack.rabbit.conn,
        &names,
        id,
        &Resolution::ReplayCorrected(reply(elsewhere, "shipment_id")),
    )
    .await;
    assert!(
        matches!(
            refused,
            Err(ResolveError::Correction(CorrectionError::OtherOrder { corrected, .. })) if corrected == elsewhere
        ),
        "{refused:?}"
    );
    assert!(
        dead().await.iter().any(|d| d.message_id == Some(id)),
        "a refused correction leaves the dead letter where it was"
    );

    saga::dead_letters::resolve(
        &stack.rabbit.conn,
        &names,
        id,
        &Resolution::ReplayCorrected(reply(order, "shipment_id")),
    )
    .await
    .unwrap();
    assert_eq!(stack.outcome(order).await.0, "OrderConfirmed");
    assert!(
        dead().await.iter().all(|d| d.message_id != Some(id)),
        "the corrected reply was taken"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_failing_transiently_past_its_retries_is_dead_lettered_and_compensated() {
    let stack = SagaStack::start(SagaConfig {
        max_deliveries: 3,
        retry_base: Duration::from_millis(50),
        step_timeout: Duration::from_secs(2),
        step_attempts: 1,
        ..SagaConfig::default()
    })
    .await;
    let order = stack.checkout(body("tok_flaky_9", 1)).await;
    let (t, reason) = stack.outcome(order).await;
    assert_eq!(
        (t.as_str(), reason.as_deref()),
        (
            "OrderCancelled",
            Some("payment step timed out after 1 attempts")
        )
    );
    let names = Names::new(&stack.rabbit.prefix);
    let dead = saga::dead_letters::list(&stack.rabbit.conn, &names)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].queue, names.dead_letter_queue("payment"));
    assert_eq!(
        (dead[0].error_class.as_str(), dead[0].attempts.as_str()),
        ("transient", "3")
    );
    assert_eq!(dead[0].original_routing_key, names.routing_key("payment"));
    assert!(dead[0].first_failure.is_some() && dead[0].first_failure <= dead[0].last_failure);
    stack
        .eventually("the stock is released", || async {
            (stack.reserved("SKU-1").await, stack.reserved("SKU-2").await) == (0, 0)
        })
        .await;
    assert_eq!(stack.payment(order).await, None);
    stack.stop().await;
}

/// Sagas recorded before decisions were (streams of `SagaInputRecorded`) still load, and
/// carry on by recording decisions after their inputs.
#[tokio::test]
async fn a_saga_recorded_as_inputs_loads_and_carries_on_with_decisions() {
    use domain::{
        personal::{Payment, Protected},
        saga::{Phase, SagaInput, SagaOrder, Step},
        values::{Currency, MinorUnits, OrderId, PaymentToken, Quantity, ShippingAddress},
    };
    let db = shop_tests::TestDb::new().await;
    let order_id = OrderId(Uuid::now_v7());
    let order = SagaOrder {
        order_id,
        lines: vec![(Sku::parse("SKU-1").unwrap(), Quantity::parse(1).unwrap())],
        amount_minor: MinorUnits::parse(500).unwrap(),
        currency: Currency::parse("EUR").unwrap(),
        payment: Payment::LegacyToken(PaymentToken::parse("tok_visa").unwrap()),
        shipping_address: Protected::Clear(
            ShippingAddress::parse("A", "B", "C", "D", "DE").unwrap(),
        ),
    };
    let meta = event_store::Metadata {
        correlation_id: order_id.0,
        causation_id: Uuid::now_v7(),
        actor: "system:saga".into(),
        traceparent: None,
        command_id: None,
    };
    let old: Vec<event_store::NewEvent> = [
        SagaInput::OrderPlaced { order },
        SagaInput::InventoryReserved {
            reservation_id: "r-1".into(),
        },
    ]
    .iter()
    .map(|i| event_store::NewEvent {
        event_id: Uuid::now_v7(),
        event_type: saga::orchestrator::INPUT_RECORDED.into(),
        schema_version: 1,
        payload: serde_json::to_value(i).unwrap(),
        metadata: meta.clone(),
    })
    .collect();
    let mut conn = db.pool.acquire().await.unwrap();
    event_store::append(
        &mut conn,
        saga::orchestrator::saga_stream_id(order_id),
        saga::orchestrator::SAGA_STREAM,
        &event_store::Expected::new_stream(),
        &old,
        &[],
    )
    .await
    .unwrap();
    let (state, _) = saga::orchestrator::load(&mut conn, order_id, 3)
        .await
        .unwrap();
    assert_eq!(state.phase, Phase::Awaiting(Step::Payment));

    let orchestrator =
        saga::orchestrator::Orchestrator::new(db.pool.clone(), SagaConfig::default());
    orchestrator
        .handle(
            &mut conn,
            order_id,
            SagaInput::PaymentAuthorized {
                authorization_id: "a-1".into(),
            },
            Uuid::now_v7(),
            None,
        )
        .await
        .unwrap();
    let (state, expected) = saga::orchestrator::load(&mut conn, order_id, 3)
        .await
        .unwrap();
    assert_eq!(state.phase, Phase::Awaiting(Step::Shipment));
    assert_eq!(expected.version, 4);
    let types: Vec<String> = sqlx::query_scalar(
        "SELECT event_type FROM events WHERE stream_id = $1 ORDER BY stream_version",
    )
    .bind(saga::orchestrator::saga_stream_id(order_id))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        types,
        [
            "SagaInputRecorded",
            "SagaInputRecorded",
            "SagaStepSucceeded",
            "SagaStepRequested"
        ]
    );
}

/// One checkout is one trace: the command, the append, the relay's publishes, the
/// projector's apply and every saga and participant step continue the traceparent of the
/// HTTP request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkouts_spans_share_the_trace_id_of_its_request() {
    shop_tests::spans::capture();
    let stack = SagaStack::start(SagaConfig {
        retry_base: Duration::from_millis(50),
        ..SagaConfig::default()
    })
    .await;
    let trace_id = Uuid::new_v4().simple().to_string();
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let order = stack
        .checkout_traced(&traceparent, body("tok_visa", 1))
        .await;
    assert_eq!(stack.outcome(order).await.0, "OrderConfirmed");
    let expected = [
        "append",
        "command",
        "participant.step",
        "projector.apply",
        "relay.publish",
        "saga.step",
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while shop_tests::spans::in_trace(&trace_id) != expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans in the request's trace: {:?}",
            shop_tests::spans::in_trace(&trace_id)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A checkout without a traceparent gets a trace of its own, not this one.
    let other = stack.checkout(body("tok_visa", 1)).await;
    assert_eq!(stack.outcome(other).await.0, "OrderConfirmed");
    assert_eq!(shop_tests::spans::in_trace(&trace_id), expected);
    stack.stop().await;
}

/// Replay discipline: deploying the saga onto a store that already holds orders (its feed
/// position never moved) starts no saga for them: no command is sent, no stock reserved.
/// Orders placed after it run as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_deployment_onto_a_store_with_orders_runs_no_saga_for_them() {
    // A store as it was before the saga's position was fixed: orders, a position at (0, 0).
    let db = shop_tests::TestDb::with_pool_size(20).await;
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 12")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE saga_feed_position SET cursor_tx = '0', cursor_pos = 0")
        .execute(&db.pool)
        .await
        .unwrap();
    let api = TestApi::with_db(db).await;
    let token = api.customer("alice");
    let mut historical = Vec::new();
    for i in 0..3 {
        let r: Value = api
            .post("/orders", &token, &format!("old-{i}"), &checkout_body())
            .await
            .json()
            .await
            .unwrap();
        historical.push(r["order_id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    // The upgrade: the migration moves the unused position to the head.
    platform::db::migrate(&api.db.pool).await.unwrap();
    let stack = SagaStack::start_on(api, SagaConfig::default()).await;
    let new = stack.checkout(body("tok_visa", 1)).await;
    assert_eq!(stack.outcome(new).await.0, "OrderConfirmed");
    let commands: i64 =
        sqlx::query_scalar("SELECT count(*) FROM saga_commands WHERE order_id = ANY($1)")
            .bind(&historical)
            .fetch_one(stack.pool())
            .await
            .unwrap();
    assert_eq!(commands, 0, "a saga ran for a historical order");
    for id in &historical {
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = $1")
            .bind(id)
            .fetch_one(stack.pool())
            .await
            .unwrap();
        assert_eq!(events, 1, "order {id} moved on from OrderPlaced");
        assert_eq!(stack.payment(*id).await, None, "a payment for {id}");
    }
    assert_eq!(stack.payment(new).await.as_deref(), Some("authorized"));
    stack.stop().await;
}

/// A customer forgotten while her checkout waits: the payment participant finds no token
/// (forgetting deleted it with her keys), so the payment declines and the saga releases the
/// stock; nothing is charged for an order whose customer asked to be forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_customer_mid_checkout_declines_the_payment_and_releases_the_stock() {
    let mut stack = SagaStack::start(SagaConfig::default()).await;
    stack.stop_saga().await;
    let order = stack.checkout(body("tok_visa", 1)).await;
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM payment_tokens WHERE order_id = $1")
        .bind(order)
        .fetch_one(stack.pool())
        .await
        .unwrap();
    assert_eq!(held, 1);
    let alice = domain::values::CustomerId::parse("alice").unwrap();
    let erased = write_side::customers::forget(stack.pool(), &alice, "test")
        .await
        .unwrap();
    assert_eq!((erased.keys_deleted, erased.payment_tokens_deleted), (1, 1));
    stack.start_saga(SagaConfig::default());
    let (outcome, reason) = stack.outcome(order).await;
    assert_eq!(outcome, "OrderCancelled");
    assert!(
        reason.as_deref().unwrap_or("").contains("erased"),
        "{reason:?}"
    );
    stack
        .eventually("the stock is released", || async {
            (stack.reserved("SKU-1").await, stack.reserved("SKU-2").await) == (0, 0)
        })
        .await;
    let authorized: i64 = sqlx::query_scalar("SELECT count(*) FROM payments WHERE order_id = $1")
        .bind(order)
        .fetch_one(stack.pool())
        .await
        .unwrap();
    assert_eq!(authorized, 0);
}

/// A storefront sees where a checkout stands (`Order.checkout`: step, attempts, last error,
/// timeline) and follows it live (`checkoutChanged`), from the saga's own record; another
/// customer sees nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storefront_sees_where_the_checkout_stands_and_follows_it_live() {
    let mut stack = SagaStack::start(SagaConfig::default()).await;
    stack.stop_saga().await;
    let order = stack.checkout(body("tok_visa", 1)).await;
    let alice = stack.api.customer("alice");
    const SUB: &str = "subscription($id: ID!) { checkoutChanged(orderId: $id) {
        status step attempts lastError timeline { kind step attempt detail } } }";
    let mut sub = stack
        .gql
        .subscribe(Some(&alice), SUB, json!({"id": order}))
        .await;
    let first = sub.next().await;
    assert_eq!(
        first["data"]["checkoutChanged"]["status"], "NOT_STARTED",
        "{first}"
    );
    let mut other = stack
        .gql
        .subscribe(Some(&stack.api.customer("bob")), SUB, json!({"id": order}))
        .await;
    let refused = other.next().await;
    assert!(refused["errors"].is_array(), "{refused}");

    stack.start_saga(SagaConfig::default());
    let mut seen = vec![first];
    while seen.last().unwrap()["data"]["checkoutChanged"]["status"] != "COMPLETED" {
        seen.push(sub.next().await);
    }
    let done = &seen.last().unwrap()["data"]["checkoutChanged"];
    let kinds: Vec<(&str, &str)> = done["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap(),
                e["step"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("started", ""),
            ("step_requested", "INVENTORY"),
            ("step_succeeded", "INVENTORY"),
            ("step_requested", "PAYMENT"),
            ("step_succeeded", "PAYMENT"),
            ("step_requested", "SHIPMENT"),
            ("step_succeeded", "SHIPMENT"),
            ("completed", ""),
        ]
    );
    assert_eq!(
        (done["step"].clone(), done["lastError"].clone()),
        (Value::Null, Value::Null)
    );
    // Nothing of the placed order (address, payment) is in it.
    assert!(!done.to_string().contains("Main St"), "{done}");

    // The stream ended after the final state: the server completes the subscription.
    let complete = loop {
        use futures::StreamExt;
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.ws.next())
            .await
            .expect("the subscription ended within 10 s of the final state")
            .expect("websocket open")
            .expect("websocket message");
        let v: Value = match msg
            .to_text()
            .ok()
            .and_then(|t| serde_json::from_str(t).ok())
        {
            Some(v) => v,
            None => continue,
        };
        if v["type"] != "ping" {
            break v;
        }
    };
    assert_eq!(complete["type"], "complete", "{complete}");

    // A declined payment: compensated. The customer learns what failed; an operator reads
    // the participant's reason and the result ids.
    let declined = stack.checkout(body("tok_decline", 1)).await;
    stack.outcome(declined).await;
    const Q: &str = "query($id: ID!) { order(id: $id) { checkout { status step attempts
        lastError timeline { kind step detail } } } }";
    let r = stack
        .gql
        .query(Some(&alice), Q, json!({"id": declined}))
        .await;
    let c = &r["data"]["order"]["checkout"];
    assert_eq!(c["status"], "COMPENSATED", "{r}");
    assert_eq!(c["attempts"], 1, "{r}");
    assert_eq!(c["lastError"], "payment refused", "{r}");
    assert!(
        c["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "step_failed"
                && e["step"] == "PAYMENT"
                && e["detail"] == "refused"),
        "{r}"
    );
    assert!(
        c["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["kind"] != "step_succeeded" || e["detail"].is_null()),
        "result ids are for operators: {r}"
    );
    let r = stack
        .gql
        .query(Some(&stack.api.operator()), Q, json!({"id": declined}))
        .await;
    let c = &r["data"]["order"]["checkout"];
    assert!(
        c["lastError"].as_str().unwrap().starts_with("refused: "),
        "{r}"
    );
    assert!(c["lastError"].as_str().unwrap().contains("declined"), "{r}");
    assert!(
        c["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "step_succeeded"
                && e["detail"].as_str().is_some_and(|d| d.starts_with("res-"))),
        "{r}"
    );
    let r = stack
        .gql
        .query(
            Some(&stack.api.customer("bob")),
            "query($id: ID!) { order(id: $id) { checkout { status } } }",
            json!({"id": declined}),
        )
        .await;
    assert_eq!(r["data"]["order"], Value::Null, "{r}");
}

//! Projections on the real services: rebuild by replay while commands arrive, resume and
//! refusal of concurrent rebuilds, sales analytics, bounded retries of transient failures,
//! subscriptions and the operator mutations.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use read_side::{
    consumer::ProjectorConfig,
    envelope::{Envelope, OrderEnvelope},
    order_summary, projection,
    projection::Kind,
    rebuild::{self, RebuildError, RebuildOptions},
    sales,
};
use serde_json::{Value, json};
use shop_tests::{Gql, ReadStack, TestApi, TestDb, append_orders, checkout_body};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The read models as the pure folds produce them from every event in the store: what the
/// live projector must converge to and what a rebuild must produce.
async fn expected_from_event_store(
    pool: &PgPool,
) -> (
    BTreeMap<Uuid, order_summary::Row>,
    BTreeMap<sales::BucketKey, sales::Delta>,
) {
    let rows = sqlx::query(
        "SELECT event_id, event_type, schema_version, stream_id, stream_version, recorded_at, payload
         FROM events WHERE stream_type = 'order' ORDER BY stream_id, stream_version",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut summaries: BTreeMap<Uuid, Option<order_summary::Row>> = BTreeMap::new();
    let mut orders: HashMap<Uuid, sales::OrderSales> = HashMap::new();
    let mut buckets = BTreeMap::new();
    for r in &rows {
        let env = Envelope {
            event_id: r.get("event_id"),
            event_type: r.get("event_type"),
            schema_version: r.get("schema_version"),
            stream_id: r.get("stream_id"),
            stream_type: "order".into(),
            stream_version: r.get("stream_version"),
            recorded_at: r.get("recorded_at"),
            metadata: serde_json::Value::Null,
            payload: r.get("payload"),
        };
        let event = env.event().unwrap();
        let applied =
            order_summary::fold(summaries.entry(env.stream_id).or_default(), &env, &event).unwrap();
        assert_eq!(
            applied,
            projection::Applied::Applied,
            "every stored event applies once"
        );
        let next = sales::fold(orders.get(&env.stream_id), &env, &event, &mut buckets)
            .unwrap()
            .unwrap();
        orders.insert(env.stream_id, next);
    }
    buckets.retain(|_, d| *d != sales::Delta::default());
    let summaries = summaries
        .into_iter()
        .map(|(id, row)| (id, row.expect("a row per order")))
        .collect();
    (summaries, buckets)
}

/// The active read models, row by row.
async fn actual(
    pool: &PgPool,
) -> (
    BTreeMap<Uuid, order_summary::Row>,
    BTreeMap<sales::BucketKey, sales::Delta>,
) {
    let rows = sqlx::query(
        "SELECT order_id, customer_id, status, currency, total_minor, items, cancellation_reason,
                version, created_at, updated_at, timeline FROM order_summary",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let summaries = rows
        .iter()
        .map(|r| {
            let row = order_summary::Row {
                order_id: r.get("order_id"),
                customer_id: r.get("customer_id"),
                status: r.get("status"),
                currency: r.get("currency"),
                total_minor: r.get("total_minor"),
                items: r.get("items"),
                cancellation_reason: r.get("cancellation_reason"),
                version: r.get("version"),
                created_at: r.get("created_at"),
                updated_at: r.get("updated_at"),
                timeline: r.get("timeline"),
            };
            (row.order_id, row)
        })
        .collect();
    let buckets: Vec<(chrono::DateTime<chrono::Utc>, String, String, i64, i64, i64)> =
        sqlx::query_as(
            "SELECT hour, sku, currency, units, revenue_minor, orders FROM sales_by_product_hour
             WHERE (units, revenue_minor, orders) <> (0, 0, 0)",
        )
        .fetch_all(pool)
        .await
        .unwrap();
    let buckets = buckets
        .into_iter()
        .map(|(h, s, c, units, revenue_minor, orders)| {
            (
                (h, s, c),
                sales::Delta {
                    units,
                    revenue_minor,
                    orders,
                },
            )
        })
        .collect();
    (summaries, buckets)
}

async fn assert_read_models_match_event_store(pool: &PgPool, when: &str) {
    let (want_summaries, want_buckets) = expected_from_event_store(pool).await;
    let (got_summaries, got_buckets) = actual(pool).await;
    assert_eq!(
        got_summaries.len(),
        want_summaries.len(),
        "{when}: order count"
    );
    for (id, want) in &want_summaries {
        assert_eq!(got_summaries.get(id), Some(want), "{when}: order {id}");
    }
    assert_eq!(got_buckets, want_buckets, "{when}: sales buckets");
}

/// Places an order through the API and cancels every third; returns the order id.
async fn place(api: &TestApi, token: &str, key: &str, cancel: bool) -> String {
    let r = api.post("/orders", token, key, &checkout_body()).await;
    assert_eq!(r.status(), 202, "{key}");
    let placed: Value = r.json().await.unwrap();
    let id = placed["order_id"].as_str().unwrap().to_owned();
    if cancel {
        let r = api
            .post(
                &format!("/orders/{id}/cancel"),
                token,
                &format!("{key}-cancel"),
                &json!({"reason": "changed my mind"}),
            )
            .await;
        assert_eq!(r.status(), 202);
    }
    id
}

const ORDER: &str = "query($id: ID!) { order(id: $id) { id status version } }";
const ORDERS: &str = "{ orders(first: 5) { edges { node { id } } } }";
const PROJECTIONS: &str =
    "{ projections { name version state position lag rebuild { version processed total error } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_while_commands_arrive_produces_the_live_read_model_and_graphql_never_fails() {
    let stack = Arc::new(ReadStack::start(ProjectorConfig::default()).await);
    let pool = stack.api.db.pool.clone();
    let alice = stack.api.customer("alice");
    let ops = stack.api.operator();
    // History: orders through the API, plus a bulk of orders appended directly (placed,
    // reserved, cancelled) so the rebuild has many batches to work through.
    let mut seed = Vec::new();
    for i in 0..30 {
        seed.push(place(&stack.api, &alice, &format!("seed-{i}"), i % 3 == 0).await);
    }
    append_orders(&pool, 300, 4).await;
    stack.wait_caught_up().await;
    assert_read_models_match_event_store(&pool, "live, before the rebuild").await;

    // Commands keep arriving and GraphQL keeps being read during the rebuilds.
    let stop = CancellationToken::new();
    let placed = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stack, stop, placed, alice) =
            (stack.clone(), stop.clone(), placed.clone(), alice.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                place(&stack.api, &alice, &format!("live-{i}"), i % 2 == 0).await;
                placed.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        })
    };
    let poller = {
        let (gql, stop, alice, first) = (
            Gql {
                url: stack.gql.url.clone(),
                http: reqwest::Client::new(),
            },
            stop.clone(),
            alice.clone(),
            seed[1].clone(),
        );
        tokio::spawn(async move {
            let mut polls = 0;
            while !stop.is_cancelled() {
                let r = gql.query(Some(&alice), ORDER, json!({"id": first})).await;
                assert!(r.get("errors").is_none(), "error during rebuild: {r}");
                assert_eq!(r["data"]["order"]["id"], first.as_str(), "{r}");
                let r = gql.query(Some(&alice), ORDERS, json!({})).await;
                assert!(r.get("errors").is_none(), "error during rebuild: {r}");
                assert_eq!(
                    r["data"]["orders"]["edges"].as_array().map(Vec::len),
                    Some(5),
                    "empty result during rebuild: {r}"
                );
                polls += 1;
            }
            polls
        })
    };

    let before = placed.load(Ordering::SeqCst);
    let options = RebuildOptions {
        batch_size: 20,
        restart: false,
        hold: false,
    };
    let mut seen = Vec::new();
    let report = rebuild::start(&pool, Kind::OrderSummary, &options)
        .await
        .unwrap()
        .run(|p| seen.push(p))
        .await
        .unwrap();
    assert_eq!(report.version, 2);
    assert!(!report.resumed);
    assert!(seen.len() > 10, "progress reported per batch: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0].processed <= w[1].processed));
    let report = rebuild::start(&pool, Kind::SalesByProduct, &options)
        .await
        .unwrap()
        .run(|_| {})
        .await
        .unwrap();
    assert_eq!(report.version, 2);
    let during = placed.load(Ordering::SeqCst) - before;
    stop.cancel();
    writer.await.unwrap();
    let polls = poller.await.unwrap();
    assert!(
        polls > 0 && during > 0,
        "polls {polls}, orders placed during the rebuilds {during}"
    );

    stack.wait_caught_up().await;
    assert_read_models_match_event_store(&pool, "after the rebuilds and the live catch-up").await;
    for old in [
        "order_summary_v1",
        "sales_orders_v1",
        "sales_by_product_hour_v1",
    ] {
        let gone: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NULL")
            .bind(old)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(gone, "{old} dropped after the switch");
    }

    // Status: both on version 2, live, nothing left to consume (the analytics group, listed
    // last, does not run in this stack).
    let r = stack.gql.query(Some(&ops), PROJECTIONS, json!({})).await;
    let list = r["data"]["projections"].as_array().expect("projections");
    let names: Vec<&str> = list.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["order_summary", "sales_by_product", "analytics"],
        "{r}"
    );
    for p in &list[..2] {
        assert_eq!(p["version"], 2, "{r}");
        assert_eq!(p["state"], "LIVE", "{r}");
        assert_eq!(p["lag"], 0, "{r}");
        assert_eq!(p["rebuild"], Value::Null, "{r}");
        assert!(p["position"].as_i64().unwrap() > 0, "{r}");
    }
    let r = stack.gql.query(Some(&alice), PROJECTIONS, json!({})).await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "FORBIDDEN", "{r}");

    // Sales over GraphQL: the buckets of the last hours, net of cancellations.
    const SALES: &str =
        "query($from: DateTime, $to: DateTime) { salesByProduct(from: $from, to: $to) {
        hour sku currency units revenueMinor orders } }";
    let now = chrono::Utc::now();
    let vars =
        json!({"from": now - chrono::TimeDelta::hours(3), "to": now + chrono::TimeDelta::hours(1)});
    let r = stack.gql.query(Some(&ops), SALES, vars.clone()).await;
    let (_, want) = expected_from_event_store(&pool).await;
    let got: Vec<&Value> = r["data"]["salesByProduct"]
        .as_array()
        .expect("sales")
        .iter()
        .collect();
    assert_eq!(got.len(), want.len(), "{r}");
    for (b, ((hour, sku, currency), d)) in got.iter().zip(&want) {
        assert_eq!(b["sku"], sku.as_str());
        assert_eq!(b["currency"], currency.as_str());
        assert_eq!(
            b["hour"]
                .as_str()
                .unwrap()
                .parse::<chrono::DateTime<chrono::Utc>>()
                .unwrap(),
            *hour
        );
        assert_eq!(
            (
                b["units"].as_i64(),
                b["revenueMinor"].as_i64(),
                b["orders"].as_i64()
            ),
            (Some(d.units), Some(d.revenue_minor), Some(d.orders))
        );
    }
    let r = stack.gql.query(Some(&alice), SALES, vars).await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "FORBIDDEN", "{r}");
    let r = stack
        .gql
        .query(
            Some(&ops),
            SALES,
            json!({"from": now, "to": now - chrono::TimeDelta::hours(1)}),
        )
        .await;
    assert_eq!(
        r["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
        "{r}"
    );
    let Ok(stack) = Arc::try_unwrap(stack) else {
        panic!("the writer still holds the stack")
    };
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_rebuild_is_refused_and_a_failed_one_resumes_where_it_stopped() {
    let db = TestDb::new().await;
    // Corrupts events on purpose, as their owner could.
    db.allow_tampering().await;
    let pool = db.pool.clone();
    append_orders(&pool, 100, 4).await;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let options = RebuildOptions {
        batch_size: 50,
        restart: false,
        hold: false,
    };

    // A rebuild holds its lock: a second one is refused, from the library and from GraphQL.
    let first = rebuild::start(&pool, Kind::OrderSummary, &options)
        .await
        .unwrap();
    assert!(matches!(
        rebuild::start(&pool, Kind::OrderSummary, &options).await,
        Err(RebuildError::AlreadyRunning("order_summary"))
    ));
    let shutdown = CancellationToken::new();
    let auth = shop_tests::test_auth();
    let gql = Gql::serve(
        read_side::graphql::router(pool.clone(), auth.clone()),
        shutdown.clone(),
    )
    .await;
    let ops = auth
        .issue(
            "ops",
            platform::auth::Role::Operator,
            Duration::from_secs(600),
        )
        .unwrap();
    let alice = auth
        .issue(
            "alice",
            platform::auth::Role::Customer,
            Duration::from_secs(600),
        )
        .unwrap();
    const REBUILD: &str = "mutation($n: String!) { rebuildProjection(name: $n) { name state } }";
    let r = gql
        .query(Some(&ops), REBUILD, json!({"n": "order_summary"}))
        .await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "CONFLICT", "{r}");
    let r = gql
        .query(Some(&alice), REBUILD, json!({"n": "order_summary"}))
        .await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "FORBIDDEN", "{r}");
    let r = gql.query(Some(&ops), REBUILD, json!({"n": "nope"})).await;
    assert_eq!(
        r["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
        "{r}"
    );
    let r = gql.query(Some(&ops), PROJECTIONS, json!({})).await;
    let summary = &r["data"]["projections"][0];
    assert_eq!(summary["name"], "order_summary", "{r}");
    assert_eq!(summary["state"], "REBUILDING", "{r}");
    assert_eq!(summary["lag"], Value::Null, "no Kafka client here: {r}");
    drop(first); // as if its process died: the lock goes with the session

    // A poison event in the store stops the rebuild after the batches before it committed.
    let (poisoned, original): (i64, i32) = sqlx::query_as(
        "UPDATE events e SET schema_version = 99
         FROM (SELECT position, schema_version FROM events ORDER BY tx_id, position OFFSET 120 LIMIT 1) o
         WHERE e.position = o.position
         RETURNING e.position, o.schema_version",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let resumed = rebuild::start(&pool, Kind::OrderSummary, &options)
        .await
        .unwrap();
    assert_eq!(resumed.version(), 2, "the interrupted version is resumed");
    match resumed.run(|_| {}).await {
        Err(RebuildError::Poison { position, .. }) => assert_eq!(position, poisoned),
        other => panic!("expected a poison stop, got {other:?}"),
    }
    let r = gql.query(Some(&ops), PROJECTIONS, json!({})).await;
    let summary = &r["data"]["projections"][0];
    assert_eq!(summary["state"], "REBUILD_INTERRUPTED", "{r}");
    assert_eq!(summary["version"], 1, "the old version keeps serving: {r}");
    assert_eq!(
        summary["rebuild"]["processed"], 100,
        "two batches committed: {r}"
    );
    assert!(
        summary["rebuild"]["error"]
            .as_str()
            .unwrap()
            .contains("schema version 99"),
        "{r}"
    );

    // Fixed, the next rebuild resumes from its cursor and switches.
    sqlx::query("UPDATE events SET schema_version = $2 WHERE position = $1")
        .bind(poisoned)
        .bind(original)
        .execute(&pool)
        .await
        .unwrap();
    let resumed = rebuild::start(&pool, Kind::OrderSummary, &options)
        .await
        .unwrap();
    assert_eq!(resumed.progress().processed, 100);
    let report = resumed.run(|_| {}).await.unwrap();
    assert!(report.resumed);
    assert_eq!(report.events, total);
    assert_eq!(report.version, 2);
    // Sales was never rebuilt and has no live projector here; compare the summary only.
    let (want, _) = expected_from_event_store(&pool).await;
    let (got, _) = actual(&pool).await;
    assert_eq!(got, want);

    // --restart starts over from an empty version.
    let again = rebuild::start(
        &pool,
        Kind::OrderSummary,
        &RebuildOptions {
            restart: true,
            ..options
        },
    )
    .await
    .unwrap();
    assert_eq!((again.version(), again.progress().processed), (3, 0));
    drop(again);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_is_retried_a_bounded_number_of_times_then_dead_lettered_and_replayable()
 {
    let stack = ReadStack::start(ProjectorConfig {
        max_attempts: 3,
        retry_base: Duration::from_millis(50),
        lock_timeout: Duration::from_millis(100),
        ..ProjectorConfig::default()
    })
    .await;
    let pool = stack.api.db.pool.clone();
    let alice = stack.api.customer("alice");
    let id = place(&stack.api, &alice, "t-1", false).await;
    stack.wait_caught_up().await;

    // Another session holds the order's read-model row: every attempt times out on the lock.
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM order_summary WHERE order_id = $1::uuid FOR UPDATE")
        .bind(&id)
        .execute(&mut *blocker)
        .await
        .unwrap();
    let r = stack
        .api
        .post(
            &format!("/orders/{id}/cancel"),
            &alice,
            "t-2",
            &json!({"reason": "oops"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (dl_id, class, attempts): (i64, String, i32) = loop {
        let row = sqlx::query_as(
            "SELECT id, error_class, attempts FROM dead_letters WHERE projection = 'order_summary' AND status = 'open'",
        )
        .fetch_optional(&pool)
        .await
        .unwrap();
        if let Some(row) = row {
            break row;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((class.as_str(), attempts), ("transient", 3));
    // The sales projection does not touch that row and carries on; the partition moved on too.
    stack.wait_caught_up().await;
    blocker.rollback().await.unwrap();

    // Replay through GraphQL: the cancellation is applied.
    let ops = stack.api.operator();
    const REPLAY: &str = "mutation($id: ID!) { replayDeadLetter(id: $id) { id status released } }";
    let r = stack
        .gql
        .query(Some(&alice), REPLAY, json!({"id": dl_id.to_string()}))
        .await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "FORBIDDEN", "{r}");
    let r = stack
        .gql
        .query(Some(&ops), REPLAY, json!({"id": dl_id.to_string()}))
        .await;
    assert_eq!(r["data"]["replayDeadLetter"]["status"], "replayed", "{r}");
    let r = stack
        .gql
        .query(Some(&ops), REPLAY, json!({"id": dl_id.to_string()}))
        .await;
    assert_eq!(
        r["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
        "replaying twice: {r}"
    );
    let r = stack
        .gql
        .query(Some(&alice), ORDER, json!({"id": id}))
        .await;
    assert_eq!(r["data"]["order"]["status"], "CANCELLED", "{r}");
    assert_read_models_match_event_store(&pool, "after the replay").await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_status_changes_stream_to_the_owner_over_websocket_after_they_commit() {
    let stack = ReadStack::start(ProjectorConfig::default()).await;
    let alice = stack.api.customer("alice");
    let id = place(&stack.api, &alice, "s-1", false).await;
    const SUB: &str =
        "subscription($id: ID!) { orderStatusChanged(orderId: $id) { id status version } }";
    let mut sub = stack
        .gql
        .subscribe(Some(&alice), SUB, json!({"id": id}))
        .await;
    let first = sub.next().await;
    assert_eq!(
        first["data"]["orderStatusChanged"],
        json!({"id": id, "status": "PENDING", "version": 1}),
        "{first}"
    );
    let r = stack
        .api
        .post(
            &format!("/orders/{id}/cancel"),
            &alice,
            "s-2",
            &json!({"reason": "later"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let next = sub.next().await;
    assert_eq!(
        next["data"]["orderStatusChanged"],
        json!({"id": id, "status": "CANCELLED", "version": 2}),
        "{next}"
    );

    // Without a token the connection is refused at connection_init.
    let refused = stack.gql.connect(None).await.expect_err("refused");
    assert!(refused.contains("bearer token is required"), "{refused}");
    stack.stop().await;
}

/// The `rebuilds` role of `shop run` under a supervisor; cancel the token to stop it.
fn rebuild_worker(
    pool: &PgPool,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let shutdown = CancellationToken::new();
    let mut supervisor = platform::supervisor::Supervisor::new(shutdown.clone());
    let p = pool.clone();
    supervisor.spawn("rebuilds", move |ctx| rebuild::run_worker(p.clone(), ctx));
    (shutdown, tokio::spawn(supervisor.wait()))
}

/// A rebuild whose process died is finished by the `rebuilds` role of `shop run`, without a
/// manual step, and the switched version equals the event-store fold.
#[tokio::test]
async fn the_rebuild_worker_finishes_an_interrupted_rebuild() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    append_orders(&pool, 60, 4).await;
    let options = RebuildOptions {
        batch_size: 20,
        restart: false,
        hold: false,
    };
    let interrupted = rebuild::start(&pool, Kind::OrderSummary, &options)
        .await
        .unwrap();
    assert_eq!(interrupted.version(), 2);
    drop(interrupted); // as if its process died
    let (shutdown, supervising) = rebuild_worker(&pool);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let all = read_side::status::all(&pool, None).await.unwrap();
        let summary = all.iter().find(|p| p.name == "order_summary").unwrap();
        if summary.state == read_side::status::State::Live && summary.version == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not switched: {:?} v{}",
            summary.state,
            summary.version
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (want, _) = expected_from_event_store(&pool).await;
    let (got, _) = actual(&pool).await;
    assert_eq!(got, want);
    shutdown.cancel();
    supervising.await.unwrap().unwrap();
}

/// A rebuild held for an operator's switch (the console's) and interrupted is resumed by the
/// `rebuilds` role and waits again, ready, following the feed (orders placed meanwhile are
/// in it), without holding up another projection's interrupted rebuild; it switches when
/// the operator says so.
#[tokio::test]
async fn a_held_rebuild_resumed_by_the_worker_waits_for_the_switch_and_holds_up_no_other() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    append_orders(&pool, 40, 4).await;
    for (kind, hold) in [(Kind::OrderSummary, true), (Kind::SalesByProduct, false)] {
        let options = RebuildOptions {
            batch_size: 20,
            restart: false,
            hold,
        };
        let interrupted = rebuild::start(&pool, kind, &options).await.unwrap();
        drop(interrupted); // as if its process died
    }
    let (shutdown, supervising) = rebuild_worker(&pool);
    let status = |name: &'static str| {
        let pool = pool.clone();
        async move {
            read_side::status::all(&pool, None)
                .await
                .unwrap()
                .into_iter()
                .find(|p| p.name == name)
                .unwrap()
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (summary, sales) = (
            status("order_summary").await,
            status("sales_by_product").await,
        );
        let held_ready = summary.rebuild.as_ref().is_some_and(|r| r.held && r.ready);
        if held_ready && sales.version == 2 && sales.rebuild.is_none() {
            assert_eq!(
                summary.version, 1,
                "a held rebuild does not switch by itself"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "order_summary {:?} v{} {:?}; sales_by_product v{}",
            summary.state,
            summary.version,
            summary.rebuild,
            sales.version
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Orders placed while it waits reach the waiting version: it reads them from the feed
    // (once every transaction older than theirs has ended, here or in other tests).
    append_orders(&pool, 10, 2).await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let followed = status("order_summary")
            .await
            .rebuild
            .map_or(0, |r| r.processed);
        if followed >= stored {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "followed {followed} of {stored} events"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (want, _) = expected_from_event_store(&pool).await;
    assert_eq!(
        rebuild::switch(&pool, Kind::OrderSummary).await.unwrap(),
        rebuild::Switch::Now { version: 2 }
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while status("order_summary").await.version != 2 {
        assert!(std::time::Instant::now() < deadline, "not switched");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (got, _) = actual(&pool).await;
    assert_eq!(got, want);
    shutdown.cancel();
    supervising.await.unwrap().unwrap();
}

/// An operator aborts rebuilds: an interrupted one is dropped at once; a running one stops at
/// its next batch and drops its own tables; the active version serves throughout and the
/// rebuild worker does not bring an aborted rebuild back.
#[tokio::test]
async fn an_aborted_rebuild_leaves_the_active_version_and_no_tables_behind() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    append_orders(&pool, 60, 4).await;
    let (want, _) = expected_from_event_store(&pool).await;
    // No projector runs here: the active version is what it was (empty) until a switch.
    let (serving, _) = actual(&pool).await;
    let options = RebuildOptions {
        batch_size: 20,
        restart: false,
        hold: false,
    };
    let tables = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT tablename::text FROM pg_tables WHERE tablename LIKE 'order_summary_v%' ORDER BY 1",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    let rebuild_version = || async {
        sqlx::query_scalar::<_, Option<i32>>(
            "SELECT rebuild_version FROM projections WHERE name = 'order_summary'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    assert_eq!(
        rebuild::abort(&pool, Kind::OrderSummary).await.unwrap(),
        rebuild::Abort::Nothing
    );

    // Interrupted (its process died): dropped at once.
    let interrupted = rebuild::start(&pool, Kind::OrderSummary, &options)
        .await
        .unwrap();
    drop(interrupted);
    assert_eq!(tables().await, ["order_summary_v1", "order_summary_v2"]);
    assert_eq!(
        rebuild::abort(&pool, Kind::OrderSummary).await.unwrap(),
        rebuild::Abort::Dropped { version: 2 }
    );
    assert_eq!(tables().await, ["order_summary_v1"]);
    assert_eq!(rebuild_version().await, None);

    // Running: asked to stop while it holds the rebuild lock, it stops at its next batch.
    let running = rebuild::start(&pool, Kind::OrderSummary, &options)
        .await
        .unwrap();
    assert_eq!(running.version(), 2);
    assert_eq!(
        rebuild::abort(&pool, Kind::OrderSummary).await.unwrap(),
        rebuild::Abort::Requested { version: 2 }
    );
    let mut batches = 0;
    let outcome = running.run(|_| batches += 1).await;
    assert!(
        matches!(outcome, Err(RebuildError::Aborted("order_summary"))),
        "{outcome:?}"
    );
    assert_eq!(batches, 0, "stopped at the first batch");
    assert_eq!(tables().await, ["order_summary_v1"]);
    assert_eq!(rebuild_version().await, None);
    let all = read_side::status::all(&pool, None).await.unwrap();
    let summary = all.iter().find(|p| p.name == "order_summary").unwrap();
    assert_eq!(
        (summary.version, summary.state),
        (1, read_side::status::State::Live)
    );
    let (got, _) = actual(&pool).await;
    assert_eq!(
        got, serving,
        "the active version is untouched by the aborts"
    );

    // A rebuild after an abort starts from scratch and switches as usual.
    let report = rebuild::start(&pool, Kind::OrderSummary, &options)
        .await
        .unwrap()
        .run(|_| {})
        .await
        .unwrap();
    assert_eq!((report.version, report.resumed), (2, false));
    let (got, _) = actual(&pool).await;
    assert_eq!(got, want);
}

/// A rebuild includes every event committed before it started, even while a transaction
/// that began earlier (here: in another database of the cluster, as another service's would)
/// holds the feed's horizon back: it waits for that transaction instead of switching to a
/// version without those events.
#[tokio::test]
async fn a_rebuild_waits_for_transactions_older_than_itself() {
    let db = shop_tests::TestDb::new().await;
    let other = shop_tests::TestDb::new().await;
    let mut open = other.pool.begin().await.unwrap();
    let _: i64 = sqlx::query_scalar("SELECT txid_current()")
        .fetch_one(&mut *open)
        .await
        .unwrap();
    shop_tests::append_orders(&db.pool, 20, 2).await;
    let pool = db.pool.clone();
    let rebuilding = tokio::spawn(async move {
        rebuild::start(&pool, Kind::OrderSummary, &RebuildOptions::default())
            .await
            .unwrap()
            .run(|_| {})
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    open.commit().await.unwrap();
    let report = rebuilding.await.unwrap();
    assert_eq!(report.events, 60, "20 orders of 3 events each");
    let (want, _) = expected_from_event_store(&db.pool).await;
    let (got, _) = actual(&db.pool).await;
    assert_eq!(got, want);
}

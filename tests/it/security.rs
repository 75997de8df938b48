//! The attacks of the security review (issue #14), each tried against the served API over a
//! real database, expecting the safe answer. The threat model is in docs/security.md; the
//! command API's input attacks are in `command_api.rs`, the refusals at start in `cli.rs`.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use platform::auth::Role;
use read_side::graphql::{GraphqlApi, GraphqlLimits};
use serde_json::{Value, json};
use shop_tests::{Gql, TestApi, test_auth};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// The GraphQL API over `api`'s database with `limits`, until the returned token is dropped.
async fn graphql(api: &TestApi, limits: GraphqlLimits) -> (Gql, tokio_util::sync::DropGuard) {
    let shutdown = CancellationToken::new();
    let router = GraphqlApi {
        pool: api.db.pool.clone(),
        auth: api.auth.clone(),
        watermarks: None,
        limits,
        admission: None,
    }
    .router();
    let gql = Gql::serve(router, shutdown.clone()).await;
    (gql, shutdown.drop_guard())
}

async fn post(gql: &Gql, token: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let r = gql
        .http
        .post(&gql.url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The command API over `api`'s database behind admission `limits`, until `shutdown`;
/// returns its base URL.
async fn command_api(
    api: &TestApi,
    limits: platform::limits::ApiLimits,
    shutdown: &CancellationToken,
) -> String {
    let router = write_side::http::router(
        write_side::http::AppState::new(
            api.db.pool.clone(),
            api.auth.clone(),
            shop_tests::test_vault(),
        )
        .with_limits(limits),
        64 * 1024,
    );
    let served = Gql::serve(router, shutdown.clone()).await;
    served.url.trim_end_matches("/graphql").to_owned()
}

/// POST /orders with a fresh idempotency key.
async fn checkout(api: &TestApi, base: &str, token: &str) -> reqwest::Response {
    api.http
        .post(format!("{base}/orders"))
        .bearer_auth(token)
        .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
        .json(&shop_tests::checkout_body())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn graphql_refuses_huge_bodies_alias_floods_costly_lists_and_slow_queries() {
    let api = TestApi::new().await;
    let (gql, _stop) = graphql(&api, GraphqlLimits::default()).await;
    let ops = api.operator();

    // A 2 MB body: 413 before it is buffered.
    let huge = format!(
        r#"{{"query":"{{ __typename }}","x":"{}"}}"#,
        "a".repeat(2 << 20)
    );
    let (status, _) = post(&gql, &ops, huge).await;
    assert_eq!(status, 413);

    // 2,000 aliases of a cheap field: refused as a whole, nothing runs.
    let aliases: String = (0..2000).map(|i| format!("a{i}: __typename ")).collect();
    let (status, r) = post(
        &gql,
        &ops,
        json!({"query": format!("{{ {aliases} }}")}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r["errors"][0]["extensions"]["code"], "TOO_MANY_FIELDS",
        "{r}"
    );
    assert!(r["data"].is_null(), "{r}");

    // A fragment bomb (fragments spreading each other tenfold, 10^14 selections expanded),
    // anonymous: counted without being expanded, and refused.
    let mut bomb = String::from("{ ...F0 }");
    for i in 0..14 {
        let spreads: String = (0..10)
            .map(|j| format!("f{j}: __typename ...F{} ", i + 1))
            .collect();
        bomb.push_str(&format!(" fragment F{i} on QueryRoot {{ {spreads} }}"));
    }
    bomb.push_str(" fragment F14 on QueryRoot { ...Missing }");
    let r = gql.query(None, &bomb, json!({})).await;
    assert_eq!(
        r["errors"][0]["extensions"]["code"], "TOO_MANY_FIELDS",
        "{r}"
    );

    // A page of 100 orders with a wide selection weighs 100 times its selection.
    const WIDE: &str = "{ orders(first: 100) { edges { cursor node { id status customerId
        totalMinor currency version createdAt updatedAt cancellationReason
        items { sku quantity unitPriceMinor } timeline { status at } } } } }";
    let r = gql.query(Some(&ops), WIDE, json!({})).await;
    let message = r["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("complex"), "{r}");
    // The same selection over a small page is fine.
    let r = gql
        .query(Some(&ops), &WIDE.replace("100", "5"), json!({}))
        .await;
    assert!(r["errors"].is_null(), "{r}");

    // A query that cannot finish within the timeout (the read model is locked by someone
    // else) is abandoned with TIMEOUT.
    let (gql, _stop) = graphql(
        &api,
        GraphqlLimits {
            query_timeout: Duration::from_millis(500),
            ..GraphqlLimits::default()
        },
    )
    .await;
    let mut blocker = api.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE order_summary IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let (status, r) = post(
        &gql,
        &ops,
        json!({"query": "{ orders { edges { cursor } } }"}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["errors"][0]["extensions"]["code"], "TIMEOUT", "{r}");
    blocker.rollback().await.unwrap();
}

#[tokio::test]
async fn graphql_console_is_off_by_default_and_loads_nothing_from_elsewhere() {
    let api = TestApi::new().await;
    let (gql, _stop) = graphql(&api, GraphqlLimits::default()).await;
    let r = gql.http.get(&gql.url).send().await.unwrap();
    assert_eq!(
        r.status(),
        405,
        "GET /graphql serves nothing unless enabled"
    );

    let (gql, _stop) = graphql(
        &api,
        GraphqlLimits {
            console: true,
            ..GraphqlLimits::default()
        },
    )
    .await;
    let r = gql.http.get(&gql.url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let page = r.text().await.unwrap();
    assert!(page.contains("<script>"), "the console is the page itself");
    for external in ["<script src", "https://", "http://", "<link"] {
        assert!(!page.contains(external), "the page loads {external}");
    }
}

#[tokio::test]
async fn websockets_need_a_token_close_when_it_expires_and_are_capped_per_caller() {
    let api = TestApi::new().await;
    let (gql, _stop) = graphql(
        &api,
        GraphqlLimits {
            max_subscriptions: 2,
            max_ws_message_bytes: 16 * 1024,
            ..GraphqlLimits::default()
        },
    )
    .await;
    const SUB: &str =
        "subscription($id: ID!) { orderStatusChanged(orderId: $id) { id status version } }";
    let id = uuid::Uuid::new_v4();

    // Anonymous, or a forged token: refused at connection_init.
    let anon = gql.connect(None).await.expect_err("anonymous refused");
    assert!(anon.contains("bearer token is required"), "{anon}");
    let forged = gql
        .connect(Some("not-a-token"))
        .await
        .expect_err("forged refused");
    assert!(forged.contains("invalid bearer token"), "{forged}");

    // Two subscriptions per caller, over any number of connections; a third is LIMITED,
    // another caller is unaffected.
    let alice = api.customer("alice");
    let _one = gql.subscribe(Some(&alice), SUB, json!({"id": id})).await;
    let _two = gql.subscribe(Some(&alice), SUB, json!({"id": id})).await;
    let mut three = gql.subscribe(Some(&alice), SUB, json!({"id": id})).await;
    let r = three.next().await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "LIMITED", "{r}");
    let mut bob = gql
        .subscribe(Some(&api.customer("bob")), SUB, json!({"id": id}))
        .await;
    // Bob's subscription runs (his order does not exist, so nothing arrives): no error is
    // sent within a moment, while alice's third was refused at once.
    let quiet = tokio::time::timeout(Duration::from_secs(1), bob.next()).await;
    assert!(quiet.is_err(), "bob was refused: {quiet:?}");

    // Queries over a socket meet the same document limit as over HTTP.
    let mut ws = gql.connect(Some(&alice)).await.expect("ack");
    let aliases: String = (0..500).map(|i| format!("a{i}: __typename ")).collect();
    let flood = json!({"id": "7", "type": "subscribe",
                       "payload": {"query": format!("{{ {aliases} }}")}});
    ws.send(Message::text(flood.to_string())).await.unwrap();
    let answer = loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("an answer")
            .expect("open")
            .expect("a message");
        let v: Value = serde_json::from_str(msg.to_text().unwrap_or("{}")).unwrap_or_default();
        if v["id"] == "7" {
            break v;
        }
    };
    assert!(answer["payload"]["data"].is_null(), "{answer}");
    assert_eq!(
        answer["payload"]["errors"][0]["extensions"]["code"], "TOO_MANY_FIELDS",
        "{answer}"
    );

    // A message above the frame limit closes the connection.
    let mut ws = gql.connect(Some(&alice)).await.expect("ack");
    let big = json!({"id": "9", "type": "subscribe",
                     "payload": {"query": format!("# {}\n{SUB}", "x".repeat(64 * 1024)), "variables": {"id": id}}});
    let _ = ws.send(Message::text(big.to_string())).await;
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        end.is_ok(),
        "an oversized message did not close the connection"
    );

    // A token with two seconds left: the connection closes when it expires.
    let short = test_auth()
        .issue("carol", Role::Customer, Duration::from_secs(2))
        .unwrap();
    let mut sub = gql.subscribe(Some(&short), SUB, json!({"id": id})).await;
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match sub.ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection outlived its token");
}

#[tokio::test]
async fn a_caller_over_its_rate_gets_429_with_retry_after_on_both_apis() {
    let api = TestApi::new().await;
    let limits = platform::limits::ApiLimits {
        rate_limit_per_second: 1,
        rate_limit_burst: 3,
        ..platform::limits::ApiLimits::default()
    };
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let base = command_api(&api, limits.clone(), &shutdown).await;
    let graphql = GraphqlApi {
        pool: api.db.pool.clone(),
        auth: api.auth.clone(),
        watermarks: None,
        limits: GraphqlLimits::default(),
        admission: Some(limits),
    }
    .router();
    let gql = Gql::serve(graphql, shutdown.clone()).await;

    let (alice, bob) = (api.customer("alice"), api.customer("bob"));
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(checkout(&api, &base, &alice).await.status().as_u16());
    }
    assert!(
        statuses.contains(&202) && statuses.contains(&429),
        "{statuses:?}"
    );
    let r = checkout(&api, &base, &alice).await;
    assert_eq!(r.status(), 429);
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["type"], "/problems/rate-limited", "{problem}");
    assert_eq!(
        checkout(&api, &base, &bob).await.status(),
        202,
        "bob has his own budget"
    );
    let health = api
        .http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "health checks are never rate limited");

    let mut statuses = Vec::new();
    for _ in 0..6 {
        let (s, _) = post(&gql, &alice, json!({"query": "{ __typename }"}).to_string()).await;
        statuses.push(s);
    }
    assert!(
        statuses.contains(&200) && statuses.contains(&429),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn tokens_of_another_issuer_audience_or_beyond_the_lifetime_cap_are_refused() {
    let api = TestApi::new().await;
    let keys = shop_tests::TEST_JWT_KEYS;
    let minted = |cfg: platform::auth::AuthConfig, ttl: u64| {
        platform::auth::Authenticator::from_config(&cfg, false)
            .unwrap()
            .issue("cust-1", Role::Customer, Duration::from_secs(ttl))
            .unwrap()
    };
    let base = platform::auth::AuthConfig::with_keys(keys);
    let long_lived = platform::auth::AuthConfig {
        jwt_max_ttl: Duration::from_secs(30 * 24 * 3600),
        ..base.clone()
    };
    for (what, token) in [
        (
            "another issuer",
            minted(
                platform::auth::AuthConfig {
                    jwt_issuer: "evil".into(),
                    ..base.clone()
                },
                60,
            ),
        ),
        (
            "another audience",
            minted(
                platform::auth::AuthConfig {
                    jwt_audience: "other-api".into(),
                    ..base.clone()
                },
                60,
            ),
        ),
        ("a 30-day token", minted(long_lived, 30 * 24 * 3600)),
    ] {
        let r = api
            .post(
                "/orders",
                &token,
                &uuid::Uuid::new_v4().to_string(),
                &shop_tests::checkout_body(),
            )
            .await;
        assert_eq!(r.status(), 401, "{what}");
    }
}

/// Idempotency keys, inbox rows, sent-command records and the analytics' windows, presence
/// and counted ids go after their retention; younger ones stay.
#[tokio::test]
async fn retention_prunes_old_bookkeeping_and_keeps_the_recent() {
    let db = shop_tests::TestDb::new().await;
    let pool = &db.pool;
    for age in ["10 days", "1 minute"] {
        let at = format!("now() - interval '{age}'");
        for sql in [
            format!(
                "INSERT INTO idempotency_keys (principal, key, request_hash, response_status, response_body, created_at) VALUES ('customer:c', gen_random_uuid()::text, '\\x00', 202, '{{}}', {at})"
            ),
            format!(
                "INSERT INTO payment_tokens (payment_ref, order_id, customer_id, sealed_token, created_at) VALUES (gen_random_uuid(), gen_random_uuid(), 'c', '{{}}', {at})"
            ),
            format!(
                "INSERT INTO saga_inbox (message_id, received_at) VALUES (gen_random_uuid(), {at})"
            ),
            format!(
                "INSERT INTO participant_inbox (participant, message_id, received_at) VALUES ('payment', gen_random_uuid(), {at})"
            ),
            format!(
                "INSERT INTO saga_commands (message_id, order_id, step, sent_at) VALUES (gen_random_uuid(), gen_random_uuid(), 'payment', {at})"
            ),
            format!("INSERT INTO analytics_minutes (minute) VALUES (date_trunc('minute', {at}))"),
            format!(
                "INSERT INTO analytics_presence (kind, id, last_seen) VALUES ('session', gen_random_uuid()::text, {at})"
            ),
            format!(
                "INSERT INTO analytics_seen (event_id, seen_at) VALUES (gen_random_uuid(), {at})"
            ),
        ] {
            sqlx::query(&sql).execute(pool).await.unwrap();
        }
    }
    let cfg = shop::retention::RetentionConfig {
        idempotency_key_retention: Duration::from_secs(72 * 3600),
        inbox_retention: Duration::from_secs(7 * 24 * 3600),
        ..shop::retention::RetentionConfig::default()
    };
    let pruned = shop::retention::prune_once(pool, &cfg).await.unwrap();
    assert_eq!(
        pruned,
        [
            ("idempotency_keys", 1),
            ("payment_tokens", 1),
            ("saga_inbox", 1),
            ("participant_inbox", 1),
            ("saga_commands", 1),
            ("analytics_minutes", 1),
            ("analytics_presence", 1),
            ("analytics_seen", 1)
        ]
    );
    for table in [
        "idempotency_keys",
        "payment_tokens",
        "saga_inbox",
        "participant_inbox",
        "saga_commands",
        "analytics_minutes",
        "analytics_presence",
        "analytics_seen",
    ] {
        let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(left, 1, "{table}: the recent row stays");
    }
    // A second pass finds nothing more.
    let again = shop::retention::prune_once(pool, &cfg).await.unwrap();
    assert!(again.iter().all(|(_, n)| *n == 0), "{again:?}");
}

/// Sockets are a standing cost the request limits do not see: one caller holds at most
/// `max_sockets_per_caller` (refused at `connection_init`), and past `max_sockets` in all the
/// upgrade itself is refused with 503; a closed socket frees its place.
#[tokio::test]
async fn websocket_connections_are_capped_per_caller_and_in_all() {
    let api = TestApi::new().await;
    let (gql, _stop) = graphql(
        &api,
        GraphqlLimits {
            max_sockets: 3,
            max_sockets_per_caller: 2,
            ..GraphqlLimits::default()
        },
    )
    .await;
    let alice = api.customer("alice");
    let a1 = gql.connect(Some(&alice)).await.expect("alice's first");
    let _a2 = gql.connect(Some(&alice)).await.expect("alice's second");
    let third = gql
        .connect(Some(&alice))
        .await
        .expect_err("alice's third is over her share");
    assert!(third.contains("as many WebSocket connections"), "{third}");
    let _b1 = gql
        .connect(Some(&api.customer("bob")))
        .await
        .expect("bob is not held back by alice");
    // Three open: the API is full for everyone.
    let full = gql
        .connect(Some(&api.customer("carol")))
        .await
        .expect_err("over the total");
    assert!(full.contains("503"), "{full}");
    // Alice closes one: carol gets in (the place is freed once the server sees the close).
    drop(a1);
    let mut carol = Err(String::new());
    for _ in 0..100 {
        carol = gql.connect(Some(&api.customer("carol"))).await;
        if carol.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    carol.expect("a closed socket frees its place");
}

/// A request's concurrency permit is held while its body trickles in, so slow uploads must
/// not lock others out: a client without a valid token is answered 401 before it sends a
/// byte of its body, and one caller holds only its share of the permits.
#[tokio::test]
async fn slow_uploads_cannot_lock_other_callers_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let api = TestApi::new().await;
    let limits = platform::limits::ApiLimits {
        max_concurrent_requests: 8,
        max_concurrent_per_caller: 2,
        ..platform::limits::ApiLimits::default()
    };
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let base = command_api(&api, limits, &shutdown).await;
    let addr = base.trim_start_matches("http://").to_owned();
    // Headers that promise a body which never comes.
    let stalled = |token: Option<String>| {
        let addr = addr.clone();
        async move {
            let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
            let head = format!(
                "POST /orders HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
                 Idempotency-Key: {}\r\nContent-Length: 60000\r\n\r\n",
                uuid::Uuid::new_v4()
            );
            tcp.write_all(head.as_bytes()).await.unwrap();
            tcp
        }
    };
    // Anonymous: the answer comes without the body.
    let mut anon = stalled(None).await;
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), anon.read(&mut answer))
        .await
        .expect("answered before the body was sent")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    // Alice stalls two uploads: her third request is refused, bob's is served.
    let alice = api.customer("alice");
    let _held = [
        stalled(Some(alice.clone())).await,
        stalled(Some(alice.clone())).await,
    ];
    let mut refused = None;
    for _ in 0..100 {
        let r = checkout(&api, &base, &alice).await;
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
        // Her stalled requests may not have reached the server yet.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = refused.expect("alice over her share of in-flight requests");
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["type"], "/problems/too-many-in-flight", "{problem}");
    assert_eq!(
        checkout(&api, &base, &api.customer("bob")).await.status(),
        202
    );
}

//! The product as its users run it: the real `shop` binary, started the way
//! `scripts/run.sh` starts it, serves a checkout end to end (HTTP in, GraphQL out) and stops
//! cleanly on SIGTERM with nothing left pending.

use std::{path::Path, time::Duration};

use shop_tests::process::ShopProcess;

pub(crate) fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shop"))
}

#[tokio::test]
async fn shop_run_serves_checkouts_end_to_end_and_stops_cleanly() {
    let shop = ShopProcess::start(bin()).await;
    // Ready means every role is up or briefly restarting; wait until all are up.
    let roles = [
        "command-api",
        "graphql",
        "relay",
        "projector:order_summary",
        "projector:sales_by_product",
        "analytics",
        "email",
        "saga:feed",
        "saga:replies",
        "participant:payment",
        "rebuilds",
        "audit-verifier",
        "retention",
        "ops",
    ];
    let mut ready = serde_json::Value::Null;
    for _ in 0..200 {
        ready = shop.readyz().await;
        if ready["status"] == "ready" && roles.iter().all(|r| ready["roles"][r] == "up") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready["status"], "ready", "{ready}");
    for role in roles {
        assert_eq!(ready["roles"][role], "up", "{role}: {ready}");
    }

    let token = shop.token("customer", "c-product");
    let mut orders = Vec::new();
    for (i, payment) in ["tok_visa", "tok_visa", "tok_visa", "tok_decline"]
        .iter()
        .enumerate()
    {
        let sku = format!("SKU-{}", i + 1);
        orders.push((shop.checkout(&token, &sku, payment).await, *payment));
    }
    for (id, payment) in &orders {
        let want = if *payment == "tok_decline" {
            "CANCELLED"
        } else {
            "CONFIRMED"
        };
        let mut seen = None;
        for _ in 0..240 {
            seen = shop.order_status(&token, *id).await;
            if seen.as_deref() == Some(want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(
            seen.as_deref(),
            Some(want),
            "order {id}:\n{}",
            shop.log_tail(30)
        );
    }
    // A visitor's activity reaches the analytics, which count it with the orders.
    let batch = serde_json::json!({"session_id": "sess-product-1", "events": [
        {"type": "product_view", "product_sku": "SKU-1",
         "occurred_at": chrono::Utc::now().to_rfc3339()},
    ]});
    let r = shop
        .http
        .post(format!("{}/activity", shop.api))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    let operator = shop.token("operator", "ops");
    let query =
        serde_json::json!({"query": "{ productAnalytics(sku: \"SKU-1\") { views orders } }"});
    let mut seen = serde_json::Value::Null;
    for _ in 0..240 {
        seen = shop
            .http
            .post(&shop.graphql)
            .bearer_auth(&operator)
            .json(&query)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if seen["data"]["productAnalytics"] == serde_json::json!([{"views": 1, "orders": 1}]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        seen["data"]["productAnalytics"],
        serde_json::json!([{"views": 1, "orders": 1}]),
        "{seen}\n{}",
        shop.log_tail(30)
    );
    // One pool per kind of work, each named in pg_stat_activity.
    let pools: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT application_name FROM pg_stat_activity
         WHERE datname = current_database() AND application_name LIKE 'shop:%' ORDER BY 1",
    )
    .fetch_all(&shop.db.pool)
    .await
    .unwrap();
    assert_eq!(pools, ["shop:commands", "shop:queries", "shop:workers"]);
    let sys = shop.system();
    let ids: Vec<_> = orders.iter().map(|(id, _)| *id).collect();
    let report = shop_tests::invariants::check(&sys, &ids).await;
    eprintln!("{report}");
    assert_eq!((report.confirmed, report.cancelled), (3, 1), "{report}");
    report.assert_ok();

    let status = shop.terminate(Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        shop.log_tail(30)
    );
    let log = std::fs::read_to_string(&shop.log).unwrap();
    assert!(
        log.contains("\"stopped\""),
        "no clean stop logged:\n{}",
        shop.log_tail(30)
    );
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(&shop.db.pool)
        .await
        .unwrap();
    assert_eq!(pending, 0, "outbox rows left unpublished");

    // Every event is keyed, the role wrote a signed checkpoint outside the database, and the
    // store verifies against one taken now.
    let unkeyed: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE hash_kid IS NULL")
        .fetch_one(&shop.db.pool)
        .await
        .unwrap();
    assert_eq!(unkeyed, 0);
    assert!(
        shop.checkpoints.join("latest.json").exists(),
        "no checkpoint written"
    );
    let out = shop
        .command(&["audit", "checkpoint", "--out"])
        .arg(&shop.checkpoints)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = shop
        .command(&["audit", "verify", "--checkpoint"])
        .arg(shop.checkpoints.join("latest.json"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("0 finding(s)"), "{text}");
    shop.clean_up_brokers().await;
}

/// A migration whose checksum no longer matches the database is a permanent failure: `shop
/// run` exits non-zero with the reason, instead of running half alive.
#[tokio::test]
async fn a_schema_mismatch_stops_shop_run_with_a_non_zero_status() {
    let shop = ShopProcess::start(bin()).await;
    shop.terminate(Duration::from_secs(60)).await;
    sqlx::query("UPDATE _sqlx_migrations SET checksum = '\\x00'::bytea WHERE version = (SELECT min(version) FROM _sqlx_migrations)")
        .execute(&shop.db.pool)
        .await
        .unwrap();
    // A misclassified (transient) error would retry for ever: bounded here.
    let out = ShopProcess::run_to_exit(
        shop.command(&["run"]),
        "shop run kept running on a mismatched schema",
    )
    .await;
    assert!(
        !out.status.success(),
        "shop run started on a mismatched schema"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        format!("{stdout}{stderr}").contains("previously applied but has been modified"),
        "{stdout}\n{stderr}"
    );
    shop.clean_up_brokers().await;
}

/// TLS to every service, as docs/operations.md configures it: PostgreSQL with
/// `sslmode=verify-full`, Kafka with `KAFKA_SECURITY_PROTOCOL=ssl` and RabbitMQ with an
/// `amqps://` URL, each verified against the CA given (the services' self-signed `localhost`
/// certificate, `scripts/lib.sh`). The brokers' TLS ports speak nothing else, so a checkout
/// that reaches its end shows every hop used TLS.
#[tokio::test]
async fn shop_run_works_over_tls_to_postgres_kafka_and_rabbitmq() {
    const CA: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    let kafka = std::env::var("KAFKA_TLS_BROKERS").unwrap_or_else(|_| "localhost:9094".into());
    let amqp = std::env::var("AMQP_TLS_URL")
        .unwrap_or_else(|_| "amqps://guest:guest@localhost:5671/%2f".into());
    let shop = ShopProcess::start_with(bin(), |db| {
        let sep = if db.url.contains('?') { '&' } else { '?' };
        let pg = db.url.replacen("@127.0.0.1:", "@localhost:", 1);
        vec![
            (
                "DATABASE_URL".into(),
                format!("{pg}{sep}sslmode=verify-full&sslrootcert={CA}"),
            ),
            ("KAFKA_BROKERS".into(), kafka.clone()),
            ("KAFKA_SECURITY_PROTOCOL".into(), "ssl".into()),
            ("KAFKA_SSL_CA_LOCATION".into(), CA.into()),
            ("AMQP_URL".into(), format!("{amqp}?cacertfile={CA}")),
        ]
    })
    .await;
    // The process's own connections to PostgreSQL are encrypted.
    let (tls, plain): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.datname = current_database() AND a.application_name LIKE 'shop:%'",
    )
    .fetch_one(&shop.db.pool)
    .await
    .unwrap();
    assert!(
        tls > 0 && plain == 0,
        "shop run's connections: {tls} TLS, {plain} plain"
    );

    let token = shop.token("customer", "c-tls");
    let confirmed = shop.checkout(&token, "SKU-1", "tok_visa").await;
    let declined = shop.checkout(&token, "SKU-2", "tok_decline").await;
    for (id, want) in [(confirmed, "CONFIRMED"), (declined, "CANCELLED")] {
        let mut seen = None;
        for _ in 0..240 {
            seen = shop.order_status(&token, id).await;
            if seen.as_deref() == Some(want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(seen.as_deref(), Some(want), "{}", shop.log_tail(40));
    }
    let status = shop.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}: {}", shop.log_tail(40));
    shop.clean_up_brokers().await;
}

//! The `shop` binary's operator commands, run as a real process against a real database.

use std::process::Command;

use platform::auth::Role;
use shop_tests::{TEST_JWT_KEYS, TestApi, checkout_body, test_auth};

fn shop(db_url: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shop"))
        .args(args)
        .env("DATABASE_URL", db_url)
        .env("JWT_KEYS", TEST_JWT_KEYS)
        .env_remove("JWT_KEYS_FILE")
        .env("AUDIT_KEYS", shop_tests::TEST_AUDIT_KEYS)
        .env_remove("AUDIT_KEYS_FILE")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run shop");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test]
async fn audit_verify_reports_the_first_broken_event() {
    let api = TestApi::new().await;
    let token = api.customer("c-1");
    let r = api.post("/orders", &token, "k", &checkout_body()).await;
    let id = r.json::<serde_json::Value>().await.unwrap()["order_id"]
        .as_str()
        .unwrap()
        .to_owned();
    api.post(
        &format!("/orders/{id}/cancel"),
        &token,
        "k2",
        &serde_json::json!({"reason": "x"}),
    )
    .await;

    let (ok, out) = shop(&api.db.url, &["audit", "verify"]);
    assert!(ok, "{out}");
    assert!(out.contains("1 stream(s) checked, 0 broken"), "{out}");

    api.db.allow_tampering().await;
    sqlx::query("UPDATE events SET payload = jsonb_set(payload, '{reason}', '\"y\"') WHERE stream_version = 2")
        .execute(&api.db.pool)
        .await
        .unwrap();
    let (ok, out) = shop(&api.db.url, &["audit", "verify", "--order", &id]);
    assert!(!ok, "tampering not reported: {out}");
    assert!(
        out.contains(&format!("BROKEN stream {id}: first bad event at version 2")),
        "{out}"
    );
    assert!(out.contains("ContentChanged"), "{out}");
}

#[test]
fn token_prints_a_token_the_services_accept() {
    let (ok, out) = shop(
        "postgres://unused@127.0.0.1/x",
        &["token", "--role", "customer", "--customer-id", "c-9"],
    );
    assert!(ok, "{out}");
    let p = test_auth().verify(out.trim()).unwrap();
    assert_eq!((p.subject.as_str(), p.role), ("c-9", Role::Customer));
}

/// `shop ARGS` with only `env` on top of a clean environment for keys and modes.
fn shop_with(env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shop"));
    for k in [
        "JWT_KEYS",
        "JWT_KEYS_FILE",
        "AUDIT_KEYS",
        "AUDIT_KEYS_FILE",
        "SHOP_DEV_MODE",
        "SAGA_FAULT_INJECTION",
    ] {
        c.env_remove(k);
    }
    // Nothing listens here: a refusal must come before any connection is tried.
    c.env("DATABASE_URL", "postgres://shop:shop@127.0.0.1:1/none")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .args(args);
    let out = c.output().expect("run shop");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[test]
fn run_refuses_to_start_without_keys_or_with_fault_injection_outside_development() {
    let audit = ("AUDIT_KEYS", shop_tests::TEST_AUDIT_KEYS);
    for (env, missing) in [
        (&[][..], "AUDIT_KEYS_FILE"),
        (&[("JWT_KEYS", TEST_JWT_KEYS)], "AUDIT_KEYS_FILE"),
        (&[audit], "JWT_KEYS_FILE"),
    ] {
        let (code, out) = shop_with(env, &["run"]);
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains(missing), "{out}");
    }
    let (code, out) = shop_with(
        &[("JWT_KEYS", TEST_JWT_KEYS)],
        &["token", "--role", "customer", "--ttl", "48h"],
    );
    assert_eq!(code, Some(1), "a token above JWT_MAX_TTL: {out}");
    assert!(out.contains("JWT_MAX_TTL"), "{out}");
    let (code, out) = shop_with(&[], &["token", "--role", "operator"]);
    assert_eq!(code, Some(1), "no built-in key mints tokens: {out}");
    for env in [
        &[
            ("JWT_KEYS", TEST_JWT_KEYS),
            audit,
            ("SAGA_FAULT_INJECTION", "true"),
        ][..],
        &[
            ("JWT_KEYS", TEST_JWT_KEYS),
            audit,
            ("SAGA_REFUSE_COMMANDS_AT", "shipping"),
        ],
    ] {
        let (code, out) = shop_with(env, &["run"]);
        assert_eq!(code, Some(1), "{env:?}: {out}");
        assert!(out.contains("SAGA_FAULT_INJECTION"), "{out}");
    }
}

/// Connection URLs carry passwords; whatever fails while connecting, no message or log line
/// may repeat them.
#[test]
fn connection_passwords_never_reach_messages_or_logs() {
    const PG_SECRET: &str = "pg-Secret-4f1e";
    const MQ_SECRET: &str = "mq-Secret-9b2c";
    let unreachable_pg = format!("postgres://shop:{PG_SECRET}@127.0.0.1:1/shop");
    let wrong_password_pg = format!("postgres://shop:{PG_SECRET}@127.0.0.1:5432/shop");
    let unreachable_mq = format!("amqp://guest:{MQ_SECRET}@127.0.0.1:1/%2f");
    let mut outputs = Vec::new();
    // Values that are not URLs at all are refused without being repeated.
    for (var, value) in [
        ("DATABASE_URL", format!("shop:{PG_SECRET}@127.0.0.1/shop")),
        ("AMQP_URL", format!("guest:{MQ_SECRET}@127.0.0.1")),
    ] {
        let (code, out) = shop_with(&[(var, &value)], &["migrate"]);
        assert_eq!(code, Some(2), "{var}: {out}");
        assert!(out.contains("expected a URL like"), "{out}");
        outputs.push(out);
    }
    // One-shot commands that fail.
    for args in [&["migrate"][..], &["catalog", "list"]] {
        for url in [&unreachable_pg, &wrong_password_pg] {
            let (code, out) = shop_with(&[("DATABASE_URL", url)], args);
            assert_ne!(code, Some(0), "{args:?} {out}");
            outputs.push(out);
        }
    }
    // Long-running roles that retry: their warnings, at debug level, for a few seconds.
    for (db, amqp, args) in [
        (&unreachable_pg, &unreachable_mq, &["run"][..]),
        (&wrong_password_pg, &unreachable_mq, &["run"]),
        (
            &"postgres://shop:shop@127.0.0.1:5432/shop".to_owned(),
            &unreachable_mq,
            &["saga"],
        ),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shop"))
            .args(args)
            .env("DATABASE_URL", db)
            .env("AMQP_URL", amqp)
            .env("JWT_KEYS", TEST_JWT_KEYS)
            .env_remove("JWT_KEYS_FILE")
            .env("AUDIT_KEYS", shop_tests::TEST_AUDIT_KEYS)
            .env_remove("AUDIT_KEYS_FILE")
            .env("RUST_LOG", "debug")
            .env("OPS_ADDR", "127.0.0.1:0")
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("GRAPHQL_ADDR", "127.0.0.1:0")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start shop");
        // Longer than a connection attempt's 5 s acquire timeout, so a retry is logged.
        std::thread::sleep(std::time::Duration::from_secs(8));
        child.kill().ok();
        let out = child.wait_with_output().expect("shop output");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("retry") || text.contains("failed") || text.contains("error"),
            "{args:?}: the failure was not reported at all: {text}"
        );
        outputs.push(text);
    }
    for out in outputs {
        assert!(
            !out.contains(PG_SECRET) && !out.contains(MQ_SECRET),
            "a password leaked:\n{out}"
        );
    }
}

#[tokio::test]
async fn outbox_failed_lists_set_aside_messages_and_retry_puts_them_back() {
    let db = shop_tests::TestDb::new().await;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (message_id, destination, target, routing_key, ordering_key, payload, failed_at, attempts, last_error)
         VALUES (gen_random_uuid(), 'amqp', 'checkout.commands', 'nowhere', 'order-1', 'x', now(), 1, 'returned by the broker: 312 NO_ROUTE')
         RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();

    let (ok, out) = shop(&db.url, &["outbox", "failed"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("NO_ROUTE")
            && out.contains("key=order-1")
            && out.contains("1 failed message(s)"),
        "{out}"
    );

    let (ok, out) = shop(&db.url, &["outbox", "retry", &id.to_string()]);
    assert!(ok, "{out}");
    let failed_at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT failed_at FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(failed_at.is_none(), "the row is pending again");
    let (ok, out) = shop(&db.url, &["outbox", "retry", &id.to_string()]);
    assert!(!ok, "retrying a row that is not failed must fail: {out}");
    let (_, out) = shop(&db.url, &["outbox", "failed"]);
    assert!(out.contains("0 failed message(s)"), "{out}");
}

#[tokio::test]
async fn dlq_lists_shows_and_discards_dead_letters() {
    let db = shop_tests::TestDb::new().await;
    let id: i64 = sqlx::query_scalar(
        r#"INSERT INTO dead_letters (projection, topic, partition, "offset", error_class, error_message, attempts, payload)
           VALUES ('order_summary', 'orders.events', 0, 7, 'undecodable', 'expected value at line 1', 1, 'not json')
           RETURNING id"#,
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let (ok, out) = shop(&db.url, &["dlq", "list"]);
    assert!(
        ok && out.contains("undecodable") && out.contains("1 read-side dead letter(s)"),
        "{out}"
    );
    let (ok, out) = shop(&db.url, &["dlq", "show", &id.to_string()]);
    assert!(
        ok && out.contains("offset 7") && out.contains("message: not json"),
        "{out}"
    );
    // Replaying an undecodable message fails again and keeps it open.
    let (ok, out) = shop(&db.url, &["dlq", "replay", &id.to_string()]);
    assert!(!ok && out.contains("failed again"), "{out}");
    let (ok, out) = shop(
        &db.url,
        &[
            "dlq",
            "discard",
            &id.to_string(),
            "--why",
            "garbage from a test",
        ],
    );
    assert!(ok && out.contains("discarded"), "{out}");
    let (_, out) = shop(&db.url, &["dlq", "list"]);
    assert!(out.contains("0 read-side dead letter(s)"), "{out}");
    // Both changes are in the action log, as the console records its own; the reads are not.
    let recorded: Vec<(String, String, String, String, String)> = sqlx::query_as(
        "SELECT actor, action, target, reason, outcome FROM console_actions ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let target = format!("dead-letter:read-side/{id}");
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert!(recorded[0].0.starts_with("cli:"), "{recorded:?}");
    assert_eq!(
        (recorded[0].1.as_str(), recorded[0].2.as_str()),
        ("replay_dead_letter", target.as_str())
    );
    assert!(recorded[0].4.starts_with("refused"), "{recorded:?}");
    assert_eq!(
        (
            recorded[1].1.as_str(),
            recorded[1].3.as_str(),
            recorded[1].4.as_str()
        ),
        ("discard_dead_letter", "garbage from a test", "ok")
    );
    // Saga dead letters are addressed by message id; an unknown one is reported.
    let missing = uuid::Uuid::new_v4().to_string();
    let (ok, out) = shop(
        &db.url,
        &["dlq", "--queue-prefix", "nobody.", "discard", &missing],
    );
    assert!(
        !ok && out.contains("no dead letter with message id"),
        "{out}"
    );
    let (_, out) = shop(&db.url, &["dlq", "list", "--all"]);
    assert!(out.contains("discarded"), "{out}");
}

#[tokio::test]
async fn projections_rebuild_switches_to_a_new_version_and_status_shows_it() {
    let db = shop_tests::TestDb::new().await;
    shop_tests::append_orders(&db.pool, 30, 2).await;
    let (ok, out) = shop(&db.url, &["projections", "rebuild", "nope"]);
    assert!(!ok && out.contains("unknown projection `nope`"), "{out}");

    let (ok, out) = shop(
        &db.url,
        &[
            "projections",
            "rebuild",
            "order_summary",
            "--batch-size",
            "25",
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("order_summary rebuilt: version 2 is active (90 events)"),
        "{out}"
    );
    let cancelled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM order_summary WHERE status = 'CANCELLED' AND version = 3",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(cancelled, 30);

    // Status lists every projection with its active version and state.
    let (ok, out) = shop(&db.url, &["projections", "status"]);
    assert!(ok, "{out}");
    assert!(out.contains("order_summary\tv2\tLive"), "{out}");
    assert!(out.contains("sales_by_product\tv1\tLive"), "{out}");
}

#[tokio::test]
async fn catalog_set_list_and_seed_manage_the_shops_prices() {
    let db = shop_tests::TestDb::new().await;
    let (ok, out) = shop(&db.url, &["catalog", "seed"]);
    assert!(ok && out.contains("5 added"), "{out}");
    let (ok, out) = shop(&db.url, &["catalog", "seed"]);
    assert!(ok && out.contains("0 added"), "{out}");
    let (ok, out) = shop(
        &db.url,
        &[
            "catalog",
            "set",
            "SKU-6",
            "--name",
            "Tamper",
            "--price-minor",
            "2900",
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = shop(
        &db.url,
        &[
            "catalog",
            "set",
            "SKU-2",
            "--name",
            "Saucer",
            "--price-minor",
            "499",
            "--inactive",
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = shop(&db.url, &["catalog", "list"]);
    assert!(ok, "{out}");
    assert!(out.contains("SKU-6\t2900 EUR\tfor sale\tTamper"), "{out}");
    assert!(out.contains("SKU-2\t499 EUR\tinactive\tSaucer"), "{out}");
    for bad in [
        &[
            "catalog",
            "set",
            "SKU-7",
            "--name",
            "X",
            "--price-minor",
            "-1",
        ][..],
        &[
            "catalog",
            "set",
            "SKU-7",
            "--name",
            "X",
            "--price-minor",
            "100000000001",
        ],
        &[
            "catalog",
            "set",
            "SKU-7",
            "--name",
            "X",
            "--price-minor",
            "1",
            "--currency",
            "EURO",
        ],
        &["catalog", "set", "a b", "--name", "X", "--price-minor", "1"],
    ] {
        let (ok, out) = shop(&db.url, bad);
        assert!(!ok, "{bad:?} was accepted: {out}");
    }
    let (_, out) = shop(&db.url, &["catalog", "list"]);
    assert!(!out.contains("SKU-7"), "{out}");
}

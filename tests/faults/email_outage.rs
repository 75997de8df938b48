//! The fan-out stays true through an SMTP outage: with the SMTP server stopped, `shop run`
//! keeps confirming orders and the analytics keep counting while the email group pauses
//! (circuit open, shown in `/readyz`); once the server is back, the group catches up and every
//! confirmation is emailed, once.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::json;
use shop_tests::process::ShopProcess;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shop"))
}

fn smtp(action: &str) -> bool {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/smtp.sh");
    Command::new("bash")
        .args([script, action])
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts the SMTP server again when dropped (also when the test fails).
struct SmtpBack;

impl Drop for SmtpBack {
    fn drop(&mut self) {
        if !smtp("up") {
            eprintln!("undoing a fault: scripts/smtp.sh up failed");
        }
    }
}

/// Emails delivered to `to` (their Message-IDs), from the server's Maildir.
fn delivered_to(to: &str) -> Vec<String> {
    let dir = std::env::var("SMTP_MAILDIR").expect("SMTP_MAILDIR (source scripts/lib.sh)");
    let mut ids = Vec::new();
    for sub in ["new", "cur"] {
        for e in std::fs::read_dir(format!("{dir}/{sub}"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let to_line = text.lines().find(|l| l.starts_with("To:")).unwrap_or("");
            if to_line.contains(to) {
                let id = text.lines().find_map(|l| l.strip_prefix("Message-ID:"));
                ids.push(id.unwrap_or("").trim().to_owned());
            }
        }
    }
    ids.sort();
    ids
}

async fn until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "never: {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smtp_outage_pauses_only_the_email_group_and_it_catches_up_after() {
    let _one = crate::ONE_AT_A_TIME.lock().await;
    let shop = ShopProcess::start_with(bin(), |_| {
        [
            ("EMAIL_RETRY_BASE", "100ms"),
            ("EMAIL_BREAKER_AFTER", "2"),
            ("EMAIL_BREAKER_COOLDOWN", "1s"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    })
    .await;
    let address = format!("{}@outage.example.com", shop.prefix.trim_end_matches('.'));
    let token = shop.token("customer", "c-outage");
    let r = shop
        .http
        .put(format!("{}/customers/c-outage", shop.api))
        .bearer_auth(&token)
        .json(&json!({"name": "Grace Hopper", "email": address}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let _back = SmtpBack;
    assert!(smtp("down"), "scripts/smtp.sh down failed");
    let mut orders = Vec::new();
    for _ in 0..5 {
        orders.push(shop.checkout(&token, "SKU-1", "tok_visa").await);
    }
    // Orders confirm without the SMTP server.
    for id in &orders {
        until(
            "the order confirmed during the outage",
            Duration::from_secs(60),
            || async { shop.order_status(&token, *id).await.as_deref() == Some("CONFIRMED") },
        )
        .await;
    }
    // The analytics count them.
    let operator = shop.token("operator", "ops");
    let query = json!({"query": "{ productAnalytics(sku: \"SKU-1\") { orders } }"});
    until(
        "the analytics counted the orders",
        Duration::from_secs(60),
        || async {
            let v = shop.graphql(&operator, &query).await;
            v["data"]["productAnalytics"][0]["orders"] == 5
        },
    )
    .await;
    // The email group is paused, and says so.
    until(
        "the email role reported down",
        Duration::from_secs(30),
        || async { shop.readyz().await["roles"]["email"] == "restarting" },
    )
    .await;
    let ready = shop.readyz().await;
    assert!(
        ready["role_details"]["email"]
            .to_string()
            .contains("circuit open"),
        "{ready}"
    );
    assert!(delivered_to(&address).is_empty());

    // The server is back: every confirmation is emailed, once.
    assert!(smtp("up"), "scripts/smtp.sh up failed");
    until(
        "every confirmation emailed",
        Duration::from_secs(60),
        || async { delivered_to(&address).len() >= 5 },
    )
    .await;
    until(
        "the email role back up",
        Duration::from_secs(30),
        || async { shop.readyz().await["roles"]["email"] == "up" },
    )
    .await;
    let ids = delivered_to(&address);
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!((ids.len(), unique.len()), (5, 5), "{ids:?}");
    let status = shop.terminate(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", shop.log_tail(30));
    shop.clean_up_brokers().await;
}

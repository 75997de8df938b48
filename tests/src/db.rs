//! A PostgreSQL database of its own per test (migrated, dropped afterwards), the shared
//! settings, and orders written straight into the event store the way the command path
//! writes them.

use platform::config::InfraConfig;
use sqlx::{Connection, Executor, PgConnection, PgPool};

/// The shared settings, read from the environment like the services read them.
pub fn infra() -> InfraConfig {
    InfraConfig::from_env().expect("invalid service environment for tests")
}

/// A short random name part, e.g. `t3f9a0c1b2d4e`.
pub fn unique_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Replaces the database name (the URL's last path segment) in a Postgres URL.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = base.rsplit_once('/').map(|(b, _)| b).unwrap_or(base);
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A database of its own for one test, with all migrations applied.
pub struct TestDb {
    pub pool: PgPool,
    pub name: String,
    pub url: String,
    admin_url: String,
}

/// Prefix of every test database; `scripts/test.sh` drops leftovers carrying it.
pub const TEST_DB_PREFIX: &str = "shoptest_";

impl TestDb {
    pub async fn new() -> Self {
        Self::with_pool_size(8).await
    }

    /// Lets this test's database change and remove events, as an attacker who owns the
    /// tables would (the owner can disable the append-only triggers); tests that tamper or
    /// simulate corrupt rows call it first.
    pub async fn allow_tampering(&self) {
        sqlx::query("ALTER TABLE events DISABLE TRIGGER USER")
            .execute(&self.pool)
            .await
            .expect("disable the append-only triggers");
    }

    pub async fn with_pool_size(max: u32) -> Self {
        crate::install_test_audit_keys();
        let admin_url = infra().database_url;
        let name = format!("{TEST_DB_PREFIX}{}", unique_prefix());
        let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!("cannot reach PostgreSQL at {admin_url}: {e} (run scripts/services.sh up)")
        });
        admin
            .execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
            .await
            .expect("create test database");
        admin.close().await.ok();
        let url = with_database(&admin_url, &name);
        let pool = platform::db::connect(&url, max)
            .await
            .expect("connect to test database");
        platform::db::migrate(&pool)
            .await
            .expect("apply migrations");
        Self {
            pool,
            name,
            url,
            admin_url,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Synchronous on purpose: async clean-up from Drop would need the test's runtime,
        // which is blocked right here. FORCE ends the pool's sessions.
        let sql = format!(r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#, self.name);
        let _ = std::process::Command::new("psql")
            .args([self.admin_url.as_str(), "-qXc", sql.as_str()])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// Appends `n_orders` orders concurrently, each with three events in three transactions
/// (placed, inventory reserved, cancelled), with their outbox messages, like the command path.
/// Returns the order ids.
pub async fn append_orders(pool: &PgPool, n_orders: usize, concurrency: usize) -> Vec<uuid::Uuid> {
    use domain::{order::*, values::*};
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (pool, next) = (pool.clone(), next.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n_orders {
                    let id = OrderId(uuid::Uuid::now_v7());
                    let place = OrderCommand::Place(PlaceOrder {
                        order_id: id,
                        customer_id: CustomerId::parse("c-1").unwrap(),
                        currency: Currency::parse("EUR").unwrap(),
                        lines: vec![NewLine {
                            sku: Sku::parse("SKU-1").unwrap(),
                            quantity: Quantity::parse(1).unwrap(),
                            unit_price_minor: MinorUnits::parse(100).unwrap(),
                        }],
                        shipping_address: platform::vault::DataKey::ephemeral().seal(
                            &domain::personal::shipping_address_context(id),
                            &ShippingAddress::parse("A", "B", "C", "D", "DE").unwrap(),
                        ),
                        payment_ref: domain::personal::PaymentRef(uuid::Uuid::now_v7()),
                    });
                    let cancel = OrderCommand::Cancel {
                        reason: Reason::parse("test").unwrap(),
                        by: CancelledBy::Customer,
                    };
                    let reserve = OrderCommand::MarkInventoryReserved {
                        reservation_id: "r".into(),
                    };
                    let mut history = Vec::new();
                    for cmd in [place, reserve, cancel] {
                        let events = decide(&replay(&history), cmd).unwrap();
                        let meta = event_store::Metadata {
                            correlation_id: id.0,
                            causation_id: uuid::Uuid::now_v7(),
                            actor: "test".into(),
                            traceparent: None,
                            command_id: None,
                        };
                        let at = event_store::now_micros();
                        let mut tx = pool.begin().await.unwrap();
                        let (_, expected) = event_store::load_stream(&mut tx, id.0).await.unwrap();
                        let (stored, outbox) =
                            orders::order_records(id, expected.version + 1, &events, &meta, at);
                        event_store::append_at(
                            &mut tx, id.0, "order", &expected, &stored, &outbox, at,
                        )
                        .await
                        .unwrap();
                        tx.commit().await.unwrap();
                        history.extend(events);
                    }
                    ids.push(id.0);
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    ids
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_name_is_replaced() {
        assert_eq!(
            super::with_database("postgres://u:p@h:5432/shop", "x"),
            "postgres://u:p@h:5432/x"
        );
        assert_eq!(
            super::with_database("postgres://u:p@h/shop?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
    }
}

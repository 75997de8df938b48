//! PostgreSQL pools and the project's migrations.
//!
//! Migrations live in `migrations/` at the workspace root and are embedded at compile time,
//! so `shop migrate` and the tests apply exactly what was built (no sqlx-cli needed).

use std::time::Duration;

use sqlx::{PgPool, migrate::Migrator, postgres::PgPoolOptions};

use crate::config::InfraConfig;

/// The project's migrations. Migrations applied by a newer build are tolerated
/// (`ignore_missing`), so an older binary keeps working during a rolling upgrade.
pub static MIGRATOR: Migrator = Migrator {
    ignore_missing: true,
    ..sqlx::migrate!("../migrations")
};

/// Opens a pool to `url` with at most `max` connections.
pub async fn connect(url: &str, max: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
}

/// Opens the pool described by the shared config.
pub async fn connect_config(cfg: &InfraConfig) -> Result<PgPool, sqlx::Error> {
    connect(&cfg.database_url, cfg.database_max_connections).await
}

/// Applies every pending migration. Safe to run concurrently (sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

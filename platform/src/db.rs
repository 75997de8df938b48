//! PostgreSQL pools and the project's migrations.
//!
//! `shop run` opens one pool per kind of work ([`Pools`]): the command API, GraphQL queries,
//! and the workers, each with its own size and `statement_timeout`, so a slow or hostile
//! query cannot hold the connections a checkout needs, and a statement that runs away is
//! stopped by PostgreSQL itself. Each pool names itself (`application_name`) in
//! `pg_stat_activity`.
//!
//! Migrations live in `migrations/` at the workspace root and are embedded at compile time,
//! so `shop migrate` and the tests apply exactly what was built (no sqlx-cli needed).

use std::time::Duration;

use sqlx::{
    PgPool,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
};

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

/// Opens a pool of at most `max` connections named `name` whose statements PostgreSQL
/// cancels after `statement_timeout`.
pub async fn connect_bounded(
    url: &str,
    name: &str,
    max: u32,
    statement_timeout: Duration,
) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let options = options.application_name(name).options([(
        "statement_timeout",
        format!("{}ms", statement_timeout.as_millis().max(1)),
    )]);
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
}

/// The pools of `shop run`, one per kind of work.
#[derive(Clone)]
pub struct Pools {
    /// The command API's.
    pub commands: PgPool,
    /// GraphQL's.
    pub queries: PgPool,
    /// The relay's, projectors', saga's, rebuilds' and readiness'.
    pub workers: PgPool,
}

impl Pools {
    pub async fn connect(cfg: &InfraConfig) -> Result<Self, sqlx::Error> {
        let url = &cfg.database_url;
        Ok(Self {
            commands: connect_bounded(
                url,
                "shop:commands",
                cfg.database_pool_commands,
                cfg.database_command_timeout,
            )
            .await?,
            queries: connect_bounded(
                url,
                "shop:queries",
                cfg.database_pool_queries,
                cfg.database_query_timeout,
            )
            .await?,
            workers: connect_bounded(
                url,
                "shop:workers",
                cfg.database_pool_workers,
                cfg.database_worker_timeout,
            )
            .await?,
        })
    }

    /// Closes every pool, each bounded by `limit`.
    pub async fn close(&self, limit: Duration) {
        for pool in [&self.commands, &self.queries, &self.workers] {
            let _ = tokio::time::timeout(limit, pool.close()).await;
        }
    }
}

/// Deletes the rows of `table` whose `column` (a timestamp) is older than `age`, at most
/// `batch` rows per statement so no delete holds many locks for long; returns how many went.
/// `table` and `column` are the caller's own names, never input.
pub async fn delete_older_than(
    pool: &PgPool,
    table: &'static str,
    column: &'static str,
    age: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let sql = format!(
        "DELETE FROM {table} WHERE ctid IN
           (SELECT ctid FROM {table} WHERE {column} < now() - $1 LIMIT $2)"
    );
    let mut total = 0;
    loop {
        let n = sqlx::query(&sql)
            .bind(age)
            .bind(batch)
            .execute(pool)
            .await?
            .rows_affected();
        total += n;
        if n < batch.max(1) as u64 {
            return Ok(total);
        }
    }
}

/// Applies every pending migration. Safe to run concurrently (sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

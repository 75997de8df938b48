//! The `retention` role of `shop run`: deletes what only has to be kept for a while, by age,
//! every minute. Each table's owner says how (`write_side::commands`, `saga::retention`);
//! this role only schedules them, supervised like every other role.
//!
//! Kept: idempotency keys (a retry within `IDEMPOTENCY_KEY_RETENTION` gets the first answer;
//! after it, a retry is a new command) and the saga's inboxes and command record
//! (`INBOX_RETENTION`), the analytics' one-minute windows and presence (a day) and counted
//! event ids (`ANALYTICS_SEEN_RETENTION`). The outbox's published rows are pruned by the relay
//! (`RELAY_RETENTION`); events are never deleted.

use std::time::Duration;

use platform::supervisor::RoleCtx;
use sqlx::PgPool;

#[derive(Debug, Clone, clap::Args)]
pub struct RetentionConfig {
    /// How long a command's idempotency key (and its stored answer) is kept.
    #[arg(long, env = "IDEMPOTENCY_KEY_RETENTION", default_value = "72h", value_parser = platform::config::parse_duration)]
    pub idempotency_key_retention: Duration,
    /// How long the saga's and participants' inbox rows and sent-command records are kept.
    #[arg(long, env = "INBOX_RETENTION", default_value = "168h", value_parser = platform::config::parse_duration)]
    pub inbox_retention: Duration,
    /// How long the analytics remember an event id they counted (longer than the topics
    /// keep events, so nothing still deliverable is counted twice).
    #[arg(long, env = "ANALYTICS_SEEN_RETENTION", default_value = "8d", value_parser = platform::config::parse_duration)]
    pub analytics_seen_retention: Duration,
    /// How long a checkout's payment token waits for the payment participant before it is
    /// deleted unused (the payment then declines: "token expired").
    #[arg(long, env = "PAYMENT_TOKEN_TTL", default_value = "24h", value_parser = platform::config::parse_duration)]
    pub payment_token_ttl: Duration,
    /// How often retention runs.
    #[arg(long, env = "RETENTION_INTERVAL", default_value = "1m", value_parser = platform::config::parse_duration)]
    pub retention_interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        platform::config::defaults()
    }
}

/// One pass over every table; returns what went, per table.
pub async fn prune_once(
    pool: &PgPool,
    cfg: &RetentionConfig,
) -> Result<Vec<(&'static str, u64)>, sqlx::Error> {
    let keys = write_side::idempotency::prune(pool, cfg.idempotency_key_retention).await?;
    let tokens = orders::payment_tokens::prune(pool, cfg.payment_token_ttl).await?;
    let mut pruned = vec![("idempotency_keys", keys), ("payment_tokens", tokens)];
    pruned.extend(saga::retention::prune(pool, cfg.inbox_retention).await?);
    let day = chrono::TimeDelta::hours(24);
    let seen = chrono::TimeDelta::from_std(cfg.analytics_seen_retention).unwrap_or(day);
    pruned.extend(read_side::analytics::repo::prune(pool, day, seen).await?);
    for (table, n) in &pruned {
        metrics::counter!("retention_pruned_rows_total", "table" => *table).increment(*n);
        if *n > 0 {
            tracing::info!(table, rows = n, "retention pruned old rows");
        }
    }
    Ok(pruned)
}

/// Runs [`prune_once`] every `retention_interval` until shutdown. A failed pass is an error
/// for the supervisor, which restarts the role with backoff.
pub async fn run_role(pool: PgPool, cfg: RetentionConfig, ctx: RoleCtx) -> anyhow::Result<()> {
    ctx.up();
    let shutdown = ctx.shutdown().clone();
    loop {
        prune_once(&pool, &cfg).await?;
        metrics::gauge!("retention_last_run_timestamp_seconds")
            .set(chrono::Utc::now().timestamp() as f64);
        ctx.up();
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(cfg.retention_interval) => {}
        }
    }
}

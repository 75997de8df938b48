//! Live analytics: the `analytics` consumer group folds user activity (`user-activity`) and
//! order events into counters in PostgreSQL: per product views, add-to-carts, orders and
//! units (conversion is orders over views); shop-wide one-minute windows for a day; when each
//! user and session was last active.
//!
//! Counted exactly once: each batch's counters, the event ids it counted and the group's
//! checkpoints commit in one transaction, and an id already counted is skipped. The counters
//! depend on the two topics alone (no wall clock), so replaying them from offset 0 gives the
//! same rows: that is the rebuild ([`rebuild`]), which resets the tables and moves the group
//! to a new generation. It recovers what the topics still hold: `user-activity` keeps
//! `ACTIVITY_RETENTION` (7 days by default), so per-product activity counts after a rebuild
//! cover that period (docs/operations.md).
//!
//! # Layout
//! - [`fold`](mod@fold): facts into counter changes (pure; windows and lateness).
//! - [`repo`]: every statement on the tables.
//! - [`consumer`]: the group's loop.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::status::{ProjectionStatus, State, Watermarks, lag_over};

pub mod consumer;
pub mod fold;
pub mod repo;

pub use consumer::{AnalyticsConsumer, Ended, Topics};

/// The group's name: its checkpoints, consumer group and place in projection status.
pub const NAME: &str = "analytics";

/// The activity topic (before the configurable prefix), written by `POST /activity`.
pub const ACTIVITY_TOPIC: &str = "user-activity";

/// The analytics group as a supervised role: waits for a broker, then [`run`]s.
pub async fn run_role(
    pool: PgPool,
    brokers: String,
    topics: Topics,
    group_prefix: String,
    stuck_after: Duration,
    ctx: platform::supervisor::RoleCtx,
) -> anyhow::Result<()> {
    platform::kafka::wait_ready(&brokers, Duration::from_secs(10)).await?;
    let shutdown = ctx.shutdown().clone();
    run(
        pool,
        &brokers,
        topics,
        &group_prefix,
        stuck_after,
        &shutdown,
        || ctx.up(),
    )
    .await
}

/// Consumes until shutdown, starting a consumer of the new group after each rebuild; `up`
/// is called each time a consumer is ready. Returns the first error.
pub async fn run(
    pool: PgPool,
    brokers: &str,
    topics: Topics,
    group_prefix: &str,
    stuck_after: Duration,
    shutdown: &CancellationToken,
    up: impl Fn(),
) -> anyhow::Result<()> {
    loop {
        let consumer = AnalyticsConsumer::new(
            pool.clone(),
            brokers,
            topics.clone(),
            group_prefix,
            stuck_after,
        )
        .await?;
        up();
        match consumer.run(shutdown).await? {
            Ended::Shutdown => return Ok(()),
            Ended::Rebuilt => {
                tracing::info!("analytics rebuilt: replaying both topics from their first offsets")
            }
        }
    }
}

/// Rebuilds the analytics by replay: resets the counters, the counted ids and the
/// checkpoints, and moves the group to a new generation; the running consumer switches to
/// it and replays both topics from offset 0. Returns the new generation.
pub async fn rebuild(pool: &PgPool) -> Result<i32, sqlx::Error> {
    repo::reset(pool, NAME).await
}

/// Events in the topics beyond the group's checkpoints; `None` when the brokers do not
/// answer.
pub async fn lag(pool: &PgPool, watermarks: &[Watermarks]) -> Result<Option<i64>, sqlx::Error> {
    let checkpoints: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT topic, partition, next_offset FROM projection_checkpoints WHERE projection = $1",
    )
    .bind(NAME)
    .fetch_all(pool)
    .await?;
    let mut total = 0;
    for w in watermarks {
        let Some(marks) = w.fetch().await else {
            return Ok(None);
        };
        total += lag_over(&marks, marks.keys().copied(), |p| {
            checkpoints
                .iter()
                .find(|c| c.0 == w.topic() && c.1 == p)
                .map(|c| c.2)
        });
    }
    Ok(Some(total))
}

/// The group as a row of projection status (a rebuild shows as its lag shrinking).
pub async fn status(
    pool: &PgPool,
    watermarks: Option<&[Watermarks]>,
) -> Result<ProjectionStatus, sqlx::Error> {
    let (version, last_rebuilt_at) = repo::state(pool).await?;
    let position: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(next_offset), 0)::bigint FROM projection_checkpoints WHERE projection = $1",
    )
    .bind(NAME)
    .fetch_one(pool)
    .await?;
    let lag = match watermarks {
        Some(w) => lag(pool, w).await?,
        None => None,
    };
    Ok(ProjectionStatus {
        name: NAME,
        version,
        state: State::Live,
        position,
        lag,
        behind_retention: None,
        rebuild: None,
        last_rebuilt_at,
    })
}

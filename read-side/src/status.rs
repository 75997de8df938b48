//! Where each projection is (and the analytics group, last): active version, Kafka position
//! and lag, and any rebuild.
//!
//! The position is the sum of the stored per-partition checkpoints (the next offset to apply);
//! the lag is what the topic holds beyond them, from the brokers' high watermarks when a
//! Kafka client is given. A rebuild counts as running only while its session holds the
//! rebuild lock; a row left `running` by a crashed process shows as interrupted.

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::{PgPool, Row};

use crate::projection::{Kind, REBUILD_LOCK_NS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Live,
    Rebuilding,
    /// A rebuild stopped (crash or error); the next rebuild resumes it.
    RebuildInterrupted,
}

#[derive(Debug, Clone)]
pub struct RebuildStatus {
    pub version: i32,
    pub processed: i64,
    pub total: i64,
    pub started_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    /// An operator asked it to stop ([`crate::rebuild::abort`]); it does at its next batch.
    pub aborting: bool,
    /// It waits for an operator's switch ([`crate::rebuild::switch`]) once caught up.
    pub held: bool,
    /// It has caught up and follows the feed, waiting for that switch.
    pub ready: bool,
}

#[derive(Debug, Clone)]
pub struct ProjectionStatus {
    pub name: &'static str,
    pub version: i32,
    pub state: State,
    pub position: i64,
    pub lag: Option<i64>,
    /// Partitions whose next offset to apply is below the oldest offset Kafka still holds:
    /// events the projection never applied were deleted by retention. Never skipped
    /// silently: the way out is `shop projections rebuild NAME` (from the event store).
    pub behind_retention: Option<i64>,
    pub rebuild: Option<RebuildStatus>,
    pub last_rebuilt_at: Option<DateTime<Utc>>,
}

/// High watermarks of the order-events topic, for lag.
#[derive(Clone)]
pub struct Watermarks {
    consumer: Arc<BaseConsumer>,
    topic: String,
}

impl Watermarks {
    pub fn new(brokers: &str, topic: &str) -> Result<Self, rdkafka::error::KafkaError> {
        let consumer: BaseConsumer = platform::kafka::base_config(brokers).create()?;
        Ok(Self {
            consumer: Arc::new(consumer),
            topic: topic.to_owned(),
        })
    }

    /// The topic whose watermarks these are.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The same client on another topic, named in full.
    pub fn for_topic(&self, topic: &str) -> Self {
        Self {
            consumer: self.consumer.clone(),
            topic: topic.to_owned(),
        }
    }

    /// The same client on `name` under this topic's prefix (`<prefix>orders.events` →
    /// `<prefix><name>`).
    pub fn sibling(&self, name: &str) -> Self {
        let prefix = self.topic.strip_suffix("orders.events").unwrap_or("");
        Self {
            consumer: self.consumer.clone(),
            topic: format!("{prefix}{name}"),
        }
    }

    /// Per partition: (low, high) watermarks. `None` when the brokers do not answer.
    pub async fn fetch(&self) -> Option<HashMap<i32, (i64, i64)>> {
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(2);
            let metadata = consumer.fetch_metadata(Some(&topic), timeout).ok()?;
            let partitions: Vec<i32> = metadata
                .topics()
                .first()?
                .partitions()
                .iter()
                .map(|p| p.id())
                .collect();
            partitions
                .into_iter()
                .map(|p| Some((p, consumer.fetch_watermarks(&topic, p, timeout).ok()?)))
                .collect()
        })
        .await
        .ok()
        .flatten()
    }
}

pub async fn all(
    pool: &PgPool,
    watermarks: Option<&Watermarks>,
) -> Result<Vec<ProjectionStatus>, sqlx::Error> {
    let marks = match watermarks {
        Some(w) => w.fetch().await.map(|m| (w.topic.clone(), m)),
        None => None,
    };
    // The rebuild lock (see `rebuild`), looked up without taking it.
    let rows = sqlx::query(
        "SELECT p.*, NOT EXISTS (
             SELECT 1 FROM pg_locks l
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND l.classid = $1::bigint::oid AND l.objid = (hashtext(p.name)::bigint & 4294967295)::oid
         ) AS free
         FROM projections p ORDER BY p.name",
    )
    .bind(REBUILD_LOCK_NS)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let name: String = r.try_get("name")?;
        let Some(kind) = Kind::parse(&name) else {
            continue;
        };
        let free: bool = r.try_get("free")?;
        let checkpoints: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT topic, partition, next_offset FROM projection_checkpoints WHERE projection = $1",
        )
        .bind(&name)
        .fetch_all(pool)
        .await?;
        let position = checkpoints.iter().map(|c| c.2).sum();
        let lag = marks.as_ref().map(|(topic, m)| {
            let next = |p: i32| {
                checkpoints
                    .iter()
                    .find(|c| &c.0 == topic && c.1 == p)
                    .map(|c| c.2)
            };
            let behind = m
                .iter()
                .filter(|(p, (low, _))| next(**p).unwrap_or(0) < *low)
                .count() as i64;
            (lag_over(m, m.keys().copied(), next), behind)
        });
        let rebuild_version: Option<i32> = r.try_get("rebuild_version")?;
        let state = match rebuild_version {
            None => State::Live,
            Some(_) if !free => State::Rebuilding,
            Some(_) => State::RebuildInterrupted,
        };
        out.push(ProjectionStatus {
            name: kind.name(),
            version: r.try_get("active_version")?,
            state,
            position,
            lag: lag.map(|l| l.0),
            behind_retention: lag.map(|l| l.1),
            rebuild: match rebuild_version {
                None => None,
                Some(version) => Some(RebuildStatus {
                    version,
                    processed: r.try_get("rebuild_processed")?,
                    total: r.try_get::<Option<i64>, _>("rebuild_total")?.unwrap_or(0),
                    started_at: r.try_get("rebuild_started_at")?,
                    updated_at: r.try_get("rebuild_updated_at")?,
                    error: r.try_get("rebuild_error")?,
                    aborting: r.try_get::<Option<String>, _>("rebuild_state")?.as_deref()
                        == Some("aborting"),
                    held: r.try_get("rebuild_hold")?,
                    ready: r.try_get::<Option<String>, _>("rebuild_state")?.as_deref()
                        == Some("ready"),
                }),
            },
            last_rebuilt_at: r.try_get("last_rebuilt_at")?,
        });
    }
    let topics = watermarks.map(|w| [w.sibling(crate::analytics::ACTIVITY_TOPIC), w.clone()]);
    out.push(crate::analytics::status(pool, topics.as_ref().map(|t| &t[..])).await?);
    Ok(out)
}

/// Per partition: (low, high) watermarks.
type Marks = HashMap<i32, (i64, i64)>;

/// One consumer group's position on one topic, and how far behind the topic it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLag {
    pub group: String,
    pub topic: String,
    /// The sum of its next offsets to apply.
    pub position: i64,
    /// Messages on the topic beyond them (`None`: no watermarks, the brokers did not answer).
    pub lag: Option<i64>,
}

/// Every consumer group that keeps its Kafka positions in `projection_checkpoints` (the
/// projections, analytics, the email group), per topic, with its lag from the brokers' high
/// watermarks.
pub async fn groups(
    pool: &PgPool,
    watermarks: Option<&Watermarks>,
) -> Result<Vec<GroupLag>, sqlx::Error> {
    let rows: Vec<(String, String, Vec<i32>, Vec<i64>)> = sqlx::query_as(
        "SELECT projection, topic, array_agg(partition ORDER BY partition), array_agg(next_offset ORDER BY partition)
         FROM projection_checkpoints GROUP BY projection, topic ORDER BY projection, topic",
    )
    .fetch_all(pool)
    .await?;
    // Each topic's watermarks, fetched once.
    let mut marks: HashMap<String, Option<Marks>> = HashMap::new();
    let mut out = Vec::with_capacity(rows.len());
    for (group, topic, partitions, next) in rows {
        let next: HashMap<i32, i64> = partitions.into_iter().zip(next).collect();
        let topic_marks = match (marks.get(&topic), watermarks) {
            (Some(m), _) => m.clone(),
            (None, Some(w)) => {
                let m = w.for_topic(&topic).fetch().await;
                marks.insert(topic.clone(), m.clone());
                m
            }
            (None, None) => None,
        };
        let lag = topic_marks
            .as_ref()
            .map(|m| lag_over(m, m.keys().copied(), |p| next.get(&p).copied()));
        out.push(GroupLag {
            group,
            topic,
            position: next.values().sum(),
            lag,
        });
    }
    Ok(out)
}

/// Events in Kafka beyond the next offsets to apply on `partitions` (`next(partition)`; a
/// partition without one counts from its low watermark, the oldest offset still held).
pub(crate) fn lag_over(
    marks: &HashMap<i32, (i64, i64)>,
    partitions: impl IntoIterator<Item = i32>,
    next: impl Fn(i32) -> Option<i64>,
) -> i64 {
    partitions
        .into_iter()
        .filter_map(|p| {
            marks
                .get(&p)
                .map(|(low, high)| (high - next(p).unwrap_or(*low)).max(0))
        })
        .sum()
}

/// Exports every projection's position, lag and retention trouble to `/metrics` every 10 s
/// (a supervised role): `projection_position`, `projection_lag_events`,
/// `projection_partitions_behind_retention`. A projection behind retention is also logged.
pub async fn report_metrics(
    pool: PgPool,
    watermarks: Watermarks,
    ctx: platform::supervisor::RoleCtx,
) -> anyhow::Result<()> {
    let mut warned = std::collections::HashSet::new();
    while !ctx.shutdown().is_cancelled() {
        match all(&pool, Some(&watermarks)).await {
            Ok(statuses) => {
                ctx.up();
                for p in statuses {
                    metrics::gauge!("projection_position", "projection" => p.name)
                        .set(p.position as f64);
                    if let Some(lag) = p.lag {
                        metrics::gauge!("projection_lag_events", "projection" => p.name)
                            .set(lag as f64);
                    }
                    if let Some(n) = p.behind_retention {
                        metrics::gauge!("projection_partitions_behind_retention", "projection" => p.name)
                            .set(n as f64);
                        if n > 0 && warned.insert(p.name) {
                            tracing::error!(
                                projection = p.name,
                                partitions = n,
                                "events this projection never applied are gone from Kafka (retention); rebuild it from the event store: shop projections rebuild {}",
                                p.name
                            );
                        }
                    }
                }
            }
            Err(e) => ctx.down(&format!("reading projection status: {e}")),
        }
        tokio::select! {
            _ = ctx.shutdown().cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
    Ok(())
}

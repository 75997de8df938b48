//! The analytics group's loop: one Kafka consumer on `user-activity` and the order-events
//! topic, in group `<prefix>analytics.v<generation>`.
//!
//! What has already arrived (up to 1,000 messages; it never waits for more) is counted in
//! one PostgreSQL transaction: skip messages behind the stored checkpoints, record their
//! event ids (those already counted are skipped: the relay may publish an event twice, a
//! client may resend a batch), add the rest to the counters, move the checkpoints, commit;
//! then commit the Kafka offsets. Every failure ends the run with its error and the
//! supervisor starts it again after a backoff; the checkpoints make the redelivery a no-op.
//!
//! A rebuild ([`super::rebuild`]) moves the generation on: the running consumer sees it (its
//! next batch, or within a second when idle), stops, and a consumer of the new group
//! replays both topics from their first offsets.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use domain::activity::UserActivity;
use rdkafka::{
    Message,
    consumer::{Consumer, StreamConsumer},
    message::OwnedMessage,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{
    NAME,
    fold::{Changes, Fact},
    repo,
};
use crate::{checkpoints, envelope::OrderEnvelope as _, status::Watermarks};

/// Most messages counted in one transaction.
const MAX_BATCH: usize = 1000;

/// How often an idle consumer looks for a rebuild.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// The topics the group reads.
#[derive(Debug, Clone)]
pub struct Topics {
    pub activity: String,
    pub orders: String,
}

/// How one run of the consumer ended (other than by an error).
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Shutdown,
    /// The generation moved on (a rebuild): start a consumer of the new group.
    Rebuilt,
}

pub struct AnalyticsConsumer {
    pool: PgPool,
    consumer: StreamConsumer,
    generation: i32,
    topics: Topics,
    watermarks: [Watermarks; 2],
    stuck_after: Duration,
}

impl AnalyticsConsumer {
    /// A consumer of the current generation's group.
    pub async fn new(
        pool: PgPool,
        brokers: &str,
        topics: Topics,
        group_prefix: &str,
        stuck_after: Duration,
    ) -> anyhow::Result<Self> {
        let (generation, _) = repo::state(&pool).await?;
        let group = format!("{group_prefix}{NAME}.v{generation}");
        let consumer: StreamConsumer =
            platform::kafka::consumer_config(brokers, &group).create()?;
        consumer.subscribe(&[&topics.activity, &topics.orders])?;
        Ok(Self {
            watermarks: [
                Watermarks::new(brokers, &topics.activity)?,
                Watermarks::new(brokers, &topics.orders)?,
            ],
            pool,
            consumer,
            generation,
            topics,
            stuck_after,
        })
    }

    /// Consumes until shutdown or a rebuild; the batch in hand is finished first.
    pub async fn run(self, shutdown: &CancellationToken) -> anyhow::Result<Ended> {
        let result = self.consume(shutdown).await;
        // Closing a consumer blocks while the broker is away: never on a runtime worker.
        let Self {
            consumer,
            watermarks,
            ..
        } = self;
        tokio::task::spawn_blocking(move || drop((consumer, watermarks)));
        result
    }

    async fn consume(&self, shutdown: &CancellationToken) -> anyhow::Result<Ended> {
        let mut idle = Duration::ZERO;
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
                m = tokio::time::timeout(IDLE_CHECK, self.consumer.recv()) => match m {
                    Ok(m) => m.context("analytics: consuming from Kafka")?.detach(),
                    Err(_) => {
                        if repo::state(&self.pool).await?.0 != self.generation {
                            return Ok(Ended::Rebuilt);
                        }
                        idle += IDLE_CHECK;
                        if idle >= self.stuck_after {
                            self.check_not_stuck().await?;
                            idle = Duration::ZERO;
                        }
                        continue;
                    }
                },
            };
            idle = Duration::ZERO;
            let batch = checkpoints::with_arrived(&self.consumer, first, MAX_BATCH)
                .context("analytics: consuming from Kafka")?;
            if !self.count(&batch).await? {
                return Ok(Ended::Rebuilt);
            }
            checkpoints::commit_offsets(&self.consumer, &batch)?;
        }
    }

    /// Counts a batch in one transaction. `false` (nothing written) when a rebuild moved the
    /// generation on.
    pub async fn count(&self, batch: &[OwnedMessage]) -> anyhow::Result<bool> {
        let mut tx = self.pool.begin().await?;
        if repo::lock_generation(&mut tx).await? != self.generation {
            return Ok(false);
        }
        // Per topic: the partitions in the batch and the next offset after each.
        let mut ends: BTreeMap<&str, BTreeMap<i32, i64>> = BTreeMap::new();
        for m in batch {
            let end = ends
                .entry(m.topic())
                .or_default()
                .entry(m.partition())
                .or_default();
            *end = (*end).max(m.offset() + 1);
        }
        let mut facts = Vec::with_capacity(batch.len());
        for (topic, partitions) in &ends {
            let parts: Vec<i32> = partitions.keys().copied().collect();
            let stored = checkpoints::locked(&mut tx, NAME, topic, &parts).await?;
            let next = |p: i32| stored.iter().find(|s| s.0 == p).map_or(0, |s| s.1);
            for m in batch
                .iter()
                .filter(|m| m.topic() == *topic && m.offset() >= next(m.partition()))
            {
                match self.fact(m) {
                    Ok(f) => facts.push(f),
                    Err(e) => {
                        metrics::counter!("analytics_skipped_total", "topic" => topic.to_string())
                            .increment(1);
                        tracing::warn!(topic, partition = m.partition(), offset = m.offset(), error = %e,
                            "analytics: a message that is not an event was skipped");
                    }
                }
            }
        }
        let ids: Vec<uuid::Uuid> = facts.iter().map(|(id, _)| *id).collect();
        let mut new = repo::first_seen(&mut tx, &ids).await?;
        let mut changes = Changes::default();
        let mut counted = 0u64;
        for (id, fact) in &facts {
            // Once per id, even when the batch holds it twice.
            if new.remove(id) {
                changes.add(fact);
                counted += 1;
            }
        }
        repo::apply(&mut tx, &changes).await?;
        for (topic, partitions) in &ends {
            let next: Vec<(i32, i64)> = partitions.iter().map(|(p, o)| (*p, *o)).collect();
            checkpoints::advance(&mut tx, NAME, topic, &next).await?;
        }
        tx.commit().await?;
        metrics::counter!("analytics_events_total").increment(counted);
        metrics::counter!("analytics_duplicates_total").increment(facts.len() as u64 - counted);
        metrics::gauge!("projection_last_progress_timestamp_seconds", "projection" => NAME)
            .set(chrono::Utc::now().timestamp() as f64);
        Ok(true)
    }

    /// A message as a fact with its event id.
    fn fact(&self, m: &OwnedMessage) -> anyhow::Result<(uuid::Uuid, Fact)> {
        let payload = m.payload().unwrap_or_default();
        if m.topic() == self.topics.activity {
            let a: UserActivity = serde_json::from_slice(payload)?;
            a.check()
                .map_err(|e| anyhow::anyhow!("not an activity event: {e}"))?;
            Ok((a.event_id, Fact::Activity(a)))
        } else {
            let env = crate::envelope::parse(payload)?;
            let event = env.event()?;
            Ok((
                env.event_id,
                Fact::Order {
                    recorded_at: env.recorded_at,
                    event,
                },
            ))
        }
    }

    /// Called after `stuck_after` without a message: an error (the supervisor restarts the
    /// consumer) when events wait in Kafka beyond the checkpoints. See
    /// [`crate::consumer::Projector::check_not_stuck`] for why.
    async fn check_not_stuck(&self) -> anyhow::Result<()> {
        let lag = super::lag(&self.pool, &self.watermarks).await?;
        match lag {
            None => anyhow::bail!("analytics: the brokers do not answer"),
            Some(0) => Ok(()),
            Some(n) => anyhow::bail!(
                "analytics: no message for {:?} while {n} event(s) wait in Kafka; the consumer is stuck",
                self.stuck_after
            ),
        }
    }
}

//! The email group's loop: consumer group `<prefix>email` on the order-events topic, one
//! message at a time (email is slow and rare next to the events).
//!
//! For an `OrderConfirmed` or `OrderCancelled` it has not handled (its inbox, by event id):
//! read the order's lines from the event store and the customer's address from her profile,
//! render, send, then record the outcome with the checkpoint in one transaction. No
//! transaction is open while the SMTP server talks, so a crash between the server's
//! acceptance and that commit sends the email once more at most, with the same Message-ID
//! (`<event id@shop>`), which mail clients treat as one.
//!
//! Replay discipline: on its first start (no checkpoint at all) the group records the topic's
//! current end as its position, so deploying it onto a system with history emails nobody
//! about the past; afterwards it goes by its checkpoints and inbox, so a Kafka offset reset
//! or a redelivery sends nothing twice.
//!
//! Failures: a transient SMTP failure retries the same email with backoff; after
//! `EMAIL_BREAKER_AFTER` in a row the circuit opens: the role reports itself down (`/readyz`),
//! `email_circuit_open` is 1, and one attempt is made per `EMAIL_BREAKER_COOLDOWN` until the
//! server answers. Nothing is skipped meanwhile. A permanent refusal records the email as
//! dead (`email_inbox.outcome = 'dead'`, with the server's answer) and moves on. A database
//! error ends the run for the supervisor to restart it.

use std::time::Duration;

use anyhow::Context as _;
use domain::{
    order::{OrderCancelled, OrderEvent, OrderPlaced},
    wire,
};
use rdkafka::{
    Message,
    consumer::{Consumer, StreamConsumer},
    message::OwnedMessage,
};
use read_side::{checkpoints, envelope::OrderEnvelope as _, status::Watermarks};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    inbox::{self, Outcome},
    mailer::{Breaker, Email, Mailer, MailerConfig, SendError},
    templates::{self, Kind},
};

/// The group's name: its checkpoints and (after the prefix) its consumer group.
pub const NAME: &str = "email";

/// What the group tells its supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Up,
    /// The SMTP circuit is open: paused, retrying.
    Paused(String),
}

pub struct EmailGroup {
    pool: PgPool,
    consumer: StreamConsumer,
    watermarks: Watermarks,
    mailer: Mailer,
    config: MailerConfig,
}

/// Why one message could not be handled yet.
enum NotYet {
    Smtp(String),
    Other(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for NotYet {
    fn from(e: E) -> Self {
        NotYet::Other(e.into())
    }
}

impl EmailGroup {
    pub fn new(
        pool: PgPool,
        brokers: &str,
        topic: &str,
        group_prefix: &str,
        config: MailerConfig,
    ) -> anyhow::Result<Self> {
        let consumer: StreamConsumer =
            platform::kafka::consumer_config(brokers, &format!("{group_prefix}{NAME}")).create()?;
        consumer.subscribe(&[topic])?;
        Ok(Self {
            pool,
            consumer,
            watermarks: Watermarks::new(brokers, topic)?,
            mailer: Mailer::new(&config)?,
            config,
        })
    }

    /// On the group's first start, records the topic's end as its position (see the module
    /// docs). `true` when it did.
    pub async fn start_position(&self) -> anyhow::Result<bool> {
        let topic = self.watermarks.topic();
        let mut tx = self.pool.begin().await?;
        let known: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM projection_checkpoints WHERE projection = $1)",
        )
        .bind(NAME)
        .fetch_one(&mut *tx)
        .await?;
        if known {
            return Ok(false);
        }
        let marks = self
            .watermarks
            .fetch()
            .await
            .context("email: the brokers do not answer")?;
        let ends: Vec<(i32, i64)> = marks.iter().map(|(p, (_, high))| (*p, *high)).collect();
        checkpoints::advance(&mut tx, NAME, topic, &ends).await?;
        tx.commit().await?;
        let skipped: i64 = marks.values().map(|(low, high)| high - low).sum();
        tracing::info!(
            topic,
            skipped,
            "email group starts at the end of the topic: earlier events are not emailed"
        );
        Ok(true)
    }

    /// Consumes until shutdown; the message in hand is finished (or left uncommitted) first.
    pub async fn run(
        self,
        shutdown: &CancellationToken,
        health: impl Fn(Health),
    ) -> anyhow::Result<()> {
        let result = self.consume(shutdown, &health).await;
        // Closing a consumer blocks while the broker is away: never on a runtime worker.
        let Self {
            consumer,
            watermarks,
            ..
        } = self;
        tokio::task::spawn_blocking(move || drop((consumer, watermarks)));
        result
    }

    async fn consume(
        &self,
        shutdown: &CancellationToken,
        health: &impl Fn(Health),
    ) -> anyhow::Result<()> {
        let mut breaker = Breaker::new(
            self.config.email_breaker_after,
            self.config.email_breaker_cooldown,
        );
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = self.consumer.recv() => m.context("email: consuming from Kafka")?.detach(),
            };
            loop {
                match self.handle(&msg).await {
                    Ok(()) => {
                        if breaker.is_open() {
                            tracing::info!("email: the SMTP server answers again; circuit closed");
                            metrics::gauge!("email_circuit_open").set(0.0);
                            health(Health::Up);
                        }
                        breaker.success();
                        break;
                    }
                    Err(NotYet::Other(e)) => return Err(e),
                    Err(NotYet::Smtp(error)) => {
                        metrics::counter!("email_send_failures_total").increment(1);
                        let wait = breaker.failure(self.config.email_retry_base);
                        if breaker.is_open() {
                            metrics::gauge!("email_circuit_open").set(1.0);
                            health(Health::Paused(format!(
                                "SMTP unavailable, circuit open: {error}"
                            )));
                        }
                        tracing::warn!(error, retry_in = ?wait, open = breaker.is_open(), "email: sending failed; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
            checkpoints::commit_offsets(&self.consumer, [&msg])?;
        }
    }

    /// Handles one message: skipped, recorded, or (on a transient SMTP failure) not yet.
    async fn handle(&self, msg: &OwnedMessage) -> Result<(), NotYet> {
        let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
        let done = |outcome: Option<(Uuid, Uuid, Kind, Outcome)>| async move {
            let mut tx = self.pool.begin().await?;
            if let Some((event_id, order_id, kind, outcome)) = &outcome {
                inbox::record(&mut tx, *event_id, *order_id, *kind, outcome).await?;
            }
            checkpoints::advance(&mut tx, NAME, topic, &[(partition, offset + 1)]).await?;
            tx.commit().await?;
            Ok::<_, NotYet>(())
        };
        let mut tx = self.pool.begin().await?;
        let next = checkpoints::locked(&mut tx, NAME, topic, &[partition]).await?;
        if next.first().is_some_and(|(_, n)| offset < *n) {
            return Ok(());
        }
        let env = match read_side::envelope::parse(msg.payload().unwrap_or_default()) {
            Ok(env) => env,
            Err(e) => {
                metrics::counter!("email_skipped_total").increment(1);
                tracing::warn!(partition, offset, error = %e, "email: a message that is not an order event was skipped");
                drop(tx);
                return done(None).await;
            }
        };
        let (kind, cancelled) = match env.event() {
            Ok(OrderEvent::Confirmed(_)) => (Kind::OrderConfirmed, None),
            Ok(OrderEvent::Cancelled(c)) => (Kind::OrderCancelled, Some(c)),
            _ => {
                drop(tx);
                return done(None).await;
            }
        };
        let (event_id, order_id) = (env.event_id, env.stream_id);
        if inbox::handled(&mut tx, event_id).await? {
            drop(tx);
            return done(None).await;
        }
        let placed = placed(&mut tx, order_id).await?;
        drop(tx);
        let Some(profile) =
            write_side::customers::find(&self.pool, placed.customer_id.as_str()).await?
        else {
            metrics::counter!("email_no_address_total").increment(1);
            return done(Some((event_id, order_id, kind, Outcome::NoAddress))).await;
        };
        let outcome = self
            .send(kind, event_id, &profile, &placed, cancelled.as_ref())
            .await?;
        done(Some((event_id, order_id, kind, outcome))).await
    }

    async fn send(
        &self,
        kind: Kind,
        event_id: Uuid,
        profile: &write_side::customers::Profile,
        placed: &OrderPlaced,
        cancelled: Option<&OrderCancelled>,
    ) -> Result<Outcome, NotYet> {
        let rendered = templates::render(kind, &profile.name, placed, cancelled)?;
        let to = profile.email.as_str().to_owned();
        let sent = self
            .mailer
            .send(Email {
                to_name: &profile.name,
                to: &to,
                message_id: format!("{event_id}@shop"),
                subject: &rendered.subject,
                body: rendered.body,
            })
            .await;
        match sent {
            Ok(()) => {
                metrics::counter!("email_sent_total", "kind" => kind.as_str()).increment(1);
                Ok(Outcome::Sent { to })
            }
            Err(SendError::Permanent(error)) => {
                metrics::counter!("email_dead_total", "kind" => kind.as_str()).increment(1);
                tracing::warn!(%event_id, error, "email: refused for good; recorded as dead");
                Ok(Outcome::Dead { to, error })
            }
            Err(SendError::Transient(e)) => Err(NotYet::Smtp(e)),
        }
    }
}

/// The order's `OrderPlaced` (its lines, totals and customer), from the event store.
async fn placed(conn: &mut sqlx::PgConnection, order_id: Uuid) -> anyhow::Result<OrderPlaced> {
    let (events, _) = event_store::load_stream(conn, order_id).await?;
    let first = events
        .first()
        .with_context(|| format!("order {order_id} has no events"))?;
    match wire::decode(&first.event_type, first.schema_version, &first.payload)? {
        OrderEvent::Placed(p) => Ok(p),
        other => anyhow::bail!("order {order_id} starts with {other:?}, not OrderPlaced"),
    }
}

/// The group as a supervised role: waits for a broker, takes its start position on the
/// first start, then consumes until shutdown.
pub async fn run_role(
    pool: PgPool,
    brokers: String,
    topic: String,
    group_prefix: String,
    config: MailerConfig,
    ctx: platform::supervisor::RoleCtx,
) -> anyhow::Result<()> {
    platform::kafka::wait_ready(&brokers, Duration::from_secs(10)).await?;
    let group = EmailGroup::new(pool, &brokers, &topic, &group_prefix, config)?;
    group.start_position().await?;
    ctx.up();
    let shutdown = ctx.shutdown().clone();
    group
        .run(&shutdown, |h| match h {
            Health::Up => ctx.up(),
            Health::Paused(why) => ctx.down(&why),
        })
        .await
}

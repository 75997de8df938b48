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
//! What is emailed is read from the event store, not from the message: the stored event with
//! the message's event id decides the kind and the cancellation reason, so a forged message
//! cannot write to a customer. One handler per event at a time, across processes (an advisory
//! lock on the event id, held while it sends; the inbox is checked again under it).
//!
//! Failures ([`crate::mailer`] classifies them): the server unavailable retries the same email
//! with backoff; after `EMAIL_BREAKER_AFTER` in a row the circuit opens: the role reports
//! itself down (`/readyz`), `email_circuit_open` is 1, and one attempt is made per
//! `EMAIL_BREAKER_COOLDOWN` until the server answers. Nothing is skipped meanwhile. A message
//! the server defers (4xx) is retried up to `EMAIL_MAX_DEFERRALS` times, then recorded dead; a
//! permanent refusal or unusable data (an event not in the store, an unreadable profile) is
//! recorded dead at once (`email_inbox.outcome = 'dead'`, with the SMTP code) and the group
//! moves on. A database error ends the run for the supervisor to restart it.

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
use read_side::{checkpoints, status::Watermarks};
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
    /// The server is unavailable.
    Smtp(String),
    /// The server deferred this message (4xx).
    Deferred(String),
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
            let mut deferrals = 0u32;
            loop {
                match self.handle(&msg, &mut deferrals).await {
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
                    Err(NotYet::Deferred(error)) => {
                        // The server answers: not an outage, so the breaker is left alone.
                        let wait = self
                            .config
                            .email_retry_base
                            .saturating_mul(2u32.saturating_pow(deferrals.min(16)))
                            .min(Duration::from_secs(30));
                        tracing::warn!(error, deferrals, retry_in = ?wait, "email: deferred by the server; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
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
    async fn handle(&self, msg: &OwnedMessage, deferrals: &mut u32) -> Result<(), NotYet> {
        let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
        {
            let mut tx = self.pool.begin().await?;
            let next = checkpoints::locked(&mut tx, NAME, topic, &[partition]).await?;
            if next.first().is_some_and(|(_, n)| offset < *n) {
                return Ok(());
            }
        }
        let env = match read_side::envelope::parse(msg.payload().unwrap_or_default()) {
            Ok(env) => env,
            Err(e) => {
                metrics::counter!("email_skipped_total").increment(1);
                tracing::warn!(partition, offset, error = %e, "email: a message that is not an order event was skipped");
                return self.done(msg, None).await;
            }
        };
        // Only the types that are emailed go further; what they say is read from the store.
        if ![wire::ORDER_CONFIRMED, wire::ORDER_CANCELLED].contains(&env.event_type.as_str()) {
            return self.done(msg, None).await;
        }
        // One handler per event at a time, across processes (a rebalance or an eviction during
        // an SMTP outage can hand the partition to another instance while this one retries):
        // the winner sends and records; the other then finds the record.
        let mut lock = inbox::EventLock::take(&self.pool, env.event_id).await?;
        // What the message claims, only to file a poison message under a kind.
        let claimed = if env.event_type == wire::ORDER_CANCELLED {
            Kind::OrderCancelled
        } else {
            Kind::OrderConfirmed
        };
        let result = self
            .handle_locked(
                lock.conn(),
                msg,
                (env.event_id, env.stream_id, claimed),
                deferrals,
            )
            .await;
        lock.unlock().await;
        result
    }

    async fn handle_locked(
        &self,
        conn: &mut sqlx::PgConnection,
        msg: &OwnedMessage,
        (event_id, order_id, claimed): (Uuid, Uuid, Kind),
        deferrals: &mut u32,
    ) -> Result<(), NotYet> {
        if inbox::handled(conn, event_id).await? {
            return self.done(msg, None).await;
        }
        // Data that cannot be used now never can: recorded as dead, never retried (a poison
        // message must not hold the group).
        let (kind, letter) = match draft(&self.pool, conn, order_id, event_id).await? {
            Draft::Ready { kind, letter } => (kind, letter),
            Draft::NoAddress { kind } => {
                metrics::counter!("email_no_address_total").increment(1);
                return self
                    .done(msg, Some((event_id, order_id, kind, Outcome::NoAddress)))
                    .await;
            }
            Draft::Unusable { kind, error } => {
                let kind = kind.unwrap_or(claimed);
                return self.dead(msg, event_id, order_id, kind, error).await;
            }
        };
        let to = letter.to.clone();
        let sent = self.mailer.send(letter.email(event_id)).await;
        let outcome = match sent {
            Ok(()) => {
                metrics::counter!("email_sent_total", "kind" => kind.as_str()).increment(1);
                Outcome::Sent { to }
            }
            Err(SendError::Permanent(error)) => {
                metrics::counter!("email_dead_total", "kind" => kind.as_str()).increment(1);
                tracing::warn!(%event_id, error, "email: refused for good; recorded as dead");
                Outcome::Dead {
                    to: Some(to),
                    error,
                }
            }
            Err(SendError::Deferred(error))
                if *deferrals + 1 >= self.config.email_max_deferrals =>
            {
                metrics::counter!("email_dead_total", "kind" => kind.as_str()).increment(1);
                tracing::warn!(%event_id, error, deferrals = *deferrals + 1, "email: deferred too often; recorded as dead");
                let error = format!("deferred {} times, last: {error}", *deferrals + 1);
                Outcome::Dead {
                    to: Some(to),
                    error,
                }
            }
            Err(SendError::Deferred(error)) => {
                *deferrals += 1;
                return Err(NotYet::Deferred(error));
            }
            Err(SendError::Unavailable(error)) => return Err(NotYet::Smtp(error)),
        };
        self.done(msg, Some((event_id, order_id, kind, outcome)))
            .await
    }

    /// Records `error` as the event's dead outcome and moves on.
    async fn dead(
        &self,
        msg: &OwnedMessage,
        event_id: Uuid,
        order_id: Uuid,
        kind: Kind,
        error: String,
    ) -> Result<(), NotYet> {
        metrics::counter!("email_dead_total", "kind" => kind.as_str()).increment(1);
        tracing::warn!(%event_id, %order_id, error, "email: cannot be written; recorded as dead");
        let outcome = Outcome::Dead { to: None, error };
        self.done(msg, Some((event_id, order_id, kind, outcome)))
            .await
    }

    /// Records the outcome (if any) and moves the checkpoint past `msg`, in one transaction.
    async fn done(
        &self,
        msg: &OwnedMessage,
        outcome: Option<(Uuid, Uuid, Kind, Outcome)>,
    ) -> Result<(), NotYet> {
        let mut tx = self.pool.begin().await?;
        if let Some((event_id, order_id, kind, outcome)) = &outcome {
            inbox::record(&mut tx, *event_id, *order_id, *kind, outcome).await?;
        }
        checkpoints::advance(
            &mut tx,
            NAME,
            msg.topic(),
            &[(msg.partition(), msg.offset() + 1)],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// An event's email, ready to send.
pub(crate) struct Letter {
    pub to_name: String,
    pub to: String,
    pub rendered: templates::Rendered,
}

impl Letter {
    /// The email, with the event's Message-ID (`<event id@shop>`): a second send of the same
    /// event is the same message to mail clients.
    pub fn email(&self, event_id: Uuid) -> Email<'_> {
        Email {
            to_name: &self.to_name,
            to: &self.to,
            message_id: format!("{event_id}@shop"),
            subject: &self.rendered.subject,
            body: self.rendered.body.clone(),
        }
    }
}

/// What the email of an event is, from what the shop holds now.
pub(crate) enum Draft {
    Ready {
        kind: Kind,
        letter: Letter,
    },
    /// The customer has no profile: no address to write to.
    NoAddress {
        kind: Kind,
    },
    /// The event, the profile or the template cannot give an email (`kind` when the event
    /// could be read).
    Unusable {
        kind: Option<Kind>,
        error: String,
    },
}

/// Drafts the email of event `event_id` of order `order_id`: the event as stored, not as a
/// message says (a forged message cannot choose whom to write or what), the address from the
/// customer's profile, rendered by the templates. The group and an operator's resend
/// ([`crate::resend`]) both draft here.
pub(crate) async fn draft(
    pool: &PgPool,
    conn: &mut sqlx::PgConnection,
    order_id: Uuid,
    event_id: Uuid,
) -> Result<Draft, sqlx::Error> {
    let (kind, placed, cancelled) = match stored(conn, order_id, event_id).await? {
        Ok(s) => s,
        Err(error) => return Ok(Draft::Unusable { kind: None, error }),
    };
    let profile = match write_side::customers::find(pool, placed.customer_id.as_str()).await {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(Draft::NoAddress { kind }),
        Err(sqlx::Error::Decode(_)) => {
            let error = "the customer's profile is unreadable".to_owned();
            return Ok(Draft::Unusable {
                kind: Some(kind),
                error,
            });
        }
        Err(e) => return Err(e),
    };
    Ok(
        match templates::render(kind, &profile.name, &placed, cancelled.as_ref()) {
            Ok(rendered) => Draft::Ready {
                kind,
                letter: Letter {
                    to_name: profile.name.clone(),
                    to: profile.email.as_str().to_owned(),
                    rendered,
                },
            },
            Err(e) => Draft::Unusable {
                kind: Some(kind),
                error: format!("the template did not render: {e}"),
            },
        },
    )
}

/// What to email, from the event store: the event `event_id` of order `order_id` (its
/// kind, and the cancellation), and the order's `OrderPlaced` (lines, totals, customer). The
/// inner error when the store cannot give them (a poison message, never retried).
#[allow(clippy::type_complexity)]
async fn stored(
    conn: &mut sqlx::PgConnection,
    order_id: Uuid,
    event_id: Uuid,
) -> Result<Result<(Kind, OrderPlaced, Option<OrderCancelled>), String>, sqlx::Error> {
    let (events, _) = event_store::load_stream(conn, order_id).await?;
    let decode =
        |e: &event_store::StoredEvent| wire::decode(&e.event_type, e.schema_version, &e.payload);
    let Some(first) = events.first() else {
        return Ok(Err(format!("order {order_id} has no events")));
    };
    let placed = match decode(first) {
        Ok(OrderEvent::Placed(p)) => p,
        Ok(_) => {
            return Ok(Err(format!(
                "order {order_id} does not start with OrderPlaced"
            )));
        }
        Err(e) => {
            return Ok(Err(format!(
                "order {order_id}'s OrderPlaced is unreadable: {e}"
            )));
        }
    };
    let Some(this) = events.iter().find(|e| e.event_id == event_id) else {
        return Ok(Err(format!(
            "event {event_id} is not in order {order_id}'s stream"
        )));
    };
    Ok(match decode(this) {
        Ok(OrderEvent::Confirmed(_)) => Ok((Kind::OrderConfirmed, placed, None)),
        Ok(OrderEvent::Cancelled(c)) => Ok((Kind::OrderCancelled, placed, Some(c))),
        Ok(_) => Err(format!(
            "event {event_id} is neither a confirmation nor a cancellation"
        )),
        Err(e) => Err(format!("event {event_id} is unreadable: {e}")),
    })
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

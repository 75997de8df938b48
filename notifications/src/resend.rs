//! An operator's second try at an email recorded dead (the console's dead letters, source
//! `email`), or her decision to give it up.
//!
//! Why: the group never retries an email it recorded dead (a permanent refusal, data that
//! could not be used), so that one bad address cannot hold every other customer's email.
//! Once the cause is fixed (the customer corrected her address, the server's configuration
//! was repaired) an operator sends it again here: drafted afresh from the event store and
//! the profile as they are now (never from the dead record), one attempt, the same
//! Message-ID as the first, under the same per-event lock as the group, so it is never sent
//! twice at once. The inbox row records the new outcome; a refusal keeps it dead.

use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    consumer::{Draft, draft},
    inbox::{self, EventLock, Outcome},
    mailer::{Mailer, SendError},
};

/// What a resend did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resent {
    /// The server accepted it.
    Sent,
    /// The customer has no profile any more (erased): there is no one to write to.
    NoAddress,
}

#[derive(Debug, thiserror::Error)]
pub enum ResendError {
    #[error("the email of event {0} is not dead (sent, discarded, or never handled)")]
    NotDead(Uuid),
    #[error("it still cannot be written: {0}")]
    Unusable(String),
    #[error("the server refused it again: {0}")]
    Refused(String),
    #[error("the server did not take it now ({0}); it stays dead: try again later")]
    NotNow(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Sends the email of `event_id` again if it is recorded dead. Runs to its end in a task of
/// its own even if the caller goes away (a browser closed mid-send), so what the server
/// answered is recorded.
pub async fn resend(pool: &PgPool, mailer: &Mailer, event_id: Uuid) -> Result<Resent, ResendError> {
    let (pool, mailer) = (pool.clone(), mailer.clone());
    tokio::spawn(async move {
        let mut lock = EventLock::take(&pool, event_id).await?;
        let result = resend_locked(&pool, lock.conn(), &mailer, event_id).await;
        lock.unlock().await;
        result
    })
    .await
    .map_err(|e| ResendError::Database(sqlx::Error::Io(std::io::Error::other(e))))?
}

async fn resend_locked(
    pool: &PgPool,
    conn: &mut sqlx::PgConnection,
    mailer: &Mailer,
    event_id: Uuid,
) -> Result<Resent, ResendError> {
    let order_id = match inbox::outcome_of(conn, event_id).await? {
        Some((outcome, order_id)) if outcome == "dead" => order_id,
        _ => return Err(ResendError::NotDead(event_id)),
    };
    let letter = match draft(pool, conn, order_id, event_id).await? {
        Draft::Ready { letter, .. } => letter,
        Draft::NoAddress { .. } => {
            inbox::settle(conn, event_id, Some(&Outcome::NoAddress)).await?;
            return Ok(Resent::NoAddress);
        }
        Draft::Unusable { error, .. } => return Err(ResendError::Unusable(error)),
    };
    match mailer.send(letter.email(event_id)).await {
        Ok(()) => {
            let sent = Outcome::Sent {
                to: letter.to.clone(),
            };
            inbox::settle(conn, event_id, Some(&sent)).await?;
            metrics::counter!("email_resent_total").increment(1);
            tracing::info!(%event_id, %order_id, "email: resent at an operator's word");
            Ok(Resent::Sent)
        }
        Err(SendError::Permanent(error)) => {
            let shown = inbox::redact(Some(&letter.to), &error);
            let dead = Outcome::Dead {
                to: Some(letter.to.clone()),
                error,
            };
            inbox::settle(conn, event_id, Some(&dead)).await?;
            Err(ResendError::Refused(shown))
        }
        Err(SendError::Deferred(e) | SendError::Unavailable(e)) => {
            Err(ResendError::NotNow(inbox::redact(Some(&letter.to), &e)))
        }
    }
}

/// Gives up an email recorded dead (recorded `discarded`); false if it is not dead.
pub async fn discard(pool: &PgPool, event_id: Uuid) -> Result<bool, sqlx::Error> {
    let mut lock = EventLock::take(pool, event_id).await?;
    let settled = inbox::settle(lock.conn(), event_id, None).await;
    lock.unlock().await;
    settled
}

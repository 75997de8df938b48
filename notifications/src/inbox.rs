//! Every SQL statement on `email_inbox`: whether an event was handled, recording how, the
//! emails recorded dead and an operator's settling of one; and the per-event lock the group
//! and an operator's resend share.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, pool::PoolConnection};
use uuid::Uuid;

use crate::templates::Kind;

/// How an event was handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Sent {
        to: String,
    },
    /// The customer has no profile (no address to write to).
    NoAddress,
    /// Refused for good by the server (`to` is set), or unusable data (the order's events or
    /// the profile could not be read, the template could not render it).
    Dead {
        to: Option<String>,
        error: String,
    },
}

/// Whether `event_id` was handled already.
pub async fn handled(conn: &mut PgConnection, event_id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM email_inbox WHERE event_id = $1)")
        .bind(event_id)
        .fetch_one(&mut *conn)
        .await
}

/// Records the outcome (a second record of the same event changes nothing).
pub async fn record(
    conn: &mut PgConnection,
    event_id: Uuid,
    order_id: Uuid,
    kind: Kind,
    outcome: &Outcome,
) -> Result<(), sqlx::Error> {
    // The recipient is personal data: the inbox keeps neither it nor a server's text quoting
    // it (the address is the profile's, which erasure deletes).
    let (name, error) = match outcome {
        Outcome::Sent { .. } => ("sent", None),
        Outcome::NoAddress => ("no_address", None),
        Outcome::Dead { to, error } => ("dead", Some(redact(to.as_deref(), error))),
    };
    sqlx::query(
        "INSERT INTO email_inbox (event_id, order_id, kind, outcome, error)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(event_id)
    .bind(order_id)
    .bind(kind.as_str())
    .bind(name)
    .bind(error)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// An event's lock (a session advisory lock) and the session holding it: one sender per
/// event at a time, across processes and with an operator's resend. Released by
/// [`EventLock::unlock`]; dropped without it (its holder's future was dropped, or unlocking
/// failed) the session is closed instead, which releases the lock: it never goes back to the
/// pool holding it.
pub struct EventLock {
    conn: Option<PoolConnection<sqlx::Postgres>>,
    event_id: Uuid,
}

impl EventLock {
    /// Takes the lock of `event_id` on a session of `pool`, waiting for a holder.
    pub async fn take(pool: &PgPool, event_id: Uuid) -> Result<Self, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock(hashtextextended($1::text, 7))")
            .bind(event_id)
            .execute(&mut *conn)
            .await?;
        Ok(Self {
            conn: Some(conn),
            event_id,
        })
    }

    /// The session holding the lock.
    pub fn conn(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("held until unlocked")
    }

    /// Releases the lock and gives the session back to the pool.
    pub async fn unlock(mut self) {
        let mut conn = self.conn.take().expect("held until unlocked");
        let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1::text, 7))")
            .bind(self.event_id)
            .execute(&mut *conn)
            .await;
        if unlocked.is_err() {
            drop(conn.detach());
        }
    }
}

impl Drop for EventLock {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}

/// An email recorded dead.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadEmail {
    pub event_id: Uuid,
    pub order_id: Uuid,
    pub kind: String,
    pub error: Option<String>,
    pub handled_at: DateTime<Utc>,
}

/// Emails recorded dead, oldest first (at most 1,000).
pub async fn dead(pool: &PgPool) -> Result<Vec<DeadEmail>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id, order_id, kind, error, handled_at FROM email_inbox
         WHERE outcome = 'dead' ORDER BY handled_at LIMIT 1000",
    )
    .fetch_all(pool)
    .await
}

/// The recorded outcome of `event_id` and its order, if it was handled.
pub async fn outcome_of(
    conn: &mut PgConnection,
    event_id: Uuid,
) -> Result<Option<(String, Uuid)>, sqlx::Error> {
    sqlx::query_as("SELECT outcome, order_id FROM email_inbox WHERE event_id = $1")
        .bind(event_id)
        .fetch_optional(&mut *conn)
        .await
}

/// Settles an email recorded dead with a new outcome (an operator's resend, or `None`: an
/// operator's discard); false if it is not dead any more.
pub async fn settle(
    conn: &mut PgConnection,
    event_id: Uuid,
    outcome: Option<&Outcome>,
) -> Result<bool, sqlx::Error> {
    let (name, error) = match outcome {
        None => ("discarded", None),
        Some(Outcome::Sent { .. }) => ("sent", None),
        Some(Outcome::NoAddress) => ("no_address", None),
        Some(Outcome::Dead { to, error }) => ("dead", Some(redact(to.as_deref(), error))),
    };
    let settled = sqlx::query(
        "UPDATE email_inbox SET outcome = $2, error = COALESCE($3, error), handled_at = now()
         WHERE event_id = $1 AND outcome = 'dead'",
    )
    .bind(event_id)
    .bind(name)
    .bind(error)
    .execute(&mut *conn)
    .await?;
    Ok(settled.rows_affected() == 1)
}

/// A server's text without the recipient (personal data the inbox does not keep).
pub(crate) fn redact(to: Option<&str>, error: &str) -> String {
    match to {
        Some(to) => error.replace(to, "<recipient>"),
        None => error.to_owned(),
    }
}

//! Every SQL statement on `email_inbox`: whether an event was handled, and recording how.

use sqlx::PgConnection;
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
        Outcome::Dead { to, error } => (
            "dead",
            Some(match to {
                Some(to) => error.replace(to.as_str(), "<recipient>"),
                None => error.clone(),
            }),
        ),
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

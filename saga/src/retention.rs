//! Retention of the saga's bookkeeping: the orchestrator's and participants' inboxes
//! (deduplication by message id) and the record of commands awaiting replies.
//!
//! Why these may go: a message is redelivered within minutes, not days, and past the inbox
//! every handler is still idempotent per order (the saga ignores a reply for a step it is
//! not on; participants key their effects by order). A reply older than the retention
//! answers a command no longer on record and is dead-lettered, where an operator sees it.

use std::time::Duration;

use sqlx::PgPool;

/// The tables pruned, with the timestamp column each is pruned by.
const TABLES: [(&str, &str); 3] = [
    ("saga_inbox", "received_at"),
    ("participant_inbox", "received_at"),
    ("saga_commands", "sent_at"),
];

/// Deletes rows older than `age`; returns how many per table.
pub async fn prune(pool: &PgPool, age: Duration) -> Result<Vec<(&'static str, u64)>, sqlx::Error> {
    let mut pruned = Vec::new();
    for (table, column) in TABLES {
        let n = platform::db::delete_older_than(pool, table, column, age, 5000).await?;
        pruned.push((table, n));
    }
    Ok(pruned)
}

//! The outbox: what the relay has not published yet, per destination and target, and the
//! oldest rows themselves.
//!
//! Why: a growing backlog is the first sign that a broker is down or refusing, and a row a
//! broker refused for good holds back every later message of its order to that destination
//! (per-order ordering). This page shows which target is behind, since when, and each row's
//! state: waiting, retrying after a transient error, failed, or held behind a failed one. A
//! failed row is inspected and retried through its dead-letter view (the same action, and
//! record, as on the Dead letters page); nothing here edits or deletes a row.

use axum::extract::{Query, State};
use chrono::Utc;
use event_store::outbox::{self, Destination, UnpublishedRow};
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use crate::{Console, ConsoleError, session::Operator, view};

/// Rows listed at most.
const LIMIT: i64 = 200;

#[derive(Deserialize, Default)]
pub struct OutboxQuery {
    /// `kafka` or `amqp`; empty for both.
    #[serde(default)]
    destination: String,
}

pub async fn page(
    State(console): State<Console>,
    op: Operator,
    Query(q): Query<OutboxQuery>,
) -> Result<Markup, ConsoleError> {
    let only: Option<Destination> = match q.destination.trim() {
        "" => None,
        d => Some(d.parse().map_err(ConsoleError::BadRequest)?),
    };
    let targets = outbox::backlog_by_target(&console.pool).await?;
    let rows = outbox::oldest_unpublished(&console.pool, only, LIMIT).await?;
    let now = Utc::now();
    Ok(view::page(
        &op,
        "Outbox",
        html! {
            h1 { "Outbox" }
            p.hint {
                "Messages committed with their events and not published yet, oldest first. "
                "A row a broker refused for good holds back the later messages of its order to that destination; "
                "retry it from its dead-letter view once the broker side is fixed."
            }
            h2 { "Backlog by target" }
            @if targets.is_empty() { p.empty.ok #outbox-empty { "Nothing waits: every message is published." } } @else {
                table #outbox-targets {
                    thead { tr { th { "Destination" } th { "Target" } th.num { "Pending" } th.num { "Failed" } th { "Oldest" } th.num { "Age (s)" } } }
                    tbody {
                        @for t in &targets {
                            tr {
                                td { a href={ "/console/outbox?destination=" (t.destination) } { (t.destination) } }
                                td { code { (t.target) } }
                                td.num { (t.pending) }
                                td.num class=[(t.failed > 0).then_some("bad")] { (t.failed) }
                                td { (view::time(t.oldest)) }
                                td.num { ((now - t.oldest).num_seconds()) }
                            }
                        }
                    }
                }
            }
            form.filters method="get" action="/console/outbox" {
                label { "Destination"
                    select name="destination" {
                        option value="" selected[only.is_none()] { "all" }
                        @for d in Destination::ALL { option value=(d) selected[only == Some(d)] { (d) } }
                    }
                }
                button type="submit" { "Show" }
            }
            h2 { "Oldest unpublished rows" }
            @if rows.is_empty() { p.empty { "None." } } @else {
                table.outbox {
                    thead { tr { th.num { "Row" } th { "To" } th { "Order" } th { "Created" } th.num { "Attempts" } th { "State" } th { "Last error" } } }
                    tbody {
                        @for r in &rows { (row(r)) }
                    }
                }
                @if rows.len() as i64 == LIMIT { p.hint { "The oldest " (LIMIT) " are shown." } }
            }
        },
    ))
}

fn row(r: &UnpublishedRow) -> Markup {
    let order: Option<Uuid> = r.ordering_key.parse().ok();
    html! {
        tr id={ "outbox-" (r.id) } {
            td.num { (r.id) }
            td { (r.destination) " " code { (r.target) } }
            td { @match order { Some(o) => a href={ "/console/orders/" (o) } { (o) }, None => code { (r.ordering_key) } } }
            td { (view::time(r.created_at)) }
            td.num { (r.attempts) }
            @match state(r) {
                RowState::Failed => td.bad.state { a href={ "/console/dead-letters/outbox/" (r.id) } { "failed: inspect, retry" } },
                RowState::Blocked => td.warn.state { "held behind a failed row" },
                RowState::Retrying => td.warn.state { "retrying" },
                RowState::Waiting => td.state { "waiting" },
            }
            td { (r.last_error.as_deref().unwrap_or("")) }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum RowState {
    Failed,
    Blocked,
    Retrying,
    Waiting,
}

fn state(r: &UnpublishedRow) -> RowState {
    if r.failed_at.is_some() {
        RowState::Failed
    } else if r.blocked {
        RowState::Blocked
    } else if r.last_error.is_some() {
        RowState::Retrying
    } else {
        RowState::Waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpublished(failed: bool, blocked: bool, error: bool) -> UnpublishedRow {
        UnpublishedRow {
            id: 1,
            message_id: Uuid::nil(),
            destination: Destination::Amqp,
            target: "checkout.commands".into(),
            ordering_key: Uuid::nil().to_string(),
            attempts: 1,
            last_error: error.then(|| "NOT_FOUND".into()),
            created_at: Utc::now(),
            failed_at: failed.then(Utc::now),
            blocked,
        }
    }

    #[test]
    fn a_row_is_failed_before_blocked_before_retrying_before_waiting() {
        assert_eq!(state(&unpublished(true, false, true)), RowState::Failed);
        assert_eq!(state(&unpublished(false, true, true)), RowState::Blocked);
        assert_eq!(state(&unpublished(false, false, true)), RowState::Retrying);
        assert_eq!(state(&unpublished(false, false, false)), RowState::Waiting);
    }
}

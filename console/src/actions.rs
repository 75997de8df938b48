//! The action log: every operator action taken through the console (who, when, what, on
//! which target, why, and how it ended), and the page that lists it.
//!
//! An action is recorded after the library call it wraps returned, with its outcome (`ok` or
//! the refusal), so the log says what happened and not what was attempted. Rows are only
//! ever inserted.

use axum::extract::{Query, State};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{Console, ConsoleError, session::Operator, view};

/// One recorded action.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Action {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub order_id: Option<Uuid>,
    pub reason: String,
    pub outcome: String,
    pub detail: Option<serde_json::Value>,
}

/// An action to record.
#[derive(Debug, Clone, Default)]
pub struct NewAction<'a> {
    /// `operator:<subject>`.
    pub actor: &'a str,
    /// What was done: `sign_in`, `replay_dead_letter`...
    pub action: &'a str,
    /// What it was done to: `dead-letter:read-side/12`...
    pub target: &'a str,
    pub order_id: Option<Uuid>,
    /// Why, in the operator's words.
    pub reason: &'a str,
    /// `ok: ...` or `refused: ...`.
    pub outcome: &'a str,
    pub detail: Option<serde_json::Value>,
}

/// An action's outcome as the log says it: `ok: ...` or `refused: ...`.
pub fn shown(outcome: &Result<String, String>) -> String {
    match outcome {
        Ok(s) => format!("ok: {s}"),
        Err(e) => format!("refused: {e}"),
    }
}

/// Records an action (and logs it).
pub async fn record(pool: &PgPool, a: NewAction<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO console_actions (actor, action, target, order_id, reason, outcome, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(a.actor)
    .bind(a.action)
    .bind(a.target)
    .bind(a.order_id)
    .bind(a.reason)
    .bind(a.outcome)
    .bind(&a.detail)
    .execute(pool)
    .await?;
    tracing::info!(
        actor = a.actor,
        action = a.action,
        target = a.target,
        reason = a.reason,
        outcome = a.outcome,
        "console action"
    );
    Ok(())
}

/// The actions on one order, newest first.
pub async fn list_for_order(pool: &PgPool, order_id: Uuid) -> Result<Vec<Action>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, at, actor, action, target, order_id, reason, outcome, detail
         FROM console_actions WHERE order_id = $1 ORDER BY id DESC",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await
}

/// The newest actions, optionally those on targets containing `target`.
pub async fn list(
    pool: &PgPool,
    target: Option<&str>,
    limit: i64,
) -> Result<Vec<Action>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, at, actor, action, target, order_id, reason, outcome, detail FROM console_actions
         WHERE $1::text IS NULL OR strpos(target, $1) > 0
         ORDER BY id DESC LIMIT $2",
    )
    .bind(target)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[derive(Deserialize)]
pub struct Filter {
    #[serde(default)]
    target: String,
}

/// Most rows the activity page shows.
const PAGE: i64 = 200;

pub async fn page(
    State(console): State<Console>,
    op: Operator,
    Query(filter): Query<Filter>,
) -> Result<Markup, ConsoleError> {
    let target = Some(filter.target.trim()).filter(|t| !t.is_empty());
    let rows = list(&console.pool, target, PAGE).await?;
    Ok(view::page(
        &op,
        "Activity",
        html! {
            h1 { "Operator activity" }
            form.filters method="get" {
                label { "Target contains " input name="target" value=(filter.target) {} }
                button type="submit" { "Filter" }
            }
            (table(&rows))
        },
    ))
}

/// The actions as a table (also under an order's page).
pub fn table(rows: &[Action]) -> Markup {
    html! {
        @if rows.is_empty() {
            p.empty { "No actions recorded." }
        } @else {
            table.actions {
                thead { tr { th { "When" } th { "Who" } th { "What" } th { "Target" } th { "Why" } th { "Outcome" } th { "Change" } } }
                tbody {
                    @for a in rows {
                        tr {
                            td { (view::time(a.at)) }
                            td { (a.actor) }
                            td { (a.action) }
                            td { (a.target) @if let Some(o) = a.order_id { " · " a href={ "/console/orders/" (o) } { "order " (o) } } }
                            td { (a.reason) }
                            td { (a.outcome) }
                            td { @if let Some(d) = &a.detail { pre { (view::pretty(d)) } } }
                        }
                    }
                }
            }
        }
    }
}

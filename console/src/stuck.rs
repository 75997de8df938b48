//! Stuck orders, found in one search, each with its causes.
//!
//! An order is stuck when it is not final in the event store (neither confirmed nor
//! cancelled) and either nothing moved it (neither its stream nor its saga's) for longer than
//! the saga's step timeout x attempts, or a saga dead letter or failed outbox row names it.
//! An order with an open read-side dead letter is listed too, final or not: its read models
//! stopped at the event before, so what customers see of it is stuck; so is a final order
//! whose email is dead: its customer was never told of its end.

use std::collections::HashMap;

use axum::extract::State;
use chrono::{DateTime, Utc};
use domain::{values::OrderId, wire};
use maud::{Markup, html};
use uuid::Uuid;

use crate::{
    Console, ConsoleError,
    letters::{self, Filter, Letter, Source},
    session::Operator,
    view,
};

/// Most idle orders one search reads.
const MAX_IDLE: i64 = 500;

/// The final events of an order's stream.
const FINAL: &[&str] = &[wire::ORDER_CONFIRMED, wire::ORDER_CANCELLED];

#[derive(Debug, Clone)]
pub struct StuckOrder {
    pub order_id: Uuid,
    /// The newest event of the order's stream (`-` when the store has no such order).
    pub last_event: String,
    /// When the order or its saga last moved.
    pub last_progress: Option<DateTime<Utc>>,
    pub causes: Vec<String>,
}

/// Every stuck order (idle ones: the `MAX_IDLE` longest idle), longest idle first, given
/// the open dead letters of every source (`letters::gather` with the default filter: the
/// caller has them already, and reading RabbitMQ's twice per page is what this avoids).
pub async fn stuck_orders(
    console: &Console,
    letters: &[Letter],
) -> Result<Vec<StuckOrder>, ConsoleError> {
    let now = Utc::now();
    let idle_since =
        now - chrono::Duration::from_std(console.stuck_after).unwrap_or(chrono::Duration::MAX);
    let mut conn = console.pool.acquire().await?;
    let idle =
        event_store::read::idle_heads(&mut conn, orders::ORDER_STREAM, FINAL, idle_since, MAX_IDLE)
            .await?;
    let mut order_ids: Vec<Uuid> = idle.iter().map(|h| h.stream_id).collect();
    order_ids.extend(letters.iter().filter_map(|l| l.order_id));
    order_ids.sort();
    order_ids.dedup();
    let saga_stream = |order_id: Uuid| domain::saga::stream_id(OrderId(order_id));
    let mut wanted: Vec<Uuid> = order_ids.clone();
    wanted.extend(order_ids.iter().map(|o| saga_stream(*o)));
    let heads: HashMap<Uuid, event_store::read::Head> =
        event_store::read::heads(&mut conn, &wanted)
            .await?
            .into_iter()
            .map(|h| (h.stream_id, h))
            .collect();
    drop(conn);

    let mut stuck = Vec::new();
    for order_id in order_ids {
        let head = heads.get(&order_id);
        let saga_head = heads.get(&saga_stream(order_id));
        let last_progress = [head, saga_head]
            .into_iter()
            .flatten()
            .map(|h| h.recorded_at)
            .max();
        let is_final = head.is_some_and(|h| FINAL.contains(&h.event_type.as_str()));
        let mut causes = Vec::new();
        if !is_final && head.is_some() && last_progress.is_some_and(|t| t < idle_since) {
            let step = saga_head.map_or("the saga never started".to_owned(), |h| {
                format!("the saga's last step: {}", h.event_type)
            });
            causes.push(format!(
                "no progress for {} ({step})",
                ago(now, last_progress)
            ));
        }
        for l in letters.iter().filter(|l| l.order_id == Some(order_id)) {
            // A final order is still stuck when a read model disagrees with it or its
            // customer was never told of its end (a dead email).
            if is_final && ![Source::ReadSide, Source::Email].contains(&l.id.source()) {
                continue;
            }
            causes.push(format!(
                "{} dead letter in {}: {}",
                l.id.source().slug(),
                l.origin,
                l.reason
            ));
        }
        if causes.is_empty() {
            continue;
        }
        stuck.push(StuckOrder {
            order_id,
            last_event: head.map_or("-".into(), |h| h.event_type.clone()),
            last_progress,
            causes,
        });
    }
    stuck.sort_by_key(|s| s.last_progress);
    Ok(stuck)
}

fn ago(now: DateTime<Utc>, t: Option<DateTime<Utc>>) -> String {
    let Some(t) = t else { return "ever".into() };
    let secs = (now - t).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s => format!("{} h", s / 3600),
    }
}

pub async fn page(State(console): State<Console>, op: Operator) -> Result<Markup, ConsoleError> {
    let gathered = letters::gather(&console, &Filter::default()).await?;
    let stuck = stuck_orders(&console, &gathered.letters).await?;
    let unreadable = gathered.saga_unreadable;
    Ok(view::page(
        &op,
        "Stuck orders",
        html! {
            h1 { "Stuck orders" }
            p.hint { "Not confirmed or cancelled, and idle for more than "
                (humantime(console.stuck_after)) " (step timeout × attempts), or named by a dead letter or a failed outbox row." }
            @if let Some(e) = &unreadable {
                p.warn { "The saga's dead letters could not be read: " (e) }
            }
            @if stuck.is_empty() {
                p.empty.ok { "No stuck orders." }
            } @else {
                p { (stuck.len()) " stuck order(s)." }
                table.stuck {
                    thead { tr { th { "Order" } th { "Last event" } th { "Last progress" } th { "Why" } } }
                    tbody {
                        @for s in &stuck {
                            tr {
                                td { a href={ "/console/orders/" (s.order_id) } { (s.order_id) } }
                                td { (s.last_event) }
                                td { (s.last_progress.map_or("-".into(), view::time)) }
                                td { ul { @for c in &s.causes { li { (c) } } } }
                            }
                        }
                    }
                }
            }
        },
    ))
}

fn humantime(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

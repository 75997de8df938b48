//! The overview: is every role up (and how often it restarted), how far behind are the
//! projections and every consumer group (Kafka lag per group and topic; the saga's RabbitMQ
//! queues, waiting messages and consumers), how big and how old is the outbox backlog, how many dead letters by source
//! and reason, how many sagas are in flight and how many orders are stuck, and the roles'
//! recent errors. Each number links to the page that acts on it.

use std::collections::BTreeMap;

use axum::extract::State;
use maud::{Markup, html};

use crate::{
    Console, ConsoleError,
    letters::{self, Filter},
    projections,
    session::Operator,
    stuck, view,
};

pub async fn page(State(console): State<Console>, op: Operator) -> Result<Markup, ConsoleError> {
    let roles = match &console.readiness {
        Some(r) => Some(r.report().await.1),
        None => None,
    };
    let (backlog, oldest) = event_store::outbox::backlog(&console.pool).await?;
    let projections = read_side::status::all(&console.pool, console.watermarks.as_ref()).await?;
    let gathered = letters::gather(&console, &Filter::default()).await?;
    let mut by_reason: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for l in &gathered.letters {
        *by_reason
            .entry((l.id.source().slug(), l.reason.as_str()))
            .or_default() += 1;
    }
    let in_flight = saga::sagas_in_flight(&console.pool).await?;
    let groups = read_side::status::groups(&console.pool, console.watermarks.as_ref()).await?;
    let queues = queues(&console).await;
    let stuck = stuck::stuck_orders(&console, &gathered.letters).await?;
    let details = roles
        .as_ref()
        .and_then(|r| r["role_details"].as_object().cloned())
        .unwrap_or_default();
    Ok(view::page(
        &op,
        "Overview",
        html! {
            h1 { "Overview" }
            div.cards {
                div.card { div.value #stuck-count { a href="/console/orders/stuck" { (stuck.len()) } } div.label { "stuck orders" } }
                div.card { div.value { a href="/console/sagas" { (in_flight) } } div.label { "sagas in flight" } }
                div.card { div.value #dead-letter-count { a href="/console/dead-letters" { (gathered.letters.len()) } } div.label { "open dead letters" } }
                div.card { div.value { a href="/console/outbox" { (backlog) } } div.label { "outbox rows pending; oldest " (format!("{oldest:.1}")) " s" } }
                @if let Some(r) = &roles {
                    div.card { div class={ "value " (if r["ready"] == true { "ok" } else { "bad" }) } { (r["status"].as_str().unwrap_or("?")) } div.label { "readiness" } }
                }
            }
            @if let Some(e) = &gathered.saga_unreadable {
                p.warn { "The saga's dead letters could not be read: " (e) }
            }
            h2 { "Roles" }
            @if details.is_empty() { p.empty { "No role report in this process." } } @else {
                table.roles {
                    thead { tr { th { "Role" } th { "Status" } th.num { "For (s)" } th.num { "Restarts" } th { "Last error" } } }
                    tbody {
                        @for (name, d) in &details {
                            tr {
                                td { (name) }
                                td class={ "status " (if d["status"] == "up" { "ok" } else { "bad" }) } { (d["status"].as_str().unwrap_or("?")) }
                                td.num { (d["for_seconds"]) }
                                td.num { (d["restarts"]) }
                                td.bad { (d["last_error"].as_str().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
            h2 { "Projections" }
            (projections::summary(&projections))
            h2 { "Consumer groups" }
            table.groups {
                thead { tr { th { "Group" } th { "Topic" } th.num { "Position" } th.num { "Lag" } } }
                tbody {
                    @for g in &groups {
                        tr id={ "group-" (g.group) } {
                            td { (g.group) }
                            td { (g.topic) }
                            td.num { (g.position) }
                            td.num.lag { (g.lag.map_or("?".into(), |l| l.to_string())) }
                        }
                    }
                }
            }
            @match &queues {
                Err(e) => p.warn { "The saga's queues could not be read: " (e) },
                Ok(q) if q.is_empty() => {},
                Ok(q) => {
                    table.queues {
                        thead { tr { th { "Saga queue" } th.num { "Waiting" } th.num { "Consumers" } } }
                        tbody {
                            @for d in q {
                                tr {
                                    td { (d.queue) }
                                    td.num { (d.waiting) }
                                    td class={ "num " (if d.consumers == 0 && !d.dead_letter { "bad" } else { "" }) } { (d.consumers) }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Dead letters by source and reason" }
            @if by_reason.is_empty() { p.empty.ok { "None open." } } @else {
                table {
                    thead { tr { th { "Source" } th { "Reason" } th.num { "Open" } } }
                    tbody {
                        @for ((source, reason), n) in &by_reason {
                            tr {
                                td { (source) }
                                td { a href={ "/console/dead-letters?source=" (source) "&reason=" (reason) } { (reason) } }
                                td.num { (n) }
                            }
                        }
                    }
                }
            }
        },
    ))
}

/// The saga's queues with their depth and consumers (none when this process runs no saga).
async fn queues(console: &Console) -> Result<Vec<saga::QueueDepth>, String> {
    if console.amqp.is_none() {
        return Ok(Vec::new());
    }
    letters::on_broker(console, async |conn, amqp| {
        saga::queue_depths(conn, &amqp.names).await
    })
    .await
}

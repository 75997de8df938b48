//! One order on one page: what the read model shows, where its checkout saga stands (the
//! same read model as GraphQL's `Order.checkout`), its dead letters with their actions, its
//! stored events with their hashes and the chain's verification, and what operators did to it.

use axum::{
    extract::{Path, Query, State},
    response::Redirect,
};
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use crate::{
    Console, ConsoleError, actions, dead_letters,
    letters::{self, Filter},
    session::Operator,
    view,
};

#[derive(Deserialize)]
pub struct Search {
    #[serde(default)]
    id: String,
}

/// The header's "Open" box: an order id opens the order, a customer id her orders' audit.
pub async fn search(_op: Operator, Query(q): Query<Search>) -> Result<Redirect, ConsoleError> {
    let typed = q.id.trim();
    if let Ok(id) = Uuid::parse_str(typed) {
        return Ok(Redirect::to(&format!("/console/orders/{id}")));
    }
    let customer = domain::values::CustomerId::parse(typed).map_err(|_| {
        ConsoleError::BadRequest(format!(
            "`{typed}` is neither an order id nor a customer id"
        ))
    })?;
    Ok(Redirect::to(&format!(
        "/console/customers/{}",
        customer.as_str()
    )))
}

pub async fn page(
    State(console): State<Console>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<Markup, ConsoleError> {
    let order_id = Uuid::parse_str(&id)
        .map_err(|_| ConsoleError::BadRequest(format!("`{id}` is not an order id")))?;
    let trail = read_side::audit::trail(&console.pool, order_id).await?;
    if trail.events.is_empty() {
        return Err(ConsoleError::NotFound(format!(
            "the event store has no order {order_id}"
        )));
    }
    let summary = read_side::order_summary::repo::find(&console.pool, order_id)
        .await
        .map_err(|e| match e {
            read_side::order_summary::repo::ReadError::Database(e)
            | read_side::order_summary::repo::ReadError::Decode(e) => ConsoleError::Database(e),
        })?;
    let checkout = read_side::checkout::load(&console.pool, order_id)
        .await
        .map_err(|e| match e {
            read_side::checkout::CheckoutError::Database(e) => ConsoleError::Database(e),
            other => ConsoleError::Refused(other.to_string()),
        })?;
    let gathered = letters::gather(
        &console,
        &Filter {
            order_id: Some(order_id),
            all: true,
            ..Filter::default()
        },
    )
    .await?;
    let done = actions::list_for_order(&console.pool, order_id).await?;
    let store_status = trail.events.last().map(|e| e.event_type.clone());
    Ok(view::page(
        &op,
        "Order",
        html! {
            h1 { "Order " (order_id) }
            dl {
                dt { "In the event store" } dd.status { (store_status.unwrap_or_default()) " (version " (trail.events.len()) ")" }
                dt { "Read model (order status)" }
                dd.status #read-model-status {
                    @match &summary {
                        Some(s) => { (s.status) " (version " (s.version) ")" },
                        None => span.warn { "not projected yet" },
                    }
                }
                @if let Some(c) = summary.as_ref().map(|s| s.customer_id.as_str()) {
                    dt { "Customer" } dd { a href={ "/console/customers/" (c) } { (c) } }
                }
                dt { "Checkout" }
                dd.status #checkout-status { (format!("{:?}", checkout.status)) }
                dt { "Step" } dd { (checkout.step.map_or("-", domain::saga::step_name)) ", attempt " (checkout.attempts) }
                dt { "Last error" } dd {
                    @if let Some(f) = &checkout.last_error {
                        span.bad { (f.kind) } " " (f.step.map_or("", domain::saga::step_name)) ": " (f.reason)
                    } @else { "-" }
                }
            }
            h2 { "Dead letters" }
            @if let Some(e) = &gathered.saga_unreadable {
                p.warn { "The saga's dead letters could not be read: " (e) }
            }
            (dead_letters::table(&gathered.letters))
            @let open = gathered.letters.iter().filter(|l| l.status == "open").count();
            @if open > 0 {
                form.action method="post" action="/console/dead-letters/replay" {
                    (view::csrf(&op))
                    input type="hidden" name="order" value=(order_id);
                    label { "Why (recorded)" input name="why" size="40" {} }
                    button type="submit" { "Replay this order's " (open) " open dead letter(s), oldest first" }
                }
            }
            h2 { "Checkout saga" }
            @if checkout.timeline.is_empty() {
                p.empty { "The saga has not recorded anything for this order." }
            } @else {
                table.timeline {
                    thead { tr { th { "When" } th { "What" } th { "Step" } th.num { "Attempt" } th { "Result" } th { "Failure" } } }
                    tbody {
                        @for e in &checkout.timeline {
                            tr {
                                td { (view::time(e.at)) }
                                td { (e.kind) }
                                td { (e.step.map_or("", domain::saga::step_name)) }
                                td.num { (e.attempt.map_or(String::new(), |a| a.to_string())) }
                                td { (e.result_id.clone().unwrap_or_default()) }
                                td.bad { @if let Some(f) = &e.failure { (f.kind) ": " (f.reason) } }
                            }
                        }
                    }
                }
            }
            h2 { "Audit trail" }
            @match &trail.report.broken {
                None => p.ok #audit-verdict { "The hash chain of all " (trail.report.events) " event(s) verifies." },
                Some(b) => p.bad #audit-verdict { "The chain breaks at version " (b.stream_version) ": " (format!("{:?}", b.problem)) "." },
            }
            table.audit {
                thead { tr { th.num { "Version" } th { "Event" } th { "Recorded" } th { "Hash" } th { "Payload" } } }
                tbody {
                    @for e in &trail.events {
                        @let broken = trail.report.broken.as_ref().is_some_and(|b| b.stream_version <= e.stream_version);
                        tr class=[broken.then_some("broken")] {
                            td.num { (e.stream_version) }
                            td { (e.event_type) " v" (e.schema_version) }
                            td { (view::time(e.recorded_at)) }
                            td { code { (hex::encode(&e.hash[..e.hash.len().min(8)])) "…" } }
                            td { pre { (view::pretty(&e.payload)) } }
                        }
                    }
                }
            }
            h2 { "Operator actions on this order" }
            (actions::table(&done))
        },
    ))
}

//! A customer's audit trail: each of her orders with its hash chain's verdict, newest first,
//! linked to the order's page (its events and hashes), and whether her personal data was
//! erased.
//!
//! Why: "what happened to Ada's orders, and has anyone altered them?" is asked by customer,
//! not by order id (a dispute, a data-subject request). Which orders are hers comes from the
//! order-summary read model's customer index; every verdict is recomputed from the event
//! store (`read_side::audit::customer_trail`).

use axum::extract::{Path, State};
use domain::values::CustomerId;
use maud::{Markup, html};

use crate::{Console, ConsoleError, session::Operator, view};

/// Orders verified per page at most (each is one stream read).
const LIMIT: i64 = 200;

pub async fn page(
    State(console): State<Console>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<Markup, ConsoleError> {
    let customer = CustomerId::parse(&id)
        .map_err(|e| ConsoleError::BadRequest(format!("`{id}` is not a customer id: {e}")))?;
    let orders = read_side::audit::customer_trail(&console.pool, customer.as_str(), LIMIT).await?;
    let erased: Option<(chrono::DateTime<chrono::Utc>, String)> =
        sqlx::query_as("SELECT erased_at, erased_by FROM customer_erasures WHERE customer_id = $1")
            .bind(customer.as_str())
            .fetch_optional(&console.pool)
            .await?;
    // An order the read model lists but the store no longer holds was deleted: as bad as a
    // broken chain.
    let bad = |o: &read_side::audit::OrderAudit| o.report.broken.is_some() || o.head.is_none();
    let broken = orders.iter().filter(|o| bad(o)).count();
    Ok(view::page(
        &op,
        "Customer",
        html! {
            h1 { "Customer " (customer.as_str()) }
            @if let Some((at, by)) = &erased {
                p.warn { "Her personal data was erased " (view::time(*at)) " (by " (by) "): sealed values show as \"erased\"." }
            }
            @if orders.is_empty() {
                p.empty #customer-verdict { "No order of hers is known to the read model." }
            } @else if broken == 0 {
                p.ok #customer-verdict { "The hash chain of each of her " (orders.len()) " order(s) verifies." }
            } @else {
                p.bad #customer-verdict { (broken) " of her " (orders.len()) " order(s) have a broken hash chain or are missing from the store." }
            }
            @if orders.len() as i64 == LIMIT { p.hint { "Her newest " (LIMIT) " orders are shown." } }
            table.customer-orders {
                thead { tr { th { "Order" } th { "Last event" } th.num { "Events" } th { "Recorded" } th { "Hash chain" } } }
                tbody {
                    @for o in &orders {
                        tr id={ "order-" (o.order_id) } class=[bad(o).then_some("broken")] {
                            td { a href={ "/console/orders/" (o.order_id) } { (o.order_id) } }
                            td { (o.head.as_ref().map_or("-", |h| h.event_type.as_str())) }
                            td.num { (o.report.events) }
                            td { (o.head.as_ref().map_or("-".into(), |h| view::time(h.recorded_at))) }
                            @match (&o.report.broken, &o.head) {
                                (Some(b), _) => td.bad.verdict { "breaks at version " (b.stream_version) ": " (format!("{:?}", b.problem)) },
                                (None, None) => td.bad.verdict { "missing from the event store" },
                                (None, Some(_)) => td.ok.verdict { "verifies" },
                            }
                        }
                    }
                }
            }
        },
    ))
}

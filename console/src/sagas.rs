//! Sagas: the checkouts waiting for a participant, by step, soonest deadline first, and the
//! operator's "retry the step now", "mark resolved" and "compensate"; the sagas that ended most recently,
//! completed or compensated (with why); a search by order id, which opens the order's page
//! (where its saga's timeline is).
//!
//! Why: a saga waits for a participant's reply up to `SAGA_STEP_TIMEOUT` per attempt. When
//! the participant is known to be back (after an outage, a fix), an operator should not have
//! to wait out every deadline: *Retry the step now* makes the step's deadline due at once,
//! and the saga's deadlines role does what the deadline would have done, through the saga's
//! own decision (`domain::saga`): send the step again as its next attempt or, out of
//! attempts, compensate. *Mark resolved* is for a step done outside the shop (stock set
//! aside by hand, a payment taken by phone, a parcel the warehouse sent): with its reference
//! (the reservation, authorization or shipment id) it is taken as the step's success through
//! the saga's own decision (`Orchestrator::resolve_by_hand`, the operator recorded as the
//! author of what follows), and the saga moves on. *Compensate* cancels the order as the operator (the same command as
//! an operator's `POST /orders/{id}/cancel`); the saga sees the cancellation on the event
//! store's feed and releases what it holds. Nothing here writes saga events itself. Every
//! action is recorded. A saga's timeline is on its order's page (the same read model as
//! GraphQL `Order.checkout`).

use axum::{
    extract::{Path, Query, State},
    response::{IntoResponse, Redirect, Response},
};
use chrono::Utc;
use domain::saga::Step;
use domain::{
    order::{CancelledBy, OrderCommand},
    values::{OrderId, Reason},
};
use event_store::Metadata;
use maud::{Markup, html};
use orders::OrderError;
use saga::orchestrator::{ByHand, SagaError};
use serde::Deserialize;
use uuid::Uuid;

use crate::{
    Console, ConsoleError, actions,
    session::{Act, Operator},
    view,
};

/// Sagas listed at most.
const LIMIT: i64 = 200;

/// The saga's steps, as stored with its deadline.
const STEPS: [&str; 3] = ["inventory", "payment", "shipment"];

#[derive(Deserialize, Default)]
pub struct SagaQuery {
    /// `waiting` (the default), `completed` or `compensated`.
    #[serde(default)]
    state: String,
    #[serde(default)]
    step: String,
    /// `1`: only deadlines already past.
    #[serde(default)]
    overdue: String,
    /// An order id: opens its page.
    #[serde(default)]
    order: String,
}

pub async fn page(
    State(console): State<Console>,
    op: Operator,
    Query(q): Query<SagaQuery>,
) -> Result<Response, ConsoleError> {
    match q.order.trim() {
        "" => Ok(render(&console, &op, &q, None).await?.into_response()),
        id => {
            let id: Uuid = id
                .parse()
                .map_err(|_| ConsoleError::BadRequest(format!("`{id}` is not an order id")))?;
            Ok(Redirect::to(&format!("/console/orders/{id}")).into_response())
        }
    }
}

#[derive(Deserialize)]
pub struct WhyForm {
    #[serde(default)]
    why: String,
    /// The step's result done by hand (mark resolved only).
    #[serde(default)]
    reference: String,
    /// The step the operator saw waiting (mark resolved only).
    #[serde(default)]
    step: String,
}

/// The longest reference a step resolved by hand takes (a reservation, authorization or
/// tracking number).
const MAX_REFERENCE: usize = 100;

/// A reference an operator typed: trimmed, 1 to [`MAX_REFERENCE`] characters, no control
/// characters (it becomes the order's reservation, authorization or shipment id, which the
/// customer sees).
fn reference(typed: &str) -> Result<&str, ConsoleError> {
    let r = typed.trim();
    // Control characters, and the invisible ones that reorder or hide text (bidirectional
    // overrides, zero-width characters, the byte-order mark).
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
    };
    if r.is_empty() || r.chars().count() > MAX_REFERENCE || r.chars().any(hidden) {
        return Err(ConsoleError::BadRequest(format!(
            "give the step's reference (its reservation, authorization or shipment id): 1 to {MAX_REFERENCE} characters, no control characters"
        )));
    }
    Ok(r)
}

/// `POST /console/sagas/{order}/{retry|resolve|compensate}`.
pub async fn act(
    State(console): State<Console>,
    Path((order, action)): Path<(String, String)>,
    act: Act<WhyForm>,
) -> Result<Markup, ConsoleError> {
    let order: Uuid = order
        .parse()
        .map_err(|_| ConsoleError::BadRequest(format!("`{order}` is not an order id")))?;
    let (verb, outcome) = match action.as_str() {
        "retry" => ("retry_saga_step", retry(&console, order).await?),
        "resolve" => {
            let reference = reference(&act.form.reference)?;
            let step = domain::saga::parse_step(&act.form.step).ok_or_else(|| {
                ConsoleError::BadRequest(format!("`{}` is not a step of the saga", act.form.step))
            })?;
            if act.form.why.trim().is_empty() {
                return Err(ConsoleError::BadRequest(
                    "say how the step was done outside the shop".into(),
                ));
            }
            (
                "resolve_saga_step",
                resolve(&console, &act.operator.actor, order, step, reference).await?,
            )
        }
        "compensate" => {
            let reason = Reason::parse(&act.form.why).map_err(|_| {
                ConsoleError::BadRequest(
                    "say why the checkout is compensated (1 to 500 characters)".into(),
                )
            })?;
            (
                "compensate_saga",
                compensate(&console, &act.operator.actor, order, reason).await?,
            )
        }
        other => return Err(ConsoleError::NotFound(format!("no action `{other}`"))),
    };
    let shown = actions::shown(&outcome);
    actions::record(
        &console.pool,
        actions::NewAction {
            actor: &act.operator.actor,
            action: verb,
            target: &format!("saga:{order}"),
            order_id: Some(order),
            reason: act.form.why.trim(),
            outcome: &shown,
            detail: None,
        },
    )
    .await?;
    render(
        &console,
        &act.operator,
        &SagaQuery::default(),
        Some((order, outcome)),
    )
    .await
}

async fn retry(console: &Console, order: Uuid) -> Result<Result<String, String>, ConsoleError> {
    Ok(match saga::expedite(&console.pool, order).await? {
        Some((step, attempt)) => Ok(format!(
            "{step} attempt {attempt}: its deadline is due now; the saga sends the step again, or compensates when out of attempts"
        )),
        None => Err("the saga waits for no participant (finished or not started)".to_owned()),
    })
}

/// Takes the waiting step as done by hand, with `reference` as its result.
async fn resolve(
    console: &Console,
    actor: &str,
    order: Uuid,
    step: Step,
    reference: &str,
) -> Result<Result<String, String>, ConsoleError> {
    let Some(saga) = &console.saga else {
        return Ok(Err("this process runs no saga".into()));
    };
    Ok(
        match saga
            .resolve_by_hand(OrderId(order), step, reference, actor, Uuid::now_v7())
            .await
        {
            Ok(ByHand::Resolved { step }) => Ok(format!(
                "{} marked resolved by hand ({reference}); the saga moves on",
                saga::orchestrator::step_name(step)
            )),
            Ok(ByHand::NotWaiting) => {
                Err("the saga waits for no step (finished or not started)".into())
            }
            Ok(ByHand::StepChanged { waiting }) => Err(format!(
                "the saga has moved on: it now waits for {}; nothing was done (look again)",
                saga::orchestrator::step_name(waiting)
            )),
            Err(SagaError::Database(e)) => return Err(e.into()),
            Err(e) => Err(e.to_string()),
        },
    )
}

/// Cancels the order as `actor`; the saga compensates when it reads the cancellation.
async fn compensate(
    console: &Console,
    actor: &str,
    order: Uuid,
    reason: Reason,
) -> Result<Result<String, String>, ConsoleError> {
    let metadata = Metadata {
        correlation_id: order,
        causation_id: Uuid::now_v7(),
        actor: actor.to_owned(),
        traceparent: None,
        command_id: None,
    };
    let mut tx = console.pool.begin().await?;
    let (state, expected) = match orders::load(&mut tx, OrderId(order)).await {
        Ok(loaded) => loaded,
        Err(e) => return Ok(Err(format!("the order cannot be read: {e}"))),
    };
    if state.customer_id().is_none() {
        return Ok(Err("no such order".into()));
    }
    let command = OrderCommand::Cancel {
        reason,
        by: CancelledBy::Operator,
    };
    Ok(
        match orders::decide_and_append(
            &mut tx,
            OrderId(order),
            &state,
            &expected,
            command,
            &metadata,
        )
        .await
        {
            Ok(version) => {
                tx.commit().await?;
                Ok(format!(
                    "the order is cancelled (version {version}); the saga releases what it holds"
                ))
            }
            Err(OrderError::Database(e)) => return Err(e.into()),
            Err(e) => Err(e.to_string()),
        },
    )
}

async fn render(
    console: &Console,
    op: &Operator,
    q: &SagaQuery,
    notice: Option<(Uuid, Result<String, String>)>,
) -> Result<Markup, ConsoleError> {
    let step = match q.step.trim() {
        "" => None,
        s => Some(
            *STEPS
                .iter()
                .find(|k| **k == s)
                .ok_or_else(|| ConsoleError::BadRequest(format!("unknown step `{s}`")))?,
        ),
    };
    let ended = match q.state.trim() {
        "" | "waiting" => None,
        s => Some(
            saga::Outcome::ALL
                .into_iter()
                .find(|o| o.name() == s)
                .ok_or_else(|| ConsoleError::BadRequest(format!("unknown state `{s}`")))?,
        ),
    };
    let search = html! {
        form.filters method="get" action="/console/sagas" {
            label { "Order id" input name="order" size="38" {} }
            button type="submit" { "Open its saga" }
            " "
            a href="/console/sagas" { "waiting" } " · "
            @for o in saga::Outcome::ALL {
                a href={ "/console/sagas?state=" (o.name()) } { "recently " (o.name()) } " · "
            }
        }
    };
    if let Some(outcome) = ended {
        let rows = saga::ended(&console.pool, Some(outcome), LIMIT).await?;
        return Ok(view::page(
            op,
            "Sagas",
            html! {
                h1 { "Sagas recently " (outcome.name()) }
                (search)
                @if rows.is_empty() { p.empty { "None." } } @else {
                    table.sagas.ended {
                        thead { tr { th { "Order" } th { "Ended" } th { "Why" } } }
                        tbody {
                            @for e in &rows {
                                tr id={ "ended-" (e.order_id) } {
                                    td { a href={ "/console/orders/" (e.order_id) } { (e.order_id) } }
                                    td { (view::time(e.at)) }
                                    td.reason { (e.reason.as_deref().unwrap_or("")) }
                                }
                            }
                        }
                    }
                    @if rows.len() as i64 == LIMIT { p.hint { "The newest " (LIMIT) " are shown." } }
                }
            },
        ));
    }
    let overdue = q.overdue == "1";
    let waiting = saga::waiting(&console.pool, step, overdue, LIMIT).await?;
    let now = Utc::now();
    Ok(view::page(
        op,
        "Sagas",
        html! {
            h1 { "Sagas waiting for a participant" }
            (search)
            @if let Some((order, outcome)) = &notice {
                @match outcome {
                    Ok(s) => p.ok #outcome { a href={ "/console/orders/" (order) } { (order) } ": " (s) },
                    Err(e) => p.bad #outcome { a href={ "/console/orders/" (order) } { (order) } ": " (e) },
                }
            }
            p.hint {
                "Each waits for its step's reply until the deadline, then the saga sends the step again or, out of attempts, compensates. "
                "Retry the step now when the participant is known to be back; mark it resolved, with its reference, when it was done outside the shop "
                "(the saga takes it as the step's success and moves on); compensate (cancel the order as the operator) to give up on it. "
                "The timeline of a saga is on its order's page."
            }
            form.filters method="get" action="/console/sagas" {
                label { "Step"
                    select name="step" {
                        option value="" selected[step.is_none()] { "any" }
                        @for s in STEPS { option value=(s) selected[step == Some(s)] { (s) } }
                    }
                }
                label { "Overdue only" input type="checkbox" name="overdue" value="1" checked[overdue] {} }
                button type="submit" { "Show" }
            }
            @if waiting.is_empty() { p.empty #sagas-empty { "No saga waits." } } @else {
                table.sagas {
                    thead { tr { th { "Order" } th { "Step" } th.num { "Attempt" } th { "Deadline" } th { "" } } }
                    tbody {
                        @for w in &waiting {
                            @let left = (w.due_at - now).num_seconds();
                            tr id={ "saga-" (w.order_id) } {
                                td { a href={ "/console/orders/" (w.order_id) } { (w.order_id) } }
                                td.step { (w.step) }
                                td.num.attempt { (w.attempt) }
                                @if left < 0 { td.bad { "overdue by " (-left) " s" } } @else { td { "in " (left) " s" } }
                                td {
                                    form.inline.retry method="post" action={ "/console/sagas/" (w.order_id) "/retry" } {
                                        (view::csrf(op))
                                        input name="why" placeholder="why (recorded)" aria-label="why retry" {}
                                        button type="submit" { "Retry the step now" }
                                    }
                                    " "
                                    form.inline.resolve method="post" action={ "/console/sagas/" (w.order_id) "/resolve" } {
                                        (view::csrf(op))
                                        input type="hidden" name="step" value=(w.step);
                                        input name="reference" placeholder={ (w.step) " reference" } aria-label="reference of the step done by hand" required maxlength=(MAX_REFERENCE) {}
                                        input name="why" placeholder="how it was done (required)" aria-label="why resolved" required {}
                                        button type="submit" { "Mark resolved" }
                                    }
                                    " "
                                    form.inline.compensate method="post" action={ "/console/sagas/" (w.order_id) "/compensate" } {
                                        (view::csrf(op))
                                        input name="why" placeholder="why (required)" aria-label="why compensate" required {}
                                        button.danger type="submit" { "Compensate" }
                                    }
                                }
                            }
                        }
                    }
                }
                @if waiting.len() as i64 == LIMIT { p.hint { "The first " (LIMIT) " are shown." } }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_done_by_hand_is_trimmed_and_bounded_and_has_no_control_characters() {
        assert_eq!(reference("  DHL-123 ").unwrap(), "DHL-123");
        assert_eq!(
            reference(&"x".repeat(MAX_REFERENCE)).unwrap().len(),
            MAX_REFERENCE
        );
        for bad in [
            "",
            "   ",
            "DHL\n123",
            "a\u{7}b",
            "DHL\u{202E}321",
            "zero\u{200B}width",
            &"x".repeat(MAX_REFERENCE + 1),
        ] {
            assert!(reference(bad).is_err(), "{bad:?}");
        }
    }
}

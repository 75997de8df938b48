//! Where an order's checkout stands, over GraphQL: `Order.checkout` (step, status, attempts,
//! last error, timeline) and the `checkoutChanged` subscription, so a storefront can show
//! "payment pending" live.
//!
//! Only GraphQL types and resolvers: the state comes from [`crate::checkout`] (the saga's
//! stream in the event store). Whoever may see the order may see its checkout.

use std::time::Duration;

use async_graphql::{
    ComplexObject, Context, Enum, ID, SimpleObject, Subscription, futures_util::Stream,
};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{
    access::principal,
    errors::{error, internal, parse_id},
    limits::subscription_slot,
    orders::Order,
};
use crate::checkout;
use platform::auth::Role;

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(rename_items = "SCREAMING_SNAKE_CASE")]
pub enum CheckoutStatus {
    /// The saga has not taken the order on yet.
    NotStarted,
    /// Waiting for a participant (see `step`).
    InProgress,
    /// Reserved, paid and shipped.
    Completed,
    /// Given up (or cancelled), and whatever was held released.
    Compensated,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(rename_items = "SCREAMING_SNAKE_CASE")]
pub enum CheckoutStep {
    Inventory,
    Payment,
    Shipment,
}

impl From<domain::saga::Step> for CheckoutStep {
    fn from(s: domain::saga::Step) -> Self {
        match s {
            domain::saga::Step::Inventory => Self::Inventory,
            domain::saga::Step::Payment => Self::Payment,
            domain::saga::Step::Shipment => Self::Shipment,
        }
    }
}

/// One decision of the checkout saga.
#[derive(SimpleObject, Clone, PartialEq)]
pub struct CheckoutEntry {
    pub at: DateTime<Utc>,
    /// `started`, `step_requested`, `step_succeeded`, `step_failed`,
    /// `compensation_started`, `completed`, `late_reply_compensated` (or `input_recorded`
    /// for sagas recorded before decisions were).
    pub kind: String,
    pub step: Option<CheckoutStep>,
    pub attempt: Option<i32>,
    /// The participant's result id, or why the step failed (`refused`, `failed` or
    /// `timed_out`, then the reason).
    pub detail: Option<String>,
}

/// Where the order's checkout saga stands.
#[derive(SimpleObject, Clone, PartialEq)]
pub struct Checkout {
    pub order_id: ID,
    pub status: CheckoutStatus,
    /// The step being waited for, while in progress.
    pub step: Option<CheckoutStep>,
    /// Attempts of the current (or last) step.
    pub attempts: i32,
    /// Why the last step failed (cleared when a later attempt succeeds), or why the saga
    /// gave up. Customers see what failed (`payment refused`); operators also the
    /// participant's reason.
    pub last_error: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
    /// The newest decisions (at most 100), oldest first.
    pub timeline: Vec<CheckoutEntry>,
}

/// What a failure says to whom: a customer learns what failed, not the participant's
/// words (stock levels, internal reasons); an operator reads everything.
fn describe(f: &checkout::Failure, operator: bool) -> String {
    if operator {
        return format!("{}: {}", f.kind, f.reason);
    }
    match f.step {
        Some(step) => format!(
            "{} {}",
            domain::saga::step_name(step),
            f.kind.replace('_', " ")
        ),
        None => "checkout cancelled".into(),
    }
}

impl Checkout {
    fn from_model(order_id: ID, c: checkout::Checkout, operator: bool) -> Self {
        Self {
            order_id,
            status: match c.status {
                checkout::Status::NotStarted => CheckoutStatus::NotStarted,
                checkout::Status::InProgress => CheckoutStatus::InProgress,
                checkout::Status::Completed => CheckoutStatus::Completed,
                checkout::Status::Compensated => CheckoutStatus::Compensated,
            },
            step: c.step.map(Into::into),
            attempts: i32::try_from(c.attempts).unwrap_or(i32::MAX),
            last_error: c.last_error.as_ref().map(|f| describe(f, operator)),
            updated_at: c.updated_at,
            timeline: c
                .timeline
                .into_iter()
                .map(|e| CheckoutEntry {
                    at: e.at,
                    kind: e.kind,
                    step: e.step.map(Into::into),
                    attempt: e.attempt.map(|a| i32::try_from(a).unwrap_or(i32::MAX)),
                    detail: match (&e.failure, e.result_id) {
                        (Some(f), _) if operator => Some(describe(f, true)),
                        (Some(f), _) => Some(f.kind.to_owned()),
                        (None, Some(id)) if operator => Some(id),
                        _ => None,
                    },
                })
                .collect(),
        }
    }

    fn is_final(&self) -> bool {
        matches!(
            self.status,
            CheckoutStatus::Completed | CheckoutStatus::Compensated
        )
    }
}

fn model_error(e: checkout::CheckoutError) -> async_graphql::Error {
    match e {
        checkout::CheckoutError::Database(e) => internal(e),
        unreadable => {
            tracing::error!(error = %unreadable, "saga stream unreadable");
            error("INTERNAL", "the checkout's record is unreadable")
        }
    }
}

async fn load(pool: &PgPool, order_id: &ID, operator: bool) -> async_graphql::Result<Checkout> {
    let id = parse_id(order_id)?;
    let c = checkout::load(pool, id).await.map_err(model_error)?;
    Ok(Checkout::from_model(order_id.clone(), c, operator))
}

#[ComplexObject]
impl Order {
    /// Where the checkout saga stands: step, attempts, last error and its timeline (read
    /// from the saga's own record, one query per order).
    #[graphql(complexity = "10 + child_complexity")]
    async fn checkout(&self, ctx: &Context<'_>) -> async_graphql::Result<Checkout> {
        let operator = principal(ctx)?.role == Role::Operator;
        load(ctx.data::<PgPool>()?, &self.id, operator).await
    }
}

/// The checkout subscriptions, merged into the schema's `SubscriptionRoot`.
#[derive(Default)]
pub struct CheckoutSubscription;

#[Subscription]
impl CheckoutSubscription {
    /// The order's checkout now, then each time it changes (checked once a second), until
    /// it completes or is compensated. Customers receive only their own orders'.
    async fn checkout_changed(
        &self,
        ctx: &Context<'_>,
        order_id: ID,
    ) -> async_graphql::Result<impl Stream<Item = Checkout> + use<>> {
        let who = principal(ctx)?.clone();
        let id = parse_id(&order_id)?;
        let pool = ctx.data::<PgPool>()?.clone();
        let owner = checkout::owner(&pool, id).await.map_err(internal)?;
        let visible = match (&owner, who.role) {
            (None, _) => false,
            (Some(_), Role::Operator) => true,
            (Some(o), Role::Customer) => *o == who.subject,
        };
        if !visible {
            return Err(error("BAD_USER_INPUT", "no such order"));
        }
        let slot = subscription_slot(ctx, &who)?;
        let operator = who.role == Role::Operator;
        // Polls once a second; sends each change; ends after the final state, or on an error
        // (the client may subscribe again), so no stream outlives its saga.
        struct Poll {
            last: Option<Checkout>,
            done: bool,
            _slot: platform::limits::Slot,
        }
        let start = Poll {
            last: None,
            done: false,
            _slot: slot,
        };
        Ok(futures::stream::unfold(start, move |mut poll| {
            let (pool, order_id) = (pool.clone(), order_id.clone());
            async move {
                if poll.done {
                    return None;
                }
                loop {
                    if poll.last.is_some() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    let now = load(&pool, &order_id, operator).await.ok()?;
                    if poll.last.as_ref() != Some(&now) {
                        poll.done = now.is_final();
                        poll.last = Some(now.clone());
                        return Some((now, poll));
                    }
                }
            }
        }))
    }
}

//! Where an order's checkout saga stands: its current step, attempts, last error and the
//! timeline of its decisions, for GraphQL (`Order.checkout`, `checkoutChanged`) and the
//! operator console.
//!
//! Read from the saga's own stream in the event store (the source of truth, like the audit
//! trail) and folded with the saga's pure fold (`domain::saga::fold_stream`), so what a
//! storefront shows is exactly what the saga will do next. Nothing of the placed order
//! (address, payment reference) leaves here: only steps, attempts and reasons.

use chrono::{DateTime, Utc};
use domain::{
    saga::{self, FailureKind, Phase, SagaEvent, Step},
    values::OrderId,
};
use sqlx::PgPool;
use uuid::Uuid;

/// Attempts per step assumed when folding streams recorded as inputs (older sagas): the
/// saga's default `SAGA_STEP_ATTEMPTS`. Decisions recorded since carry their own attempts.
const DEFAULT_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The saga has not taken the order on yet.
    NotStarted,
    /// Waiting for a participant.
    InProgress,
    /// Every step succeeded.
    Completed,
    /// The saga gave up (or the order was cancelled) and undid what may be held.
    Compensated,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    pub status: Status,
    /// The step being waited for (while in progress).
    pub step: Option<Step>,
    /// The attempt of the current (or last) step, 1-based; 0 before the first.
    pub attempts: u32,
    /// Why the last step failed or the saga compensated.
    pub last_error: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
    pub timeline: Vec<Entry>,
}

/// One recorded decision of the saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub at: DateTime<Utc>,
    /// `started`, `step_requested`, `step_succeeded`, `step_failed`, `compensation_started`,
    /// `completed`, `late_reply_compensated`, or `input_recorded` (older sagas).
    pub kind: String,
    pub step: Option<Step>,
    pub attempt: Option<u32>,
    /// The participant's result id, or why it failed (`refused`/`failed`/`timed_out`: ..).
    pub detail: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the saga of order {0} has an unreadable event: {1}")]
    Unreadable(Uuid, String),
}

/// The customer who placed `order_id`, from its first event in the store (`None`: no such
/// order). From the store and not the read model, so a subscriber is not refused for an
/// order the projection has not caught up with.
pub async fn owner(pool: &PgPool, order_id: Uuid) -> Result<Option<String>, CheckoutError> {
    let mut conn = pool.acquire().await?;
    let (stored, _) = event_store::load_stream(&mut conn, order_id).await?;
    let Some(first) = stored.first() else {
        return Ok(None);
    };
    match domain::wire::decode(&first.event_type, first.schema_version, &first.payload) {
        Ok(domain::order::OrderEvent::Placed(p)) => Ok(Some(p.customer_id.as_str().to_owned())),
        Ok(_) => Ok(None),
        Err(e) => Err(CheckoutError::Unreadable(order_id, e.to_string())),
    }
}

/// The checkout of `order_id` (a `NotStarted` one when the saga has not recorded anything).
pub async fn load(pool: &PgPool, order_id: Uuid) -> Result<Checkout, CheckoutError> {
    let mut conn = pool.acquire().await?;
    let (stored, _) =
        event_store::load_stream(&mut conn, saga::stream_id(OrderId(order_id))).await?;
    let unreadable = |e: serde_json::Error| CheckoutError::Unreadable(order_id, e.to_string());
    let state = saga::fold_stream(
        DEFAULT_ATTEMPTS,
        stored
            .iter()
            .map(|e| (e.event_type.clone(), e.payload.clone())),
    )
    .map_err(unreadable)?;
    let mut timeline = Vec::with_capacity(stored.len());
    let mut last_error = None;
    for e in &stored {
        let entry = if e.event_type == saga::INPUT_RECORDED {
            let input: saga::SagaInput =
                serde_json::from_value(e.payload.clone()).map_err(unreadable)?;
            Entry {
                at: e.recorded_at,
                kind: "input_recorded".into(),
                step: input.answers(),
                attempt: None,
                detail: Some(input.name().into()),
            }
        } else {
            let decision: SagaEvent =
                serde_json::from_value(e.payload.clone()).map_err(unreadable)?;
            if let Some(reason) = failure(&decision) {
                last_error = Some(reason);
            }
            entry(e.recorded_at, &decision)
        };
        timeline.push(entry);
    }
    let status = match state.phase {
        Phase::NotStarted => Status::NotStarted,
        Phase::Awaiting(_) => Status::InProgress,
        Phase::Confirmed => Status::Completed,
        Phase::Cancelled => Status::Compensated,
    };
    if status == Status::Compensated && last_error.is_none() {
        last_error = state.cancel_reason.clone();
    }
    Ok(Checkout {
        status,
        step: match state.phase {
            Phase::Awaiting(step) => Some(step),
            _ => None,
        },
        attempts: state.attempt,
        last_error,
        updated_at: stored.last().map(|e| e.recorded_at),
        timeline,
    })
}

fn failure(e: &SagaEvent) -> Option<String> {
    match e {
        SagaEvent::StepFailed { reason, .. } | SagaEvent::CompensationStarted { reason, .. } => {
            Some(reason.clone())
        }
        _ => None,
    }
}

fn entry(at: DateTime<Utc>, e: &SagaEvent) -> Entry {
    let (kind, step, attempt, detail) = match e {
        SagaEvent::Started { .. } => ("started", None, None, None),
        SagaEvent::StepRequested { step, attempt } => {
            ("step_requested", Some(*step), Some(*attempt), None)
        }
        SagaEvent::StepSucceeded {
            step,
            attempt,
            result_id,
        } => (
            "step_succeeded",
            Some(*step),
            Some(*attempt),
            Some(result_id.clone()),
        ),
        SagaEvent::StepFailed {
            step,
            attempt,
            reason,
            kind,
        } => {
            let kind = match kind {
                FailureKind::Refused => "refused",
                FailureKind::Failed => "failed",
                FailureKind::TimedOut => "timed_out",
            };
            (
                "step_failed",
                Some(*step),
                Some(*attempt),
                Some(format!("{kind}: {reason}")),
            )
        }
        SagaEvent::CompensationStarted { reason, .. } => {
            ("compensation_started", None, None, Some(reason.clone()))
        }
        SagaEvent::Completed => ("completed", None, None, None),
        SagaEvent::LateReplyCompensated { step } => {
            ("late_reply_compensated", Some(*step), None, None)
        }
    };
    Entry {
        at,
        kind: kind.into(),
        step,
        attempt,
        detail,
    }
}

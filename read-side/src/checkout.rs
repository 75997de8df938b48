//! Where an order's checkout saga stands: its current step, attempts, last error and the
//! timeline of its decisions, for GraphQL (`Order.checkout`, `checkoutChanged`) and the
//! operator console.
//!
//! Read from the saga's own stream in the event store (the source of truth, like the audit
//! trail) and folded with the saga's pure fold (`domain::saga::fold_stream`), so what a
//! storefront shows is exactly what the saga will do next. Nothing of the placed order
//! (address, payment reference) leaves here: only steps, attempts, result ids and reasons,
//! which the GraphQL layer shows in full to operators only.

use chrono::{DateTime, Utc};
use domain::{
    saga::{self, FailureKind, Phase, Recorded, SagaEvent, Step},
    values::OrderId,
};
use sqlx::PgPool;
use uuid::Uuid;

/// Attempts per step assumed when folding streams recorded as inputs (older sagas): the
/// saga's default `SAGA_STEP_ATTEMPTS`. Decisions recorded since carry their own attempts;
/// only a saga recorded as inputs under another setting can show a different phase here.
const DEFAULT_ATTEMPTS: u32 = 3;

/// Most timeline entries returned (the newest): late or duplicate replies each add one.
pub const MAX_TIMELINE: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The saga has not taken the order on yet.
    NotStarted,
    /// Waiting for a participant.
    InProgress,
    /// Every step succeeded.
    Completed,
    /// The saga gave up (or the order was cancelled) and sent the compensations for what
    /// may be held.
    Compensated,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    pub status: Status,
    /// The step being waited for (while in progress).
    pub step: Option<Step>,
    /// The attempt of the current (or last) step, 1-based; 0 before the first.
    pub attempts: u32,
    /// Why the last step failed or the saga compensated (cleared when a later attempt of
    /// the step succeeds).
    pub last_error: Option<Failure>,
    pub updated_at: Option<DateTime<Utc>>,
    pub timeline: Vec<Entry>,
}

/// A failure: its kind (`refused`, `failed`, `timed_out`, or `compensated` when the saga
/// gave up), the step, and the participant's or the saga's reason (operators only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: &'static str,
    pub step: Option<Step>,
    pub reason: String,
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
    /// The participant's result id (reservation, authorization, shipment).
    pub result_id: Option<String>,
    pub failure: Option<Failure>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the saga of order {0} has an unreadable event: {1}")]
    Unreadable(Uuid, String),
}

/// The customer who placed `order_id`, from its first event in the store (`None`: no such
/// order, or not an order's stream). From the store and not the read model, so a subscriber
/// is not refused for an order the projection has not caught up with.
pub async fn owner(pool: &PgPool, order_id: Uuid) -> Result<Option<String>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let Some(first) = event_store::load_event(&mut conn, order_id, 1).await? else {
        return Ok(None);
    };
    Ok(
        match domain::wire::decode(&first.event_type, first.schema_version, &first.payload) {
            Ok(domain::order::OrderEvent::Placed(p)) => Some(p.customer_id.as_str().to_owned()),
            _ => None,
        },
    )
}

/// The checkout of `order_id` (a `NotStarted` one when the saga has not recorded anything).
pub async fn load(pool: &PgPool, order_id: Uuid) -> Result<Checkout, CheckoutError> {
    let mut conn = pool.acquire().await?;
    let (stored, _) =
        event_store::load_stream(&mut conn, saga::stream_id(OrderId(order_id))).await?;
    // Never serde's text: it can quote a value (older saga records hold personal data).
    let unreadable = |_: serde_json::Error| {
        CheckoutError::Unreadable(order_id, "a saga event does not parse".into())
    };
    // Each event parsed once: folded into the state and turned into its timeline entry.
    let mut state = saga::SagaState::new(DEFAULT_ATTEMPTS);
    let mut timeline = Vec::with_capacity(stored.len());
    let mut last_error = None;
    for e in stored {
        let recorded = Recorded::parse(&e.event_type, e.payload).map_err(unreadable)?;
        state = recorded.apply(state);
        let entry = match &recorded {
            Recorded::Input(input) => Entry {
                at: e.recorded_at,
                kind: format!("input_recorded:{}", input.name()),
                step: input.answers(),
                attempt: None,
                result_id: None,
                failure: None,
            },
            Recorded::Decision(decision) => {
                let entry = entry(e.recorded_at, decision);
                if matches!(
                    decision,
                    SagaEvent::StepSucceeded { .. } | SagaEvent::Completed
                ) {
                    last_error = None;
                }
                // The step's own failure says more than the compensation that follows it.
                match (&entry.failure, decision) {
                    (Some(_), SagaEvent::CompensationStarted { .. }) if last_error.is_some() => {}
                    (Some(f), _) => last_error = Some(f.clone()),
                    _ => {}
                }
                entry
            }
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
        last_error = state.cancel_reason.clone().map(|reason| Failure {
            kind: "compensated",
            step: None,
            reason,
        });
    }
    let skip = timeline.len().saturating_sub(MAX_TIMELINE);
    timeline.drain(..skip);
    Ok(Checkout {
        status,
        step: match state.phase {
            Phase::Awaiting(step) => Some(step),
            _ => None,
        },
        attempts: state.attempt,
        last_error,
        updated_at: timeline.last().map(|e| e.at),
        timeline,
    })
}

fn entry(at: DateTime<Utc>, e: &SagaEvent) -> Entry {
    let failure = |kind, step, reason: &String| {
        Some(Failure {
            kind,
            step,
            reason: reason.clone(),
        })
    };
    let (kind, step, attempt, result_id, failure) = match e {
        SagaEvent::Started { .. } => ("started", None, None, None, None),
        SagaEvent::StepRequested { step, attempt } => {
            ("step_requested", Some(*step), Some(*attempt), None, None)
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
            None,
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
                None,
                failure(kind, Some(*step), reason),
            )
        }
        SagaEvent::CompensationStarted { reason, .. } => (
            "compensation_started",
            None,
            None,
            None,
            failure("compensated", None, reason),
        ),
        SagaEvent::Completed => ("completed", None, None, None, None),
        SagaEvent::LateReplyCompensated { step } => {
            ("late_reply_compensated", Some(*step), None, None, None)
        }
    };
    Entry {
        at,
        kind: kind.into(),
        step,
        attempt,
        result_id,
        failure,
    }
}

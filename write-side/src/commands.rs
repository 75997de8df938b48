//! Executing a command. A checkout is decided in the request and group-committed with
//! other checkouts ([`crate::checkouts`]); a cancel runs in one transaction holding the
//! idempotency check, the load, the pure decision, the append (events + outbox) and the
//! idempotency record.
//!
//! Idempotency ([`crate::idempotency`]): the first successful response for
//! `(principal, key)` is stored in the same transaction as the events. Two concurrent cancels
//! with one key are serialized by a transaction-level advisory lock on (caller, key): the
//! second waits for the first transaction to end and then answers with its stored response.
//! Two concurrent checkouts with one key both decide (on different new streams); the key's
//! unique index lets one response be stored, and the loser writes nothing and answers with
//! the winner's response.

use domain::{
    order::{CancelledBy, Order, OrderCommand, OrderRejected},
    values::{CustomerId, OrderId, Reason},
};
use event_store::{Expected, Metadata};
use orders::OrderError;
use platform::{
    auth::{Principal, Role},
    vault::{DataKey, Vault, VaultError},
};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use tracing::Instrument;
use uuid::Uuid;

use crate::{checkouts::Checkouts, dto::CheckoutRequest, idempotency, problem::ApiError};

/// Who asks, with which key and request, in which trace.
#[derive(Debug, Clone)]
pub struct CommandContext {
    pub principal: Principal,
    pub idempotency_key: String,
    /// SHA-256 of method, path and canonical body: "the same request".
    pub request_hash: Vec<u8>,
    pub traceparent: String,
    /// Causation id of the events: this request.
    pub request_id: Uuid,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommandResponse {
    pub status: u16,
    pub body: Value,
}

pub enum Command {
    /// A checkout request (priced and sealed when placed: [`crate::checkouts::place`]) for
    /// the customer, as the new order.
    Checkout {
        request: Box<CheckoutRequest>,
        customer: CustomerId,
        order_id: OrderId,
    },
    Cancel {
        order_id: OrderId,
        if_match: Option<i64>,
        reason: Reason,
    },
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Checkout { .. } => "checkout",
            Command::Cancel { .. } => "cancel",
        }
    }
}

/// Runs the command in its transaction, inside a span that continues the request's trace.
pub async fn execute(
    pool: &PgPool,
    checkouts: &Checkouts,
    ctx: &CommandContext,
    command: &Command,
) -> Result<CommandResponse, ApiError> {
    let span = tracing::info_span!(
        "command",
        command = command.name(),
        actor = %ctx.principal.actor(),
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    platform::trace::follow(&span, Some(&ctx.traceparent));
    async {
        let result = match command {
            Command::Checkout {
                request,
                customer,
                order_id,
            } => crate::checkouts::place(checkouts, ctx, request, customer, *order_id).await,
            Command::Cancel {
                order_id,
                if_match,
                reason,
            } => cancel_once_or_twice(pool, ctx, *order_id, *if_match, reason).await,
        };
        // One line per command, inside its span: it carries the trace id to follow.
        match &result {
            Ok(r) => tracing::info!(
                status = r.status,
                order_id = r.body["order_id"].as_str(),
                "command answered"
            ),
            Err(e) => tracing::info!(problem = e.outcome(), "command refused"),
        }
        result
    }
    .instrument(span)
    .await
}

async fn cancel_once_or_twice(
    pool: &PgPool,
    ctx: &CommandContext,
    order_id: OrderId,
    if_match: Option<i64>,
    reason: &Reason,
) -> Result<CommandResponse, ApiError> {
    // Two rounds at most: the second only runs after losing an idempotency-key race, and then
    // finds the winner's response.
    for _ in 0..2 {
        let mut tx = pool.begin().await?;
        // Copies of a command on an existing order (same caller, same key) run one after the
        // other: a copy waits here until the first one's transaction ends, then finds its
        // stored response instead of deciding again on the state the first one left (a 409
        // or "already cancelled" for a retried cancel).
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!(
                "{}\n{}",
                ctx.principal.actor(),
                ctx.idempotency_key
            ))
            .execute(&mut *tx)
            .await?;
        if let Some(stored) = idempotency::stored_response(&mut tx, ctx).await? {
            return Ok(stored);
        }
        let response = cancel(&mut tx, ctx, order_id, if_match, reason.clone()).await?;
        if idempotency::remember(&mut tx, ctx, &response).await? {
            tx.commit().await?;
            return Ok(response);
        }
        tx.rollback().await?;
    }
    Err(ApiError::Internal(
        "idempotency key neither free nor readable".into(),
    ))
}

pub(crate) fn metadata(ctx: &CommandContext, order_id: OrderId) -> Metadata {
    Metadata {
        correlation_id: order_id.0,
        causation_id: ctx.request_id,
        actor: ctx.principal.actor(),
        traceparent: Some(ctx.traceparent.clone()),
        command_id: Some(ctx.idempotency_key.clone()),
    }
}

pub(crate) fn order_error(e: OrderError) -> ApiError {
    match e {
        OrderError::Rejected(OrderRejected::NotFound) => ApiError::NotFound("no such order".into()),
        OrderError::Rejected(other) => ApiError::Rejected(other.to_string()),
        OrderError::Conflict => {
            ApiError::VersionConflict("the order was changed concurrently; reload and retry".into())
        }
        OrderError::Unreadable(e) => ApiError::Internal(e),
        OrderError::Database(e) => e.into(),
    }
}

/// The customer's data key, made (and committed) outside the command's transaction: an
/// erasure running alongside then sees it and deletes it (the order's sealed data is then
/// unreadable, as it should be), instead of missing a key not committed yet.
pub async fn data_key(
    pool: &PgPool,
    vault: &Vault,
    customer_id: &str,
) -> Result<DataKey, ApiError> {
    let mut conn = pool.acquire().await?;
    vault
        .key_for(&mut conn, customer_id)
        .await
        .map_err(vault_error)
}

fn vault_error(e: VaultError) -> ApiError {
    match e {
        VaultError::Database(e) => e.into(),
        other => ApiError::Internal(other.to_string()),
    }
}

pub(crate) fn accepted(order_id: OrderId, status: &str, version: i64) -> CommandResponse {
    CommandResponse {
        status: 202,
        body: json!({"order_id": order_id, "status": status, "version": version}),
    }
}

/// Loads an order for `principal`: a customer sees only their own orders (others' are
/// reported missing, so existence does not leak).
pub async fn load_order(
    conn: &mut PgConnection,
    principal: &Principal,
    order_id: OrderId,
) -> Result<(Order, Expected), ApiError> {
    let (state, expected) = orders::load(conn, order_id)
        .await
        .map_err(|e| order_error(e.into()))?;
    let visible = match (principal.role, state.customer_id()) {
        (_, None) => false,
        (Role::Operator, Some(_)) => true,
        (Role::Customer, Some(c)) => c.as_str() == principal.subject,
    };
    if !visible {
        return Err(ApiError::NotFound("no such order".into()));
    }
    Ok((state, expected))
}

async fn cancel(
    conn: &mut PgConnection,
    ctx: &CommandContext,
    order_id: OrderId,
    if_match: Option<i64>,
    reason: Reason,
) -> Result<CommandResponse, ApiError> {
    let (state, expected) = load_order(conn, &ctx.principal, order_id).await?;
    if let Some(v) = if_match
        && v != expected.version
    {
        return Err(ApiError::VersionConflict(format!(
            "If-Match names version {v} but the order is at version {}",
            expected.version
        )));
    }
    let by = match ctx.principal.role {
        Role::Customer => CancelledBy::Customer,
        Role::Operator => CancelledBy::Operator,
    };
    let version = orders::decide_and_append(
        conn,
        order_id,
        &state,
        &expected,
        OrderCommand::Cancel { reason, by },
        &metadata(ctx, order_id),
    )
    .await
    .map_err(order_error)?;
    Ok(accepted(order_id, "CANCELLED", version))
}

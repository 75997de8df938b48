//! Checkouts, group-committed: concurrent `POST /orders` share one transaction.
//!
//! Why: a checkout writes four things that must commit together (the idempotency record, the
//! new order stream's head and event, its outbox message, the held payment token). One
//! transaction each costs PostgreSQL a BEGIN, four statements and a COMMIT with its WAL
//! flush per order; on a busy shop's two cores that, not the deciding, is the limit. Here the
//! request decides and seals on its own, then hands the rows to a
//! [`Committer`](event_store::group::Committer) that writes whatever checkouts are waiting
//! with one statement per table and one commit ([`Checkouts::write`]).
//!
//! Per-checkout isolation inside a batch, in this order:
//! 1. every idempotency record is claimed ([`idempotency::claim`]); a checkout whose key is
//!    taken writes nothing more and answers with the stored response;
//! 2. the claimed checkouts' streams are appended ([`event_store::append_many`]); one whose
//!    stream exists already (a conflict) gives its claim back ([`idempotency::release`]);
//! 3. the appended checkouts' payment tokens are held ([`orders::payment_tokens::hold`]).
//!
//! A batch that fails as a whole is written again one checkout per transaction by the
//! committer, so a bad checkout fails alone.

use chrono::{DateTime, Utc};
use domain::{
    order::{self, Order, OrderCommand, PlaceOrder},
    personal::{self, PaymentRef, Sealed},
    values::{CustomerId, OrderId},
};
use event_store::{
    Append, Expected, NewEvent, OutboxMessage,
    group::{Batch, CommitError, Committer},
};
use orders::{ORDER_STREAM, OrderError, payment_tokens::Held};
use platform::vault::DataKey;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    commands::{self, CommandContext, CommandResponse},
    dto::Checkout,
    idempotency,
    problem::ApiError,
};

/// Writers of checkouts: how many transactions may be open at once (each holds a connection
/// of the command pool while it writes).
pub const WORKERS: usize = 4;
/// Checkouts per transaction at most.
pub const MAX_BATCH: usize = 64;

/// Starts the checkout committer on the command pool.
pub fn committer(pool: PgPool) -> Committer<Checkouts> {
    Committer::start(pool, Checkouts, WORKERS, MAX_BATCH)
}

/// A decided checkout, ready to write.
#[derive(Debug, Clone)]
pub struct CheckoutJob {
    ctx: CommandContext,
    response: CommandResponse,
    order_id: OrderId,
    customer_id: CustomerId,
    payment_ref: PaymentRef,
    sealed_token: Sealed,
    events: Vec<NewEvent>,
    outbox: Vec<OutboxMessage>,
    recorded_at: DateTime<Utc>,
}

/// What became of a checkout in its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Its rows are committed; its response is the one the job carried.
    Placed,
    /// Its idempotency key was taken: nothing of it was written.
    KeyTaken,
    /// Its order's stream existed already: nothing of it was written.
    Conflict,
}

/// The batch writer of [`CheckoutJob`]s.
pub struct Checkouts;

impl Batch for Checkouts {
    type Job = CheckoutJob;
    type Output = Written;

    fn stream(job: &CheckoutJob) -> Uuid {
        job.order_id.0
    }

    async fn write(
        &self,
        conn: &mut PgConnection,
        jobs: &[CheckoutJob],
    ) -> Result<Vec<Written>, sqlx::Error> {
        let records: Vec<_> = jobs.iter().map(|j| (&j.ctx, &j.response)).collect();
        let claimed = idempotency::claim(conn, &records).await?;
        let new_stream = Expected::new_stream();
        let appends: Vec<Append<'_>> = jobs
            .iter()
            .zip(&claimed)
            .filter(|(_, claimed)| **claimed)
            .map(|(j, _)| Append {
                stream_id: j.order_id.0,
                stream_type: ORDER_STREAM,
                expected: &new_stream,
                events: &j.events,
                outbox: &j.outbox,
                recorded_at: j.recorded_at,
            })
            .collect();
        let mut appended = event_store::append_many(conn, &appends).await?.into_iter();
        let mut written = Vec::with_capacity(jobs.len());
        let mut released = Vec::new();
        let mut tokens = Vec::new();
        for (j, claimed) in jobs.iter().zip(claimed) {
            if !claimed {
                written.push(Written::KeyTaken);
                continue;
            }
            match appended.next().expect("one outcome per claimed checkout") {
                Ok(_) => {
                    tokens.push(Held {
                        payment_ref: j.payment_ref,
                        order_id: j.order_id,
                        customer_id: &j.customer_id,
                        sealed_token: &j.sealed_token,
                    });
                    written.push(Written::Placed);
                }
                Err(_) => {
                    released.push(&j.ctx);
                    written.push(Written::Conflict);
                }
            }
        }
        idempotency::release(conn, &released).await?;
        orders::payment_tokens::hold(conn, &tokens).await?;
        Ok(written)
    }
}

/// Seals the shipping address and the payment token with the customer's data key (the event
/// carries only the sealed box and the token's reference: `domain::personal`), decides the
/// order and writes it through `committer`. A checkout whose key is taken answers with the
/// stored response (a 422 if the key was used for another request).
pub async fn place(
    committer: &Committer<Checkouts>,
    pool: &PgPool,
    ctx: &CommandContext,
    checkout: &Checkout,
    key: &DataKey,
) -> Result<CommandResponse, ApiError> {
    let job = decide(ctx, checkout, key)?;
    let response = job.response.clone();
    // Two rounds at most: the second only runs if the key's holder was gone when we looked
    // (its transaction failed after our batch lost the key to it).
    for _ in 0..2 {
        match committer.submit(job.clone()).await.map_err(commit_error)? {
            Written::Placed => return Ok(response),
            Written::Conflict => return Err(commands::order_error(OrderError::Conflict)),
            Written::KeyTaken => {
                let mut conn = pool.acquire().await?;
                if let Some(stored) = idempotency::stored_response(&mut conn, ctx).await? {
                    return Ok(stored);
                }
            }
        }
    }
    Err(ApiError::Internal(
        "idempotency key neither free nor readable".into(),
    ))
}

fn decide(
    ctx: &CommandContext,
    checkout: &Checkout,
    key: &DataKey,
) -> Result<CheckoutJob, ApiError> {
    let order_id = checkout.order_id;
    let shipping_address = key.seal(
        &personal::shipping_address_context(order_id),
        &checkout.shipping_address,
    );
    let sealed_token = key.seal(
        &personal::payment_token_context(order_id),
        &checkout.payment_token,
    );
    let payment_ref = PaymentRef(Uuid::now_v7());
    let cmd = PlaceOrder {
        order_id,
        customer_id: checkout.customer_id.clone(),
        currency: checkout.currency,
        lines: checkout.lines.clone(),
        shipping_address,
        payment_ref,
    };
    let events = order::decide(&Order::NotPlaced, OrderCommand::Place(cmd))
        .map_err(|e| commands::order_error(e.into()))?;
    let recorded_at = event_store::now_micros();
    let (stored, outbox) = orders::order_records(
        order_id,
        1,
        &events,
        &commands::metadata(ctx, order_id),
        recorded_at,
    );
    Ok(CheckoutJob {
        ctx: ctx.clone(),
        response: commands::accepted(order_id, "PENDING", stored.len() as i64),
        order_id,
        customer_id: checkout.customer_id.clone(),
        payment_ref,
        sealed_token,
        events: stored,
        outbox,
        recorded_at,
    })
}

fn commit_error(e: CommitError) -> ApiError {
    match e {
        CommitError::Database(e) => e.into(),
        CommitError::Stopped => ApiError::Internal(e.to_string()),
    }
}

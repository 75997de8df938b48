//! Payment tokens held for checkouts: every SQL statement on `payment_tokens`.
//!
//! Why: a payment token lets whoever holds it charge the customer, so it must not live as
//! long as an event (forever), nor be copied into Kafka, RabbitMQ, dead letters or logs. The
//! command API stores it here in the checkout's transaction, sealed with the customer's
//! data key (a backup or the WAL holds only ciphertext, and forgetting her makes it
//! unreadable), and the `OrderPlaced` event carries only the [`PaymentRef`]. The payment
//! participant [`take`]s it (reads and deletes it in the transaction that records the
//! authorization), so it is used once; retention ([`prune`], `PAYMENT_TOKEN_TTL`) deletes
//! what nobody took, and forgetting a customer deletes hers ([`forget_customer`]).

use domain::{
    personal::{PaymentRef, Sealed},
    values::{CustomerId, OrderId},
};
use sqlx::{PgConnection, PgPool, types::Json};

/// A token to hold ([`hold_cte`]): the reference the order's event carries (a fresh UUIDv7
/// made by the caller), and the sealed token.
pub struct Held<'a> {
    pub payment_ref: PaymentRef,
    pub order_id: OrderId,
    pub customer_id: &'a CustomerId,
    pub sealed_token: &'a Sealed,
}

/// Parameters [`hold_cte`] takes.
pub const HOLD_PARAMS: usize = 4;

/// The CTE `held`: holds the tokens whose order is in the CTE `gate` (a `stream_id` column),
/// for a caller's statement (a group commit holds the tokens of the orders it appended), with
/// parameters from `$first` ([`HOLD_PARAMS`], bound by [`bind_holds`]).
pub fn hold_cte(gate: &str, first: usize) -> String {
    let p = |n: usize| format!("${}", first + n - 1);
    format!(
        "held AS (
    INSERT INTO payment_tokens (payment_ref, order_id, customer_id, sealed_token)
    SELECT * FROM unnest({}::uuid[], {}::uuid[], {}::text[], {}::jsonb[]) AS t(r, o, c, s)
    WHERE t.o IN (SELECT stream_id FROM {gate})
    RETURNING 1
)",
        p(1),
        p(2),
        p(3),
        p(4)
    )
}

/// Binds `tokens` for [`hold_cte`].
pub fn bind_holds<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    tokens: &[Held<'q>],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    q.bind(tokens.iter().map(|t| t.payment_ref.0).collect::<Vec<_>>())
        .bind(tokens.iter().map(|t| t.order_id.0).collect::<Vec<_>>())
        .bind(
            tokens
                .iter()
                .map(|t| t.customer_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            tokens
                .iter()
                .map(|t| Json(t.sealed_token))
                .collect::<Vec<_>>(),
        )
}

/// Takes the sealed token of `order_id` (deleting it, in the caller's transaction): `None`
/// when it was taken, expired or erased, or belongs to another order.
pub async fn take(
    conn: &mut PgConnection,
    payment_ref: PaymentRef,
    order_id: OrderId,
) -> Result<Option<Sealed>, sqlx::Error> {
    let token: Option<Json<Sealed>> = sqlx::query_scalar(
        "DELETE FROM payment_tokens WHERE payment_ref = $1 AND order_id = $2 RETURNING sealed_token",
    )
    .bind(payment_ref.0)
    .bind(order_id.0)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(token.map(|t| t.0))
}

/// Reads the sealed token without taking it (the development provider's fault injection).
pub async fn peek(pool: &PgPool, payment_ref: PaymentRef) -> Result<Option<Sealed>, sqlx::Error> {
    let token: Option<Json<Sealed>> =
        sqlx::query_scalar("SELECT sealed_token FROM payment_tokens WHERE payment_ref = $1")
            .bind(payment_ref.0)
            .fetch_optional(pool)
            .await?;
    Ok(token.map(|t| t.0))
}

/// Deletes the customer's tokens that are still held (erasure); returns how many.
pub async fn forget_customer(
    conn: &mut PgConnection,
    customer_id: &str,
) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM payment_tokens WHERE customer_id = $1")
            .bind(customer_id)
            .execute(&mut *conn)
            .await?
            .rows_affected(),
    )
}

/// Deletes tokens held longer than `ttl` (nobody took them: the saga gave up or never ran).
pub async fn prune(pool: &PgPool, ttl: std::time::Duration) -> Result<u64, sqlx::Error> {
    platform::db::delete_older_than(pool, "payment_tokens", "created_at", ttl, 5000).await
}

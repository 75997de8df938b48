//! Checkouts, group-committed: concurrent `POST /orders` share one transaction.
//!
//! Why: a checkout writes four things that must commit together (the idempotency record, the
//! new order stream's head and event, its outbox message, the held payment token). One
//! transaction each costs PostgreSQL a BEGIN, four statements and a COMMIT with its WAL
//! flush per order; on a busy shop's two cores that, not the deciding, is the limit. Here the
//! request prices, seals and decides on its own (with prices and the customer's data key
//! kept in memory: [`crate::catalog::Prices`], [`RecentKeys`]), then hands the rows to a
//! [`Committer`] that writes whatever checkouts are waiting with one statement per table and
//! one commit ([`CheckoutBatch::write`]).
//!
//! Per-checkout isolation inside a batch, with one statement for the whole batch ([`WRITE`]:
//! each owner's part comes from its module), so a batch costs BEGIN, one statement, COMMIT:
//! 1. what was decided from memory is checked: every line's price against the catalog, and
//!    the data key against the vault (the customer may have been forgotten meanwhile); a
//!    stale checkout writes nothing and is decided again from the database;
//! 2. the others' idempotency records are claimed ([`Claims`]); a checkout whose key is
//!    taken writes nothing more and answers with the stored response;
//! 3. the claimed checkouts' streams are appended ([`AppendBatch`]);
//! 4. the appended checkouts' payment tokens are held ([`payment_tokens::hold_cte`]).
//!
//! A claimed checkout whose stream existed already (a conflict; not expected of a fresh
//! UUIDv7) gives its claim back ([`idempotency::release`]) before the commit.
//! A batch that fails as a whole is written again one checkout per transaction by the
//! committer, so a bad checkout fails alone.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, LazyLock, Mutex},
};

use chrono::{DateTime, Utc};
use domain::{
    order::{self, Order, OrderCommand, PlaceOrder},
    personal::{self, PaymentRef, Sealed},
    values::{Currency, CustomerId, OrderId, Sku},
};
use event_store::{
    APPEND_PARAMS, Append, AppendBatch, Expected, NewEvent, OutboxMessage,
    group::{Batch, CommitError, Committer},
};
use orders::{
    ORDER_STREAM, OrderError,
    payment_tokens::{self, Held},
};
use platform::vault::{DataKey, Vault};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::{
    catalog::Prices,
    commands::{self, CommandContext, CommandResponse},
    dto::CheckoutRequest,
    idempotency::{self, CLAIM_PARAMS, Claims},
    problem::ApiError,
};

/// Writers of checkouts: how many transactions may be open at once (each holds a connection
/// of the command pool while it writes).
pub const WORKERS: usize = 4;
/// Checkouts per transaction at most.
pub const MAX_BATCH: usize = 64;
/// Customers whose data key is kept in memory at most (the map is emptied when full).
pub const RECENT_KEYS: usize = 10_000;

/// Places checkouts: prices and keys in memory, the committer that writes them.
#[derive(Clone)]
pub struct Checkouts {
    pool: PgPool,
    vault: Vault,
    prices: Prices,
    keys: RecentKeys,
    committer: Committer<CheckoutBatch>,
}

impl Checkouts {
    /// Starts the checkout committer on the command pool.
    pub fn start(pool: PgPool, vault: Vault) -> Self {
        Self {
            committer: Committer::start(pool.clone(), CheckoutBatch, WORKERS, MAX_BATCH),
            pool,
            vault,
            prices: Prices::default(),
            keys: RecentKeys::default(),
        }
    }
}

/// Customers' data keys, unwrapped, kept in memory: one query per checkout saved. A kept key
/// may have been deleted since (the customer forgotten, by any process); the writing
/// transaction checks it and the checkout is then decided
/// again with the customer's current key.
#[derive(Clone, Default)]
pub struct RecentKeys {
    known: Arc<Mutex<HashMap<String, DataKey>>>,
}

impl RecentKeys {
    async fn get(
        &self,
        pool: &PgPool,
        vault: &Vault,
        customer: &CustomerId,
        fresh: bool,
    ) -> Result<DataKey, ApiError> {
        if !fresh && let Some(key) = self.known.lock().expect("keys lock").get(customer.as_str()) {
            return Ok(key.clone());
        }
        let key = commands::data_key(pool, vault, customer.as_str()).await?;
        let mut known = self.known.lock().expect("keys lock");
        if known.len() >= RECENT_KEYS {
            known.clear();
        }
        known.insert(customer.as_str().to_owned(), key.clone());
        Ok(key)
    }
}

/// A decided checkout, ready to write.
#[derive(Debug, Clone)]
pub struct CheckoutJob {
    ctx: CommandContext,
    response: CommandResponse,
    order_id: OrderId,
    customer_id: CustomerId,
    /// Each line's SKU and the price it was decided with, in `currency`.
    priced: Vec<(Sku, i64)>,
    currency: Currency,
    /// The data key that sealed the address and the token.
    key_id: Uuid,
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
    /// It was decided with a price or a data key that is no longer current: nothing of it
    /// was written.
    Stale,
    /// Its idempotency key was taken: nothing of it was written.
    KeyTaken,
    /// Its order's stream existed already: nothing of it was written.
    Conflict,
}

/// The batch writer of [`CheckoutJob`]s.
pub struct CheckoutBatch;

impl Batch for CheckoutBatch {
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
        // Stale decisions (prices, data keys).
        let (mut of, mut skus, mut prices, mut currencies) = (vec![], vec![], vec![], vec![]);
        for (i, j) in jobs.iter().enumerate() {
            for (sku, price) in &j.priced {
                of.push(i as i64);
                skus.push(sku.as_str());
                prices.push(*price);
                currencies.push(j.currency.as_str());
            }
        }
        let indices: Vec<i64> = (0..jobs.len() as i64).collect();
        let key_ids: Vec<Uuid> = jobs.iter().map(|j| j.key_id).collect();
        let streams: Vec<Uuid> = jobs.iter().map(|j| j.order_id.0).collect();
        // Idempotency records, each key once (a second copy in this batch finds the first's
        // response afterwards).
        let mut claims = Claims::default();
        let mut keys = HashSet::new();
        for (i, j) in jobs.iter().enumerate() {
            if keys.insert((j.ctx.principal.actor(), &j.ctx.idempotency_key)) {
                claims.push(i, j.order_id.0, &j.ctx, &j.response);
            }
        }
        let new_stream = Expected::new_stream();
        let appends: Vec<Append<'_>> = jobs
            .iter()
            .map(|j| Append {
                stream_id: j.order_id.0,
                stream_type: ORDER_STREAM,
                expected: &new_stream,
                events: &j.events,
                outbox: &j.outbox,
                recorded_at: j.recorded_at,
            })
            .collect();
        let batch = AppendBatch::new(&appends);
        let tokens: Vec<Held<'_>> = jobs
            .iter()
            .map(|j| Held {
                payment_ref: j.payment_ref,
                order_id: j.order_id,
                customer_id: &j.customer_id,
                sealed_token: &j.sealed_token,
            })
            .collect();

        let q = sqlx::query(&WRITE)
            .bind(&of)
            .bind(&skus)
            .bind(&prices)
            .bind(&currencies)
            .bind(&indices)
            .bind(&key_ids);
        let q = batch.bind(claims.bind(q));
        let q = payment_tokens::bind_holds(q, &tokens)
            .bind(&indices)
            .bind(&streams);
        let mut written = vec![Written::KeyTaken; jobs.len()];
        let mut conflicts = Vec::new();
        for row in q.fetch_all(&mut *conn).await? {
            let i: i64 = row.get(0);
            let (stale, claimed, moved): (bool, bool, bool) = (row.get(1), row.get(2), row.get(3));
            let i = i as usize;
            written[i] = match (stale, claimed, moved) {
                (true, _, _) => Written::Stale,
                (false, false, _) => Written::KeyTaken,
                (false, true, true) => Written::Placed,
                (false, true, false) => {
                    conflicts.push(&jobs[i].ctx);
                    Written::Conflict
                }
            };
        }
        // A claimed checkout whose stream existed wrote nothing else: give its key back.
        idempotency::release(conn, &conflicts).await?;
        Ok(written)
    }
}

/// The batch's one statement: `stale` (checkouts decided from a price or a data key no longer
/// current: a line whose product is not active at that price and currency any more, or a
/// key deleted with its customer; this reads the catalog and the vault's `customer_keys`
/// and writes nothing), the idempotency claims of the others ([`Claims::ctes`]), the appends
/// of the claimed ([`AppendBatch::ctes`]), the payment tokens of the appended
/// ([`payment_tokens::hold_cte`]); one row per checkout says what happened to it.
static WRITE: LazyLock<String> = LazyLock::new(|| {
    let claims = 7;
    let appends = claims + CLAIM_PARAMS;
    let holds = appends + APPEND_PARAMS;
    let last = holds + payment_tokens::HOLD_PARAMS;
    format!(
        "WITH stale AS (
    SELECT r.i FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[])
        AS r(i, sku, price, currency)
    WHERE NOT EXISTS (SELECT 1 FROM catalog_products p WHERE p.sku = r.sku AND p.active
                      AND p.price_minor = r.price AND p.currency = r.currency)
    UNION
    SELECT k.i FROM unnest($5::bigint[], $6::uuid[]) AS k(i, key_id)
    WHERE NOT EXISTS (SELECT 1 FROM customer_keys c WHERE c.key_id = k.key_id)
), {}, {}, {}
SELECT r.i, r.i IN (SELECT i FROM stale), r.i IN (SELECT i FROM claimed),
       r.s IN (SELECT stream_id FROM head)
FROM unnest(${}::bigint[], ${}::uuid[]) AS r(i, s)",
        Claims::ctes("stale", claims),
        AppendBatch::ctes(Some("claimed"), appends),
        payment_tokens::hold_cte("head", holds),
        last,
        last + 1
    )
});

/// Prices the request from the catalog, seals the shipping address and the payment token
/// with the customer's data key (the event carries only the sealed box and the token's
/// reference: `domain::personal`), decides the order and writes it with concurrent ones. A
/// checkout decided from a stale price or key is decided once more from the database; one
/// whose idempotency key is taken answers with the stored response (a 422 if the key was
/// used for another request).
pub async fn place(
    checkouts: &Checkouts,
    ctx: &CommandContext,
    request: &CheckoutRequest,
    customer: &CustomerId,
    order_id: OrderId,
) -> Result<CommandResponse, ApiError> {
    let skus = request.skus()?;
    let mut fresh = false;
    // Three rounds at most: a second after a stale price or key (decided afresh), or after
    // losing the key to a request whose transaction then failed; a third for both.
    for _ in 0..3 {
        let (prices, key) = tokio::try_join!(
            async { Ok::<_, ApiError>(checkouts.prices.get(&checkouts.pool, &skus, fresh).await?) },
            checkouts
                .keys
                .get(&checkouts.pool, &checkouts.vault, customer, fresh),
        )?;
        let checkout = request.command(order_id, customer.clone(), &prices)?;
        let job = decide(ctx, &checkout, &key)?;
        let response = job.response.clone();
        match checkouts
            .committer
            .submit(job)
            .await
            .map_err(commit_error)?
        {
            Written::Placed => return Ok(response),
            Written::Stale => fresh = true,
            Written::Conflict => return Err(commands::order_error(OrderError::Conflict)),
            Written::KeyTaken => {
                let mut conn = checkouts.pool.acquire().await?;
                if let Some(stored) = idempotency::stored_response(&mut conn, ctx).await? {
                    return Ok(stored);
                }
            }
        }
    }
    Err(ApiError::Internal(
        "the checkout could not be written (prices or idempotency key kept changing)".into(),
    ))
}

fn decide(
    ctx: &CommandContext,
    checkout: &crate::dto::Checkout,
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
        priced: checkout
            .lines
            .iter()
            .map(|l| (l.sku.clone(), l.unit_price_minor.get()))
            .collect(),
        currency: checkout.currency,
        key_id: key.key_id,
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

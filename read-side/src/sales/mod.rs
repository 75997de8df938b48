//! Sales per product per hour: units, revenue (minor units) and orders per SKU and currency,
//! bucketed by the hour the order was placed, net of cancellations.
//!
//! `sales_orders` remembers what each order contributed, so a cancellation takes exactly that
//! back out, and carries the stream version for idempotency. Bucket changes are summed in
//! memory per batch and written in key order (concurrent writers never deadlock).
//!
//! # Layout
//! - [`fold`](mod@fold): contributions, bucket changes and the pure fold.
//! - [`repo`]: every statement on the tables.

use std::collections::{BTreeMap, HashMap};

use futures::future::BoxFuture;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::projection::{Applied, ApplyError, Decoded, Kind, Projection, Target, touched_orders};

pub mod fold;
pub mod repo;

pub use fold::{BucketKey, Delta, Line, OrderSales, fold, hour_of};
pub use repo::Bucket;

pub const NAME: &str = Kind::SalesByProduct.name();

/// The sales [`Projection`], as listed in [`crate::registry`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SalesByProduct;

impl Projection for SalesByProduct {
    fn kind(&self) -> Kind {
        Kind::SalesByProduct
    }

    fn tables(&self) -> &'static [&'static str] {
        &[repo::ORDERS_TABLE, repo::BUCKETS_TABLE]
    }

    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        target: Target,
        events: &'a [Decoded],
    ) -> BoxFuture<'a, Result<Vec<Applied>, ApplyError>> {
        Box::pin(apply_batch(conn, target, events))
    }
}

/// Applies `events` in order to the sales tables of `target`.
pub async fn apply_batch(
    conn: &mut PgConnection,
    target: Target,
    events: &[Decoded],
) -> Result<Vec<Applied>, ApplyError> {
    let (orders_table, buckets_table) = (
        target.table(repo::ORDERS_TABLE),
        target.table(repo::BUCKETS_TABLE),
    );
    let ids = touched_orders(events);
    let loaded = repo::load(conn, target, &orders_table, &ids).await?;
    let mut rows: HashMap<Uuid, OrderSales> = HashMap::with_capacity(ids.len());
    for o in loaded {
        rows.insert(o.order_id, o);
    }
    let mut deltas = BTreeMap::new();
    let mut changed = Vec::new();
    let mut outcomes = Vec::with_capacity(events.len());
    for d in events {
        match fold(rows.get(&d.env.stream_id), &d.env, &d.event, &mut deltas)? {
            Some(o) => {
                changed.push(o.order_id);
                rows.insert(o.order_id, o);
                outcomes.push(Applied::Applied);
            }
            None => outcomes.push(Applied::Duplicate),
        }
    }
    changed.sort_unstable();
    changed.dedup();
    let rs: Vec<&OrderSales> = changed.iter().map(|id| &rows[id]).collect();
    repo::save_orders(conn, &orders_table, &rs).await?;
    let deltas: Vec<_> = deltas
        .into_iter()
        .filter(|(_, d)| *d != Delta::default())
        .collect();
    repo::add_to_buckets(conn, &buckets_table, &deltas).await?;
    Ok(outcomes)
}

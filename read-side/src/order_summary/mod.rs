//! The order-summary projection: one row per order with status, lines, totals, cancellation
//! reason and the timeline of status changes.
//!
//! The fold is pure ([`fold()`]); [`apply_batch`] loads the touched rows, folds the events in
//! order and writes the changed rows back with one statement, so the live projector (one
//! event) and a rebuild (thousands) share every line of logic. The SQL, the projection's
//! writes and the API's reads alike, is in [`repo`].
//!
//! # Layout
//! - [`fold`](mod@fold): the row and the pure fold.
//! - [`repo`]: every statement on the table.

use std::collections::{HashMap, HashSet};

use futures::future::BoxFuture;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::projection::{Applied, ApplyError, Decoded, Kind, Projection, Target, touched_orders};

pub mod fold;
pub mod repo;

pub use fold::{Row, fold};
pub use repo::STATUS_CHANNEL;

pub const NAME: &str = Kind::OrderSummary.name();

/// The order-summary [`Projection`], as listed in [`crate::registry`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderSummary;

impl Projection for OrderSummary {
    fn kind(&self) -> Kind {
        Kind::OrderSummary
    }

    fn tables(&self) -> &'static [&'static str] {
        &[repo::TABLE]
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

/// Applies `events` in order to the order-summary table of `target`.
pub async fn apply_batch(
    conn: &mut PgConnection,
    target: Target,
    events: &[Decoded],
) -> Result<Vec<Applied>, ApplyError> {
    let table = target.table(repo::TABLE);
    let ids = touched_orders(events);
    let loaded = repo::load(conn, target, &table, &ids).await?;
    let mut rows: HashMap<Uuid, Option<Row>> = HashMap::with_capacity(ids.len());
    for row in loaded {
        rows.insert(row.order_id, Some(row));
    }
    let existing: HashSet<Uuid> = rows.keys().copied().collect();
    let mut changed: Vec<Uuid> = Vec::new();
    let mut outcomes = Vec::with_capacity(events.len());
    for d in events {
        let row = rows.entry(d.env.stream_id).or_default();
        let outcome = fold(row, &d.env, &d.event)?;
        if outcome == Applied::Applied {
            changed.push(d.env.stream_id);
        }
        outcomes.push(outcome);
    }
    changed.sort_unstable();
    changed.dedup();
    let (updated, inserted): (Vec<&Row>, Vec<&Row>) = changed
        .iter()
        .filter_map(|id| rows[id].as_ref())
        .partition(|r| existing.contains(&r.order_id));
    if target == Target::Live {
        let all: Vec<&Row> = updated.into_iter().chain(inserted).collect();
        repo::upsert(conn, &table, &all).await?;
        repo::announce(conn, &all).await?;
    } else {
        // A rebuild is the only writer of its tables: rows it wrote before are deleted and
        // every changed row is COPYed in, much cheaper than upserting them one by one.
        if !updated.is_empty() {
            let ids: Vec<Uuid> = updated.iter().map(|r| r.order_id).collect();
            repo::delete(conn, &table, &ids).await?;
        }
        let all: Vec<&Row> = updated.into_iter().chain(inserted).collect();
        repo::copy_in(conn, &table, &all).await?;
    }
    Ok(outcomes)
}

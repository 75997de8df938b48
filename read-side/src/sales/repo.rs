//! Every SQL statement on the sales tables: the projection's batched writes (each order's
//! contribution, the hourly buckets) and the range read the GraphQL API serves.
//!
//! One place per store, so callers (the batch apply, GraphQL) see contributions and buckets,
//! not SQL.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row as _};
use uuid::Uuid;

use super::fold::{BucketKey, Delta, OrderSales};
use crate::projection::Target;

/// Base name of the table of each order's contribution (with its stream version).
pub const ORDERS_TABLE: &str = "sales_orders";
/// Base name of the table of hourly buckets per SKU and currency.
pub const BUCKETS_TABLE: &str = "sales_by_product_hour";

/// The contributions of `ids` in `orders_table` (of `target`), locked as
/// [`Target::row_lock`] says.
pub(super) async fn load(
    conn: &mut PgConnection,
    target: Target,
    orders_table: &str,
    ids: &[Uuid],
) -> Result<Vec<OrderSales>, sqlx::Error> {
    let loaded = sqlx::query(&format!(
        "SELECT order_id, version, placed_hour, currency, lines, cancelled FROM {orders_table}
         WHERE order_id = ANY($1) {}",
        target.row_lock()
    ))
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    loaded
        .iter()
        .map(|r| {
            let lines: serde_json::Value = r.try_get("lines")?;
            Ok(OrderSales {
                order_id: r.try_get("order_id")?,
                version: r.try_get("version")?,
                placed_hour: r.try_get("placed_hour")?,
                currency: r.try_get("currency")?,
                lines: serde_json::from_value(lines)
                    .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                cancelled: r.try_get("cancelled")?,
            })
        })
        .collect()
}

/// Inserts new contributions and updates the version and cancellation of existing ones.
pub(super) async fn save_orders(
    conn: &mut PgConnection,
    orders_table: &str,
    rs: &[&OrderSales],
) -> Result<(), sqlx::Error> {
    if rs.is_empty() {
        return Ok(());
    }
    sqlx::query(&format!(
        "INSERT INTO {orders_table} (order_id, version, placed_hour, currency, lines, cancelled)
         SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::timestamptz[], $4::text[], $5::jsonb[], $6::bool[])
         ON CONFLICT (order_id) DO UPDATE SET version = EXCLUDED.version, cancelled = EXCLUDED.cancelled"
    ))
    .bind(rs.iter().map(|o| o.order_id).collect::<Vec<_>>())
    .bind(rs.iter().map(|o| o.version).collect::<Vec<_>>())
    .bind(rs.iter().map(|o| o.placed_hour).collect::<Vec<_>>())
    .bind(rs.iter().map(|o| o.currency.clone()).collect::<Vec<_>>())
    .bind(rs.iter().map(|o| serde_json::json!(o.lines)).collect::<Vec<_>>())
    .bind(rs.iter().map(|o| o.cancelled).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Adds `deltas` to the buckets in one statement, in the given (key) order, so concurrent
/// writers lock buckets in the same order and never deadlock.
pub(super) async fn add_to_buckets(
    conn: &mut PgConnection,
    buckets_table: &str,
    deltas: &[(BucketKey, Delta)],
) -> Result<(), sqlx::Error> {
    if deltas.is_empty() {
        return Ok(());
    }
    sqlx::query(&format!(
        "INSERT INTO {buckets_table} AS b (hour, sku, currency, units, revenue_minor, orders)
         SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[])
         ON CONFLICT (hour, sku, currency) DO UPDATE SET
             units = b.units + EXCLUDED.units,
             revenue_minor = b.revenue_minor + EXCLUDED.revenue_minor,
             orders = b.orders + EXCLUDED.orders"
    ))
    .bind(deltas.iter().map(|((h, _, _), _)| *h).collect::<Vec<_>>())
    .bind(deltas.iter().map(|((_, s, _), _)| s.clone()).collect::<Vec<_>>())
    .bind(deltas.iter().map(|((_, _, c), _)| c.clone()).collect::<Vec<_>>())
    .bind(deltas.iter().map(|(_, d)| d.units).collect::<Vec<_>>())
    .bind(deltas.iter().map(|(_, d)| d.revenue_minor).collect::<Vec<_>>())
    .bind(deltas.iter().map(|(_, d)| d.orders).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Sales of one product in one hour and currency, net of cancellations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub hour: DateTime<Utc>,
    pub sku: String,
    pub currency: String,
    pub units: i64,
    pub revenue_minor: i64,
    pub orders: i64,
}

/// The non-empty buckets with `from <= hour < to` (`from` taken down to its hour), of one
/// SKU or all, ordered by hour, SKU and currency (through the view on the active version).
pub async fn buckets(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    sku: Option<String>,
) -> Result<Vec<Bucket>, sqlx::Error> {
    let rows: Vec<(DateTime<Utc>, String, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT hour, sku, currency, units, revenue_minor, orders FROM sales_by_product_hour
         WHERE hour >= date_trunc('hour', $1::timestamptz) AND hour < $2 AND ($3::text IS NULL OR sku = $3)
           AND (units, revenue_minor, orders) <> (0, 0, 0)
         ORDER BY hour, sku, currency",
    )
    .bind(from)
    .bind(to)
    .bind(sku)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(hour, sku, currency, units, revenue_minor, orders)| Bucket {
                hour,
                sku,
                currency,
                units,
                revenue_minor,
                orders,
            },
        )
        .collect())
}

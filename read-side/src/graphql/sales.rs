//! Sales analytics over GraphQL: `salesByProduct`, for operators.
//!
//! Only the GraphQL type, the argument rules (defaults, range limits) and the resolver; the
//! buckets come from [`crate::sales::repo`].

use async_graphql::{Context, Object, SimpleObject};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{
    access::operator,
    errors::{error, internal},
};
use crate::sales::repo;

/// Sales of one product in one hour and currency, net of cancellations.
#[derive(SimpleObject)]
pub struct SalesBucket {
    pub hour: DateTime<Utc>,
    pub sku: String,
    pub currency: String,
    pub units: i64,
    pub revenue_minor: i64,
    pub orders: i64,
}

impl From<repo::Bucket> for SalesBucket {
    fn from(b: repo::Bucket) -> Self {
        Self {
            hour: b.hour,
            sku: b.sku,
            currency: b.currency,
            units: b.units,
            revenue_minor: b.revenue_minor,
            orders: b.orders,
        }
    }
}

/// The sales queries, merged into the schema's `QueryRoot`.
#[derive(Default)]
pub struct SalesQuery;

#[Object]
impl SalesQuery {
    /// Sales per product per hour (net of cancellations, by the hour orders were placed) with
    /// `from <= hour < to`; defaults: the last 24 hours. At most 366 days. Operators only.
    #[graphql(complexity = "100 * child_complexity")]
    async fn sales_by_product(
        &self,
        ctx: &Context<'_>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        sku: Option<String>,
    ) -> async_graphql::Result<Vec<SalesBucket>> {
        operator(ctx, "sales analytics")?;
        let to = to.unwrap_or_else(Utc::now);
        let from = from.unwrap_or(to - chrono::TimeDelta::hours(24));
        if from >= to {
            return Err(error("BAD_USER_INPUT", "`from` must be before `to`"));
        }
        if to - from > chrono::TimeDelta::days(366) {
            return Err(error(
                "BAD_USER_INPUT",
                "the range may span at most 366 days",
            ));
        }
        let pool = ctx.data::<PgPool>()?;
        Ok(repo::buckets(pool, from, to, sku)
            .await
            .map_err(internal)?
            .into_iter()
            .map(Into::into)
            .collect())
    }
}

//! Live analytics over GraphQL, for operators: `productAnalytics`, `activityWindows`,
//! `liveAnalytics`, and the `liveAnalytics` subscription (at most one update a second, only
//! when something changed).
//!
//! Only the GraphQL types, the argument rules and the resolvers; the rows come from
//! [`crate::analytics::repo`].

use std::time::Duration;

use async_graphql::{Context, Object, SimpleObject, Subscription, futures_util::Stream};
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::PgPool;

use super::{
    access::operator,
    errors::{error, internal},
    limits::subscription_slot,
};
use crate::analytics::repo;

/// "Active" means seen within this long (in event time).
const ACTIVE_WINDOW: TimeDelta = TimeDelta::minutes(5);

/// One product's all-time counters (what the `user-activity` topic still holds after a
/// rebuild; orders from the order stream).
#[derive(SimpleObject, Clone, PartialEq)]
pub struct ProductAnalytics {
    pub sku: String,
    pub views: i64,
    pub add_to_carts: i64,
    pub remove_from_carts: i64,
    /// Orders placed with this product.
    pub orders: i64,
    pub units: i64,
    /// Orders per product view; null before the first view.
    pub conversion_rate: Option<f64>,
}

impl From<repo::ProductRow> for ProductAnalytics {
    fn from(r: repo::ProductRow) -> Self {
        let [views, add_to_carts, remove_from_carts, orders, units] = r.counts;
        Self {
            sku: r.sku,
            views,
            add_to_carts,
            remove_from_carts,
            orders,
            units,
            conversion_rate: (views > 0).then(|| orders as f64 / views as f64),
        }
    }
}

/// One tumbling minute, shop-wide, in event time.
#[derive(SimpleObject, Clone, PartialEq)]
pub struct ActivityWindow {
    pub minute: DateTime<Utc>,
    pub page_views: i64,
    pub product_views: i64,
    pub searches: i64,
    pub add_to_carts: i64,
    pub remove_from_carts: i64,
    pub checkouts_started: i64,
    pub orders_placed: i64,
    pub orders_confirmed: i64,
    pub orders_cancelled: i64,
    /// Activity that arrived in this minute after its own window was final (10 minutes
    /// after that window ended), so it is counted here instead.
    pub late_events: i64,
}

impl From<repo::MinuteRow> for ActivityWindow {
    fn from(r: repo::MinuteRow) -> Self {
        let [
            page_views,
            product_views,
            searches,
            add_to_carts,
            remove_from_carts,
            checkouts_started,
            orders_placed,
            orders_confirmed,
            orders_cancelled,
            late_events,
        ] = r.counts;
        Self {
            minute: r.minute,
            page_views,
            product_views,
            searches,
            add_to_carts,
            remove_from_carts,
            checkouts_started,
            orders_placed,
            orders_confirmed,
            orders_cancelled,
            late_events,
        }
    }
}

/// Who is in the shop now.
#[derive(SimpleObject, Clone, PartialEq)]
pub struct LiveAnalytics {
    /// When this was read.
    pub at: DateTime<Utc>,
    /// Signed-in customers active in the last five minutes.
    pub active_users: i64,
    /// Sessions (signed in or not) active in the last five minutes.
    pub active_sessions: i64,
    /// The current minute's window, if anything happened in it yet.
    pub this_minute: Option<ActivityWindow>,
}

async fn live(pool: &PgPool) -> async_graphql::Result<LiveAnalytics> {
    let at = Utc::now();
    let (active_users, active_sessions) = repo::active_since(pool, at - ACTIVE_WINDOW)
        .await
        .map_err(internal)?;
    let minute = crate::analytics::fold::minute_of(at);
    let this_minute = repo::minutes(pool, minute, minute + TimeDelta::minutes(1))
        .await
        .map_err(internal)?
        .pop()
        .map(Into::into);
    Ok(LiveAnalytics {
        at,
        active_users,
        active_sessions,
        this_minute,
    })
}

/// The analytics queries, merged into the schema's `QueryRoot`.
#[derive(Default)]
pub struct AnalyticsQuery;

#[Object]
impl AnalyticsQuery {
    /// Per product counters, most viewed first (at most `first`, 1 to 100; default 20), or
    /// one product. Operators only.
    #[graphql(complexity = "first.unwrap_or(20).clamp(1, 100) as usize * child_complexity")]
    async fn product_analytics(
        &self,
        ctx: &Context<'_>,
        sku: Option<String>,
        first: Option<i32>,
    ) -> async_graphql::Result<Vec<ProductAnalytics>> {
        operator(ctx, "analytics")?;
        let first = first.unwrap_or(20);
        if !(1..=100).contains(&first) {
            return Err(error("BAD_USER_INPUT", "`first` must be 1 to 100"));
        }
        let pool = ctx.data::<PgPool>()?;
        Ok(repo::products(pool, sku.as_deref(), i64::from(first))
            .await
            .map_err(internal)?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// One-minute windows with `from <= minute < to` (default: the last hour; at most 24
    /// hours, which is what is kept). Operators only.
    #[graphql(complexity = "60 * child_complexity")]
    async fn activity_windows(
        &self,
        ctx: &Context<'_>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> async_graphql::Result<Vec<ActivityWindow>> {
        operator(ctx, "analytics")?;
        let to = to.unwrap_or_else(Utc::now);
        let from = from.unwrap_or(to - TimeDelta::hours(1));
        if from >= to {
            return Err(error("BAD_USER_INPUT", "`from` must be before `to`"));
        }
        if to - from > TimeDelta::hours(24) {
            return Err(error(
                "BAD_USER_INPUT",
                "the range may span at most 24 hours",
            ));
        }
        let pool = ctx.data::<PgPool>()?;
        Ok(repo::minutes(pool, from, to)
            .await
            .map_err(internal)?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Active users and sessions now, and this minute's window. Operators only.
    async fn live_analytics(&self, ctx: &Context<'_>) -> async_graphql::Result<LiveAnalytics> {
        operator(ctx, "analytics")?;
        live(ctx.data::<PgPool>()?).await
    }
}

/// The analytics subscriptions, merged into the schema's `SubscriptionRoot`.
#[derive(Default)]
pub struct AnalyticsSubscription;

#[Subscription]
impl AnalyticsSubscription {
    /// `liveAnalytics` now, then again whenever it changed, at most once a second.
    /// Operators only.
    async fn live_analytics(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<impl Stream<Item = LiveAnalytics> + use<>> {
        let who = operator(ctx, "analytics")?.clone();
        let slot = subscription_slot(ctx, &who)?;
        let pool = ctx.data::<PgPool>()?.clone();
        let ticks = tokio_stream_interval(Duration::from_secs(1));
        use futures::StreamExt;
        let mut last: Option<LiveAnalytics> = None;
        Ok(ticks
            .then(move |()| {
                let pool = pool.clone();
                async move { live(&pool).await.ok() }
            })
            .filter_map(move |now| {
                let _held = &slot;
                let fresh = now.filter(|n| {
                    let changed = last.as_ref().is_none_or(|l| {
                        (l.active_users, l.active_sessions, &l.this_minute)
                            != (n.active_users, n.active_sessions, &n.this_minute)
                    });
                    if changed {
                        last = Some(n.clone());
                    }
                    changed
                });
                futures::future::ready(fresh)
            }))
    }
}

/// A tick now, then one every `period`.
fn tokio_stream_interval(period: Duration) -> impl Stream<Item = ()> {
    futures::stream::unfold(None, move |started: Option<()>| async move {
        if started.is_some() {
            tokio::time::sleep(period).await;
        }
        Some(((), Some(())))
    })
}

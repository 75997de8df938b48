//! The orders model over GraphQL: `order`, `orders` (a relay-style connection),
//! `checkoutProgress` and the `orderStatusChanged` subscription (`Order.checkout`, where
//! the saga stands, is in [`super::checkout`]).
//!
//! Only GraphQL types and resolvers: rows come from [`crate::order_summary::repo`], changes
//! from [`StatusFeed`]. A customer sees only their own orders (another customer's order is
//! `null`, so existence does not leak); operators see all.

use async_graphql::{Context, Enum, ID, Object, SimpleObject, Subscription, futures_util::Stream};
use chrono::{DateTime, Utc};
use platform::auth::{Principal, Role};
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    access::principal,
    errors::{error, internal, parse_id},
    limits::subscription_slot,
};
use crate::{
    notify::StatusFeed,
    order_summary::{
        self,
        repo::{self, OrderFilter, ReadError},
    },
};

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(
    remote = "domain::order::OrderStatus",
    rename_items = "SCREAMING_SNAKE_CASE"
)]
pub enum OrderStatus {
    Pending,
    InventoryReserved,
    PaymentAuthorized,
    Confirmed,
    Cancelled,
}

impl OrderStatus {
    fn as_str(self) -> &'static str {
        domain::order::OrderStatus::from(self).as_str()
    }

    /// Statuses are written by the projection from the domain's own names.
    fn parse(s: &str) -> Self {
        serde_json::from_value::<domain::order::OrderStatus>(serde_json::Value::from(s))
            .map(Into::into)
            .unwrap_or(Self::Pending)
    }
}

#[derive(SimpleObject, Clone)]
pub struct Item {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_minor: i64,
}

#[derive(SimpleObject, Clone)]
pub struct TimelineEntry {
    pub status: OrderStatus,
    pub at: DateTime<Utc>,
}

#[derive(SimpleObject, Clone)]
#[graphql(complex)]
pub struct Order {
    pub id: ID,
    pub customer_id: ID,
    pub status: OrderStatus,
    pub currency: String,
    pub total_minor: i64,
    pub items: Vec<Item>,
    pub cancellation_reason: Option<String>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub timeline: Vec<TimelineEntry>,
}

#[derive(SimpleObject)]
pub struct OrderEdge {
    pub cursor: String,
    pub node: Order,
}

#[derive(SimpleObject)]
pub struct PageInfo {
    pub has_next_page: bool,
    pub end_cursor: Option<String>,
}

#[derive(SimpleObject)]
pub struct OrderConnection {
    pub edges: Vec<OrderEdge>,
    pub page_info: PageInfo,
}

/// The checkout steps an order has passed (the saga confirms only after the shipment exists).
#[derive(SimpleObject)]
pub struct CheckoutProgress {
    pub order_id: ID,
    pub status: OrderStatus,
    pub inventory_reserved: bool,
    pub payment_authorized: bool,
    pub shipment_created: bool,
    pub confirmed: bool,
    pub cancelled: bool,
    pub cancellation_reason: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// The orders queries, merged into the schema's `QueryRoot`.
#[derive(Default)]
pub struct OrdersQuery;

#[Object]
impl OrdersQuery {
    /// One order; `null` if it does not exist or belongs to another customer.
    async fn order(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<Order>> {
        let who = principal(ctx)?;
        let id = parse_id(&id)?;
        load_visible(ctx.data::<PgPool>()?, who, id).await
    }

    /// Orders, newest first, as a relay-style connection. Customers see only their own
    /// (`customerId` defaults to the caller and may not name someone else). `first` defaults to
    /// 20, at most 100.
    #[graphql(complexity = "first.unwrap_or(20).clamp(1, 100) as usize * child_complexity")]
    async fn orders(
        &self,
        ctx: &Context<'_>,
        customer_id: Option<ID>,
        status: Option<OrderStatus>,
        first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<OrderConnection> {
        let who = principal(ctx)?;
        let customer = match (who.role, customer_id) {
            (Role::Customer, Some(c)) if c.as_str() != who.subject => {
                return Err(error(
                    "FORBIDDEN",
                    "customers may only list their own orders",
                ));
            }
            (Role::Customer, _) => Some(who.subject.clone()),
            (Role::Operator, c) => c.map(|c| c.to_string()),
        };
        let first = first.unwrap_or(20);
        if !(1..=100).contains(&first) {
            return Err(error("BAD_USER_INPUT", "`first` must be between 1 and 100"));
        }
        let after = after.map(|c| parse_cursor(&c)).transpose()?;
        let pool = ctx.data::<PgPool>()?;
        let filter = OrderFilter {
            customer_id: customer,
            status: status.map(|s| s.as_str()),
            after,
        };
        let page = repo::page(pool, filter, first.unsigned_abs())
            .await
            .map_err(read_error)?;
        let has_next_page = page.has_next_page;
        let edges = page
            .rows
            .into_iter()
            .map(|row| {
                let node = Order::try_from(row)?;
                Ok(OrderEdge {
                    cursor: cursor(node.created_at, &node.id),
                    node,
                })
            })
            .collect::<async_graphql::Result<Vec<_>>>()?;
        let end_cursor = edges.last().map(|e| e.cursor.clone());
        Ok(OrderConnection {
            edges,
            page_info: PageInfo {
                has_next_page,
                end_cursor,
            },
        })
    }

    /// Which checkout steps an order has passed, from its status history; `null` like
    /// `order` when the order is unknown or not the caller's.
    async fn checkout_progress(
        &self,
        ctx: &Context<'_>,
        order_id: ID,
    ) -> async_graphql::Result<Option<CheckoutProgress>> {
        let Some(order) = self.order(ctx, order_id).await? else {
            return Ok(None);
        };
        let reached = |s: OrderStatus| order.timeline.iter().any(|t| t.status == s);
        Ok(Some(CheckoutProgress {
            order_id: order.id.clone(),
            status: order.status,
            inventory_reserved: reached(OrderStatus::InventoryReserved),
            payment_authorized: reached(OrderStatus::PaymentAuthorized),
            shipment_created: reached(OrderStatus::Confirmed),
            confirmed: reached(OrderStatus::Confirmed),
            cancelled: reached(OrderStatus::Cancelled),
            cancellation_reason: order.cancellation_reason.clone(),
            updated_at: order.updated_at,
        }))
    }
}

/// The orders subscriptions, merged into the schema's `SubscriptionRoot`.
#[derive(Default)]
pub struct OrdersSubscription;

#[Subscription]
impl OrdersSubscription {
    /// The order each time its read model changes (after the change commits), starting with
    /// its current state. Customers receive only their own orders' changes.
    async fn order_status_changed(
        &self,
        ctx: &Context<'_>,
        order_id: ID,
    ) -> async_graphql::Result<impl Stream<Item = Order> + use<>> {
        let who = principal(ctx)?.clone();
        let id = parse_id(&order_id)?;
        let slot = subscription_slot(ctx, &who)?;
        let pool = ctx.data::<PgPool>()?.clone();
        let feed = ctx.data::<StatusFeed>()?;
        // Listen before reading the current state, so no change falls between the two.
        let rx = feed.subscribe().await.map_err(internal)?;
        let first = load_visible(&pool, &who, id).await?;
        let changes = futures::stream::unfold(rx, move |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(c) if c.order_id == id => return Some(((), rx)),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        return Some(((), rx));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        use futures::StreamExt;
        let updates = changes.filter_map(move |()| {
            let (pool, who) = (pool.clone(), who.clone());
            async move { load_visible(&pool, &who, id).await.ok().flatten() }
        });
        let mut last_version = 0;
        let stream = futures::stream::iter(first)
            .chain(updates)
            .filter(move |o| {
                let _held = &slot;
                // Each version once, in order (a lag or a duplicate notice reloads the same row).
                let fresh = o.version > last_version;
                last_version = last_version.max(o.version);
                futures::future::ready(fresh)
            });
        Ok(stream)
    }
}

/// The order if it exists and `who` may see it.
async fn load_visible(
    pool: &PgPool,
    who: &Principal,
    id: Uuid,
) -> async_graphql::Result<Option<Order>> {
    let Some(row) = repo::find(pool, id).await.map_err(read_error)? else {
        return Ok(None);
    };
    let order = Order::try_from(row)?;
    if who.role == Role::Customer && order.customer_id.as_str() != who.subject {
        return Ok(None);
    }
    Ok(Some(order))
}

fn read_error(e: ReadError) -> async_graphql::Error {
    match e {
        ReadError::Database(e) => internal(e),
        // A row that does not decode answers with the decoding error, as it always has.
        ReadError::Decode(e) => e.into(),
    }
}

fn cursor(created_at: DateTime<Utc>, id: &ID) -> String {
    format!("{}_{}", created_at.timestamp_micros(), id.as_str())
}

fn parse_cursor(c: &str) -> async_graphql::Result<(DateTime<Utc>, Uuid)> {
    let bad = || {
        error(
            "BAD_USER_INPUT",
            "`after` is not a cursor returned by this API",
        )
    };
    let (micros, id) = c.split_once('_').ok_or_else(bad)?;
    let at = micros
        .parse()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    Ok((at, Uuid::parse_str(id).map_err(|_| bad())?))
}

impl TryFrom<order_summary::Row> for Order {
    type Error = async_graphql::Error;

    fn try_from(r: order_summary::Row) -> async_graphql::Result<Self> {
        let items: Vec<serde_json::Value> = serde_json::from_value(r.items)?;
        let timeline: Vec<serde_json::Value> = serde_json::from_value(r.timeline)?;
        Ok(Order {
            id: ID(r.order_id.to_string()),
            customer_id: ID(r.customer_id),
            status: OrderStatus::parse(&r.status),
            currency: r.currency,
            total_minor: r.total_minor,
            items: items
                .iter()
                .map(|i| Item {
                    sku: i["sku"].as_str().unwrap_or_default().to_owned(),
                    quantity: i["quantity"].as_i64().unwrap_or_default(),
                    unit_price_minor: i["unit_price_minor"].as_i64().unwrap_or_default(),
                })
                .collect(),
            cancellation_reason: r.cancellation_reason,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
            timeline: timeline
                .iter()
                .filter_map(|t| {
                    Some(TimelineEntry {
                        status: OrderStatus::parse(t["status"].as_str()?),
                        at: t["at"].as_str()?.parse().ok()?,
                    })
                })
                .collect(),
        })
    }
}

//! GraphQL over the read models (async-graphql on axum): `POST /graphql`, GraphiQL on GET.
//!
//! Same bearer tokens as the command API. A customer sees only their own orders (another
//! customer's order is `null`, so existence does not leak); operators see all. Errors carry a
//! stable `extensions.code`: `UNAUTHENTICATED`, `FORBIDDEN`, `BAD_USER_INPUT`, `INTERNAL`.

use async_graphql::{
    Context, EmptyMutation, EmptySubscription, Enum, ErrorExtensions, ID, Json, Object, Schema,
    SimpleObject, http::GraphiQLSource,
};
use async_graphql_axum::{GraphQLRequest, GraphQLResponse};
use axum::{
    Router,
    extract::State,
    http::{HeaderMap, header},
    response::{Html, IntoResponse},
    routing::get,
};
use chrono::{DateTime, Utc};
use platform::auth::{Authenticator, Principal, Role};
use sqlx::{PgPool, Row, postgres::PgRow};
use uuid::Uuid;

pub type ShopSchema = Schema<QueryRoot, EmptyMutation, EmptySubscription>;

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

#[derive(SimpleObject)]
pub struct AuditEntry {
    pub position: i64,
    pub stream_version: i64,
    pub event_type: String,
    pub schema_version: i32,
    pub recorded_at: DateTime<Utc>,
    pub payload: Json<serde_json::Value>,
    pub metadata: Json<serde_json::Value>,
    /// SHA-256 chain hash, hex.
    pub hash: String,
}

#[derive(SimpleObject)]
pub struct AuditTrail {
    pub entries: Vec<AuditEntry>,
    /// The hash chain recomputes and matches the stream head.
    pub verified: bool,
    /// Stream version of the first broken event, when not verified.
    pub broken_at: Option<i64>,
}

fn error(code: &'static str, message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", code))
}

fn principal<'a>(ctx: &'a Context<'_>) -> async_graphql::Result<&'a Principal> {
    ctx.data_opt::<Principal>()
        .ok_or_else(|| error("UNAUTHENTICATED", "a valid bearer token is required"))
}

pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// One order; `null` if it does not exist or belongs to another customer.
    async fn order(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<Order>> {
        let who = principal(ctx)?;
        let id = parse_id(&id)?;
        let pool = ctx.data::<PgPool>()?;
        let row = sqlx::query(&format!(
            "SELECT {ORDER_COLUMNS} FROM order_summary WHERE order_id = $1"
        ))
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(internal)?;
        let Some(r) = row else { return Ok(None) };
        let order = order_from_row(&r)?;
        if who.role == Role::Customer && order.customer_id.as_str() != who.subject {
            return Ok(None);
        }
        Ok(Some(order))
    }

    /// Orders, newest first, as a relay-style connection. Customers see only their own
    /// (`customerId` defaults to the caller and may not name someone else). `first` defaults to
    /// 20, at most 100.
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
        let rows = sqlx::query(&format!(
            "SELECT {ORDER_COLUMNS} FROM order_summary
             WHERE ($1::text IS NULL OR customer_id = $1)
               AND ($2::text IS NULL OR status = $2)
               AND ($3::timestamptz IS NULL OR (created_at, order_id) < ($3, $4))
             ORDER BY created_at DESC, order_id DESC
             LIMIT $5"
        ))
        .bind(customer)
        .bind(status.map(|s| s.as_str()))
        .bind(after.map(|(t, _)| t))
        .bind(after.map(|(_, id)| id))
        .bind(i64::from(first) + 1)
        .fetch_all(pool)
        .await
        .map_err(internal)?;
        let has_next_page = rows.len() > first as usize;
        let edges = rows
            .iter()
            .take(first as usize)
            .map(|r| {
                let node = order_from_row(r)?;
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

    /// Every stored event of an order with its metadata and hash, and whether the hash chain
    /// verifies. Operators only.
    async fn audit_trail(
        &self,
        ctx: &Context<'_>,
        order_id: ID,
    ) -> async_graphql::Result<AuditTrail> {
        let who = principal(ctx)?;
        if who.role != Role::Operator {
            return Err(error("FORBIDDEN", "the audit trail is for operators"));
        }
        let id = parse_id(&order_id)?;
        let pool = ctx.data::<PgPool>()?;
        let mut conn = pool.acquire().await.map_err(internal)?;
        let (events, _) = event_store::load_stream(&mut conn, id)
            .await
            .map_err(internal)?;
        let report = event_store::audit::verify_stream(&mut conn, id)
            .await
            .map_err(internal)?;
        Ok(AuditTrail {
            entries: events
                .into_iter()
                .map(|e| AuditEntry {
                    position: e.position,
                    stream_version: e.stream_version,
                    event_type: e.event_type,
                    schema_version: e.schema_version,
                    recorded_at: e.recorded_at,
                    payload: Json(e.payload),
                    metadata: Json(e.metadata),
                    hash: hex::encode(e.hash),
                })
                .collect(),
            verified: report.broken.is_none(),
            broken_at: report.broken.map(|b| b.stream_version),
        })
    }
}

const ORDER_COLUMNS: &str = "order_id, customer_id, status, currency, total_minor, items, cancellation_reason, \
                             version, created_at, updated_at, timeline";

fn internal(e: sqlx::Error) -> async_graphql::Error {
    tracing::error!(error = %e, "read model query failed");
    error("INTERNAL", "the read model is unavailable")
}

fn parse_id(id: &ID) -> async_graphql::Result<Uuid> {
    Uuid::parse_str(id).map_err(|_| {
        error(
            "BAD_USER_INPUT",
            format!("`{}` is not an order id", id.as_str()),
        )
    })
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

fn order_from_row(r: &PgRow) -> async_graphql::Result<Order> {
    let id: Uuid = r.try_get("order_id")?;
    let items: Vec<serde_json::Value> = serde_json::from_value(r.try_get("items")?)?;
    let timeline: Vec<serde_json::Value> = serde_json::from_value(r.try_get("timeline")?)?;
    Ok(Order {
        id: ID(id.to_string()),
        customer_id: ID(r.try_get::<String, _>("customer_id")?),
        status: OrderStatus::parse(r.try_get("status")?),
        currency: r.try_get("currency")?,
        total_minor: r.try_get("total_minor")?,
        items: items
            .iter()
            .map(|i| Item {
                sku: i["sku"].as_str().unwrap_or_default().to_owned(),
                quantity: i["quantity"].as_i64().unwrap_or_default(),
                unit_price_minor: i["unit_price_minor"].as_i64().unwrap_or_default(),
            })
            .collect(),
        cancellation_reason: r.try_get("cancellation_reason")?,
        version: r.try_get("version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
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

pub fn schema(pool: PgPool) -> ShopSchema {
    Schema::build(QueryRoot, EmptyMutation, EmptySubscription)
        .data(pool)
        .limit_depth(10)
        .limit_complexity(500)
        .finish()
}

#[derive(Clone)]
struct AppState {
    schema: ShopSchema,
    auth: Authenticator,
}

async fn graphql(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: GraphQLRequest,
) -> GraphQLResponse {
    let mut req = req.into_inner();
    let header = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""));
    // A missing or invalid token leaves the request anonymous; fields that need a caller
    // answer UNAUTHENTICATED.
    if let Ok(p) = state.auth.verify_header(header) {
        req = req.data(p);
    }
    state.schema.execute(req).await.into()
}

async fn graphiql() -> impl IntoResponse {
    Html(GraphiQLSource::build().endpoint("/graphql").finish())
}

/// `/graphql` plus the ops routes (`/readyz` checks PostgreSQL).
pub fn router(pool: PgPool, auth: Authenticator) -> Router {
    let readiness = platform::ops::Readiness::new().postgres(pool.clone());
    Router::new()
        .route("/graphql", get(graphiql).post(graphql))
        .with_state(AppState {
            schema: schema(pool),
            auth,
        })
        .merge(platform::ops::router(readiness))
}

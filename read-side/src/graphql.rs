//! GraphQL over the read models (async-graphql on axum): `POST /graphql`, GraphiQL on GET.
//!
//! Same bearer tokens as the command API. A customer sees only their own orders (another
//! customer's order is `null`, so existence does not leak); operators see all. Errors carry a
//! stable `extensions.code`: `UNAUTHENTICATED`, `BAD_USER_INPUT`, `INTERNAL`.

use async_graphql::{
    Context, EmptyMutation, EmptySubscription, Enum, ErrorExtensions, ID, Object, Schema,
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
use sqlx::{PgPool, Row};
use uuid::Uuid;

pub type ShopSchema = Schema<QueryRoot, EmptyMutation, EmptySubscription>;

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(rename_items = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Pending,
    InventoryReserved,
    PaymentAuthorized,
    Confirmed,
    Cancelled,
}

impl OrderStatus {
    fn parse(s: &str) -> Self {
        match s {
            "INVENTORY_RESERVED" => Self::InventoryReserved,
            "PAYMENT_AUTHORIZED" => Self::PaymentAuthorized,
            "CONFIRMED" => Self::Confirmed,
            "CANCELLED" => Self::Cancelled,
            _ => Self::Pending,
        }
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
        let id = Uuid::parse_str(&id).map_err(|_| {
            error(
                "BAD_USER_INPUT",
                format!("`{}` is not an order id", id.as_str()),
            )
        })?;
        let pool = ctx.data::<PgPool>()?;
        let row = sqlx::query(
            "SELECT order_id, customer_id, status, currency, total_minor, items, cancellation_reason, version,
                    created_at, updated_at, timeline
             FROM order_summary WHERE order_id = $1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "order query failed");
            error("INTERNAL", "the read model is unavailable")
        })?;
        let Some(r) = row else { return Ok(None) };
        let customer: String = r.try_get("customer_id")?;
        if who.role == Role::Customer && customer != who.subject {
            return Ok(None);
        }
        let items: Vec<serde_json::Value> = serde_json::from_value(r.try_get("items")?)?;
        let timeline: Vec<serde_json::Value> = serde_json::from_value(r.try_get("timeline")?)?;
        Ok(Some(Order {
            id: ID(id.to_string()),
            customer_id: ID(customer),
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
        }))
    }
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

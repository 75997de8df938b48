//! GraphQL over the read models (async-graphql on axum): `POST /graphql`, GraphiQL on GET,
//! subscriptions over WebSocket (`graphql-transport-ws`) on `/graphql/ws`.
//!
//! Same bearer tokens as the command API (on WebSocket: `Authorization` in the upgrade request
//! or in the `connection_init` payload). A customer sees only their own orders (another
//! customer's order is `null`, so existence does not leak); operators see all, and only they
//! may read the audit trail, sales and projections or call mutations. Errors carry a stable
//! `extensions.code`: `UNAUTHENTICATED`, `FORBIDDEN`, `BAD_USER_INPUT`, `CONFLICT`, `INTERNAL`.

use async_graphql::{
    Context, Data, Enum, ErrorExtensions, ID, Json, Object, Schema, SimpleObject, Subscription,
    futures_util::Stream,
    http::{ALL_WEBSOCKET_PROTOCOLS, GraphiQLSource},
};
use async_graphql_axum::{GraphQLProtocol, GraphQLRequest, GraphQLResponse, GraphQLWebSocket};
use axum::{
    Router,
    extract::{State, WebSocketUpgrade},
    http::{HeaderMap, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use chrono::{DateTime, Utc};
use platform::auth::{Authenticator, Principal, Role};
use sqlx::{PgPool, Row, postgres::PgRow};
use uuid::Uuid;

use crate::{
    dead_letters,
    notify::StatusFeed,
    projection::Kind,
    rebuild::{self, RebuildError, RebuildOptions},
    status::{self, Watermarks},
};

pub type ShopSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

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

fn operator<'a>(ctx: &'a Context<'_>, what: &str) -> async_graphql::Result<&'a Principal> {
    let who = principal(ctx)?;
    if who.role != Role::Operator {
        return Err(error("FORBIDDEN", format!("{what} is for operators")));
    }
    Ok(who)
}

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

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(rename_items = "SCREAMING_SNAKE_CASE")]
pub enum ProjectionState {
    Live,
    Rebuilding,
    /// A rebuild stopped (crash or error); rebuilding again resumes it.
    RebuildInterrupted,
}

#[derive(SimpleObject)]
pub struct RebuildProgress {
    pub version: i32,
    pub processed: i64,
    pub total: i64,
    pub started_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

#[derive(SimpleObject)]
pub struct Projection {
    pub name: String,
    /// The active version of its tables.
    pub version: i32,
    pub state: ProjectionState,
    /// Sum of the next offsets to apply over the topic's partitions.
    pub position: i64,
    /// Messages in the topic beyond `position`; `null` when the brokers are not reachable.
    pub lag: Option<i64>,
    /// Partitions whose next offset is below the oldest one Kafka still holds: events this
    /// projection never applied were deleted by retention. Rebuild it from the event store.
    /// `null` when the brokers are not reachable.
    pub partitions_behind_retention: Option<i64>,
    pub rebuild: Option<RebuildProgress>,
    pub last_rebuilt_at: Option<DateTime<Utc>>,
}

impl From<status::ProjectionStatus> for Projection {
    fn from(p: status::ProjectionStatus) -> Self {
        Self {
            name: p.name.to_owned(),
            version: p.version,
            state: match p.state {
                status::State::Live => ProjectionState::Live,
                status::State::Rebuilding => ProjectionState::Rebuilding,
                status::State::RebuildInterrupted => ProjectionState::RebuildInterrupted,
            },
            position: p.position,
            lag: p.lag,
            partitions_behind_retention: p.behind_retention,
            rebuild: p.rebuild.map(|r| RebuildProgress {
                version: r.version,
                processed: r.processed,
                total: r.total,
                started_at: r.started_at,
                updated_at: r.updated_at,
                error: r.error,
            }),
            last_rebuilt_at: p.last_rebuilt_at,
        }
    }
}

#[derive(SimpleObject)]
pub struct DeadLetterResolution {
    pub id: ID,
    pub status: String,
    /// Events that were parked behind the dead letter and are now applied.
    pub released: i64,
}

async fn projection_status(
    ctx: &Context<'_>,
    name: &str,
) -> async_graphql::Result<Option<Projection>> {
    let pool = ctx.data::<PgPool>()?;
    let all = status::all(pool, ctx.data_opt::<Watermarks>())
        .await
        .map_err(internal)?;
    Ok(all.into_iter().find(|p| p.name == name).map(Into::into))
}

pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// One order; `null` if it does not exist or belongs to another customer.
    async fn order(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<Order>> {
        let who = principal(ctx)?;
        let id = parse_id(&id)?;
        load_visible(ctx.data::<PgPool>()?, who, id).await
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
        operator(ctx, "the audit trail")?;
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

    /// Sales per product per hour (net of cancellations, by the hour orders were placed) with
    /// `from <= hour < to`; defaults: the last 24 hours. At most 366 days. Operators only.
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
        .await
        .map_err(internal)?;
        Ok(rows
            .into_iter()
            .map(
                |(hour, sku, currency, units, revenue_minor, orders)| SalesBucket {
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

    /// Every projection: active version, position, lag and any rebuild. Operators only.
    async fn projections(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Projection>> {
        operator(ctx, "projection status")?;
        let pool = ctx.data::<PgPool>()?;
        Ok(status::all(pool, ctx.data_opt::<Watermarks>())
            .await
            .map_err(internal)?
            .into_iter()
            .map(Into::into)
            .collect())
    }
}

pub struct MutationRoot;

#[Object]
impl MutationRoot {
    /// Starts rebuilding a projection from the event store in the background (or resumes an
    /// interrupted rebuild) and returns its status; progress shows in `projections`.
    /// `CONFLICT` if a rebuild of it is already running. Operators only.
    async fn rebuild_projection(
        &self,
        ctx: &Context<'_>,
        name: String,
    ) -> async_graphql::Result<Projection> {
        operator(ctx, "rebuilding")?;
        let kind = Kind::parse(&name).ok_or_else(|| {
            let known: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
            error(
                "BAD_USER_INPUT",
                format!("unknown projection `{name}`; known: {}", known.join(", ")),
            )
        })?;
        let pool = ctx.data::<PgPool>()?;
        let started = match rebuild::start(pool, kind, &RebuildOptions::default()).await {
            Ok(r) => r,
            Err(e @ RebuildError::AlreadyRunning(_)) => {
                return Err(error("CONFLICT", e.to_string()));
            }
            Err(e) => {
                tracing::error!(error = %e, "starting a rebuild failed");
                return Err(error("INTERNAL", "the rebuild could not start"));
            }
        };
        // Runs here at once; if it fails or this process dies, the rebuild stays interrupted
        // and the `rebuilds` role of `shop run` resumes it (rebuild::run_worker).
        tokio::spawn(async move {
            if let Err(e) = started.run(|_| {}).await {
                tracing::error!(projection = kind.name(), error = %e, "rebuild failed");
            }
        });
        projection_status(ctx, kind.name())
            .await?
            .ok_or_else(|| error("INTERNAL", "the projection has no status row"))
    }

    /// Re-applies a dead letter from the event store and releases the events parked behind it.
    async fn replay_dead_letter(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<DeadLetterResolution> {
        resolve_dead_letter(ctx, id, true).await
    }

    /// Gives up on a dead letter and releases the events parked behind it.
    async fn discard_dead_letter(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<DeadLetterResolution> {
        resolve_dead_letter(ctx, id, false).await
    }
}

async fn resolve_dead_letter(
    ctx: &Context<'_>,
    id: ID,
    replay: bool,
) -> async_graphql::Result<DeadLetterResolution> {
    operator(ctx, "handling dead letters")?;
    let n: i64 = id.parse().map_err(|_| {
        error(
            "BAD_USER_INPUT",
            format!("`{}` is not a dead-letter id", id.as_str()),
        )
    })?;
    let pool = ctx.data::<PgPool>()?;
    let result = if replay {
        dead_letters::replay(pool, n).await
    } else {
        dead_letters::discard(pool, n).await
    };
    match result {
        Ok(released) => Ok(DeadLetterResolution {
            id,
            status: if replay { "replayed" } else { "discarded" }.to_owned(),
            released: released as i64,
        }),
        Err(e @ dead_letters::ResolveError::NotOpen(_)) => {
            Err(error("BAD_USER_INPUT", e.to_string()))
        }
        Err(e @ dead_letters::ResolveError::StillFailing { .. }) => {
            Err(error("CONFLICT", e.to_string()))
        }
        Err(e) => {
            tracing::error!(error = %e, "resolving a dead letter failed");
            Err(error("INTERNAL", "the dead letter could not be resolved"))
        }
    }
}

pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// The order each time its read model changes (after the change commits), starting with
    /// its current state. Customers receive only their own orders' changes.
    async fn order_status_changed(
        &self,
        ctx: &Context<'_>,
        order_id: ID,
    ) -> async_graphql::Result<impl Stream<Item = Order> + use<>> {
        let who = principal(ctx)?.clone();
        let id = parse_id(&order_id)?;
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

/// What the GraphQL API needs: the read models' pool, the token verifier and, for `lag`, a
/// Kafka client on the order-events topic.
#[derive(Clone)]
pub struct GraphqlApi {
    pub pool: PgPool,
    pub auth: Authenticator,
    pub watermarks: Option<Watermarks>,
}

impl GraphqlApi {
    pub fn schema(&self) -> ShopSchema {
        let mut builder = Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
            .data(self.pool.clone())
            .data(StatusFeed::new(self.pool.clone()))
            .limit_depth(10)
            .limit_complexity(500);
        if let Some(w) = &self.watermarks {
            builder = builder.data(w.clone());
        }
        builder.finish()
    }

    /// `/graphql`, `/graphql/ws` and `/healthz` (readiness and metrics are on the ops listener).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/graphql", get(graphiql).post(graphql))
            .route("/graphql/ws", get(graphql_ws))
            .with_state(AppState {
                schema: self.schema(),
                auth: self.auth.clone(),
            })
            .merge(platform::ops::health_router())
    }
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
    // A missing or invalid token leaves the request anonymous; fields that need a caller
    // answer UNAUTHENTICATED.
    if let Some(p) = header_principal(&state.auth, &headers) {
        req = req.data(p);
    }
    state.schema.execute(req).await.into()
}

fn header_principal(auth: &Authenticator, headers: &HeaderMap) -> Option<Principal> {
    let header = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""));
    auth.verify_header(header).ok()
}

/// WebSocket subscriptions. The token comes from the upgrade request's `Authorization` header
/// or from `connection_init`'s payload (`{"Authorization": "Bearer ..."}`), as browsers cannot
/// set headers on a WebSocket; an invalid token in the payload refuses the connection.
async fn graphql_ws(
    State(state): State<AppState>,
    protocol: GraphQLProtocol,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let from_header = header_principal(&state.auth, &headers);
    let auth = state.auth.clone();
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |stream| {
            GraphQLWebSocket::new(stream, state.schema.clone(), protocol)
                .on_connection_init(move |payload| async move {
                    let mut data = Data::default();
                    let token = ["Authorization", "authorization"]
                        .iter()
                        .find_map(|k| payload.get(k).and_then(|v| v.as_str()));
                    match (token, from_header) {
                        (Some(t), _) => match auth.verify_header(Some(t)) {
                            Ok(p) => data.insert(p),
                            Err(_) => return Err("invalid bearer token".into()),
                        },
                        (None, Some(p)) => data.insert(p),
                        (None, None) => {}
                    }
                    Ok(data)
                })
                .serve()
        })
}

async fn graphiql() -> impl IntoResponse {
    Html(
        GraphiQLSource::build()
            .endpoint("/graphql")
            .subscription_endpoint("/graphql/ws")
            .finish(),
    )
}

/// `/graphql` plus the ops routes, without Kafka lag.
pub fn router(pool: PgPool, auth: Authenticator) -> Router {
    GraphqlApi {
        pool,
        auth,
        watermarks: None,
    }
    .router()
}

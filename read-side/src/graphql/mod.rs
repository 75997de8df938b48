//! GraphQL over the read models (async-graphql on axum): `POST /graphql`, a query console on
//! GET when enabled (`GRAPHQL_CONSOLE`), subscriptions over WebSocket (`graphql-transport-ws`) on `/graphql/ws`.
//!
//! Same bearer tokens as the command API (on WebSocket: `Authorization` in the upgrade request
//! or in the `connection_init` payload). A customer sees only their own orders (another
//! customer's order is `null`, so existence does not leak); operators see all, and only they
//! may read the audit trail, sales, analytics and projections or call mutations. Errors carry a stable
//! `extensions.code`: `UNAUTHENTICATED`, `FORBIDDEN`, `BAD_USER_INPUT`, `CONFLICT`, `INTERNAL`.
//!
//! This module assembles the schema from one root per model and serves it; each model's
//! types and resolvers live in its own module, and none of them holds SQL.
//!
//! # Layout
//! - [`orders`] answers `order`, `orders`, `checkoutProgress` and `orderStatusChanged`.
//! - [`sales`] answers `salesByProduct`.
//! - [`analytics`] answers `productAnalytics`, `activityWindows` and `liveAnalytics` (query
//!   and subscription).
//! - [`audit`] answers `auditTrail`.
//! - [`checkout`] answers `Order.checkout` and `checkoutChanged` (where the saga stands).
//! - [`operations`] answers `projections` and the mutations (rebuilds, dead letters).
//! - `access` and `errors` hold the caller and the error codes, shared by the resolvers.
//! - `socket` serves `/graphql/ws` within its limits.

use async_graphql::{MergedObject, MergedSubscription, Schema};
use async_graphql_axum::{GraphQLRequest, GraphQLResponse};
use axum::{
    Router,
    extract::State,
    http::{HeaderMap, header},
    response::{Html, IntoResponse},
    routing::{get, post},
};
use platform::{
    auth::{Authenticator, Principal},
    limits::{Admission, ApiLimits},
};
use sqlx::PgPool;

use crate::{notify::StatusFeed, status::Watermarks};

mod access;
pub mod analytics;
pub mod audit;
pub mod checkout;
mod errors;
pub mod limits;
pub mod operations;
pub mod orders;
pub mod sales;
mod socket;

pub use audit::{AuditEntry, AuditTrail};
pub use limits::GraphqlLimits;
pub use operations::{DeadLetterResolution, Projection, ProjectionState, RebuildProgress};
pub use orders::{
    CheckoutProgress, Item, Order, OrderConnection, OrderEdge, OrderStatus, PageInfo, TimelineEntry,
};
pub use sales::SalesBucket;

pub type ShopSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

// Every model's queries. The order of the parts is the order of the fields in the schema.
// Plain comments on the roots: a doc comment would become a description in the schema.
#[derive(MergedObject, Default)]
pub struct QueryRoot(
    orders::OrdersQuery,
    audit::AuditQuery,
    sales::SalesQuery,
    analytics::AnalyticsQuery,
    operations::OperationsQuery,
);

// Every model's mutations (only operations has any).
#[derive(MergedObject, Default)]
pub struct MutationRoot(operations::OperationsMutation);

// Every model's subscriptions.
#[derive(MergedSubscription, Default)]
pub struct SubscriptionRoot(
    orders::OrdersSubscription,
    checkout::CheckoutSubscription,
    analytics::AnalyticsSubscription,
);

/// What the GraphQL API needs: the read models' pool, the token verifier, its limits and,
/// for `lag`, a Kafka client on the order-events topic.
#[derive(Clone)]
pub struct GraphqlApi {
    pub pool: PgPool,
    pub auth: Authenticator,
    pub watermarks: Option<Watermarks>,
    pub limits: GraphqlLimits,
    /// Admission control ([`platform::limits`]) in front of `/graphql` and `/graphql/ws`.
    pub admission: Option<ApiLimits>,
}

impl GraphqlApi {
    pub fn schema(&self) -> ShopSchema {
        let mut builder = Schema::build(
            QueryRoot::default(),
            MutationRoot::default(),
            SubscriptionRoot::default(),
        )
        .data(self.pool.clone())
        .data(StatusFeed::new(self.pool.clone()))
        .data(limits::SubscriptionSlots::new(
            self.limits.max_subscriptions,
        ))
        .extension(limits::Bounds {
            max_fields: self.limits.max_fields,
            query_timeout: self.limits.query_timeout,
        })
        .limit_depth(10)
        .limit_complexity(self.limits.max_complexity);
        if let Some(w) = &self.watermarks {
            builder = builder.data(w.clone());
        }
        builder.finish()
    }

    /// `/graphql`, `/graphql/ws` and `/healthz` (readiness and metrics are on the ops
    /// listener). GET /graphql serves the query console only when it is enabled.
    pub fn router(&self) -> Router {
        let query = if self.limits.console {
            get(console).post(graphql)
        } else {
            post(graphql)
        };
        let mut api = Router::new()
            .route("/graphql", query)
            .route("/graphql/ws", get(socket::graphql_ws));
        if let Some(limits) = &self.admission {
            let admission = Admission::new("graphql", self.auth.clone(), limits);
            api = api.route_layer(axum::middleware::from_fn_with_state(
                admission,
                platform::limits::admit,
            ));
        }
        api.with_state(AppState {
            schema: self.schema(),
            auth: self.auth.clone(),
            limits: self.limits.clone(),
            sockets: socket::Sockets::new(&self.limits),
        })
        // Counted while the body streams in: a larger one is refused with 413 before it
        // is buffered (multipart included).
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            self.limits.max_body_bytes,
        ))
        .merge(platform::ops::health_router())
    }
}

#[derive(Clone)]
struct AppState {
    schema: ShopSchema,
    auth: Authenticator,
    limits: GraphqlLimits,
    sockets: socket::Sockets,
}

async fn graphql(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: GraphQLRequest,
) -> GraphQLResponse {
    let mut req = req.into_inner();
    // A missing or invalid token leaves the request anonymous; fields that need a caller
    // answer UNAUTHENTICATED. The document limit and the timeout are the schema's
    // (`limits::Bounds`), so they hold over WebSocket too.
    if let Some(p) = header_principal(&state.auth, &headers) {
        req = req.data(p);
    }
    state.schema.execute(req).await.into()
}

pub(crate) fn header_principal(auth: &Authenticator, headers: &HeaderMap) -> Option<Principal> {
    let header = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""));
    auth.verify_header(header).ok()
}

/// The query console: one page compiled into the binary, no external script.
async fn console() -> impl IntoResponse {
    (
        [(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
        )],
        Html(include_str!("console.html")),
    )
}

/// `/graphql` plus the ops routes, without Kafka lag, with the default limits.
pub fn router(pool: PgPool, auth: Authenticator) -> Router {
    GraphqlApi {
        pool,
        auth,
        watermarks: None,
        limits: GraphqlLimits::default(),
        admission: None,
    }
    .router()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema clients rely on, as SDL. A change to it shows here first: update
    /// `schema.graphql` only for an intended API change.
    #[test]
    fn the_schema_is_the_published_one() {
        let sdl = Schema::build(
            QueryRoot::default(),
            MutationRoot::default(),
            SubscriptionRoot::default(),
        )
        .finish()
        .sdl();
        assert_eq!(sdl, include_str!("schema.graphql"));
    }
}

//! GraphQL over the read models (async-graphql on axum): `POST /graphql`, GraphiQL on GET,
//! subscriptions over WebSocket (`graphql-transport-ws`) on `/graphql/ws`.
//!
//! Same bearer tokens as the command API (on WebSocket: `Authorization` in the upgrade request
//! or in the `connection_init` payload). A customer sees only their own orders (another
//! customer's order is `null`, so existence does not leak); operators see all, and only they
//! may read the audit trail, sales and projections or call mutations. Errors carry a stable
//! `extensions.code`: `UNAUTHENTICATED`, `FORBIDDEN`, `BAD_USER_INPUT`, `CONFLICT`, `INTERNAL`.
//!
//! This module assembles the schema from one root per model and serves it; each model's
//! types and resolvers live in its own module, and none of them holds SQL.
//!
//! # Layout
//! - [`orders`] answers `order`, `orders`, `checkoutProgress` and `orderStatusChanged`.
//! - [`sales`] answers `salesByProduct`.
//! - [`audit`] answers `auditTrail`.
//! - [`operations`] answers `projections` and the mutations (rebuilds, dead letters).
//! - `access` and `errors` hold the caller and the error codes, shared by the resolvers.

use async_graphql::{
    Data, MergedObject, MergedSubscription, Schema,
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
use platform::auth::{Authenticator, Principal};
use sqlx::PgPool;

use crate::{notify::StatusFeed, status::Watermarks};

mod access;
pub mod audit;
mod errors;
pub mod operations;
pub mod orders;
pub mod sales;

pub use audit::{AuditEntry, AuditTrail};
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
    operations::OperationsQuery,
);

// Every model's mutations (only operations has any).
#[derive(MergedObject, Default)]
pub struct MutationRoot(operations::OperationsMutation);

// Every model's subscriptions (only orders has any).
#[derive(MergedSubscription, Default)]
pub struct SubscriptionRoot(orders::OrdersSubscription);

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
        let mut builder = Schema::build(
            QueryRoot::default(),
            MutationRoot::default(),
            SubscriptionRoot::default(),
        )
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

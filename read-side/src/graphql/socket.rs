//! `/graphql/ws`: subscriptions (and any operation) over WebSocket, within limits of its own.
//!
//! Why separate from the HTTP limits: admission control sees only the upgrade request, after
//! which a socket is a standing cost that sends as many operations as it likes. So here: a
//! cap on open sockets (refused with 503 at the upgrade), a cap per principal (checked at
//! `connection_init`, where the token arrives), a message rate per socket (a fast client is
//! slowed down, nothing is dropped), a message size, and a lifetime bounded by the token's
//! expiry (or 10 s without a `connection_init`).

use std::{sync::Arc, time::Duration};

use async_graphql::{Data, http::ALL_WEBSOCKET_PROTOCOLS};
use async_graphql_axum::{GraphQLProtocol, GraphQLWebSocket};
use axum::{
    extract::{State, WebSocketUpgrade},
    http::{HeaderMap, StatusCode},
    response::Response,
};
use futures::StreamExt;
use platform::limits::{KeyedSlots, refusal, throttle};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{AppState, GraphqlLimits, header_principal};

/// How long a WebSocket may stay open without a successful `connection_init`.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The open sockets, in all and per principal; shared by every connection of the API.
#[derive(Clone)]
pub(super) struct Sockets {
    open: Arc<Semaphore>,
    per_caller: KeyedSlots,
}

impl Sockets {
    pub(super) fn new(limits: &GraphqlLimits) -> Self {
        Self {
            open: Arc::new(Semaphore::new(limits.max_sockets)),
            per_caller: KeyedSlots::new(limits.max_sockets_per_caller),
        }
    }

    fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.open.clone().try_acquire_owned().ok()
    }
}

/// The token comes from the upgrade request's `Authorization` header or from
/// `connection_init`'s payload (`{"Authorization": "Bearer ..."}`), as browsers cannot set
/// headers on a WebSocket; without a valid one, or when its principal already holds its
/// share of sockets, `connection_init` is refused. The connection is closed when the token
/// expires (a client reconnects with a fresh one).
pub(super) async fn graphql_ws(
    State(state): State<AppState>,
    protocol: GraphQLProtocol,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let Some(permit) = state.sockets.admit() else {
        metrics::counter!("http_refused_total", "api" => "graphql", "reason" => "sockets")
            .increment(1);
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the GraphQL API holds as many WebSocket connections as it may; retry shortly",
            Duration::from_secs(5),
        );
    };
    let from_header = header_principal(&state.auth, &headers);
    let auth = state.auth.clone();
    let per_caller = state.sockets.per_caller.clone();
    let max = state.limits.max_ws_message_bytes;
    let rate = state.limits.ws_messages_per_second;
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let _permit = permit;
            // When the accepted token expires; set by `connection_init`.
            let (expiry_tx, mut expiry) = tokio::sync::watch::channel(None::<i64>);
            let (sink, stream) = socket.split();
            let serve = GraphQLWebSocket::new_with_pair(
                sink,
                throttle(stream, rate),
                state.schema,
                protocol,
            )
            .on_connection_init(move |payload| async move {
                let token = ["Authorization", "authorization"]
                    .iter()
                    .find_map(|k| payload.get(k).and_then(|v| v.as_str()));
                let principal = match (token, from_header) {
                    (Some(t), _) => auth
                        .verify_header(Some(t))
                        .map_err(|_| async_graphql::Error::new("invalid bearer token"))?,
                    (None, Some(p)) => p,
                    (None, None) => {
                        return Err(async_graphql::Error::new(
                            "a bearer token is required in connection_init",
                        ));
                    }
                };
                let slot = per_caller.acquire(&principal.actor()).ok_or_else(|| {
                    async_graphql::Error::new(
                        "this caller holds as many WebSocket connections as it may",
                    )
                })?;
                expiry_tx.send_replace(Some(principal.expires_at));
                let mut data = Data::default();
                data.insert(principal);
                // Held by the connection's data: freed when the socket closes.
                data.insert(slot);
                Ok(data)
            })
            .serve();
            let expired = async move {
                let at = loop {
                    if let Some(at) = *expiry.borrow_and_update() {
                        break at;
                    }
                    match tokio::time::timeout(INIT_TIMEOUT, expiry.changed()).await {
                        Ok(Ok(())) => {}
                        // connection_init was refused: `serve` closes the socket itself.
                        Ok(Err(_)) => std::future::pending::<()>().await,
                        // No connection_init in time: an idle socket is closed.
                        Err(_) => return,
                    }
                };
                let left = at - chrono::Utc::now().timestamp();
                tokio::time::sleep(Duration::from_secs(left.max(0).unsigned_abs())).await;
            };
            tokio::select! {
                () = serve => {}
                () = expired => tracing::debug!("websocket closed: its token expired"),
            }
        })
}

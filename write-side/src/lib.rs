//! The command API: `POST /orders` (checkout), `POST /orders/{id}/cancel`, and the ingestion
//! of user activity (`POST /activity`).
//!
//! A request is authenticated, parsed into domain values, decided by the pure order aggregate,
//! and its events are appended with their outbox messages and the idempotency record in one
//! PostgreSQL transaction (checkouts share theirs with concurrent ones: group commit). Nothing on the command path talks to a broker.
//!
//! # Layout
//! - [`problem`]: every error as `application/problem+json` with a stable `type`.
//! - [`dto`]: request bodies and their conversion into domain commands.
//! - [`catalog`]: the shop's products and prices (a checkout names products, never prices).
//! - [`customers`]: customer profiles (`PUT|GET /customers/{id}`): where notifications go.
//! - [`commands`]: executing a command: a checkout through [`checkouts`] (decided in the
//!   request, group-committed with concurrent ones), a cancel in its own transaction
//!   (idempotency, the order stream's load, decide and append ([`orders`]), the record).
//! - [`idempotency`]: the stored responses of commands (`idempotency_keys`).
//! - [`activity`]: `POST /activity`, user activity produced straight to Kafka (telemetry
//!   decides nothing, so it skips the event store).
//! - [`http`]: routes, extractors, metrics; [`build`] binds and [`App::run`] serves.
#![forbid(unsafe_code)]

pub mod activity;
pub mod catalog;
pub mod checkouts;
pub mod commands;
pub mod customers;
pub mod dto;
pub mod http;
pub mod idempotency;
pub mod problem;

use std::net::SocketAddr;

use platform::auth::{AuthConfig, Authenticator};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct WriteSideConfig {
    /// Address the command API listens on.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Largest request body accepted, in bytes (larger ones get 413).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    #[command(flatten)]
    pub auth: AuthConfig,
}

impl Default for WriteSideConfig {
    fn default() -> Self {
        platform::config::defaults()
    }
}

/// A bound, not yet serving, command API (STYLE 11: `build` binds, `run` serves).
pub struct App {
    listener: tokio::net::TcpListener,
    router: axum::Router,
}

impl App {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves until `shutdown` is cancelled, then lets in-flight requests finish.
    pub async fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        tracing::info!(addr = %self.local_addr(), "command api listening");
        let header_timeout = platform::limits::ApiLimits::default().header_read_timeout;
        platform::server::serve(self.listener, self.router, shutdown, header_timeout).await
    }
}

/// Binds the command API; `auth` checks its bearer tokens.
pub async fn build(
    cfg: &WriteSideConfig,
    pool: PgPool,
    auth: Authenticator,
    vault: platform::vault::Vault,
) -> std::io::Result<App> {
    bind(cfg, http::AppState::new(pool, auth, vault)).await
}

/// Binds the command API over a prepared state (e.g. with activity ingestion).
pub async fn bind(cfg: &WriteSideConfig, state: http::AppState) -> std::io::Result<App> {
    let listener = tokio::net::TcpListener::bind(cfg.http_addr)
        .await
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("binding the command api to {}: {e}", cfg.http_addr),
            )
        })?;
    Ok(App {
        listener,
        router: http::router(state, cfg.max_body_bytes),
    })
}

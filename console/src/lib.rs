//! The operator console: `/console` on the ops listener of `shop run`.
//!
//! Why: every operator action used to be a CLI command or a GraphQL mutation, and finding why
//! one order is stuck meant knowing five places to look (read-side dead letters, the saga's
//! dead-letter queues, failed outbox rows, the saga's stream, the audit chain). The console
//! puts them on one page each, finds stuck orders in one search, and records every action it
//! takes (who, when, what, why) in `console_actions`.
//!
//! Pages are rendered on the server ([`maud`], escaped by construction) and work without
//! JavaScript. Operators sign in with an operator bearer token ([`session`]); the session
//! cookie is HttpOnly and SameSite=Strict (Secure with `CONSOLE_SECURE_COOKIE`), and every
//! POST carries the session's CSRF token. The console is a thin shell over the same library
//! calls as `shop dlq`, `shop outbox` and `shop audit`: it owns no other table than its
//! sessions, its action log and the audit verifications operators ask for ([`audit`], run
//! by the `audit-verifier` role).

pub mod actions;
pub mod audit;
mod checkpoints;
mod customers;
mod dead_letters;
mod error;
mod letters;
mod orders;
mod outbox;
mod overview;
mod pace;
mod projections;
mod sagas;
pub mod session;
mod stuck;
mod view;

use std::time::Duration;

use axum::{
    Router,
    http::{HeaderValue, header},
    routing::{get, post},
};
use platform::{auth::Authenticator, ops::Readiness};
use sqlx::PgPool;

pub use error::ConsoleError;
pub use letters::{Letter, LetterId, Source};
pub use stuck::{StuckOrder, stuck_orders};

/// The console's settings (flags of `shop run`).
#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleConfig {
    /// Marks the console's session cookie `Secure`: set it when the ops listener is reached
    /// through TLS (a proxy), so the browser never sends the cookie in clear.
    #[arg(long = "console-secure-cookie", env = "CONSOLE_SECURE_COOKIE")]
    pub secure_cookie: bool,
}

/// What the console's pages read and act on. Cheap to clone.
#[derive(Clone)]
pub struct Console {
    pub pool: PgPool,
    /// Checks the operator token at sign-in (the same keys as the API).
    pub auth: Authenticator,
    /// Where the saga's dead-letter queues are (none: this process has no saga settings).
    pub amqp: Option<Amqp>,
    /// The roles' health on the overview.
    pub readiness: Option<Readiness>,
    /// The order topic's high watermarks, for the projections' lag.
    pub watermarks: Option<read_side::status::Watermarks>,
    /// The saga's orchestrator, for an operator's *mark resolved* (none: this process runs no
    /// saga).
    pub saga: Option<saga::orchestrator::Orchestrator>,
    /// Where the `audit-checkpoints` role writes signed checkpoints (none: it writes none).
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// Sends an email recorded dead again (none: this process sends no email).
    pub mailer: Option<notifications::Mailer>,
    /// An order with no saga progress for this long is stuck (step timeout x attempts).
    pub stuck_after: Duration,
    pub secure_cookie: bool,
}

/// The saga's broker and queue names, for its dead letters.
#[derive(Clone)]
pub struct Amqp {
    pub url: String,
    pub names: saga::topology::Names,
}

impl Console {
    /// The console's routes, under `/console`.
    pub fn router(self) -> Router {
        Router::new()
            .route("/console", get(overview::page))
            .route("/console/", get(overview::page))
            .route(
                "/console/sign-in",
                get(session::sign_in_page).post(session::sign_in),
            )
            .route("/console/sign-out", post(session::sign_out))
            .route("/console/console.css", get(view::stylesheet))
            .route("/console/dead-letters", get(dead_letters::list))
            .route(
                "/console/dead-letters/replay",
                post(dead_letters::replay_selection),
            )
            .route(
                "/console/dead-letters/{source}/{id}",
                get(dead_letters::show),
            )
            .route(
                "/console/dead-letters/{source}/{id}/{action}",
                post(dead_letters::act),
            )
            .route("/console/orders", get(orders::search))
            .route("/console/orders/stuck", get(stuck::page))
            .route("/console/orders/{id}", get(orders::page))
            .route("/console/customers/{id}", get(customers::page))
            .route("/console/projections", get(projections::page))
            .route(
                "/console/projections/{name}/{action}",
                post(projections::act),
            )
            .route("/console/outbox", get(outbox::page))
            .route("/console/sagas", get(sagas::page))
            .route("/console/sagas/{order}/{action}", post(sagas::act))
            .route("/console/activity", get(actions::page))
            .route("/console/audit", get(audit::page))
            .route("/console/audit/verify", post(audit::start))
            .route(
                "/console/audit/checkpoints",
                get(checkpoints::page).post(checkpoints::compare),
            )
            .layer(axum::middleware::map_response(harden))
            .with_state(self)
    }
}

/// Headers every console answer carries: no framing (clickjacking), nothing from elsewhere
/// (no CDN, no inline script), no caching of operator data, no referrer to other sites.
async fn harden(mut res: axum::response::Response) -> axum::response::Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

//! Operational endpoints: `/healthz`, `/readyz`, `/metrics`.
//!
//! `/readyz` and `/metrics` belong on the ops listener (loopback by default): they tell an
//! outsider what runs and how loaded it is. Public listeners merge only [`health_router`].
//! `/healthz` says the process is alive (always 200 while it can answer). `/readyz` runs the
//! service's named dependency checks and answers 503 with the failing ones when any fails, so a
//! load balancer stops sending work while, say, PostgreSQL is unreachable. `/metrics` renders
//! the process-wide Prometheus recorder that every crate writes to through the `metrics` macros.

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use futures::future::{BoxFuture, join_all};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use anyhow::Context;

use crate::supervisor::{RoleCtx, Roles};

type CheckFn = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Where the ops listener (`/healthz`, `/readyz`, `/metrics`) listens, and how long a role
/// may be down before `/readyz` answers 503.
#[derive(Debug, Clone, clap::Args)]
pub struct OpsConfig {
    /// Address of the ops listener: `/readyz` (every role), `/metrics`, `/healthz`. Keep it
    /// on loopback or a private network.
    #[arg(
        id = "ops_addr",
        long = "ops-addr",
        env = "OPS_ADDR",
        default_value = "127.0.0.1:9090"
    )]
    pub addr: SocketAddr,
    /// How long a role that was up may be restarting before `/readyz` answers 503.
    #[arg(id = "ops_ready_grace", long = "ops-ready-grace", env = "READY_GRACE", default_value = "10s", value_parser = crate::config::parse_duration)]
    pub ready_grace: Duration,
}

/// How long one readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The named checks `/readyz` runs. Cheap to clone.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<(&'static str, CheckFn)>,
    roles: Option<(Roles, Duration)>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check; it fails when the future returns `Err` or takes longer than 2 s.
    pub fn check<F, Fut>(mut self, name: &'static str, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks.push((name, Arc::new(move || Box::pin(f()))));
        self
    }

    /// Ready while the pool can run `SELECT 1`.
    pub fn postgres(self, pool: sqlx::PgPool) -> Self {
        self.check("postgres", move || {
            let pool = pool.clone();
            async move {
                sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
    }

    /// Ready while a worker says so (e.g. the relay while its broker connection is up).
    pub fn flag(self, name: &'static str, flag: Arc<AtomicBool>) -> Self {
        self.check(name, move || {
            let up = flag.load(Ordering::Relaxed);
            async move { if up { Ok(()) } else { Err("not ready".into()) } }
        })
    }

    /// Also requires every supervised role to be up (or restarting for less than `grace`).
    pub fn roles(mut self, roles: Roles, grace: Duration) -> Self {
        self.roles = Some((roles, grace));
        self
    }

    /// Runs every check concurrently; returns whether all passed and a per-check report.
    pub async fn report(&self) -> (bool, serde_json::Value) {
        self.report_only(None).await
    }

    /// Like [`Self::report`], limited to the named checks and roles when `only` is given
    /// (`/readyz?only=command-api,postgres`: what a load balancer in front of the command API
    /// needs, which keeps taking checkouts into the outbox while a broker is down).
    pub async fn report_only(&self, only: Option<&[&str]>) -> (bool, serde_json::Value) {
        let wanted = |name: &str| only.is_none_or(|only| only.contains(&name));
        let checks = self.checks.iter().filter(|(name, _)| wanted(name));
        let results = join_all(checks.map(|(name, f)| async move {
            let r = match tokio::time::timeout(CHECK_TIMEOUT, f()).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            };
            (*name, r)
        }))
        .await;
        let mut ready = results.iter().all(|(_, r)| r.is_ok());
        let checks: serde_json::Map<_, _> = results
            .into_iter()
            .map(|(name, r)| {
                let v = match r {
                    Ok(()) => json!({"status": "up"}),
                    Err(e) => json!({"status": "down", "error": e}),
                };
                (name.to_owned(), v)
            })
            .collect();
        let mut body = json!({"checks": checks});
        if let Some((roles, grace)) = &self.roles {
            let (roles_ready, report) = roles.report(*grace, only);
            ready &= roles_ready;
            body["roles"] = report["roles"].clone();
            body["role_details"] = report["role_details"].clone();
        }
        body["ready"] = json!(ready);
        body["status"] = json!(if ready { "ready" } else { "degraded" });
        (ready, body)
    }
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is already global; then ours renders nothing,
            // which `/metrics` makes visible rather than crashing the service.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}

/// `/healthz` alone: what a public listener (command API, GraphQL) exposes.
pub fn health_router() -> Router {
    Router::new().route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
}

/// Routes for `/healthz`, `/readyz` and `/metrics`: the ops listener (loopback by default).
pub fn router(readiness: Readiness) -> Router {
    let handle = metrics_handle();
    health_router()
        .route("/readyz", get(readyz).with_state(readiness))
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move {
                    handle.run_upkeep();
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        handle.render(),
                    )
                }
            }),
        )
}

/// Binds `addr` and serves `router` as a supervised role until shutdown. A port already
/// taken is a permanent failure (the process stops with the address in the message).
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    header_read_timeout: Duration,
    ctx: RoleCtx,
) -> anyhow::Result<()> {
    // A taken port or an address that is not ours will not heal by itself.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {} to {addr} (port taken?)", ctx.name()))
        .map_err(crate::errors::permanent)?;
    tracing::info!(role = ctx.name(), %addr, "listening");
    ctx.up();
    crate::server::serve(
        listener,
        router,
        ctx.shutdown().clone(),
        header_read_timeout,
    )
    .await
    .with_context(|| format!("serving {} on {addr}", ctx.name()))
}

#[derive(serde::Deserialize)]
struct ReadyQuery {
    /// Comma-separated check and role names to consider (all when absent).
    only: Option<String>,
}

async fn readyz(
    State(readiness): State<Readiness>,
    axum::extract::Query(q): axum::extract::Query<ReadyQuery>,
) -> impl IntoResponse {
    let only: Option<Vec<&str>> = q
        .only
        .as_deref()
        .map(|o| o.split(',').map(str::trim).collect());
    let (ready, body) = readiness.report_only(only.as_deref()).await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_fails_when_any_check_fails() {
        let flag = Arc::new(AtomicBool::new(true));
        let r = Readiness::new()
            .flag("broker", flag.clone())
            .check("ok", || async { Ok(()) });
        assert!(r.report().await.0);
        flag.store(false, Ordering::Relaxed);
        let (ready, body) = r.report().await;
        assert!(!ready);
        assert_eq!(body["checks"]["broker"]["status"], "down");
        assert_eq!(body["checks"]["ok"]["status"], "up");
    }

    #[test]
    fn metrics_are_rendered() {
        let handle = metrics_handle();
        metrics::counter!("platform_test_total").increment(3);
        assert!(handle.render().contains("platform_test_total 3"));
    }
}

//! The supervision tree of a process: named roles, restarted when they fail transiently, the
//! whole process stopped when one fails permanently.
//!
//! Why: a spawned task whose error is only seen when someone awaits its handle at shutdown is
//! a silent failure (the first wave lost its read side to a Kafka restart that way). Here every
//! long-running role (command API, GraphQL, relay, each projector, the saga's orchestrator and
//! participants, ...) runs under [`Supervisor::spawn`]:
//! - a role that returns an error classified transient ([`crate::errors`]), returns `Ok`
//!   while nobody asked it to stop, or panics, is logged with its full error chain, counted
//!   (`shop_role_restarts_total{role}`) and started again after a capped exponential backoff
//!   with jitter (reset once it has stayed up for a while);
//! - a permanent error cancels the process's shutdown token, so every role stops, and
//!   [`Supervisor::wait`] returns the error: the binary exits non-zero with a clear message,
//!   never half alive;
//! - each role says when it is up ([`RoleCtx::up`]); [`Roles::report`] is what `/readyz`
//!   shows, and `shop_role_up{role}` is the same in `/metrics`.
//!
//! Shutdown: roles `select!` on [`RoleCtx::shutdown`]; after the token is cancelled they get
//! [`Supervisor::with_stop_timeout`] to finish, then are aborted and reported.

use std::{
    collections::BTreeMap,
    future::Future,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::FutureExt;
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::errors::{ErrorClass, classify};

/// How long a role must stay up before its backoff starts again from the minimum.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Where a role is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Started, not yet up (connecting, declaring, binding).
    Starting,
    Up,
    /// Failed; waiting for its backoff before it starts again.
    Restarting,
    /// Stopped because the process is shutting down.
    Stopped,
    /// Failed permanently; the process is stopping.
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Up => "up",
            Self::Restarting => "restarting",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone)]
struct RoleState {
    status: Status,
    since: Instant,
    /// Start of the current outage: set when the role stops being up, cleared only once it
    /// has been up again for the readiness grace. A role that crash-loops (up for a moment,
    /// down again) therefore stays in one outage instead of looking freshly healthy.
    down_since: Option<Instant>,
    restarts: u64,
    last_error: Option<String>,
}

impl RoleState {
    /// Ready while up (and not just back from an outage), or early in an outage that
    /// followed a time up (a broker blip should not flap a load balancer).
    fn ready(&mut self, grace: Duration) -> bool {
        let up = self.status == Status::Up;
        if up && self.since.elapsed() >= grace {
            self.down_since = None;
        }
        match self.down_since {
            None => up,
            Some(t) => t.elapsed() < grace,
        }
    }
}

/// The roles of a process and their states. Cheap to clone; shared with `/readyz`.
#[derive(Clone, Default)]
pub struct Roles(Arc<Mutex<BTreeMap<String, RoleState>>>);

impl Roles {
    fn set(&self, role: &str, status: Status, error: Option<String>) {
        let mut roles = self.0.lock().expect("roles lock");
        let state = roles.entry(role.to_owned()).or_insert(RoleState {
            status,
            since: Instant::now(),
            down_since: None,
            restarts: 0,
            last_error: None,
        });
        if state.status != status {
            state.since = Instant::now();
        }
        if status != Status::Up && state.status == Status::Up && state.down_since.is_none() {
            state.down_since = Some(Instant::now());
        }
        state.status = status;
        if error.is_some() {
            state.last_error = error;
        }
        metrics::gauge!("shop_role_up", "role" => role.to_owned()).set(if status == Status::Up {
            1.0
        } else {
            0.0
        });
    }

    fn count_restart(&self, role: &str) {
        if let Some(state) = self.0.lock().expect("roles lock").get_mut(role) {
            state.restarts += 1;
        }
        metrics::counter!("shop_role_restarts_total", "role" => role.to_owned()).increment(1);
    }

    /// The status of one role, if it exists.
    pub fn status(&self, role: &str) -> Option<Status> {
        self.0
            .lock()
            .expect("roles lock")
            .get(role)
            .map(|s| s.status)
    }

    /// Whether every role (or, with `only`, every named one) is ready, and the per-role
    /// report. See [`RoleState::ready`] for what ready means.
    pub fn report(&self, grace: Duration, only: Option<&[&str]>) -> (bool, serde_json::Value) {
        let mut roles = self.0.lock().expect("roles lock");
        let mut ready = !roles.is_empty();
        let mut statuses = serde_json::Map::new();
        let mut details = serde_json::Map::new();
        for (name, s) in roles.iter_mut() {
            if only.is_some_and(|only| !only.contains(&name.as_str())) {
                continue;
            }
            ready &= s.ready(grace);
            statuses.insert(name.clone(), json!(s.status.as_str()));
            details.insert(
                name.clone(),
                json!({
                    "status": s.status.as_str(),
                    "for_seconds": s.since.elapsed().as_secs(),
                    "restarts": s.restarts,
                    "last_error": s.last_error,
                }),
            );
        }
        (ready, json!({ "roles": statuses, "role_details": details }))
    }
}

/// What a role gets each time it is started.
#[derive(Clone)]
pub struct RoleCtx {
    name: Arc<str>,
    roles: Roles,
    shutdown: CancellationToken,
}

impl RoleCtx {
    /// Marks the role up (connected, bound, consuming). Call it again after a reconnect
    /// inside the role, if the role reconnects by itself.
    pub fn up(&self) {
        if self.roles.status(&self.name) != Some(Status::Up) {
            tracing::info!(role = %self.name, "role up");
        }
        self.roles.set(&self.name, Status::Up, None);
    }

    /// Marks the role as having lost a service it keeps retrying by itself (not restarted).
    pub fn down(&self, error: &str) {
        if self.roles.status(&self.name) == Some(Status::Up) {
            tracing::warn!(role = %self.name, error, "role lost a service; retrying");
        }
        self.roles
            .set(&self.name, Status::Restarting, Some(error.to_owned()));
    }

    /// The process's shutdown token: the role stops taking work when it is cancelled.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Runs named roles until shutdown or the first permanent failure.
pub struct Supervisor {
    shutdown: CancellationToken,
    roles: Roles,
    tasks: JoinSet<(String, anyhow::Result<()>)>,
    backoff: ExponentialBuilder,
    stop_timeout: Duration,
}

impl Supervisor {
    /// A supervisor whose roles stop when `shutdown` is cancelled (and which cancels it on a
    /// permanent failure).
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            roles: Roles::default(),
            tasks: JoinSet::new(),
            // Jitter adds up to the delay again: restarts wait 0.25 s .. 20 s.
            backoff: ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(250))
                .with_max_delay(Duration::from_secs(10))
                .with_jitter()
                .without_max_times(),
            stop_timeout: Duration::from_secs(30),
        }
    }

    /// Restart delays between `min` and `max` (tests use short ones).
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = self.backoff.with_min_delay(min).with_max_delay(max);
        self
    }

    /// How long roles get to finish after shutdown before they are aborted.
    pub fn with_stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    pub fn roles(&self) -> Roles {
        self.roles.clone()
    }

    pub fn shutdown(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Starts the role `name`: `start` is called for each (re)start with a fresh context.
    pub fn spawn<F, Fut>(&mut self, name: impl Into<String>, start: F)
    where
        F: FnMut(RoleCtx) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let name = name.into();
        self.roles.set(&name, Status::Starting, None);
        metrics::counter!("shop_role_restarts_total", "role" => name.clone()).absolute(0);
        let ctx = RoleCtx {
            name: name.as_str().into(),
            roles: self.roles.clone(),
            shutdown: self.shutdown.clone(),
        };
        let backoff = self.backoff;
        self.tasks.spawn(async move {
            let result = supervise(ctx, backoff, start).await;
            (name, result)
        });
    }

    /// Waits until every role has stopped. `Err` when a role failed permanently (or did not
    /// stop within the stop timeout): the caller exits non-zero.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut failure: Option<anyhow::Error> = None;
        let (shutdown, stop_timeout) = (self.shutdown.clone(), self.stop_timeout);
        let deadline = async move {
            shutdown.cancelled().await;
            tokio::time::sleep(stop_timeout).await;
        };
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                joined = self.tasks.join_next() => match joined {
                    None => break,
                    Some(Ok((_, Ok(())))) => {}
                    Some(Ok((name, Err(e)))) => {
                        self.shutdown.cancel();
                        failure.get_or_insert(e.context(format!("role {name} failed")));
                    }
                    Some(Err(e)) => {
                        self.shutdown.cancel();
                        failure.get_or_insert(anyhow::anyhow!("a supervised task was lost: {e}"));
                    }
                },
                _ = &mut deadline => {
                    let stuck: Vec<String> = self.roles.0.lock().expect("roles lock").iter()
                        .filter(|(_, s)| s.status != Status::Stopped && s.status != Status::Failed)
                        .map(|(n, _)| n.clone()).collect();
                    tracing::error!(?stuck, timeout = ?self.stop_timeout, "roles did not stop in time; aborting them");
                    self.tasks.shutdown().await;
                    failure.get_or_insert(anyhow::anyhow!("roles did not stop within {:?}: {}", self.stop_timeout, stuck.join(", ")));
                    break;
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// One role's life: start, watch, classify, back off, start again.
async fn supervise<F, Fut>(
    ctx: RoleCtx,
    backoff: ExponentialBuilder,
    mut start: F,
) -> anyhow::Result<()>
where
    F: FnMut(RoleCtx) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let role = ctx.name.clone();
    let mut delays = backoff.build();
    let mut first = true;
    loop {
        tracing::info!(%role, "role starting");
        // After a failure the role shows as restarting until it is up again.
        if first {
            ctx.roles.set(&role, Status::Starting, None);
            first = false;
        }
        let started = Instant::now();
        let outcome = AssertUnwindSafe(start(ctx.clone())).catch_unwind().await;
        if ctx.shutdown.is_cancelled() {
            if let Ok(Err(e)) = &outcome {
                tracing::warn!(%role, error = format!("{e:#}"), "role ended with an error while stopping");
            }
            ctx.roles.set(&role, Status::Stopped, None);
            tracing::info!(%role, "role stopped");
            return Ok(());
        }
        let (error, class) = match outcome {
            Ok(Ok(())) => (
                anyhow::anyhow!("the role returned although nobody asked it to stop"),
                ErrorClass::Transient,
            ),
            Ok(Err(e)) => {
                let class = classify(&e);
                (e, class)
            }
            Err(panic) => (
                anyhow::anyhow!("panicked: {}", panic_message(&*panic)),
                ErrorClass::Transient,
            ),
        };
        let chain = format!("{error:#}");
        if class == ErrorClass::Permanent {
            tracing::error!(%role, error = chain, "role failed permanently; stopping the process");
            ctx.roles.set(&role, Status::Failed, Some(chain));
            ctx.shutdown.cancel();
            return Err(error);
        }
        if started.elapsed() >= STABLE_AFTER {
            delays = backoff.build();
        }
        let wait = delays.next().unwrap_or(Duration::from_secs(30));
        ctx.roles.count_restart(&role);
        tracing::warn!(%role, class = class.as_str(), error = chain, retry_in = ?wait, "role failed; restarting");
        ctx.roles.set(&role, Status::Restarting, Some(chain));
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {
                ctx.roles.set(&role, Status::Stopped, None);
                return Ok(());
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick(shutdown: CancellationToken) -> Supervisor {
        Supervisor::new(shutdown)
            .with_backoff(Duration::from_millis(1), Duration::from_millis(5))
            .with_stop_timeout(Duration::from_secs(5))
    }

    #[tokio::test]
    async fn transient_failures_and_panics_restart_the_role() {
        let shutdown = CancellationToken::new();
        let mut sup = quick(shutdown.clone());
        let starts = Arc::new(AtomicU32::new(0));
        let counted = starts.clone();
        sup.spawn("flaky", move |ctx| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => anyhow::bail!(sqlx::Error::PoolTimedOut),
                    1 => panic!("boom"),
                    2 => Ok(()),
                    _ => {
                        ctx.up();
                        ctx.shutdown().cancelled().await;
                        Ok(())
                    }
                }
            }
        });
        let roles = sup.roles();
        let waiting = tokio::spawn(sup.wait());
        while roles.status("flaky") != Some(Status::Up) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(starts.load(Ordering::SeqCst), 4);
        let (ready, body) = roles.report(Duration::ZERO, None);
        assert!(ready);
        assert_eq!(body["role_details"]["flaky"]["restarts"], 3);
        assert!(
            body["role_details"]["flaky"]["last_error"]
                .as_str()
                .unwrap()
                .contains("nobody asked")
        );
        shutdown.cancel();
        waiting.await.unwrap().unwrap();
        assert_eq!(roles.status("flaky"), Some(Status::Stopped));
    }

    #[tokio::test]
    async fn a_permanent_failure_stops_every_role_and_is_returned() {
        let shutdown = CancellationToken::new();
        let mut sup = quick(shutdown.clone());
        sup.spawn("steady", |ctx| async move {
            ctx.up();
            ctx.shutdown().cancelled().await;
            Ok(())
        });
        sup.spawn("misconfigured", |_| async {
            Err(crate::errors::permanent(anyhow::anyhow!(
                "JWT_SECRET is too short"
            )))
        });
        let roles = sup.roles();
        let err = sup.wait().await.unwrap_err();
        assert!(format!("{err:#}").contains("JWT_SECRET"), "{err:#}");
        assert!(shutdown.is_cancelled());
        assert_eq!(roles.status("misconfigured"), Some(Status::Failed));
        assert_eq!(roles.status("steady"), Some(Status::Stopped));
        assert!(!roles.report(Duration::from_secs(60), None).0);
    }

    #[tokio::test]
    async fn readiness_waits_for_every_role_and_tolerates_a_short_blip() {
        let roles = Roles::default();
        roles.set("a", Status::Starting, None);
        roles.set("b", Status::Up, None);
        assert!(
            !roles.report(Duration::from_secs(60), None).0,
            "a never came up"
        );
        roles.set("a", Status::Up, None);
        assert!(roles.report(Duration::from_secs(60), None).0);
        roles.set("a", Status::Restarting, Some("kafka down".into()));
        assert!(
            roles.report(Duration::from_secs(60), None).0,
            "within the grace"
        );
        let (ready, body) = roles.report(Duration::ZERO, None);
        assert!(!ready, "past the grace");
        assert_eq!(body["roles"]["a"], "restarting");
        assert!(
            roles.report(Duration::ZERO, Some(&["b"])).0,
            "b alone is ready"
        );
        // Up for a moment then down again: still the same outage, past its grace.
        let grace = Duration::from_millis(50);
        std::thread::sleep(grace);
        roles.set("a", Status::Up, None);
        assert!(!roles.report(grace, None).0, "just back from a long outage");
        roles.set("a", Status::Restarting, None);
        assert!(!roles.report(grace, None).0, "a crash loop is not ready");
        roles.set("a", Status::Up, None);
        std::thread::sleep(grace);
        assert!(
            roles.report(grace, None).0,
            "up for the grace: healthy again"
        );
        roles.set("a", Status::Restarting, None);
        assert!(
            roles.report(grace, None).0,
            "a new outage starts its own grace"
        );
    }

    #[tokio::test]
    async fn a_role_that_ignores_shutdown_is_aborted_and_reported() {
        let shutdown = CancellationToken::new();
        let mut sup = quick(shutdown.clone()).with_stop_timeout(Duration::from_millis(50));
        sup.spawn("stubborn", |ctx| async move {
            ctx.up();
            std::future::pending::<()>().await;
            Ok(())
        });
        shutdown.cancel();
        let err = sup.wait().await.unwrap_err();
        assert!(err.to_string().contains("stubborn"), "{err}");
    }
}

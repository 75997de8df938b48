//! Admission control for the public APIs (command API and GraphQL): how many requests are
//! served at once, how fast one caller may send them, and how long one may take.
//!
//! Why in front of the handlers: a flood must be refused before it costs a database
//! connection. Over the concurrency limit a request is refused at once with 503 and
//! `Retry-After` (queueing would only turn overload into timeouts); over a caller's rate it
//! gets 429 with `Retry-After`; past the timeout, 503. A caller is the bearer token's
//! `role:subject`, so many tokens of one customer share one budget; requests without a valid
//! token share one budget per client address (`anonymous:<ip>`, an IPv6 address by its /64:
//! only `POST /activity` serves them, the other handlers refuse them), and all anonymous
//! callers together hold at most `MAX_CONCURRENT_ANONYMOUS` permits.
//!
//! One caller may also hold only a share of the concurrency limit
//! (`MAX_CONCURRENT_PER_CALLER`): a request whose body trickles in holds its permit until
//! the timeout, so without a share a few hundred slow uploads from one token (or from
//! anonymous clients of one address, who share one budget) would lock every other caller out.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use tokio::sync::Semaphore;

use crate::auth::Authenticator;

/// The limits of one API, each configurable (docs/security.md lists the defaults).
#[derive(Debug, Clone, clap::Args)]
pub struct ApiLimits {
    /// Longest a request to the command API or GraphQL may take before it is answered 503.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "15s", value_parser = crate::config::parse_duration)]
    pub request_timeout: Duration,
    /// Longest a client may take to send a request's headers (every listener) before it is
    /// disconnected.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = crate::config::parse_duration)]
    pub header_read_timeout: Duration,
    /// Requests each public API serves at once; more are refused with 503 and Retry-After.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrent_requests: u32,
    /// Of those, how many one caller may hold at once (anonymous requests from one address
    /// count as one caller); more are refused with 429 and Retry-After.
    #[arg(long, env = "MAX_CONCURRENT_PER_CALLER", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrent_per_caller: u32,
    /// Of those, how many all anonymous callers together may hold at once (so slow uploads
    /// from many addresses cannot hold every permit); more are refused with 429.
    #[arg(long, env = "MAX_CONCURRENT_ANONYMOUS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrent_anonymous: u32,
    /// Requests per second one caller may send to each public API, sustained.
    #[arg(long, env = "RATE_LIMIT_PER_SECOND", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_per_second: u32,
    /// Requests one caller may send at once above the sustained rate.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_burst: u32,
}

impl Default for ApiLimits {
    fn default() -> Self {
        crate::config::defaults()
    }
}

type Limiter =
    RateLimiter<String, governor::state::keyed::DefaultKeyedStateStore<String>, DefaultClock>;

/// The shared state of one API's admission control; [`admit`] is its middleware.
#[derive(Clone)]
pub struct Admission {
    api: &'static str,
    auth: Authenticator,
    in_flight: Arc<Semaphore>,
    per_caller: KeyedSlots,
    /// All anonymous callers together (one key).
    anonymous: KeyedSlots,
    limiter: Arc<Limiter>,
    checks: Arc<AtomicU64>,
    timeout: Duration,
}

/// How often (in checks) idle callers are dropped from the rate limiter's memory.
const PRUNE_EVERY: u64 = 10_000;

impl Admission {
    pub fn new(api: &'static str, auth: Authenticator, limits: &ApiLimits) -> Self {
        let nz = |n: u32| NonZeroU32::new(n.max(1)).expect("at least 1");
        let quota = Quota::per_second(nz(limits.rate_limit_per_second))
            .allow_burst(nz(limits.rate_limit_burst));
        Self {
            api,
            auth,
            in_flight: Arc::new(Semaphore::new(limits.max_concurrent_requests as usize)),
            per_caller: KeyedSlots::new(limits.max_concurrent_per_caller as usize),
            anonymous: KeyedSlots::new(limits.max_concurrent_anonymous as usize),
            limiter: Arc::new(RateLimiter::keyed(quota)),
            checks: Arc::default(),
            timeout: limits.request_timeout,
        }
    }

    /// The caller's budget key: `role:subject` of a valid token, else `anonymous:<address>`
    /// of the peer (anonymous visitors send activity; one address must not starve the rest).
    fn caller(&self, req: &Request) -> String {
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match self.auth.verify_header(header) {
            Ok(p) => p.actor(),
            Err(_) => match req
                .extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            {
                Some(peer) => format!("anonymous:{}", network(peer.0.ip())),
                None => "anonymous".into(),
            },
        }
    }
}

/// The middleware: concurrency, then the caller's rate, then the timeout around the handler.
/// Install with `axum::middleware::from_fn_with_state(admission, admit)`.
pub async fn admit(State(a): State<Admission>, req: Request, next: Next) -> Response {
    let Ok(_permit) = a.in_flight.clone().try_acquire_owned() else {
        metrics::counter!("http_refused_total", "api" => a.api, "reason" => "overloaded")
            .increment(1);
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the service is at its concurrency limit; retry shortly",
            Duration::from_secs(1),
        );
    };
    let caller = a.caller(&req);
    if let Err(not_until) = a.limiter.check_key(&caller) {
        metrics::counter!("http_refused_total", "api" => a.api, "reason" => "rate_limited")
            .increment(1);
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        return refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "too many requests from this caller; retry after the delay in Retry-After",
            wait,
        );
    }
    let Some(_slot) = a.per_caller.acquire(&caller) else {
        metrics::counter!("http_refused_total", "api" => a.api, "reason" => "caller_concurrency")
            .increment(1);
        return refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-in-flight",
            "this caller already has as many requests in flight as it may; retry when one ends",
            Duration::from_secs(1),
        );
    };
    let _anonymous = match caller.starts_with("anonymous") {
        true => match a.anonymous.acquire("anonymous") {
            Some(slot) => Some(slot),
            None => {
                metrics::counter!("http_refused_total", "api" => a.api, "reason" => "anonymous_concurrency")
                    .increment(1);
                return refusal(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too-many-in-flight",
                    "anonymous callers already have as many requests in flight as they may; retry shortly",
                    Duration::from_secs(1),
                );
            }
        },
        false => None,
    };
    if a.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
        a.limiter.retain_recent();
    }
    match tokio::time::timeout(a.timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("http_refused_total", "api" => a.api, "reason" => "timeout")
                .increment(1);
            refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "the request took longer than the service allows and was abandoned",
                Duration::from_secs(1),
            )
        }
    }
}

/// The budget key of an address: itself for IPv4, its /64 for IPv6 (one subscriber usually
/// holds a whole /64, and could otherwise use a new address per request).
pub fn network(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        std::net::IpAddr::V6(v6) => std::net::IpAddr::V4(v6.to_ipv4_mapped().expect("mapped")),
        v4 => v4,
    }
}

/// Per-key counters with a cap: how many of something (requests in flight, subscriptions,
/// sockets) each caller holds. Cloning shares the counters.
#[derive(Clone, Default)]
pub struct KeyedSlots {
    open: Arc<Mutex<HashMap<String, usize>>>,
    max: usize,
}

/// One held slot; dropping it frees it.
pub struct Slot {
    open: Arc<Mutex<HashMap<String, usize>>>,
    who: String,
}

impl KeyedSlots {
    pub fn new(max: usize) -> Self {
        Self {
            open: Arc::default(),
            max,
        }
    }

    /// A slot for `who`, or `None` when it already holds the maximum.
    pub fn acquire(&self, who: &str) -> Option<Slot> {
        let mut open = self.open.lock().expect("slots lock");
        let held = open.get(who).copied().unwrap_or(0);
        if held >= self.max {
            return None;
        }
        open.insert(who.to_owned(), held + 1);
        Some(Slot {
            open: self.open.clone(),
            who: who.to_owned(),
        })
    }

    /// How many slots `who` holds now.
    pub fn held(&self, who: &str) -> usize {
        let open = self.open.lock().expect("slots lock");
        open.get(who).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("slots lock");
        if let Some(n) = open.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.who);
            }
        }
    }
}

/// `stream`, slowed to `per_second` items a second (a burst of as many again is let
/// through): a fast sender waits, nothing is dropped. For streams a client feeds, such as a
/// WebSocket's messages, which the request-level limits above do not see.
pub fn throttle<S: futures::Stream>(
    stream: S,
    per_second: u32,
) -> impl futures::Stream<Item = S::Item> {
    use futures::StreamExt;
    let n = NonZeroU32::new(per_second.max(1)).expect("at least 1");
    let limiter = Arc::new(RateLimiter::direct(Quota::per_second(n)));
    stream.then(move |item| {
        let limiter = limiter.clone();
        async move {
            limiter.until_ready().await;
            item
        }
    })
}

/// An `application/problem+json` refusal with `Retry-After` (whole seconds, at least 1).
pub fn refusal(status: StatusCode, kind: &str, detail: &str, retry_after: Duration) -> Response {
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    let body = serde_json::json!({
        "type": format!("/problems/{kind}"),
        "title": status.canonical_reason().unwrap_or("refused"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    response
}

#[cfg(test)]
mod tests {
    use axum::{Router, body::Body, routing::get};
    use tower::ServiceExt;

    use super::*;
    use crate::auth::Role;

    #[test]
    fn anonymous_budgets_are_per_ipv4_address_and_per_ipv6_64() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(network(ip("203.0.113.7")), ip("203.0.113.7"));
        assert_eq!(network(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(network(ip("2001:db8:1:2:bbbb::9")), ip("2001:db8:1:2::"));
        assert_ne!(network(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(network(ip("::ffff:203.0.113.7")), ip("203.0.113.7"));
    }

    fn app(limits: ApiLimits, auth: &Authenticator) -> Router {
        let admission = Admission::new("test", auth.clone(), &limits);
        Router::new()
            .route(
                "/",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "ok"
                }),
            )
            .route("/fast", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(admission, admit))
    }

    fn request(path: &str, token: Option<&str>) -> Request {
        let mut b = Request::builder().uri(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Body::empty()).unwrap()
    }

    /// Sends fast requests while a slow one is (about to be) in flight, until one is answered
    /// `status`; `None` if none is within 200 tries.
    async fn refused_while_slow(
        app: &Router,
        token: Option<&str>,
        status: u16,
    ) -> Option<Response> {
        for _ in 0..200 {
            let r = app.clone().oneshot(request("/fast", token)).await.unwrap();
            if r.status() == status {
                return Some(r);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        None
    }

    #[tokio::test]
    async fn a_caller_over_its_rate_gets_429_and_others_do_not() {
        let auth = Authenticator::ephemeral();
        let limits = ApiLimits {
            rate_limit_per_second: 1,
            rate_limit_burst: 2,
            ..ApiLimits::default()
        };
        let app = app(limits, &auth);
        let alice = auth
            .issue("alice", Role::Customer, Duration::from_secs(60))
            .unwrap();
        let bob = auth
            .issue("bob", Role::Customer, Duration::from_secs(60))
            .unwrap();
        for _ in 0..2 {
            let r = app.clone().oneshot(request("/fast", Some(&alice))).await;
            assert_eq!(r.unwrap().status(), 200);
        }
        let r = app
            .clone()
            .oneshot(request("/fast", Some(&alice)))
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let r = app.oneshot(request("/fast", Some(&bob))).await.unwrap();
        assert_eq!(r.status(), 200, "another caller has its own budget");
    }

    #[tokio::test]
    async fn anonymous_callers_from_many_addresses_share_one_cap_and_callers_with_tokens_do_not() {
        let auth = Authenticator::ephemeral();
        let limits = ApiLimits {
            max_concurrent_anonymous: 2,
            ..ApiLimits::default()
        };
        let app = app(limits, &auth);
        let from = |ip: &str, path: &str, token: Option<&str>| {
            let mut r = request(path, token);
            let peer: std::net::SocketAddr = format!("{ip}:40000").parse().unwrap();
            r.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            r
        };
        // Two slow anonymous requests from two addresses hold the anonymous share...
        let slow: Vec<_> = ["198.51.100.1", "198.51.100.2"]
            .into_iter()
            .map(|ip| tokio::spawn(app.clone().oneshot(from(ip, "/", None))))
            .collect();
        let mut refused = None;
        for _ in 0..200 {
            let r = app
                .clone()
                .oneshot(from("198.51.100.3", "/fast", None))
                .await
                .unwrap();
            if r.status() == 429 {
                refused = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // ... so a third address is refused, while a caller with a token is served.
        assert!(refused.is_some(), "a third anonymous address was let in");
        let alice = auth
            .issue("alice", Role::Customer, Duration::from_secs(60))
            .unwrap();
        let r = app
            .clone()
            .oneshot(from("198.51.100.4", "/fast", Some(&alice)))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        for s in slow {
            assert_eq!(s.await.unwrap().unwrap().status(), 200);
        }
    }

    #[tokio::test]
    async fn over_the_concurrency_limit_or_the_timeout_is_503() {
        let auth = Authenticator::ephemeral();
        let limits = ApiLimits {
            max_concurrent_requests: 1,
            ..ApiLimits::default()
        };
        let one_at_a_time = app(limits, &auth);
        let slow = tokio::spawn(one_at_a_time.clone().oneshot(request("/", None)));
        // Wait until the slow request holds the only permit.
        let refused = refused_while_slow(&one_at_a_time, None, 503)
            .await
            .expect("a second request while one is in flight");
        assert_eq!(refused.headers()["retry-after"], "1");
        assert_eq!(slow.await.unwrap().unwrap().status(), 200);

        let limits = ApiLimits {
            request_timeout: Duration::from_millis(50),
            ..ApiLimits::default()
        };
        let r = app(limits, &auth).oneshot(request("/", None)).await;
        assert_eq!(r.unwrap().status(), 503);
    }

    #[tokio::test]
    async fn one_caller_holds_only_its_share_of_the_concurrency_limit() {
        let auth = Authenticator::ephemeral();
        let limits = ApiLimits {
            max_concurrent_per_caller: 1,
            ..ApiLimits::default()
        };
        let app = app(limits, &auth);
        let alice = auth
            .issue("alice", Role::Customer, Duration::from_secs(60))
            .unwrap();
        let bob = auth
            .issue("bob", Role::Customer, Duration::from_secs(60))
            .unwrap();
        let slow = tokio::spawn(app.clone().oneshot(request("/", Some(&alice))));
        let refused = refused_while_slow(&app, Some(&alice), 429)
            .await
            .expect("alice's second request while her first is in flight");
        assert_eq!(refused.headers()["retry-after"], "1");
        let r = app
            .clone()
            .oneshot(request("/fast", Some(&bob)))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "bob is not held back by alice's request");
        assert_eq!(slow.await.unwrap().unwrap().status(), 200);
        let r = app.oneshot(request("/fast", Some(&alice))).await.unwrap();
        assert_eq!(r.status(), 200, "her slot is free again");
    }

    #[tokio::test]
    async fn a_throttled_stream_holds_back_what_is_over_its_burst_and_loses_nothing() {
        use futures::{FutureExt, StreamExt};
        let mut slowed = Box::pin(throttle(futures::stream::iter(0..12), 10));
        for i in 0..10 {
            assert_eq!(slowed.next().await, Some(i), "the burst passes at once");
        }
        assert!(
            slowed.next().now_or_never().is_none(),
            "the 11th waits for the rate"
        );
        let rest: Vec<u32> = slowed.collect().await;
        assert_eq!(rest, vec![10, 11], "nothing is dropped");
    }

    #[test]
    fn slots_are_capped_per_key_and_freed_on_drop() {
        let slots = KeyedSlots::new(2);
        let a1 = slots.acquire("customer:a").unwrap();
        let _a2 = slots.acquire("customer:a").unwrap();
        assert!(slots.acquire("customer:a").is_none());
        assert!(
            slots.acquire("customer:b").is_some(),
            "others are not affected"
        );
        assert_eq!(slots.held("customer:b"), 0, "a dropped slot is freed");
        drop(a1);
        assert_eq!(slots.held("customer:a"), 1);
        assert!(slots.acquire("customer:a").is_some());
    }
}

//! Routes, request parsing and metrics of the command API.
//!
//! Handlers do the HTTP part only: authenticate, read headers, parse the body into a domain
//! command, call [`commands::execute`], and shape the response. Bodies are read as bytes and
//! parsed here so every failure becomes a precise problem document: syntax errors are 400,
//! well-formed JSON with wrong fields or types is 422, too large is 413.

use std::time::Instant;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, FromRequest, Path, Request, State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use domain::{
    order::{MAX_LINES, OrderRejected},
    values::{CustomerId, OrderId, Reason},
};
use platform::{
    auth::{Authenticator, Principal, Role},
    limits::{Admission, ApiLimits},
    vault::Vault,
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    checkouts::Checkouts,
    commands::{self, Command, CommandContext, CommandResponse},
    dto::{CancelRequest, CheckoutRequest},
    problem::ApiError,
};

/// The committed OpenAPI document of this API (`schemas/openapi.json`).
pub const OPENAPI: &str = include_str!("../../schemas/openapi.json");

#[derive(Clone)]
pub struct AppState {
    pub(crate) pool: PgPool,
    auth: Authenticator,
    max_body_bytes: usize,
    limits: Option<ApiLimits>,
    pub(crate) activity: Option<crate::activity::Ingest>,
    /// Seals checkouts' personal data with customers' data keys.
    pub(crate) vault: Vault,
    /// Writes checkouts, many per transaction.
    pub(crate) checkouts: Checkouts,
}

impl AppState {
    pub fn new(pool: PgPool, auth: Authenticator, vault: Vault) -> Self {
        Self {
            checkouts: Checkouts::start(pool.clone(), vault.clone()),
            pool,
            auth,
            vault,
            max_body_bytes: 64 * 1024,
            limits: None,
            activity: None,
        }
    }

    /// Serves `POST /activity` ([`crate::activity`]); without it that route answers 404.
    pub fn with_activity(mut self, ingest: crate::activity::Ingest) -> Self {
        self.activity = Some(ingest);
        self
    }

    /// Admission control ([`platform::limits`]) in front of every route but `/healthz`.
    pub fn with_limits(mut self, limits: ApiLimits) -> Self {
        self.limits = Some(limits);
        self
    }
}

pub fn router(mut state: AppState, max_body_bytes: usize) -> Router {
    state.max_body_bytes = max_body_bytes;
    let admission = state
        .limits
        .as_ref()
        .map(|l| Admission::new("commands", state.auth.clone(), l));
    let mut api = Router::new()
        .route("/orders", post(checkout))
        .route("/orders/{id}/cancel", post(cancel))
        .route("/activity", post(crate::activity::ingest))
        .route(
            "/customers/{id}",
            get(crate::customers::get).put(crate::customers::put),
        )
        .route("/admin/orders/{id}/audit", get(audit))
        .route(
            "/admin/customers/{id}/forget",
            post(crate::customers::forget_endpoint),
        )
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .layer(DefaultBodyLimit::max(max_body_bytes));
    if let Some(admission) = admission {
        api = api.route_layer(axum::middleware::from_fn_with_state(
            admission,
            platform::limits::admit,
        ));
    }
    api.with_state(state)
        .merge(platform::ops::health_router())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
}

pub(crate) fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""));
    state
        .auth
        .verify_header(value)
        .map_err(|e| ApiError::Unauthorized(e.to_string()))
}

/// Authenticates a request, then reads its body: a caller without a valid token is refused
/// before a byte of the body is read, so anonymous clients cannot hold the server up with
/// slow or large uploads.
pub(crate) async fn authenticated(
    state: &AppState,
    request: Request,
) -> Result<(Principal, HeaderMap, Result<Bytes, BytesRejection>), ApiError> {
    let principal = authenticate(state, request.headers())?;
    let headers = request.headers().clone();
    let body = Bytes::from_request(request, state).await;
    Ok((principal, headers, body))
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::MissingIdempotencyKey)?;
    if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(key.to_owned())
    } else {
        Err(ApiError::MissingIdempotencyKey)
    }
}

/// The request's W3C trace context, or a new trace when it has none (or a malformed one).
fn traceparent(headers: &HeaderMap) -> String {
    let valid = |s: &str| {
        let p: Vec<&str> = s.split('-').collect();
        p.len() == 4
            && [2, 32, 16, 2].iter().zip(&p).all(|(n, part)| {
                part.len() == *n
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            })
            && p[1] != "00000000000000000000000000000000"
            && p[2] != "0000000000000000"
    };
    match headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        Some(tp) if valid(tp) => tp.to_owned(),
        _ => {
            let span = Uuid::new_v4().simple().to_string();
            format!("00-{}-{}-01", Uuid::new_v4().simple(), &span[..16])
        }
    }
}

/// Parses a JSON body: 415 without a JSON content type, 413 over the limit, 400 for broken
/// JSON, 422 for JSON of the wrong shape. Returns the body value too (for the request hash).
pub(crate) fn parse_body<T: DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(T, Value), ApiError> {
    let value = json_body(state, headers, body)?;
    let parsed = T::deserialize(&value).map_err(|e| ApiError::Validation {
        field: None,
        detail: format!("body does not match the schema: {e}"),
    })?;
    Ok((parsed, value))
}

/// A body as JSON: 415 without a JSON content type, 413 over the limit, 400 when it is not
/// JSON.
pub(crate) fn json_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !(mime.eq_ignore_ascii_case("application/json") || mime.ends_with("+json")) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(state.max_body_bytes)
        } else {
            ApiError::MalformedRequest(r.body_text())
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::MalformedRequest(format!("body is not valid JSON: {e}")))
}

fn request_hash(method_path: &str, body: &Value) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(method_path.as_bytes());
    h.update(b"\n");
    h.update(event_store::hash::canonical_json(body).as_bytes());
    h.finalize().to_vec()
}

fn parse_order_id(raw: &str) -> Result<OrderId, ApiError> {
    OrderId::parse(raw).map_err(|_| {
        ApiError::MalformedRequest(format!("`{raw}` is not an order id (expected a UUID)"))
    })
}

fn context(
    headers: &HeaderMap,
    principal: Principal,
    hash: Vec<u8>,
) -> Result<CommandContext, ApiError> {
    Ok(CommandContext {
        principal,
        idempotency_key: idempotency_key(headers)?,
        request_hash: hash,
        traceparent: traceparent(headers),
        request_id: Uuid::now_v7(),
    })
}

/// Runs a command handler and records its latency and outcome.
async fn observed(
    command: &'static str,
    handler: impl Future<Output = Result<Response, ApiError>>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let result = handler.await;
    let outcome = match &result {
        Ok(_) => "accepted",
        Err(e) => e.outcome(),
    };
    metrics::histogram!("command_duration_seconds", "command" => command, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("commands_total", "command" => command, "outcome" => outcome).increment(1);
    result
}

fn respond(r: CommandResponse, location: Option<String>) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::ACCEPTED);
    let mut resp = (status, Json(r.body)).into_response();
    if let Some(loc) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    resp
}

async fn checkout(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    observed("checkout", async {
        let (principal, headers, body) = authenticated(&state, request).await?;
        let (req, value): (CheckoutRequest, Value) = parse_body(&state, &headers, body)?;
        let customer = match (principal.role, req.customer_id.as_deref()) {
            (Role::Customer, None) => CustomerId::parse(&principal.subject).map_err(|_| {
                ApiError::Forbidden("this token's subject is not a valid customer id".into())
            })?,
            (Role::Customer, Some(c)) if c == principal.subject => CustomerId::parse(c)?,
            (Role::Customer, Some(_)) => {
                return Err(ApiError::Forbidden(
                    "customers may only place orders for themselves".into(),
                ));
            }
            (Role::Operator, Some(c)) => CustomerId::parse(c)?,
            (Role::Operator, None) => {
                return Err(ApiError::validation(
                    "customer_id",
                    "customer_id: operators must name the customer",
                ));
            }
        };
        let ctx = context(&headers, principal, request_hash("POST /orders", &value))?;
        let order_id = OrderId(Uuid::now_v7());
        // Bounded before anything is looked up: the catalog query takes at most MAX_LINES.
        match req.items.len() {
            0 => return Err(ApiError::Rejected(OrderRejected::NoLines.to_string())),
            n if n > MAX_LINES => {
                return Err(ApiError::Rejected(
                    OrderRejected::TooManyLines(n).to_string(),
                ));
            }
            _ => {}
        }
        let r = commands::execute(
            &state.pool,
            &state.checkouts,
            &ctx,
            &Command::Checkout {
                request: Box::new(req),
                customer,
                order_id,
            },
        )
        .await?;
        let location = r.body["order_id"]
            .as_str()
            .map(|id| format!("/orders/{id}"));
        Ok(respond(r, location))
    })
    .await
}

async fn cancel(
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    observed("cancel", async {
        let (principal, headers, body) = authenticated(&state, request).await?;
        let order_id = parse_order_id(&raw_id)?;
        let (req, value): (CancelRequest, Value) = parse_body(&state, &headers, body)?;
        let if_match = match headers.get(header::IF_MATCH) {
            None => None,
            Some(v) => {
                let s = v.to_str().unwrap_or("").trim();
                let s = s.strip_prefix("W/").unwrap_or(s).trim_matches('"');
                Some(s.parse::<i64>().map_err(|_| {
                    ApiError::MalformedRequest(
                        "If-Match must be the order version in quotes, e.g. \"3\"".into(),
                    )
                })?)
            }
        };
        let reason = Reason::parse(&req.reason)?;
        let ctx = context(
            &headers,
            principal,
            request_hash(&format!("POST /orders/{order_id}/cancel"), &value),
        )?;
        let r = commands::execute(
            &state.pool,
            &state.checkouts,
            &ctx,
            &Command::Cancel {
                order_id,
                if_match,
                reason,
            },
        )
        .await?;
        Ok(respond(r, None))
    })
    .await
}

/// Operator only: verifies the hash chain of one order's stream.
async fn audit(
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&state, &headers)?;
    if principal.role != Role::Operator {
        return Err(ApiError::Forbidden("this route is for operators".into()));
    }
    let order_id = parse_order_id(&raw_id)?;
    let mut conn = state.pool.acquire().await?;
    let report = event_store::audit::verify_stream(&mut conn, order_id.0).await?;
    if report.events == 0 {
        return Err(ApiError::NotFound("no such order".into()));
    }
    let broken = report.broken.map(|b| {
        json!({"stream_version": b.stream_version, "position": b.position, "event_id": b.event_id, "problem": format!("{:?}", b.problem)})
    });
    Ok(Json(json!({"order_id": order_id, "events": report.events, "verified": broken.is_none(), "broken_at": broken})).into_response())
}

//! `POST /activity`: user-activity ingestion, straight to the `user-activity` Kafka topic.
//!
//! Why not the event store: activity is high-volume telemetry that decides nothing. Writing
//! it through PostgreSQL would put every page view on the database that orders need, for no
//! invariant; Kafka's idempotent producer with `acks=all` gives the durability it needs, and
//! the analytics group reads it from there (docs/architecture.md).
//!
//! A batch is all or nothing: it is checked against `schemas/activity/batch.v1.json`, then
//! event by event (time bounds, catalog products), and any refusal answers 422 with every
//! problem by event index while nothing is produced. The answer 202 is sent only once the
//! broker has acknowledged every event; if it does not in time the answer is 503 and the
//! client resends the batch: event ids are derived from the content (see
//! [`domain::activity::event_id`]), so events that did reach the topic are counted once.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Json,
    extract::{ConnectInfo, FromRequest, Request, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use chrono::{TimeDelta, Utc};
use domain::activity::{Batch, TimeBounds, UserActivity};
use platform::auth::Role;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

use crate::{
    catalog,
    http::{AppState, json_body},
    problem::{ApiError, EventError},
};

/// The batch schema, compiled into the binary.
pub const BATCH_SCHEMA: &str = include_str!("../../schemas/activity/batch.v1.json");

#[derive(Debug, Clone, clap::Args)]
pub struct ActivityConfig {
    /// How far in the future (clients' clocks) an activity event's time may be.
    #[arg(long, env = "ACTIVITY_MAX_CLOCK_SKEW", default_value = "5m", value_parser = platform::config::parse_duration)]
    pub activity_max_clock_skew: Duration,
    /// How old an activity event may be when it arrives.
    #[arg(long, env = "ACTIVITY_MAX_AGE", default_value = "24h", value_parser = platform::config::parse_duration)]
    pub activity_max_age: Duration,
    /// How long a batch waits for the broker's acknowledgement before it is answered 503.
    #[arg(long, env = "ACTIVITY_PRODUCE_TIMEOUT", default_value = "5s", value_parser = platform::config::parse_duration)]
    pub activity_produce_timeout: Duration,
}

impl Default for ActivityConfig {
    fn default() -> Self {
        platform::config::defaults()
    }
}

/// What ingestion needs: a producer on the topic, the compiled schema and the bounds.
#[derive(Clone)]
pub struct Ingest {
    producer: FutureProducer,
    topic: String,
    schema: Arc<jsonschema::Validator>,
    bounds: TimeBounds,
    timeout: Duration,
}

impl Ingest {
    pub fn new(brokers: &str, topic: &str, cfg: &ActivityConfig) -> anyhow::Result<Self> {
        let delta = |d: Duration| TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX);
        Ok(Self {
            producer: platform::kafka::producer(brokers)?,
            topic: topic.to_owned(),
            schema: Arc::new(schema()),
            bounds: TimeBounds {
                max_skew: delta(cfg.activity_max_clock_skew),
                max_age: delta(cfg.activity_max_age),
            },
            timeout: cfg.activity_produce_timeout,
        })
    }
}

/// The batch schema, with `format` checked (`date-time`).
pub fn schema() -> jsonschema::Validator {
    let value: Value = serde_json::from_str(BATCH_SCHEMA).expect("the batch schema is JSON");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&value)
        .expect("the batch schema compiles")
}

/// The handler (routed by [`crate::http::router`]).
pub async fn ingest(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let Some(ingest) = state.activity.clone() else {
        return Err(ApiError::NotFound(
            "activity ingestion is not enabled".into(),
        ));
    };
    let started = std::time::Instant::now();
    let result = handle(&state, &ingest, request).await;
    let outcome = match &result {
        Ok(_) => "accepted",
        Err(e) => e.outcome(),
    };
    metrics::histogram!("activity_batch_duration_seconds", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("activity_batches_total", "outcome" => outcome).increment(1);
    result
}

async fn handle(state: &AppState, ingest: &Ingest, request: Request) -> Result<Response, ApiError> {
    // Optional token: a visitor may be anonymous, but a token that is sent must be valid.
    let user = match request.headers().get(header::AUTHORIZATION) {
        None => None,
        Some(_) => {
            let principal = crate::http::authenticate(state, request.headers())?;
            if principal.role != Role::Customer {
                return Err(ApiError::Forbidden(
                    "activity is recorded for customers and visitors only".into(),
                ));
            }
            Some(principal.subject)
        }
    };
    let client_ip = client_ip(&request);
    let headers: HeaderMap = request.headers().clone();
    let body = Bytes::from_request(request, state).await;
    let value = json_body(state, &headers, body)?;
    let mut errors: Vec<EventError> = ingest
        .schema
        .iter_errors(&value)
        .map(|e| EventError::at(e.instance_path().as_str(), e.masked().to_string()))
        .collect();
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.index);
        return Err(ApiError::InvalidEvents(errors));
    }
    let batch: Batch = serde_json::from_value(value).map_err(|e| ApiError::Validation {
        field: None,
        detail: format!("body does not match the schema: {e}"),
    })?;
    let events = accept_all(state, ingest, &batch, user.as_deref(), &client_ip).await?;
    produce(ingest, &events).await?;
    metrics::counter!("activity_events_total").increment(events.len() as u64);
    let ids: Vec<_> = events.iter().map(|e| e.event_id).collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"accepted": ids.len(), "event_ids": ids})),
    )
        .into_response())
}

/// The peer's address, as the listener saw it (a proxy in front is the peer; see
/// docs/security.md).
fn client_ip(request: &Request) -> String {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Every event of the batch checked by the domain's rules and against the catalog; all
/// refusals at once, by index.
async fn accept_all(
    state: &AppState,
    ingest: &Ingest,
    batch: &Batch,
    user: Option<&str>,
    client_ip: &str,
) -> Result<Vec<UserActivity>, ApiError> {
    let now = Utc::now();
    let mut errors = Vec::new();
    let mut accepted = Vec::with_capacity(batch.events.len());
    for (i, e) in batch.events.iter().enumerate() {
        match domain::activity::accept(e, &batch.session_id, user, client_ip, now, ingest.bounds) {
            Ok(a) => accepted.push(a),
            Err(refused) => errors.push(EventError::index(i, refused.to_string())),
        }
    }
    let mut named = Vec::new();
    for (i, e) in batch.events.iter().enumerate() {
        if let Some(s) = &e.product_sku {
            match domain::values::Sku::parse(s) {
                Ok(sku) => named.push((i, sku)),
                Err(v) => errors.push(EventError::index(i, v.to_string())),
            }
        }
    }
    let mut skus: Vec<_> = named.iter().map(|(_, s)| s.clone()).collect();
    skus.sort();
    skus.dedup();
    let known = catalog::prices(&state.pool, &skus).await?;
    for (i, sku) in named.iter().filter(|(_, s)| !known.contains_key(s)) {
        errors.push(EventError::index(
            *i,
            format!(
                "product_sku `{}` is not a product of the shop",
                sku.as_str()
            ),
        ));
    }
    if errors.is_empty() {
        Ok(accepted)
    } else {
        errors.sort_by_key(|e| e.index);
        Err(ApiError::InvalidEvents(errors))
    }
}

/// Produces every event and waits for every acknowledgement (`acks=all`, idempotent).
async fn produce(ingest: &Ingest, events: &[UserActivity]) -> Result<(), ApiError> {
    let sends = events.iter().map(|e| {
        let key = e.key();
        let payload = serde_json::to_vec(e).expect("activity serializes");
        async move {
            let record = FutureRecord::to(&ingest.topic).key(&key).payload(&payload);
            ingest
                .producer
                .send(record, rdkafka::util::Timeout::After(ingest.timeout))
                .await
                .map(|_| ())
                .map_err(|(e, _)| e)
        }
    });
    let results = futures::future::join_all(sends).await;
    if let Some(e) = results.into_iter().find_map(Result::err) {
        tracing::warn!(error = %e, "producing activity failed");
        metrics::counter!("activity_produce_failures_total").increment(1);
        return Err(ApiError::BrokerUnavailable);
    }
    Ok(())
}

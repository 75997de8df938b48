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
use domain::{
    activity::{Batch, TimeBounds, UserActivity},
    personal::Protected,
};
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
    /// Activity events one caller (a customer, or an anonymous address) may send per
    /// second, sustained; a burst of ten seconds' worth is allowed. Over it: 429.
    #[arg(long, env = "ACTIVITY_EVENTS_PER_SECOND", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub activity_events_per_second: u32,
    /// How long a batch waits for the broker's acknowledgement before it is answered 503.
    #[arg(long, env = "ACTIVITY_PRODUCE_TIMEOUT", default_value = "5s", value_parser = platform::config::parse_duration)]
    pub activity_produce_timeout: Duration,
}

impl Default for ActivityConfig {
    fn default() -> Self {
        platform::config::defaults()
    }
}

type EventLimiter = governor::RateLimiter<
    String,
    governor::state::keyed::DefaultKeyedStateStore<String>,
    governor::clock::DefaultClock,
>;

/// What ingestion needs: a producer on the topic, the compiled schema, the bounds and the
/// per-caller event budget.
#[derive(Clone)]
pub struct Ingest {
    producer: FutureProducer,
    events: Arc<EventLimiter>,
    topic: String,
    schema: Arc<jsonschema::Validator>,
    bounds: TimeBounds,
    timeout: Duration,
}

impl Ingest {
    pub fn new(brokers: &str, topic: &str, cfg: &ActivityConfig) -> anyhow::Result<Self> {
        // At most a year: a huge setting must not overflow the time arithmetic.
        let delta = |d: Duration| {
            TimeDelta::from_std(d.min(Duration::from_secs(366 * 86_400))).unwrap_or(TimeDelta::MAX)
        };
        // Delivery gives up at the timeout (librdkafka's default would wait 5 minutes),
        // and the queue stays small: a broker outage answers 503 instead of buffering.
        let producer = platform::kafka::producer_config(brokers)
            .set(
                "message.timeout.ms",
                cfg.activity_produce_timeout.as_millis().max(1).to_string(),
            )
            .set("queue.buffering.max.kbytes", "65536")
            .create()?;
        let per_second =
            std::num::NonZeroU32::new(cfg.activity_events_per_second.max(1)).expect("at least 1");
        let burst = per_second.saturating_mul(std::num::NonZeroU32::new(10).expect("10"));
        Ok(Self {
            producer,
            events: Arc::new(governor::RateLimiter::keyed(
                governor::Quota::per_second(per_second).allow_burst(burst),
            )),
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
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let headers: HeaderMap = request.headers().clone();
    let body = Bytes::from_request(request, state).await;
    let value = json_body(state, &headers, body)?;
    let mut errors: Vec<EventError> = ingest
        .schema
        .iter_errors(&value)
        .map(|e| schema_error(e.instance_path().as_str(), e.kind().keyword()))
        .collect();
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.index);
        return Err(ApiError::InvalidEvents(errors));
    }
    let batch: Batch = serde_json::from_value(value).map_err(|e| ApiError::Validation {
        field: None,
        detail: format!("body does not match the schema: {e}"),
    })?;
    // Events, not requests, are what cost: one caller's budget counts them.
    let caller = match (&user, peer) {
        (Some(u), _) => format!("user:{u}"),
        (None, Some(ip)) => format!("anonymous:{}", platform::limits::network(ip)),
        (None, None) => "anonymous".to_owned(),
    };
    let n = std::num::NonZeroU32::new(u32::try_from(batch.events.len()).unwrap_or(u32::MAX))
        .unwrap_or(std::num::NonZeroU32::MIN);
    match ingest.events.check_key_n(&caller, n) {
        Ok(Ok(())) => {}
        Ok(Err(not_until)) => {
            use governor::clock::{Clock, DefaultClock};
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            metrics::counter!("activity_refused_total", "reason" => "rate_limited").increment(1);
            return Err(ApiError::TooManyEvents(wait));
        }
        Err(_) => return Err(ApiError::TooManyEvents(Duration::from_secs(1))),
    }
    let client_ip = protect_ip(state, user.as_deref(), peer).await?;
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

/// The client's address as the topic keeps it: sealed with a signed-in customer's data key
/// (so forgetting her erases it, `platform::vault`), only its network for an anonymous
/// visitor. One key lookup per batch, not per event.
async fn protect_ip(
    state: &AppState,
    user: Option<&str>,
    peer: Option<std::net::IpAddr>,
) -> Result<Protected<String>, ApiError> {
    let Some(user) = user else {
        return Ok(Protected::Clear(peer.map_or_else(
            || "unknown".to_owned(),
            domain::activity::anonymised_ip,
        )));
    };
    let ip = peer.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
    let key = crate::commands::data_key(&state.pool, &state.vault, user).await?;
    Ok(Protected::Sealed(
        key.seal(&domain::activity::client_ip_context(user), &ip),
    ))
}

/// A schema failure described without repeating anything the client sent: the pointer keeps
/// only the batch's own field names (`/events/3/type`; a property name the client chose is
/// cut off) and the detail names the rule that failed.
fn schema_error(pointer: &str, keyword: &str) -> EventError {
    const FIELDS: [&str; 7] = [
        "session_id",
        "events",
        "event_id",
        "type",
        "occurred_at",
        "product_sku",
        "properties",
    ];
    let mut kept = String::new();
    for (i, part) in pointer.split('/').skip(1).enumerate() {
        let known = FIELDS.contains(&part) || (i == 1 && part.bytes().all(|b| b.is_ascii_digit()));
        if !known {
            break;
        }
        kept.push('/');
        kept.push_str(part);
    }
    let rule = match keyword {
        "required" => "a required field is missing",
        "additionalProperties" => "a field that is not in the schema",
        "enum" => "not one of the allowed values",
        "format" | "pattern" => "not in the required format",
        "maxLength" | "minLength" => "too long or too short",
        "maxItems" | "minItems" => "too many or too few events",
        "maxProperties" => "too many properties",
        "propertyNames" => "a property name that is not allowed",
        "type" | "anyOf" => "a value of the wrong type",
        _ => "does not match the schema",
    };
    EventError::at(&kept, format!("{rule} (schema rule `{keyword}`)"))
}

/// Every event of the batch checked by the domain's rules and against the catalog; all
/// refusals at once, by index.
async fn accept_all(
    state: &AppState,
    ingest: &Ingest,
    batch: &Batch,
    user: Option<&str>,
    client_ip: &Protected<String>,
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
    let known = match skus.is_empty() {
        true => Default::default(),
        false => catalog::prices(&state.pool, &skus).await?,
    };
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
    let acked = tokio::time::timeout(ingest.timeout, futures::future::join_all(sends)).await;
    let failure = match acked {
        Ok(results) => results
            .into_iter()
            .find_map(Result::err)
            .map(|e| e.to_string()),
        Err(_) => Some(format!("no acknowledgement within {:?}", ingest.timeout)),
    };
    if let Some(error) = failure {
        tracing::warn!(error, "producing activity failed");
        metrics::counter!("activity_produce_failures_total").increment(1);
        return Err(ApiError::BrokerUnavailable);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn problems(body: Value) -> Vec<(Option<usize>, String, String)> {
        let schema = schema();
        let mut out: Vec<_> = schema
            .iter_errors(&body)
            .map(|e| schema_error(e.instance_path().as_str(), e.kind().keyword()))
            .map(|e| (e.index, e.pointer, e.detail))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn schema_problems_name_the_event_and_never_repeat_what_the_client_sent() {
        let at = "2026-12-04T10:00:00Z";
        let found = problems(json!({"session_id": "sess-0001", "events": [
            {"type": "page_view", "occurred_at": at},
            {"type": "<script>", "occurred_at": at},
            {"type": "page_view", "occurred_at": at, "properties": {"Secret-Key<x>": "v"}},
            {"type": "page_view", "occurred_at": at, "evil_field": 1},
        ]}));
        let text = format!("{found:?}");
        for secret in ["<script>", "Secret-Key", "evil_field"] {
            assert!(!text.contains(secret), "{secret} repeated in {text}");
        }
        let indexes: Vec<_> = found.iter().map(|f| f.0).collect();
        assert!(
            indexes.contains(&Some(1)) && indexes.contains(&Some(2)) && indexes.contains(&Some(3)),
            "{found:?}"
        );
        assert!(found.iter().any(|f| f.1 == "/events/1/type"), "{found:?}");
        assert!(
            found.iter().any(|f| f.1 == "/events/2/properties"),
            "{found:?}"
        );
    }
}

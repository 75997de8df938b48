//! Errors of the command API as RFC 9457 `application/problem+json`.
//!
//! Each variant has a stable `type` (`/problems/<slug>`) clients can switch on. Causes of
//! server-side failures are logged, never sent: the client gets the type and a request-safe
//! detail. Bad input is always a 4xx; only infrastructure trouble is a 5xx.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    MalformedRequest(String),
    #[error("the Idempotency-Key header is required (1 to 255 visible characters)")]
    MissingIdempotencyKey,
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    VersionConflict(String),
    #[error("request body exceeds {0} bytes")]
    PayloadTooLarge(usize),
    #[error("expected Content-Type application/json")]
    UnsupportedMediaType,
    #[error("{detail}")]
    Validation {
        field: Option<String>,
        detail: String,
    },
    #[error("{0}")]
    Rejected(String),
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    #[error("{} event(s) of the batch are invalid; nothing of it was recorded", .0.len())]
    InvalidEvents(Vec<EventError>),
    #[error("a dependency is unavailable, retry later")]
    Unavailable(#[source] sqlx::Error),
    #[error("the event broker did not acknowledge in time; resend the batch")]
    BrokerUnavailable,
    #[error("too many activity events from this caller; retry after the delay in Retry-After")]
    TooManyEvents(std::time::Duration),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use ApiError::*;
        match self {
            MalformedRequest(_) => (
                StatusCode::BAD_REQUEST,
                "malformed-request",
                "Malformed request",
            ),
            MissingIdempotencyKey => (
                StatusCode::BAD_REQUEST,
                "missing-idempotency-key",
                "Missing Idempotency-Key",
            ),
            Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            VersionConflict(_) => (StatusCode::CONFLICT, "version-conflict", "Version conflict"),
            PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
            ),
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            ),
            Validation { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation-error",
                "Invalid request",
            ),
            Rejected(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "command-rejected",
                "Command rejected",
            ),
            IdempotencyKeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency key reused",
            ),
            InvalidEvents(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-activity",
                "Invalid activity events",
            ),
            BrokerUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "broker-unavailable",
                "Service unavailable",
            ),
            TooManyEvents(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
            ),
            Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service-unavailable",
                "Service unavailable",
            ),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal-error",
                "Internal error",
            ),
        }
    }

    /// Short label for metrics.
    pub fn outcome(&self) -> &'static str {
        self.parts().1
    }

    pub fn validation(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Validation {
            field: Some(field.into()),
            detail: detail.into(),
        }
    }
}

/// One problem with one event of an activity batch: its index in `events` (`None` for the
/// batch itself), the JSON pointer of the offending value and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventError {
    pub index: Option<usize>,
    pub pointer: String,
    pub detail: String,
}

impl EventError {
    /// From a JSON pointer into the batch (`/events/3/type`).
    pub fn at(pointer: &str, detail: String) -> Self {
        let index = pointer
            .strip_prefix("/events/")
            .and_then(|rest| rest.split('/').next())
            .and_then(|i| i.parse().ok());
        Self {
            index,
            pointer: pointer.to_owned(),
            detail,
        }
    }

    /// About event `index` as a whole.
    pub fn index(index: usize, detail: String) -> Self {
        Self {
            index: Some(index),
            pointer: format!("/events/{index}"),
            detail,
        }
    }
}

impl From<domain::values::ValueError> for ApiError {
    fn from(e: domain::values::ValueError) -> Self {
        ApiError::Validation {
            detail: e.to_string(),
            field: Some(e.field),
        }
    }
}

/// By the one classification (`platform::errors`): what may heal by itself (the database
/// restarting, a pool timeout, a serialization failure) is a 503 the client may retry with
/// the same idempotency key; the rest is a 500.
impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match platform::errors::classify_sqlx(&e) {
            platform::errors::ErrorClass::Transient => ApiError::Unavailable(e),
            _ => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, slug, title) = self.parts();
        let detail = match &self {
            ApiError::Internal(cause) => {
                tracing::error!(cause, "internal error");
                "the request could not be completed; it has been logged".to_owned()
            }
            ApiError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "dependency unavailable");
                self.to_string()
            }
            _ => self.to_string(),
        };
        let mut body = json!({
            "type": format!("/problems/{slug}"),
            "title": title,
            "status": status.as_u16(),
            "detail": detail,
        });
        if let ApiError::Validation { field: Some(f), .. } = &self {
            body["field"] = json!(f);
        }
        if let ApiError::InvalidEvents(errors) = &self {
            body["errors"] = json!(errors);
        }
        let mut resp = (status, body.to_string()).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ApiError::TooManyEvents(wait) = &self {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn problem(e: ApiError) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let resp = e.into_response();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, headers, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn every_error_is_problem_json_with_a_stable_type_and_its_status() {
        let cases = [
            (
                ApiError::MissingIdempotencyKey,
                400,
                "/problems/missing-idempotency-key",
            ),
            (
                ApiError::Unauthorized("no token".into()),
                401,
                "/problems/unauthorized",
            ),
            (
                ApiError::Forbidden("customers only".into()),
                403,
                "/problems/forbidden",
            ),
            (
                ApiError::NotFound("no such order".into()),
                404,
                "/problems/not-found",
            ),
            (
                ApiError::VersionConflict("v2".into()),
                409,
                "/problems/version-conflict",
            ),
            (
                ApiError::UnsupportedMediaType,
                415,
                "/problems/unsupported-media-type",
            ),
            (
                ApiError::validation("items[0].sku", "empty"),
                422,
                "/problems/validation-error",
            ),
            (
                ApiError::IdempotencyKeyReused,
                422,
                "/problems/idempotency-key-reused",
            ),
            (
                ApiError::Internal("boom".into()),
                500,
                "/problems/internal-error",
            ),
            (
                ApiError::Rejected("cancelled".into()),
                422,
                "/problems/command-rejected",
            ),
            (
                ApiError::InvalidEvents(vec![EventError::at("/events/2/type", "bad".into())]),
                422,
                "/problems/invalid-activity",
            ),
            (
                ApiError::BrokerUnavailable,
                503,
                "/problems/broker-unavailable",
            ),
        ];
        for (e, status, kind) in cases {
            let name = format!("{e:?}");
            let (s, h, body) = problem(e).await;
            assert_eq!(s.as_u16(), status, "{name}");
            assert_eq!(body["type"], kind, "{name}");
            assert_eq!(body["status"], status, "{name}");
            assert_eq!(
                h[header::CONTENT_TYPE],
                "application/problem+json",
                "{name}"
            );
        }
    }

    #[tokio::test]
    async fn headers_and_details_tell_the_client_what_to_do_and_nothing_more() {
        let (_, h, _) = problem(ApiError::Unauthorized("expired".into())).await;
        assert_eq!(h[header::WWW_AUTHENTICATE], "Bearer");
        let (s, h, _) = problem(ApiError::from(sqlx::Error::PoolTimedOut)).await;
        assert_eq!(
            (s.as_u16(), &h[header::RETRY_AFTER]),
            (503, &HeaderValue::from_static("1"))
        );
        let (_, _, body) = problem(ApiError::Internal("password=hunter2".into())).await;
        assert!(
            !body["detail"].as_str().unwrap().contains("hunter2"),
            "{body}"
        );
        let (_, _, body) = problem(ApiError::validation("items[1].quantity", "too many")).await;
        assert_eq!(body["field"], "items[1].quantity");
    }

    #[test]
    fn database_errors_follow_the_one_classification() {
        assert!(matches!(
            ApiError::from(sqlx::Error::PoolTimedOut),
            ApiError::Unavailable(_)
        ));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(matches!(
            ApiError::from(sqlx::Error::Io(reset)),
            ApiError::Unavailable(_)
        ));
        assert!(matches!(
            ApiError::from(sqlx::Error::ColumnNotFound("version".into())),
            ApiError::Internal(_)
        ));
    }
}

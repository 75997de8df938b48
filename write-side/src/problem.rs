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
    #[error("a dependency is unavailable, retry later")]
    Unavailable(#[source] sqlx::Error),
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

impl From<domain::values::ValueError> for ApiError {
    fn from(e: domain::values::ValueError) -> Self {
        ApiError::Validation {
            detail: e.to_string(),
            field: Some(e.field),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                ApiError::Unavailable(e)
            }
            other => ApiError::Internal(other.to_string()),
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
        resp
    }
}

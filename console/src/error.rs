//! The console's one error type: what went wrong, as the status and page an operator sees.
//! Database and broker details are logged, not shown (they can quote data).

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(&'static str),
    /// An action the library refused (not open any more, broker did not confirm...).
    #[error("{0}")]
    Refused(String),
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let (status, shown) = match &self {
            ConsoleError::Database(e) => {
                tracing::error!(error = %e, "console: database error");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The database did not answer; try again.".to_owned(),
                )
            }
            ConsoleError::NotFound(m) => (StatusCode::NOT_FOUND, m.clone()),
            ConsoleError::BadRequest(m) => (StatusCode::BAD_REQUEST, m.clone()),
            ConsoleError::Forbidden(m) => (StatusCode::FORBIDDEN, (*m).to_owned()),
            ConsoleError::Refused(m) => (StatusCode::CONFLICT, m.clone()),
        };
        let page = crate::view::bare(
            "Error",
            maud::html! {
                h1 { (status.canonical_reason().unwrap_or("Error")) }
                p.error { (shown) }
                p { a href="/console" { "Back to the overview" } }
            },
        );
        (status, page).into_response()
    }
}

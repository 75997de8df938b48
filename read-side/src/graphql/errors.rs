//! The API's errors: every one carries a stable `extensions.code` (`UNAUTHENTICATED`,
//! `FORBIDDEN`, `BAD_USER_INPUT`, `CONFLICT`, `INTERNAL`), and database causes are logged,
//! never sent. Shared by every model's resolvers, so the codes are spelt in one place.

use async_graphql::{ErrorExtensions, ID};
use uuid::Uuid;

pub(super) fn error(code: &'static str, message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", code))
}

pub(super) fn internal(e: sqlx::Error) -> async_graphql::Error {
    tracing::error!(error = %e, "read model query failed");
    error("INTERNAL", "the read model is unavailable")
}

/// An order id argument (`order`, `checkoutProgress`, `auditTrail`, the subscription).
pub(super) fn parse_id(id: &ID) -> async_graphql::Result<Uuid> {
    Uuid::parse_str(id).map_err(|_| {
        error(
            "BAD_USER_INPUT",
            format!("`{}` is not an order id", id.as_str()),
        )
    })
}

//! Who is calling: the principal the router put in the request data (from the bearer token),
//! and the operator-only guard. Shared by every model's resolvers.

use async_graphql::Context;
use platform::auth::{Principal, Role};

use super::errors::error;

pub(super) fn principal<'a>(ctx: &'a Context<'_>) -> async_graphql::Result<&'a Principal> {
    ctx.data_opt::<Principal>()
        .ok_or_else(|| error("UNAUTHENTICATED", "a valid bearer token is required"))
}

pub(super) fn operator<'a>(
    ctx: &'a Context<'_>,
    what: &str,
) -> async_graphql::Result<&'a Principal> {
    let who = principal(ctx)?;
    if who.role != Role::Operator {
        return Err(error("FORBIDDEN", format!("{what} is for operators")));
    }
    Ok(who)
}

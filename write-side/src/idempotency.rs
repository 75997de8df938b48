//! The idempotency records of commands: every SQL statement on `idempotency_keys`.
//!
//! Why: a client that retries (a timeout, a lost answer) must get the first answer back, not
//! a second order. The first successful response for `(principal, key)` is stored in the same
//! transaction as the command's events, so it survives restarts and is never stored without
//! them. A retry with the same key and the same request gets it back; with a different
//! request, a 422.

use serde_json::Value;
use sqlx::{PgConnection, PgPool, types::Json};

use crate::{
    commands::{CommandContext, CommandResponse},
    problem::ApiError,
};

/// The response stored under the caller's key, if any; a 422 if the key was used for another
/// request.
pub async fn stored_response(
    conn: &mut PgConnection,
    ctx: &CommandContext,
) -> Result<Option<CommandResponse>, ApiError> {
    let row: Option<(Vec<u8>, i16, Value)> = sqlx::query_as(
        "SELECT request_hash, response_status, response_body FROM idempotency_keys
         WHERE principal = $1 AND key = $2",
    )
    .bind(ctx.principal.actor())
    .bind(&ctx.idempotency_key)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        None => Ok(None),
        Some((hash, _, _)) if hash != ctx.request_hash => Err(ApiError::IdempotencyKeyReused),
        Some((_, status, body)) => Ok(Some(CommandResponse {
            status: status as u16,
            body,
        })),
    }
}

/// Stores the response under the key; `false` if a concurrent request took the key first.
pub async fn remember(
    conn: &mut PgConnection,
    ctx: &CommandContext,
    r: &CommandResponse,
) -> Result<bool, ApiError> {
    Ok(claim(conn, &[(ctx, r)]).await?[0])
}

/// Stores each response under its key, in the caller's transaction, with one statement; per
/// record, whether it was stored (`false`: the key was taken, by a committed request or by an
/// earlier record of this call).
pub async fn claim(
    conn: &mut PgConnection,
    records: &[(&CommandContext, &CommandResponse)],
) -> Result<Vec<bool>, sqlx::Error> {
    let principals: Vec<String> = records.iter().map(|(c, _)| c.principal.actor()).collect();
    let keys: Vec<&str> = records
        .iter()
        .map(|(c, _)| c.idempotency_key.as_str())
        .collect();
    let hashes: Vec<&[u8]> = records
        .iter()
        .map(|(c, _)| c.request_hash.as_slice())
        .collect();
    let statuses: Vec<i16> = records.iter().map(|(_, r)| r.status as i16).collect();
    let bodies: Vec<Json<&Value>> = records.iter().map(|(_, r)| Json(&r.body)).collect();
    let stored: Vec<(String, String)> = sqlx::query_as(
        "INSERT INTO idempotency_keys (principal, key, request_hash, response_status, response_body)
         SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::smallint[], $5::jsonb[])
         ON CONFLICT DO NOTHING
         RETURNING principal, key",
    )
    .bind(&principals)
    .bind(&keys)
    .bind(&hashes)
    .bind(&statuses)
    .bind(&bodies)
    .fetch_all(&mut *conn)
    .await?;
    // A key twice in one call is stored once: the first record claimed it.
    let mut seen = Vec::with_capacity(records.len());
    Ok(principals
        .iter()
        .zip(&keys)
        .map(|(p, k)| {
            let mine = !seen.contains(&(p, k))
                && stored.iter().any(|(sp, sk)| sp == p && sk.as_str() == *k);
            seen.push((p, k));
            mine
        })
        .collect())
}

/// Gives back keys claimed in the caller's transaction by commands that then wrote nothing
/// (their append conflicted), so the records leave with nothing of theirs.
pub async fn release(
    conn: &mut PgConnection,
    contexts: &[&CommandContext],
) -> Result<(), sqlx::Error> {
    if contexts.is_empty() {
        return Ok(());
    }
    let principals: Vec<String> = contexts.iter().map(|c| c.principal.actor()).collect();
    let keys: Vec<&str> = contexts
        .iter()
        .map(|c| c.idempotency_key.as_str())
        .collect();
    sqlx::query(
        "DELETE FROM idempotency_keys k USING unnest($1::text[], $2::text[]) AS r(principal, key)
         WHERE k.principal = r.principal AND k.key = r.key",
    )
    .bind(&principals)
    .bind(&keys)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Forgets idempotency keys older than `age` (retention): a retry after that is a new
/// command. Returns how many went.
pub async fn prune(pool: &PgPool, age: std::time::Duration) -> Result<u64, sqlx::Error> {
    platform::db::delete_older_than(pool, "idempotency_keys", "created_at", age, 5000).await
}

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

/// Records to claim inside a caller's statement ([`Claims::ctes`]): each with its owner's
/// index and the stream its command writes.
#[derive(Default)]
pub struct Claims<'a> {
    principals: Vec<String>,
    keys: Vec<&'a str>,
    hashes: Vec<&'a [u8]>,
    statuses: Vec<i16>,
    bodies: Vec<Json<&'a Value>>,
    of: Vec<i64>,
    streams: Vec<uuid::Uuid>,
}

/// Parameters [`Claims::ctes`] takes.
pub const CLAIM_PARAMS: usize = 7;

impl<'a> Claims<'a> {
    /// Adds the record of command `of`, which writes `stream`. A caller adds each
    /// `(principal, key)` once: two records of one key in a statement would both be seen as
    /// claimed.
    pub fn push(
        &mut self,
        of: usize,
        stream: uuid::Uuid,
        ctx: &'a CommandContext,
        r: &'a CommandResponse,
    ) {
        self.principals.push(ctx.principal.actor());
        self.keys.push(&ctx.idempotency_key);
        self.hashes.push(&ctx.request_hash);
        self.statuses.push(r.status as i16);
        self.bodies.push(Json(&r.body));
        self.of.push(of as i64);
        self.streams.push(stream);
    }

    /// CTEs `claim` (the records stored; a key already taken is not) and `claimed` (`i` and
    /// `stream_id` of the commands whose record was stored), for a caller's statement, with
    /// parameters from `$first` ([`CLAIM_PARAMS`]); commands whose `i` is in the CTE `skip`
    /// are not tried.
    pub fn ctes(skip: &str, first: usize) -> String {
        let p = |n: usize| format!("${}", first + n - 1);
        format!(
            "claim AS (
    INSERT INTO idempotency_keys (principal, key, request_hash, response_status, response_body)
    SELECT r.p, r.k, r.h, r.s, r.b
    FROM unnest({}::text[], {}::text[], {}::bytea[], {}::smallint[], {}::jsonb[], {}::bigint[])
        AS r(p, k, h, s, b, i)
    WHERE r.i NOT IN (SELECT i FROM {skip})
    ON CONFLICT DO NOTHING
    RETURNING principal, key
), claimed AS (
    SELECT r.i, r.stream_id
    FROM unnest({}::text[], {}::text[], {}::bigint[], {}::uuid[]) AS r(p, k, i, stream_id)
    JOIN claim c ON c.principal = r.p AND c.key = r.k
)",
            p(1),
            p(2),
            p(3),
            p(4),
            p(5),
            p(6),
            p(1),
            p(2),
            p(6),
            p(7)
        )
    }

    /// Binds the records, in the order [`Claims::ctes`] numbers them.
    pub fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        q.bind(&self.principals)
            .bind(&self.keys)
            .bind(&self.hashes)
            .bind(&self.statuses)
            .bind(&self.bodies)
            .bind(&self.of)
            .bind(&self.streams)
    }
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

//! The Audit page: verify the hash chain of every stream with an event in a time range (or of
//! the whole store), watch its progress, and see the streams whose chain breaks.
//!
//! Why: `shop audit verify` checks the whole store from a terminal and holds it until done;
//! an operator asked "was anything changed last month?" wants to start the check, leave, and
//! find the verdict kept. The page only asks (a `requested` row in `audit_verifications`,
//! recorded as an action). The `audit-verifier` role of `shop run` ([`run_role`], one
//! verification at a time through [`work`]) checks one stream after another with the same
//! check as `shop audit verify` (`event_store::audit`), counting as it goes; one whose
//! process stopped is taken again from the start (at shutdown at once, after a crash once
//! its count has not moved for [`STALE`]).

use std::time::{Duration, Instant};

use axum::extract::State;
use chrono::{DateTime, Utc};
use event_store::audit;
use maud::{Markup, html};
use platform::supervisor::RoleCtx;
use serde::Deserialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    Console, ConsoleError, actions,
    pace::Pace,
    session::{Act, Operator},
    view,
};

/// A running verification whose count has not moved for this long lost its runner.
pub const STALE: Duration = Duration::from_secs(30);

/// How often a runner writes its count.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Broken streams kept per verification (the count goes on).
const MAX_BROKEN: usize = 1000;

/// Verifications listed.
const LIMIT: i64 = 20;

/// One verification as the page shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Verification {
    id: i64,
    requested_by: String,
    reason: String,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    state: String,
    streams: i32,
    checked: i32,
    events: i64,
    broken: serde_json::Value,
    requested_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

impl Verification {
    fn open(&self) -> bool {
        self.state != "done"
    }

    fn broken(&self) -> &[serde_json::Value] {
        self.broken.as_array().map_or(&[], Vec::as_slice)
    }

    /// What the state column says; a running one nobody counts for is waiting for a runner.
    fn shown_state(&self, now: DateTime<Utc>) -> String {
        let stale = self
            .updated_at
            .is_some_and(|u| (now - u).to_std().is_ok_and(|d| d > STALE));
        match self.state.as_str() {
            "running" if stale => "interrupted: starts again when a shop run takes it".into(),
            "requested" => "waiting for the audit-verifier role".into(),
            s => s.into(),
        }
    }

    fn range(&self) -> String {
        match (self.since, self.until) {
            (None, None) => "the whole store".into(),
            (Some(s), None) => format!("since {}", view::time(s)),
            (None, Some(u)) => format!("until {}", view::time(u)),
            (Some(s), Some(u)) => format!("{} to {}", view::time(s), view::time(u)),
        }
    }
}

pub async fn page(State(console): State<Console>, op: Operator) -> Result<Markup, ConsoleError> {
    render(&console, &op, None).await
}

#[derive(Deserialize)]
pub struct VerifyForm {
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    #[serde(default)]
    why: String,
}

fn bound(s: &str, what: &str) -> Result<Option<DateTime<Utc>>, ConsoleError> {
    match s.trim() {
        "" => Ok(None),
        s => view::parse_time(s).map(Some).ok_or_else(|| {
            ConsoleError::BadRequest(format!(
                "{what}: `{s}` is not a time (YYYY-MM-DDTHH:MM, UTC)"
            ))
        }),
    }
}

/// `POST /console/audit/verify`: asks for a verification of the range (recorded).
pub async fn start(
    State(console): State<Console>,
    act: Act<VerifyForm>,
) -> Result<Markup, ConsoleError> {
    let since = bound(&act.form.since, "since")?;
    let until = bound(&act.form.until, "until")?;
    if let (Some(s), Some(u)) = (since, until)
        && s >= u
    {
        return Err(ConsoleError::BadRequest(
            "the range ends before it starts".into(),
        ));
    }
    let why = act.form.why.trim();
    let asked: Result<i64, sqlx::Error> = sqlx::query_scalar(
        "INSERT INTO audit_verifications (requested_by, reason, since, until)
         VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(&act.operator.actor)
    .bind(why)
    .bind(since)
    .bind(until)
    .fetch_one(&console.pool)
    .await;
    let (target, outcome) = match asked {
        Ok(id) => (
            format!("audit:{id}"),
            Ok(format!("verification {id} asked for")),
        ),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => (
            "audit".to_owned(),
            Err("a verification is already waiting or running: one at a time".to_owned()),
        ),
        Err(e) => return Err(e.into()),
    };
    let shown = actions::shown(&outcome);
    actions::record(
        &console.pool,
        actions::NewAction {
            actor: &act.operator.actor,
            action: "verify_audit",
            target: &target,
            order_id: None,
            reason: why,
            outcome: &shown,
            detail: Some(serde_json::json!({"since": since, "until": until})),
        },
    )
    .await?;
    render(&console, &act.operator, Some(outcome)).await
}

/// Seconds between reloads while a verification waits or runs.
const REFRESH_SECS: u32 = 2;

async fn render(
    console: &Console,
    op: &Operator,
    notice: Option<Result<String, String>>,
) -> Result<Markup, ConsoleError> {
    let all: Vec<Verification> = sqlx::query_as(
        "SELECT id, requested_by, reason, since, until, state, streams, checked, events, broken,
                requested_at, started_at, updated_at, finished_at
         FROM audit_verifications ORDER BY id DESC LIMIT $1",
    )
    .bind(LIMIT)
    .fetch_all(&console.pool)
    .await?;
    let now = Utc::now();
    let every = all
        .iter()
        .any(Verification::open)
        .then_some((REFRESH_SECS, "/console/audit"));
    Ok(view::refreshing(
        op,
        "Audit",
        every,
        html! {
            h1 { "Audit trail" }
            @if let Some(outcome) = &notice {
                @match outcome {
                    Ok(s) => p.ok #outcome { (s) },
                    Err(e) => p.bad #outcome { (e) },
                }
            }
            p.hint {
                "Checks the hash chain of every stream with an event in the range (all of each such stream), as "
                code { "shop audit verify" } " does: content changed, events removed or reordered, a tail cut off. "
                "One order's chain is on its page, a customer's orders on hers. The check runs in the background; leave and come back. "
                "What the chain alone cannot show (a stream deleted or cut short since) a signed checkpoint can: "
                a href="/console/audit/checkpoints" { "compare a checkpoint with the store" } "."
            }
            form.filters method="post" action="/console/audit/verify" {
                (view::csrf(op))
                label { "Since (UTC)" input type="datetime-local" name="since" {} }
                label { "Until (UTC)" input type="datetime-local" name="until" {} }
                label { "Why (recorded)" input name="why" size="30" {} }
                button type="submit" { "Verify" }
            }
            @if all.is_empty() { p.empty { "No verification yet." } } @else {
                table.verifications {
                    thead { tr {
                        th.num { "#" } th { "Asked by" } th { "Range" } th { "State" } th { "Progress" }
                        th.num { "Events" } th.num { "Broken" } th { "Asked" } th { "Finished" }
                    } }
                    tbody {
                        @for v in &all {
                            tr id={ "verification-" (v.id) } title=(v.reason) {
                                td.num { (v.id) }
                                td { (v.requested_by) }
                                td { (v.range()) }
                                td.state { (v.shown_state(now)) }
                                td.progress {
                                    @if v.state == "running" {
                                        (Pace::of(v.checked.into(), v.streams.into(), v.started_at, v.updated_at, now)
                                            .bar(v.checked.into(), v.streams.into(), "streams"))
                                    } @else if v.state == "done" {
                                        (v.checked) " streams"
                                    }
                                }
                                td.num { (v.events) }
                                @if v.broken().is_empty() { td.num.broken { "0" } } @else { td.num.bad.broken { (v.broken().len()) } }
                                td { (view::time(v.requested_at)) }
                                td { (v.finished_at.map_or("-".into(), view::time)) }
                            }
                        }
                    }
                }
                @for v in all.iter().filter(|v| !v.broken().is_empty()).take(1) {
                    h2 { "Where chains break (verification " (v.id) ")" }
                    table.broken {
                        thead { tr { th { "Stream" } th { "Type" } th.num { "Version" } th { "Problem" } } }
                        tbody {
                            @for b in v.broken() {
                                @let id = b["stream_id"].as_str().unwrap_or_default();
                                @let kind = b["stream_type"].as_str().unwrap_or("?");
                                tr {
                                    td { @if kind == "order" { a href={ "/console/orders/" (id) } { (id) } } @else { (id) } }
                                    td { (kind) }
                                    td.num { (b["version"]) }
                                    td.bad { (b["problem"].as_str().unwrap_or_default()) }
                                }
                            }
                        }
                    }
                    @if v.broken().len() == MAX_BROKEN { p.hint { "The first " (MAX_BROKEN) " are kept." } }
                }
            }
        },
    ))
}

/// A verification taken by a runner: the range and the start that marks it as this runner's.
#[derive(sqlx::FromRow)]
struct Taken {
    id: i64,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    started_at: DateTime<Utc>,
}

/// Takes the oldest verification asked for (or one whose runner went quiet) and runs it to
/// its end, or until `shutdown` (it is then asked for again). Returns its id, or `None`
/// when none was waiting.
pub async fn work(pool: &PgPool, shutdown: &CancellationToken) -> Result<Option<i64>, sqlx::Error> {
    let taken: Option<Taken> =
        sqlx::query_as(
            "UPDATE audit_verifications
             SET state = 'running', started_at = clock_timestamp(), updated_at = clock_timestamp(),
                 streams = 0, checked = 0, events = 0, broken = '[]'
             WHERE id = (SELECT id FROM audit_verifications
                         WHERE state = 'requested'
                            OR (state = 'running' AND updated_at < now() - make_interval(secs => $1))
                         ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING id, since, until, started_at",
        )
        .bind(STALE.as_secs_f64())
        .fetch_optional(pool)
        .await?;
    let Some(job) = taken else {
        return Ok(None);
    };
    let id = job.id;
    tracing::info!(verification = id, "audit verification started");
    verify(pool, &job, shutdown).await?;
    Ok(Some(id))
}

async fn verify(
    pool: &PgPool,
    job: &Taken,
    shutdown: &CancellationToken,
) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let ids = audit::streams_in(&mut conn, job.since, job.until).await?;
    let keyed_from = audit::keyed_from(&mut conn).await?;
    let streams = i32::try_from(ids.len()).unwrap_or(i32::MAX);
    let mut count = Count::default();
    if !count.write(pool, job, streams, false).await? {
        return Ok(());
    }
    let mut last = Instant::now();
    for id in ids {
        if shutdown.is_cancelled() {
            // Asked for again: the next runner starts it over at once.
            sqlx::query(
                "UPDATE audit_verifications SET state = 'requested' WHERE id = $1 AND started_at = $2",
            )
            .bind(job.id)
            .bind(job.started_at)
            .execute(pool)
            .await?;
            return Ok(());
        }
        let report = audit::verify_stream_keyed_from(&mut conn, id, keyed_from).await?;
        count.checked += 1;
        count.events += report.events as i64;
        if let Some(b) = report.broken
            && count.broken.len() < MAX_BROKEN
        {
            let kind: Option<String> =
                sqlx::query_scalar("SELECT stream_type FROM streams WHERE stream_id = $1")
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?;
            count.broken.push(serde_json::json!({
                "stream_id": id,
                "stream_type": kind,
                "version": b.stream_version,
                "problem": format!("{:?}", b.problem),
            }));
        }
        if last.elapsed() >= PROGRESS_EVERY {
            if !count.write(pool, job, streams, false).await? {
                return Ok(());
            }
            last = Instant::now();
        }
    }
    count.write(pool, job, streams, true).await?;
    tracing::info!(
        verification = job.id,
        streams = count.checked,
        broken = count.broken.len(),
        "audit verification done"
    );
    Ok(())
}

#[derive(Default)]
struct Count {
    checked: i32,
    events: i64,
    broken: Vec<serde_json::Value>,
}

impl Count {
    /// Writes the count (and `done`); `false` when another runner has taken the verification
    /// over (this one stops).
    async fn write(
        &self,
        pool: &PgPool,
        job: &Taken,
        streams: i32,
        done: bool,
    ) -> Result<bool, sqlx::Error> {
        let updated = sqlx::query(
            "UPDATE audit_verifications
             SET streams = $3, checked = $4, events = $5, broken = $6, updated_at = clock_timestamp(),
                 state = CASE WHEN $7 THEN 'done' ELSE state END,
                 finished_at = CASE WHEN $7 THEN clock_timestamp() END
             WHERE id = $1 AND started_at = $2 AND state = 'running'",
        )
        .bind(job.id)
        .bind(job.started_at)
        .bind(streams)
        .bind(self.checked)
        .bind(self.events)
        .bind(serde_json::Value::Array(self.broken.clone()))
        .bind(done)
        .execute(pool)
        .await?
        .rows_affected();
        Ok(updated == 1)
    }
}

/// How often the role looks for a verification when none is waiting.
const POLL: Duration = Duration::from_secs(1);

/// The `audit-verifier` role of `shop run`: runs the verifications operators ask for, one at
/// a time, until shutdown. A database error ends the run (the supervisor restarts it; the
/// verification is taken again once [`STALE`]).
pub async fn run_role(pool: PgPool, ctx: RoleCtx) -> anyhow::Result<()> {
    let shutdown = ctx.shutdown().clone();
    ctx.up();
    while !shutdown.is_cancelled() {
        if work(&pool, &shutdown).await?.is_none() {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
    Ok(())
}

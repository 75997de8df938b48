//! Projections: each read model's version, position, lag and state, and its rebuilds.
//!
//! Why: a read model that disagrees with the event store (a bug fixed in a projector, a
//! partition behind Kafka's retention) is repaired by rebuilding it from the store. An
//! operator starts that here with `read_side::rebuild::request`, the same call as the GraphQL
//! mutation `rebuildProjection`, watches it (events done of the store's count, events/s,
//! ETA; the page reloads itself every 2 s while a rebuild runs, without JavaScript) and can
//! abort it. A rebuild started here waits for the operator: once it has caught up with the
//! store it keeps following the feed, `ready`, and switches in (one transaction,
//! `read_side::rebuild::switch`) only when the operator presses Switch, after checking it.
//! The previous version keeps serving, and is kept, until then. Starting, switching and
//! aborting are recorded in the action log.

use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use read_side::{
    projection::Kind,
    rebuild::{self, Abort, RebuildError, Switch},
    status::{ProjectionStatus, RebuildStatus, State as Phase},
};
use serde::Deserialize;

use crate::{
    Console, ConsoleError, actions,
    pace::Pace,
    session::{Act, Operator},
    view,
};

/// How often the page reloads itself while a rebuild runs.
const REFRESH_SECS: u32 = 2;

pub async fn page(State(console): State<Console>, op: Operator) -> Result<Markup, ConsoleError> {
    render(&console, &op, None).await
}

#[derive(Deserialize)]
pub struct WhyForm {
    /// Why, in the operator's words (recorded; required to abort).
    #[serde(default)]
    why: String,
}

/// `POST /console/projections/{name}/{rebuild|switch|abort}`.
pub async fn act(
    State(console): State<Console>,
    Path((name, action)): Path<(String, String)>,
    act: Act<WhyForm>,
) -> Result<Markup, ConsoleError> {
    let Some(&name) = rebuild::known_names().iter().find(|k| **k == name) else {
        return Err(ConsoleError::NotFound(format!("no projection `{name}`")));
    };
    let why = act.form.why.trim();
    let (verb, outcome) = match action.as_str() {
        "rebuild" => ("rebuild_projection", start(&console, name).await?),
        "switch" => ("switch_projection", switch(&console, rebuilt(name)?).await?),
        "abort" => {
            if why.is_empty() {
                return Err(ConsoleError::BadRequest(
                    "say why the rebuild is aborted".into(),
                ));
            }
            ("abort_rebuild", abort(&console, rebuilt(name)?).await?)
        }
        other => return Err(ConsoleError::NotFound(format!("no action `{other}`"))),
    };
    let shown = actions::shown(&outcome);
    actions::record(
        &console.pool,
        actions::NewAction {
            actor: &act.operator.actor,
            action: verb,
            target: &format!("projection:{name}"),
            order_id: None,
            reason: why,
            outcome: &shown,
            detail: None,
        },
    )
    .await?;
    render(&console, &act.operator, Some((name, outcome))).await
}

/// A projection rebuilt from the event store (analytics replays Kafka: no version to switch
/// to or abort).
fn rebuilt(name: &str) -> Result<Kind, ConsoleError> {
    Kind::parse(name).ok_or_else(|| {
        ConsoleError::BadRequest(format!(
            "`{name}` is rebuilt by replaying its Kafka topics: it has no rebuilt version to switch to or abort"
        ))
    })
}

async fn start(console: &Console, name: &str) -> Result<Result<String, String>, ConsoleError> {
    Ok(match rebuild::request(&console.pool, name, true).await {
        Ok(Some(version)) => Ok(format!(
            "building version {version} from the event store; switch to it once it is ready"
        )),
        Ok(None) => Ok("reset: its consumer group replays its topics from the start".into()),
        Err(RebuildError::Database(e)) => return Err(e.into()),
        Err(e) => Err(e.to_string()),
    })
}

async fn switch(console: &Console, kind: Kind) -> Result<Result<String, String>, ConsoleError> {
    Ok(match rebuild::switch(&console.pool, kind).await {
        Ok(Switch::Now { version }) => Ok(format!(
            "switching to version {version}; the previous version is dropped then"
        )),
        Ok(Switch::WhenCaughtUp { version }) => Ok(format!(
            "version {version} switches in as soon as it has caught up with the store"
        )),
        Ok(Switch::Nothing) => Err("there is no rebuilt version to switch to".into()),
        Err(RebuildError::Database(e)) => return Err(e.into()),
        Err(e) => Err(e.to_string()),
    })
}

async fn abort(console: &Console, kind: Kind) -> Result<Result<String, String>, ConsoleError> {
    Ok(match rebuild::abort(&console.pool, kind).await {
        Ok(Abort::Dropped { version }) => {
            Ok(format!("aborted; version {version}'s tables are dropped"))
        }
        Ok(Abort::Requested { version }) => Ok(format!(
            "the running rebuild of version {version} stops at its next batch and drops its tables"
        )),
        Ok(Abort::Nothing) => Err("there is no rebuild to abort".into()),
        Err(RebuildError::Database(e)) => return Err(e.into()),
        Err(e) => Err(e.to_string()),
    })
}

type Notice<'a> = (&'a str, Result<String, String>);

async fn render(
    console: &Console,
    op: &Operator,
    notice: Option<Notice<'_>>,
) -> Result<Markup, ConsoleError> {
    let all = read_side::status::all(&console.pool, console.watermarks.as_ref()).await?;
    let moving = all.iter().any(|p| p.rebuild.is_some());
    let every = moving.then_some((REFRESH_SECS, "/console/projections"));
    Ok(view::refreshing(
        op,
        "Projections",
        every,
        html! {
            h1 { "Projections" }
            @if let Some((name, outcome)) = &notice {
                @match outcome {
                    Ok(s) => p.ok #outcome { (name) ": " (s) },
                    Err(e) => p.bad #outcome { (name) ": " (e) },
                }
            }
            p.hint {
                "A rebuild replays the event store into a new version while the current one serves. "
                "Once it has caught up it is ready: it follows the live feed and waits for your Switch "
                "(check it first); the current version is kept until then, and dropped after. "
                "Analytics is rebuilt by replaying its Kafka topics instead."
            }
            @for p in &all { (card(op, p)) }
        },
    ))
}

fn card(op: &Operator, p: &ProjectionStatus) -> Markup {
    html! {
        section.projection id={ "projection-" (p.name) } {
            h2 { (p.name) }
            dl {
                dt { "Version" } dd.version { (p.version) }
                dt { "State" } dd.state { (state(p)) }
                dt { "Position" } dd { (p.position) }
                dt { "Lag" } dd { (p.lag.map_or("?".into(), |l| l.to_string())) }
                @if let Some(n) = p.behind_retention.filter(|n| *n > 0) {
                    dt { "Behind retention" } dd.bad { (n) " partition(s): rebuild it" }
                }
                dt { "Last rebuilt" } dd { (p.last_rebuilt_at.map_or("never".into(), view::time)) }
            }
            @match &p.rebuild {
                Some(r) => {
                    (progress(r, Utc::now()))
                    @if r.held && !r.aborting {
                        form.inline method="post" action={ "/console/projections/" (p.name) "/switch" } {
                            (view::csrf(op))
                            input name="why" placeholder="why (recorded)" aria-label="why switch" {}
                            button type="submit" {
                                @if r.ready { "Switch to v" (r.version) } @else { "Switch to v" (r.version) " once caught up" }
                            }
                        }
                    }
                    form.inline method="post" action={ "/console/projections/" (p.name) "/abort" } {
                        (view::csrf(op))
                        input name="why" placeholder="why abort (recorded)" aria-label="why abort" required {}
                        button.danger type="submit" { "Abort the rebuild" }
                    }
                }
                None => {
                    form.inline method="post" action={ "/console/projections/" (p.name) "/rebuild" } {
                        (view::csrf(op))
                        input name="why" placeholder="why (recorded)" aria-label="why rebuild" {}
                        button type="submit" { "Rebuild" }
                    }
                }
            }
        }
    }
}

fn state(p: &ProjectionStatus) -> String {
    match (&p.state, &p.rebuild) {
        (_, Some(r)) if r.aborting => format!("aborting the rebuild of v{}", r.version),
        (Phase::Rebuilding, Some(r)) if r.ready && r.held => format!(
            "live; v{} is ready: caught up, following the feed, waiting for a switch",
            r.version
        ),
        (Phase::Rebuilding, Some(r)) if r.ready => format!("live; switching to v{}", r.version),
        (Phase::Rebuilding, Some(r)) => format!("live; rebuilding v{}", r.version),
        (Phase::RebuildInterrupted, Some(r)) if r.error.is_some() => {
            format!(
                "live; the rebuild of v{} failed (retried within minutes)",
                r.version
            )
        }
        (Phase::RebuildInterrupted, Some(r)) => {
            format!(
                "live; the rebuild of v{} was interrupted (resumes within seconds)",
                r.version
            )
        }
        _ => "live".into(),
    }
}

/// A rebuild's progress bar and numbers.
fn progress(r: &RebuildStatus, now: DateTime<Utc>) -> Markup {
    html! {
        div.rebuild {
            (pace(r, now).bar(r.processed, r.total, "events"))
            @if let Some(e) = &r.error { p.bad { (e) } }
        }
    }
}

fn pace(r: &RebuildStatus, now: DateTime<Utc>) -> Pace {
    Pace::of(r.processed, r.total, r.started_at, r.updated_at, now)
}

/// The overview's compact table, linking here.
pub fn summary(all: &[ProjectionStatus]) -> Markup {
    html! {
        table.projections {
            thead { tr { th { "Projection" } th.num { "Version" } th { "State" } th.num { "Position" } th.num { "Lag" } th { "Rebuild" } } }
            tbody {
                @for p in all {
                    tr {
                        td { a href={ "/console/projections#projection-" (p.name) } { (p.name) } }
                        td.num { (p.version) }
                        td { (state(p)) }
                        td.num { (p.position) }
                        td.num { (p.lag.map_or("?".into(), |l| l.to_string())) }
                        td { @if let Some(r) = &p.rebuild { (pace(r, Utc::now()).percent) "%" } }
                    }
                }
            }
        }
    }
}

//! The dead-letter pages: one list over every source with filters, a detail view with the
//! whole envelope, and the actions (replay one, discard one with a reason, replay the open
//! ones a filter shows, in the order they failed, and correct-then-replay a saga message).
//! Every action goes through [`resolve`], which routes it to its source's library call and
//! records it.
//!
//! Only a saga message can be corrected: it is a message between processes, and its
//! receiver checks the corrected one as it checks any (a reply must still answer a command
//! the saga sent). A read-side dead letter is an event of the store, which is the source of
//! truth and never edited; an outbox row is an event or command already committed with it.
//! A correction is recorded with the message before and after.
//!
//! An email recorded dead is *resent* rather than replayed: drafted afresh from the event
//! store and the customer's profile as they are now (`notifications::resend`), so fixing
//! her address first is the usual recovery; discarding gives it up.

use axum::extract::{Path, Query, State};
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use crate::{
    Console, ConsoleError, actions,
    letters::{self, Filter, Letter, LetterId, Source},
    session::{Act, Operator},
    view,
};

/// The list's query (and the selection form's fields): every value a string, checked here.
#[derive(Debug, Default, Deserialize)]
pub struct FilterForm {
    #[serde(default)]
    source: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    order: String,
    /// `YYYY-MM-DDTHH:MM` (a datetime-local input, UTC) or RFC 3339.
    #[serde(default)]
    since: String,
    #[serde(default)]
    all: String,
}

impl FilterForm {
    fn parse(&self) -> Result<Filter, ConsoleError> {
        let source = match self.source.trim() {
            "" => None,
            s => Some(
                Source::parse(s)
                    .ok_or_else(|| ConsoleError::BadRequest(format!("unknown source `{s}`")))?,
            ),
        };
        let order_id = match self.order.trim() {
            "" => None,
            s => Some(
                Uuid::parse_str(s)
                    .map_err(|_| ConsoleError::BadRequest(format!("`{s}` is not an order id")))?,
            ),
        };
        let since = match self.since.trim() {
            "" => None,
            s => Some(view::parse_time(s).ok_or_else(|| {
                ConsoleError::BadRequest(format!("`{s}` is not a time (YYYY-MM-DDTHH:MM, UTC)"))
            })?),
        };
        let reason = Some(self.reason.trim().to_owned()).filter(|r| !r.is_empty());
        Ok(Filter {
            source,
            reason,
            order_id,
            since,
            all: !self.all.is_empty(),
        })
    }

    fn hidden(&self) -> Markup {
        html! {
            input type="hidden" name="source" value=(self.source);
            input type="hidden" name="reason" value=(self.reason);
            input type="hidden" name="order" value=(self.order);
            input type="hidden" name="since" value=(self.since);
        }
    }
}

pub async fn list(
    State(console): State<Console>,
    op: Operator,
    Query(form): Query<FilterForm>,
) -> Result<Markup, ConsoleError> {
    let filter = form.parse()?;
    let gathered = letters::gather(&console, &filter).await?;
    let open = gathered
        .letters
        .iter()
        .filter(|l| l.status == "open")
        .count();
    Ok(view::page(
        &op,
        "Dead letters",
        html! {
            h1 { "Dead letters" }
            form.filters method="get" {
                label { "Source"
                    select name="source" {
                        option value="" { "all" }
                        @for s in Source::ALL {
                            option value=(s.slug()) selected[filter.source == Some(s)] { (s.slug()) }
                        }
                    }
                }
                label { "Reason" input name="reason" value=(form.reason) placeholder="e.g. invalid_payload" {} }
                label { "Order id" input name="order" value=(form.order) size="38" {} }
                label { "Since (UTC)" input type="datetime-local" name="since" value=(form.since) {} }
                label { "Resolved too" input type="checkbox" name="all" value="1" checked[filter.all] {} }
                button type="submit" { "Filter" }
            }
            @if let Some(e) = &gathered.saga_unreadable {
                p.warn { "The saga's dead letters could not be read: " (e) }
            }
            p { (gathered.letters.len()) " dead letter(s) shown, " (open) " open." }
            (table(&gathered.letters))
            @if open > 0 {
                form.action method="post" action="/console/dead-letters/replay" {
                    (view::csrf(&op))
                    (form.hidden())
                    label { "Why (recorded)" input name="why" size="40" {} }
                    button type="submit" { "Replay the " (open) " open dead letter(s) shown, oldest first" }
                }
            }
        },
    ))
}

/// Dead letters as a table (the list, and an order's page).
pub fn table(letters: &[Letter]) -> Markup {
    html! {
        @if letters.is_empty() {
            p.empty { "No dead letters." }
        } @else {
            table.letters {
                thead { tr {
                    th { "Source" } th { "Where" } th { "Order" } th { "Reason" } th { "Error" }
                    th.num { "Attempts" } th { "First seen" } th { "Last seen" } th { "Status" } th.num { "Held behind" } th {}
                } }
                tbody {
                    @for l in letters {
                        tr {
                            td { (l.id.source().slug()) }
                            td { (l.origin) }
                            td { @if let Some(o) = l.order_id { a href={ "/console/orders/" (o) } { (o) } } @else { "-" } }
                            td.bad { (l.reason) }
                            td { (truncate(&l.error, 160)) }
                            td.num { (l.attempts) }
                            td { (l.first_seen.map_or("-".into(), view::time)) }
                            td { (l.last_seen.map_or("-".into(), view::time)) }
                            td.status { (l.status) }
                            td.num { (l.held_behind.len()) }
                            td { a href={ "/console/dead-letters/" (l.id.path()) } { "Inspect" } }
                        }
                    }
                }
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

pub async fn show(
    State(console): State<Console>,
    op: Operator,
    Path((source, id)): Path<(String, String)>,
) -> Result<Markup, ConsoleError> {
    let id = LetterId::parse(&source, &id)?;
    let l = letters::find(&console, id).await?;
    let open = l.status == "open";
    let body = shown(&console, &l.body).await?;
    Ok(view::page(
        &op,
        "Dead letter",
        html! {
            h1 { "Dead letter " (id.path()) }
            dl {
                dt { "Status" } dd.status { (l.status) }
                dt { "Source" } dd { (id.source().slug()) " · " (l.origin) }
                dt { "Order" } dd { @if let Some(o) = l.order_id { a href={ "/console/orders/" (o) } { (o) } } @else { "-" } }
                dt { "Reason" } dd.bad { (l.reason) }
                dt { "Error" } dd { pre { (l.error) } }
                dt { "Attempts" } dd { (l.attempts) }
                dt { "First seen" } dd { (l.first_seen.map_or("-".into(), view::time)) }
                dt { "Last seen" } dd { (l.last_seen.map_or("-".into(), view::time)) }
                @for (k, v) in &l.details { dt { (k) } dd { pre { (v) } } }
            }
            @if !l.held_behind.is_empty() {
                h2 { "Held behind it" }
                p { "Later events of this order wait until this one is replayed or discarded: versions "
                    (l.held_behind.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")) "." }
            }
            h2 { "Message" }
            pre.body { (body) }
            @if open && id.source() == Source::Saga {
                h2 { "Correct, then replay" }
                p.hint { "For a message its receiver cannot read (a field misnamed, a value malformed): it must stay a "
                    (if l.origin.ends_with(".replies.dlq") { "participant's reply" } else { "command of this participant" })
                    " about the same order, and its receiver checks it as any other. The message before and after is recorded." }
                form.action.correct method="post" action={ "/console/dead-letters/" (id.path()) "/correct" } {
                    (view::csrf(&op))
                    textarea name="body" rows="12" aria-label="corrected message" required { (editable(&l.body)) }
                    label { "Why (required)" input name="why" size="40" required {} }
                    button type="submit" { "Replay the corrected message" }
                }
            }
            @if open {
                h2 { "Recover" }
                @if id.source() == Source::ReadSide {
                    p.hint { "Replay applies the event as the event store holds it (the source of truth), then the events held behind it." }
                }
                @if id.source() == Source::Email {
                    p.hint { "Resend drafts the email again from the order's events and the customer's profile as they are now "
                        "(fix her address on her profile first if the server refused it) and sends it once, with the same Message-ID." }
                }
                form.action method="post" action={ "/console/dead-letters/" (id.path()) "/replay" } {
                    (view::csrf(&op))
                    label { "Why (recorded)" input name="why" size="40" {} }
                    button type="submit" {
                        @match id.source() {
                            Source::Outbox => "Retry publishing",
                            Source::Email => "Resend",
                            _ => "Replay",
                        }
                    }
                }
                @if id.source() != Source::Outbox {
                    form.action method="post" action={ "/console/dead-letters/" (id.path()) "/discard" } {
                        (view::csrf(&op))
                        label { "Why (required)" input name="why" size="40" required {} }
                        button.danger type="submit" { "Discard" }
                    }
                }
            }
        },
    ))
}

/// A message as shown: pretty JSON with a forgotten customer's sealed values marked
/// `"erased"` (as `shop dlq show` and the audit trail show them), or its text.
async fn shown(console: &Console, body: &[u8]) -> Result<String, ConsoleError> {
    let mut conn = console.pool.acquire().await?;
    Ok(
        match platform::vault::shown_message(&mut conn, body).await? {
            Some(value) => view::pretty(&value),
            None => String::from_utf8_lossy(body).into_owned(),
        },
    )
}

/// A message as an operator edits it: its JSON indented, or its text.
fn editable(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .map(|v| view::pretty(&v))
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
}

#[derive(Deserialize)]
pub struct ReasonForm {
    /// Why, in the operator's words (recorded).
    #[serde(default)]
    why: String,
    /// A corrected message (correct-then-replay only).
    #[serde(default)]
    body: String,
}

/// What an operator can do to a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Replay,
    Discard,
    /// Replay this body instead (saga messages only).
    Correct(Vec<u8>),
}

pub async fn act(
    State(console): State<Console>,
    Path((source, id, action)): Path<(String, String, String)>,
    act: Act<ReasonForm>,
) -> Result<Markup, ConsoleError> {
    let id = LetterId::parse(&source, &id)?;
    let action = match action.as_str() {
        "replay" => Action::Replay,
        "discard" => Action::Discard,
        "correct" if id.source() == Source::Saga => {
            Action::Correct(act.form.body.clone().into_bytes())
        }
        "correct" => {
            return Err(ConsoleError::BadRequest(
                "only a saga message can be corrected: a read-side dead letter is an event of the store (never edited), an outbox row was committed with its event, an email is drafted from the store and the profile".into(),
            ));
        }
        other => return Err(ConsoleError::NotFound(format!("no action `{other}`"))),
    };
    let reason = act.form.why.trim();
    if action != Action::Replay && reason.is_empty() {
        return Err(ConsoleError::BadRequest(
            "say why the dead letter is discarded or corrected".into(),
        ));
    }
    let order = letters::find(&console, id).await?.order_id;
    let outcome = resolve(&console, &act.operator.actor, (id, order), &action, reason).await?;
    Ok(outcome_page(&act.operator, &[(id, order, outcome)]))
}

/// Replays every open dead letter the filter shows, oldest first; stops at nothing (each
/// outcome is shown and recorded).
pub async fn replay_selection(
    State(console): State<Console>,
    act: Act<SelectionForm>,
) -> Result<Markup, ConsoleError> {
    let filter = act.form.filter.parse()?;
    let gathered = letters::gather(&console, &filter).await?;
    let reason = act.form.why.trim();
    let mut outcomes = Vec::new();
    for l in gathered.letters.iter().filter(|l| l.status == "open") {
        let outcome = resolve(
            &console,
            &act.operator.actor,
            (l.id, l.order_id),
            &Action::Replay,
            reason,
        )
        .await?;
        outcomes.push((l.id, l.order_id, outcome));
    }
    Ok(outcome_page(&act.operator, &outcomes))
}

#[derive(Deserialize)]
pub struct SelectionForm {
    #[serde(flatten)]
    filter: FilterForm,
    #[serde(default)]
    why: String,
}

/// Runs one action on its source and records it; `Ok` holds the outcome shown (a refusal
/// such as "not open any more" is an outcome, not an error). A correction the saga's check
/// refuses is recorded, then answered 400.
async fn resolve(
    console: &Console,
    actor: &str,
    (id, order): (LetterId, Option<Uuid>),
    action: &Action,
    reason: &str,
) -> Result<Result<String, String>, ConsoleError> {
    use notifications::resend::{ResendError, Resent};
    use read_side::dead_letters as rs;
    use saga::dead_letters::{Resolution, ResolveError};
    let mut bad_correction = None;
    let mut before = None;
    let outcome: Result<String, String> = match (id, action) {
        (LetterId::ReadSide(n), Action::Replay) => match rs::replay(&console.pool, n).await {
            Ok(released) => Ok(format!("replayed; {released} held event(s) applied")),
            Err(rs::ResolveError::Database(e)) => return Err(e.into()),
            Err(e) => Err(e.to_string()),
        },
        (LetterId::ReadSide(n), Action::Discard) => match rs::discard(&console.pool, n).await {
            Ok(released) => Ok(format!("discarded; {released} held event(s) applied")),
            Err(rs::ResolveError::Database(e)) => return Err(e.into()),
            Err(e) => Err(e.to_string()),
        },
        (LetterId::Outbox(n), Action::Replay) => {
            if event_store::outbox::retry_failed(&console.pool, n).await? {
                Ok("put back in line for the relay".into())
            } else {
                Err(format!("outbox row {n} is not failed any more"))
            }
        }
        (LetterId::Outbox(_), Action::Discard) => {
            return Err(ConsoleError::BadRequest(
                "a failed outbox row is retried, not discarded (its order would lose an event)"
                    .into(),
            ));
        }
        (LetterId::Email(e), Action::Replay) => match &console.mailer {
            None => Err("this process sends no email (no SMTP settings)".into()),
            Some(mailer) => match notifications::resend::resend(&console.pool, mailer, e).await {
                Ok(Resent::Sent) => Ok("sent again; the SMTP server accepted it".into()),
                Ok(Resent::NoAddress) => {
                    Ok("not sent: the customer has no profile any more".into())
                }
                Err(ResendError::Database(e)) => return Err(e.into()),
                Err(e) => Err(e.to_string()),
            },
        },
        (LetterId::Email(e), Action::Discard) => {
            if notifications::resend::discard(&console.pool, e).await? {
                Ok("discarded".into())
            } else {
                Err(format!("the email of event {e} is not dead any more"))
            }
        }
        (LetterId::ReadSide(_) | LetterId::Outbox(_) | LetterId::Email(_), Action::Correct(_)) => {
            return Err(ConsoleError::BadRequest(
                "only a saga message can be corrected".into(),
            ));
        }
        (LetterId::Saga(m), action) => match letters::broker(console).await {
            Err(e) => Err(format!("RabbitMQ: {e}")),
            Ok((conn, amqp)) => {
                let resolution = match action {
                    Action::Replay => Resolution::Replay,
                    Action::Discard => Resolution::Discard,
                    Action::Correct(body) => Resolution::ReplayCorrected(body.clone()),
                };
                let r = saga::dead_letters::resolve(&conn, &amqp.names, m, &resolution).await;
                conn.close(200, "resolved".into()).await.ok();
                match (r, action) {
                    (Ok(_), Action::Discard) => Ok("discarded".into()),
                    (Ok(d), Action::Correct(_)) => {
                        before = Some(as_json(&d.body));
                        Ok(format!(
                            "corrected and republished to {}",
                            d.original_routing_key
                        ))
                    }
                    (Ok(d), _) => Ok(format!("republished to {}", d.original_routing_key)),
                    (Err(ResolveError::Correction(e)), _) => {
                        bad_correction = Some(e.to_string());
                        Err(e.to_string())
                    }
                    (Err(e), _) => Err(e.to_string()),
                }
            }
        },
    };
    let verb = match action {
        Action::Replay => "replay_dead_letter",
        Action::Discard => "discard_dead_letter",
        Action::Correct(_) => "correct_and_replay_dead_letter",
    };
    // A correction keeps the message before and after with the action.
    let detail = match action {
        Action::Correct(after) => Some(serde_json::json!({
            "before": before,
            "after": as_json(after),
        })),
        _ => None,
    };
    let shown = actions::shown(&outcome);
    actions::record(
        &console.pool,
        actions::NewAction {
            actor,
            action: verb,
            target: &format!("dead-letter:{}", id.path()),
            order_id: order,
            reason,
            outcome: &shown,
            detail,
        },
    )
    .await?;
    match bad_correction {
        Some(e) => Err(ConsoleError::BadRequest(e)),
        None => Ok(outcome),
    }
}

/// A message as recorded: its JSON, or its text.
fn as_json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()))
}

type Outcome = (LetterId, Option<Uuid>, Result<String, String>);

fn outcome_page(op: &Operator, outcomes: &[Outcome]) -> Markup {
    view::page(
        op,
        "Dead letters",
        html! {
            h1 { "Done" }
            @if outcomes.is_empty() { p.empty { "Nothing was open to replay." } }
            table {
                thead { tr { th { "Dead letter" } th { "Order" } th { "Outcome" } } }
                tbody {
                    @for (id, order, outcome) in outcomes {
                        tr {
                            td { a href={ "/console/dead-letters/" (id.path()) } { (id.path()) } }
                            td { @if let Some(o) = order { a href={ "/console/orders/" (o) } { (o) } } @else { "-" } }
                            @match outcome {
                                Ok(s) => td.ok.outcome { (s) },
                                Err(e) => td.bad.outcome { (e) },
                            }
                        }
                    }
                }
            }
            p { a href="/console/dead-letters" { "Back to the dead letters" } }
        },
    )
}

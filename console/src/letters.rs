//! Dead letters of every source as one list: read-side projections (`dead_letters`, with the
//! events parked behind them), the saga's RabbitMQ dead-letter queues (commands, replies and
//! each participant's), outbox rows the relay set aside after a broker refused them, and
//! emails the email group recorded dead (`email_inbox`).
//!
//! Each source keeps its own store and its own recovery (the library calls `shop dlq` and
//! `shop outbox` use); this module only reads them into one shape and routes an action to
//! the right one. RabbitMQ being down hides only its letters: the page says so.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{Console, ConsoleError};

/// Where a dead letter lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// A projection could not apply an event (`dead_letters`).
    ReadSide,
    /// A saga command or reply in a RabbitMQ dead-letter queue.
    Saga,
    /// An outbox row the broker refused (the relay stopped retrying it).
    Outbox,
    /// An email the SMTP server refused for good, or that could not be written.
    Email,
}

impl Source {
    pub const ALL: [Source; 4] = [
        Source::ReadSide,
        Source::Saga,
        Source::Outbox,
        Source::Email,
    ];

    pub fn slug(self) -> &'static str {
        match self {
            Source::ReadSide => "read-side",
            Source::Saga => "saga",
            Source::Outbox => "outbox",
            Source::Email => "email",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.slug() == s)
    }
}

/// A dead letter's identity in its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LetterId {
    ReadSide(i64),
    /// The message id.
    Saga(Uuid),
    /// The outbox row id.
    Outbox(i64),
    /// The id of the order event the email is about.
    Email(Uuid),
}

impl LetterId {
    pub fn source(self) -> Source {
        match self {
            LetterId::ReadSide(_) => Source::ReadSide,
            LetterId::Saga(_) => Source::Saga,
            LetterId::Outbox(_) => Source::Outbox,
            LetterId::Email(_) => Source::Email,
        }
    }

    /// `read-side/12`, `saga/<message id>`, `outbox/7`: its path under `/console/dead-letters`.
    pub fn path(self) -> String {
        match self {
            LetterId::ReadSide(n) | LetterId::Outbox(n) => format!("{}/{n}", self.source().slug()),
            LetterId::Saga(id) | LetterId::Email(id) => format!("{}/{id}", self.source().slug()),
        }
    }

    pub fn parse(source: &str, id: &str) -> Result<Self, ConsoleError> {
        let bad = || ConsoleError::BadRequest(format!("`{source}/{id}` names no dead letter"));
        match Source::parse(source).ok_or_else(bad)? {
            Source::ReadSide => id.parse().map(LetterId::ReadSide).map_err(|_| bad()),
            Source::Saga => Uuid::parse_str(id).map(LetterId::Saga).map_err(|_| bad()),
            Source::Outbox => id.parse().map(LetterId::Outbox).map_err(|_| bad()),
            Source::Email => Uuid::parse_str(id).map(LetterId::Email).map_err(|_| bad()),
        }
    }
}

/// One dead letter, whatever its source.
#[derive(Debug, Clone)]
pub struct Letter {
    pub id: LetterId,
    /// The projection, the dead-letter queue, or `destination:target` of the outbox row.
    pub origin: String,
    pub order_id: Option<Uuid>,
    /// The error class (`invalid_payload`, `malformed_reply`, `rejected`...).
    pub reason: String,
    pub error: String,
    pub attempts: String,
    pub first_seen: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
    /// `open`, or how a read-side one was resolved (`replayed`, `discarded`).
    pub status: String,
    /// Later events of the same order held behind it (read side: their stream versions).
    pub held_behind: Vec<i64>,
    /// Where it came from, in its source's terms (topic/partition/offset, queue and routing key,
    /// outbox destination and message id), and its headers.
    pub details: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What a list of dead letters shows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub source: Option<Source>,
    pub reason: Option<String>,
    pub order_id: Option<Uuid>,
    pub since: Option<DateTime<Utc>>,
    /// Resolved read-side letters too.
    pub all: bool,
}

impl Filter {
    fn wants(&self, l: &Letter) -> bool {
        self.source.is_none_or(|s| s == l.id.source())
            && self.reason.as_ref().is_none_or(|r| *r == l.reason)
            && self.order_id.is_none_or(|o| l.order_id == Some(o))
            && self
                .since
                .is_none_or(|t| l.last_seen.or(l.first_seen).is_some_and(|seen| seen >= t))
    }
}

/// The dead letters that match, oldest first, and why the saga's could not be read (if so).
#[derive(Debug, Default)]
pub struct Gathered {
    pub letters: Vec<Letter>,
    pub saga_unreadable: Option<String>,
}

/// How long the console waits for RabbitMQ before it shows the page without saga letters.
const BROKER_WAIT: Duration = Duration::from_secs(3);

pub async fn gather(console: &Console, filter: &Filter) -> Result<Gathered, ConsoleError> {
    let mut out = Gathered::default();
    let wants = |s: Source| filter.source.is_none_or(|f| f == s);
    if wants(Source::ReadSide) {
        out.letters.extend(read_side(console, !filter.all).await?);
    }
    if wants(Source::Outbox) {
        out.letters.extend(outbox(console).await?);
    }
    if wants(Source::Email) {
        out.letters.extend(emails(console).await?);
    }
    if wants(Source::Saga) {
        match saga_letters(console).await {
            Ok(letters) => out.letters.extend(letters),
            Err(e) => out.saga_unreadable = Some(e),
        }
    }
    out.letters.retain(|l| filter.wants(l));
    out.letters.sort_by_key(|l| l.first_seen.or(l.last_seen));
    Ok(out)
}

/// One dead letter by id (resolved read-side ones included).
pub async fn find(console: &Console, id: LetterId) -> Result<Letter, ConsoleError> {
    let missing = || ConsoleError::NotFound(format!("no dead letter {}", id.path()));
    let letters = match id {
        LetterId::ReadSide(n) => {
            let d = read_side::dead_letters::get(&console.pool, n)
                .await?
                .ok_or_else(missing)?;
            return Ok(read_side_letter(d, &parked(console).await?));
        }
        LetterId::Outbox(_) => outbox(console).await?,
        LetterId::Email(_) => emails(console).await?,
        LetterId::Saga(_) => saga_letters(console)
            .await
            .map_err(|e| ConsoleError::Refused(format!("RabbitMQ: {e}")))?,
    };
    letters.into_iter().find(|l| l.id == id).ok_or_else(missing)
}

type Parked = HashMap<(String, Uuid), Vec<i64>>;

/// The events parked behind each projection's stream.
async fn parked(console: &Console) -> Result<Parked, ConsoleError> {
    Ok(read_side::dead_letters::parked(&console.pool)
        .await?
        .into_iter()
        .map(|(p, s, v)| ((p, s), v))
        .collect())
}

async fn read_side(console: &Console, only_open: bool) -> Result<Vec<Letter>, ConsoleError> {
    let rows = read_side::dead_letters::list(&console.pool, only_open).await?;
    let parked = parked(console).await?;
    Ok(rows
        .into_iter()
        .map(|d| read_side_letter(d, &parked))
        .collect())
}

fn read_side_letter(d: read_side::dead_letters::DeadLetter, parked: &Parked) -> Letter {
    let held_behind = match (d.status.as_str(), d.stream_id) {
        ("open", Some(s)) => parked
            .get(&(d.projection.clone(), s))
            .cloned()
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    Letter {
        id: LetterId::ReadSide(d.id),
        origin: d.projection.clone(),
        order_id: d.stream_id,
        reason: d.error_class,
        error: d.error_message,
        attempts: d.attempts.to_string(),
        first_seen: Some(d.first_failed_at),
        last_seen: Some(d.last_failed_at),
        status: d.status,
        held_behind,
        details: vec![
            ("topic".into(), d.topic),
            ("partition".into(), d.partition.to_string()),
            ("offset".into(), d.offset.to_string()),
            (
                "stream version".into(),
                d.stream_version.map_or("-".into(), |v| v.to_string()),
            ),
            (
                "event id".into(),
                d.event_id.map_or("-".into(), |v| v.to_string()),
            ),
        ],
        body: d.payload,
    }
}

async fn outbox(console: &Console) -> Result<Vec<Letter>, ConsoleError> {
    let rows = event_store::outbox::list_failed(&console.pool).await?;
    Ok(rows
        .into_iter()
        .map(|r| Letter {
            id: LetterId::Outbox(r.id),
            origin: format!("{}:{}", r.destination.as_str(), r.target),
            order_id: Uuid::parse_str(&r.ordering_key).ok(),
            reason: "rejected".into(),
            error: r.last_error.unwrap_or_default(),
            attempts: r.attempts.to_string(),
            first_seen: Some(r.created_at),
            last_seen: r.failed_at,
            status: "open".into(),
            held_behind: Vec::new(),
            details: vec![
                ("message id".into(), r.message_id.to_string()),
                ("ordering key".into(), r.ordering_key),
                ("headers".into(), crate::view::pretty(&r.headers)),
            ],
            body: r.payload,
        })
        .collect())
}

async fn emails(console: &Console) -> Result<Vec<Letter>, ConsoleError> {
    let rows = notifications::inbox::dead(&console.pool).await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let error = r.error.unwrap_or_default();
            Letter {
                id: LetterId::Email(r.event_id),
                origin: format!("email:{}", r.kind),
                order_id: Some(r.order_id),
                reason: email_reason(&error).into(),
                error,
                attempts: "1".into(),
                first_seen: Some(r.handled_at),
                last_seen: Some(r.handled_at),
                status: "open".into(),
                held_behind: Vec::new(),
                details: vec![
                    ("event id".into(), r.event_id.to_string()),
                    ("kind".into(), r.kind.clone()),
                ],
                // What the email is drafted from on a resend (never kept: the address is the
                // customer's profile's, the text the templates').
                body: serde_json::to_vec(&serde_json::json!({
                    "event_id": r.event_id,
                    "order_id": r.order_id,
                    "kind": r.kind,
                }))
                .unwrap_or_default(),
            }
        })
        .collect())
}

/// An email's error class: the SMTP server refused it (a 5xx, or 4xx too often), or the shop
/// could not write it (its event, the profile or the template).
/// (The texts of `notifications::mailer`: `SMTP <code>`, `deferred N times, last: ...`.)
fn email_reason(error: &str) -> &'static str {
    let server = [
        "SMTP ",
        "deferred ",
        "not sendable to this server",
        "unusable address",
    ];
    if server.iter().any(|p| error.starts_with(p)) {
        "refused"
    } else {
        "unwritable"
    }
}

/// The order a saga message is about: its correlation id, else the body's `order_id`.
fn saga_order(correlation: Option<&str>, body: &[u8]) -> Option<Uuid> {
    correlation
        .and_then(|c| Uuid::parse_str(c).ok())
        .or_else(|| {
            serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("order_id")?.as_str().map(str::to_owned))
                .and_then(|s| Uuid::parse_str(&s).ok())
        })
}

pub(crate) async fn broker(console: &Console) -> Result<(lapin::Connection, &crate::Amqp), String> {
    let amqp = console
        .amqp
        .as_ref()
        .ok_or("this process has no saga settings")?;
    let conn = tokio::time::timeout(
        BROKER_WAIT,
        platform::amqp::connect(&amqp.url, "shop-console"),
    )
    .await
    .map_err(|_| format!("no answer within {BROKER_WAIT:?}"))?
    .map_err(|e| e.to_string())?;
    Ok((conn, amqp))
}

/// Runs `work` on a connection of its own to the saga's broker, waiting at most
/// [`BROKER_WAIT`] for the answer, then closes it.
pub(crate) async fn on_broker<T, E: std::fmt::Display>(
    console: &Console,
    work: impl AsyncFnOnce(&lapin::Connection, &crate::Amqp) -> Result<T, E>,
) -> Result<T, String> {
    let (conn, amqp) = broker(console).await?;
    let done = match tokio::time::timeout(BROKER_WAIT, work(&conn, amqp)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {BROKER_WAIT:?}")),
    };
    conn.close(200, "done".into()).await.ok();
    done
}

async fn saga_letters(console: &Console) -> Result<Vec<Letter>, String> {
    let listed = on_broker(console, async |conn, amqp| {
        saga::dead_letters::list(conn, &amqp.names).await
    })
    .await;
    Ok(listed?
        .into_iter()
        .filter_map(|d| {
            // A message without an id cannot be replayed or discarded by id: shown in
            // RabbitMQ's own tools only.
            let id = d.message_id?;
            Some(Letter {
                id: LetterId::Saga(id),
                origin: d.queue.clone(),
                order_id: saga_order(d.correlation_id.as_deref(), &d.body),
                reason: d.error_class,
                error: d.error_message,
                attempts: d.attempts,
                first_seen: d.first_failure,
                last_seen: d.last_failure,
                status: "open".into(),
                held_behind: Vec::new(),
                details: vec![
                    ("original queue".into(), d.original_queue),
                    ("routing key".into(), d.original_routing_key),
                    (
                        "correlation id".into(),
                        d.correlation_id.unwrap_or_default(),
                    ),
                ],
                body: d.body,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_letter_id_round_trips_through_its_path_and_rejects_anything_else() {
        let id = Uuid::now_v7();
        for l in [
            LetterId::ReadSide(12),
            LetterId::Outbox(7),
            LetterId::Saga(id),
            LetterId::Email(id),
        ] {
            let path = l.path();
            let (source, rest) = path.split_once('/').unwrap();
            assert_eq!(LetterId::parse(source, rest).unwrap(), l);
        }
        for (source, id) in [
            ("read-side", "x"),
            ("saga", "12"),
            ("outbox", "-"),
            ("email", "1"),
            ("mail", &id.to_string()),
        ] {
            assert!(LetterId::parse(source, id).is_err(), "{source}/{id}");
        }
    }

    #[test]
    fn an_email_refused_by_the_server_is_told_from_one_the_shop_could_not_write() {
        for refused in [
            "SMTP 550",
            "deferred 5 times, last: SMTP 451",
            "unusable address",
        ] {
            assert_eq!(email_reason(refused), "refused", "{refused}");
        }
        for unwritable in [
            "order 0190f3a2-5500-7000-8000-000000000550 has no events",
            "the customer's profile is unreadable",
            "the template did not render: x",
        ] {
            assert_eq!(email_reason(unwritable), "unwritable", "{unwritable}");
        }
    }

    #[test]
    fn a_saga_letter_names_its_order_by_correlation_id_or_by_its_body() {
        let order = Uuid::now_v7();
        assert_eq!(saga_order(Some(&order.to_string()), b"junk"), Some(order));
        let body = serde_json::json!({"order_id": order}).to_string();
        assert_eq!(saga_order(None, body.as_bytes()), Some(order));
        assert_eq!(saga_order(Some("not-a-uuid"), b"{}"), None);
    }

    #[test]
    fn a_filter_matches_on_every_field_it_sets() {
        let order = Uuid::now_v7();
        let letter = Letter {
            id: LetterId::ReadSide(1),
            origin: "order_summary".into(),
            order_id: Some(order),
            reason: "invalid_payload".into(),
            error: String::new(),
            attempts: "1".into(),
            first_seen: Some(Utc::now()),
            last_seen: Some(Utc::now()),
            status: "open".into(),
            held_behind: Vec::new(),
            details: Vec::new(),
            body: Vec::new(),
        };
        assert!(Filter::default().wants(&letter));
        let f = Filter {
            source: Some(Source::ReadSide),
            reason: Some("invalid_payload".into()),
            order_id: Some(order),
            since: Some(Utc::now() - chrono::Duration::minutes(1)),
            all: false,
        };
        assert!(f.wants(&letter));
        for other in [
            Filter {
                source: Some(Source::Saga),
                ..f.clone()
            },
            Filter {
                reason: Some("invariant".into()),
                ..f.clone()
            },
            Filter {
                order_id: Some(Uuid::now_v7()),
                ..f.clone()
            },
            Filter {
                since: Some(Utc::now() + chrono::Duration::minutes(1)),
                ..f.clone()
            },
        ] {
            assert!(!other.wants(&letter), "{other:?}");
        }
    }
}

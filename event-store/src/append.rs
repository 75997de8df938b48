//! Appending events and their outbox messages in one statement, for one stream or many.
//!
//! The statement moves each stream's head row (insert for a new stream, conditional update
//! otherwise) and inserts the events and the outbox rows of exactly the streams whose head
//! moved. A stream whose head did not move (another writer took the expected version, or a
//! younger transaction already wrote the stream) gets nothing written and its caller a
//! conflict; the other streams of the same call are unaffected. Everything happens in the
//! caller's transaction, so more rows (an idempotency record) can join it.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, Row, types::Json};
use uuid::Uuid;

use crate::{
    NewEvent, StoreError,
    hash::{self, HashInput},
    outbox::OutboxMessage,
};

#[derive(Debug, Clone, PartialEq)]
pub struct AppendOutcome {
    /// The stream's version after the append.
    pub version: i64,
    /// The new head hash (pass it as `prev_hash` to the next append).
    pub head_hash: Vec<u8>,
    pub recorded_at: DateTime<Utc>,
}

/// What the caller knows of the stream's head: its version and hash (`0` and
/// [`crate::hash::GENESIS`] for a stream that does not exist yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub version: i64,
    pub head_hash: Vec<u8>,
}

impl Expected {
    pub fn new_stream() -> Self {
        Self {
            version: 0,
            head_hash: crate::hash::GENESIS.to_vec(),
        }
    }
}

/// One stream's append, for [`append_many`]: `events` go onto `stream_id` if it is at
/// `expected`, with `outbox` messages, recorded at `recorded_at` (from [`now_micros`]).
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    pub stream_id: Uuid,
    pub stream_type: &'a str,
    pub expected: &'a Expected,
    pub events: &'a [NewEvent],
    pub outbox: &'a [OutboxMessage],
    pub recorded_at: DateTime<Utc>,
}

/// The statement's common table expressions: `req` (the appends tried), `ins`/`upd` (heads
/// moved), `head` (the stream ids whose head moved), `ev` and `ob` (their events and outbox
/// rows). Parameters are numbered from `first`; `gate`, if given, names an earlier CTE with a
/// `stream_id` column: only those streams are tried (a caller's statement can make the append
/// depend on its own rows, e.g. an idempotency claim).
fn ctes(gate: Option<&str>, first: usize) -> String {
    let p = |n: usize| format!("${}", first + n - 1);
    let gate = gate
        .map(|g| format!("WHERE r.stream_id IN (SELECT stream_id FROM {g})"))
        .unwrap_or_default();
    format!(
        r#"req AS (
    SELECT * FROM unnest({p1}::uuid[], {p2}::text[], {p3}::bigint[], {p4}::bigint[], {p5}::bytea[])
        AS r(stream_id, stream_type, expected, version, head_hash)
    {gate}
), ins AS (
    INSERT INTO streams (stream_id, stream_type, version, head_hash, last_tx)
    SELECT stream_id, stream_type, version, head_hash, pg_current_xact_id()
    FROM req WHERE expected = 0
    ON CONFLICT (stream_id) DO NOTHING
    RETURNING stream_id
), upd AS (
    UPDATE streams s
    SET version = r.version, head_hash = r.head_hash, last_tx = pg_current_xact_id()
    FROM req r
    WHERE r.expected > 0 AND s.stream_id = r.stream_id AND s.version = r.expected
      AND s.last_tx < pg_current_xact_id()
    RETURNING s.stream_id
), head AS (
    SELECT stream_id FROM ins UNION ALL SELECT stream_id FROM upd
), ev AS (
    INSERT INTO events (stream_id, stream_type, stream_version, event_id, event_type,
                        schema_version, payload, metadata, recorded_at, prev_hash, hash,
                        hash_kid)
    SELECT x.s, x.st, x.v, x.id, x.t, x.sv, x.p, x.m, x.at, x.ph, x.h, x.kid
    FROM unnest({p6}::uuid[], {p7}::text[], {p8}::bigint[], {p9}::uuid[], {p10}::text[],
                {p11}::int[], {p12}::jsonb[], {p13}::jsonb[], {p14}::timestamptz[],
                {p15}::bytea[], {p16}::bytea[], {p17}::text[])
        AS x(s, st, v, id, t, sv, p, m, at, ph, h, kid)
    WHERE x.s IN (SELECT stream_id FROM head)
    RETURNING 1
), ob AS (
    INSERT INTO outbox (message_id, destination, target, routing_key, ordering_key, headers, payload)
    SELECT x.id, x.d, x.t, x.rk, x.ok, x.hd, x.p
    FROM unnest({p18}::uuid[], {p19}::uuid[], {p20}::text[], {p21}::text[], {p22}::text[],
                {p23}::text[], {p24}::jsonb[], {p25}::bytea[]) AS x(s, id, d, t, rk, ok, hd, p)
    WHERE x.s IN (SELECT stream_id FROM head)
    RETURNING 1
)"#,
        p1 = p(1),
        p2 = p(2),
        p3 = p(3),
        p4 = p(4),
        p5 = p(5),
        p6 = p(6),
        p7 = p(7),
        p8 = p(8),
        p9 = p(9),
        p10 = p(10),
        p11 = p(11),
        p12 = p(12),
        p13 = p(13),
        p14 = p(14),
        p15 = p(15),
        p16 = p(16),
        p17 = p(17),
        p18 = p(18),
        p19 = p(19),
        p20 = p(20),
        p21 = p(21),
        p22 = p(22),
        p23 = p(23),
        p24 = p(24),
        p25 = p(25),
    )
}

/// Appends `events` to the stream if it is at `expected`, with `outbox` messages, in the
/// caller's transaction, recorded now (see [`append_at`]).
pub async fn append(
    conn: &mut PgConnection,
    stream_id: Uuid,
    stream_type: &str,
    expected: &Expected,
    events: &[NewEvent],
    outbox: &[OutboxMessage],
) -> Result<AppendOutcome, StoreError> {
    append_at(
        conn,
        stream_id,
        stream_type,
        expected,
        events,
        outbox,
        now_micros(),
    )
    .await
}

/// [`append`] with the recorded time chosen by the caller (from [`now_micros`]), for callers
/// that put the time into the outbox messages too. It is part of the hash, so it must have
/// microsecond precision, like `timestamptz`.
pub async fn append_at(
    conn: &mut PgConnection,
    stream_id: Uuid,
    stream_type: &str,
    expected: &Expected,
    events: &[NewEvent],
    outbox: &[OutboxMessage],
    recorded_at: DateTime<Utc>,
) -> Result<AppendOutcome, StoreError> {
    let one = Append {
        stream_id,
        stream_type,
        expected,
        events,
        outbox,
        recorded_at,
    };
    append_many(conn, &[one])
        .await
        .map_err(|e| map_conflict(e, stream_id, expected.version))?
        .pop()
        .expect("one outcome per append")
}

/// Several streams' appends prepared for one statement: their events chained (versions and
/// hashes), every column as an array. [`append_many`] runs them alone; a caller with more
/// rows to write in the same statement embeds [`AppendBatch::ctes`] in its own statement,
/// binds [`AppendBatch::bind`] at that place, and reads the moved streams from `head`.
pub struct AppendBatch<'a> {
    appends: Vec<Append<'a>>,
    cols: Columns<'a>,
}

/// Parameters [`AppendBatch::ctes`] takes.
pub const APPEND_PARAMS: usize = 25;

impl<'a> AppendBatch<'a> {
    /// Prepares `appends` (distinct streams: panics otherwise, as two appends to one stream
    /// in one transaction would chain onto the same head).
    pub fn new(appends: &[Append<'a>]) -> Self {
        let mut cols = Columns::default();
        for a in appends {
            assert!(
                !cols.heads.contains(&a.stream_id),
                "an append batch takes each stream once"
            );
            if !a.events.is_empty() {
                cols.push(a);
            }
        }
        Self {
            appends: appends.to_vec(),
            cols,
        }
    }

    /// Whether no append has events (nothing to write).
    pub fn is_empty(&self) -> bool {
        self.cols.heads.is_empty()
    }

    /// The CTEs (see [`ctes`]) with parameters from `$first` ([`APPEND_PARAMS`] of them).
    pub fn ctes(gate: Option<&str>, first: usize) -> String {
        ctes(gate, first)
    }

    /// Binds the batch's arrays, in the order [`AppendBatch::ctes`] numbers them.
    pub fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let c = &self.cols;
        q.bind(&c.heads)
            .bind(&c.head_types)
            .bind(&c.expected)
            .bind(&c.versions)
            .bind(&c.head_hashes)
            .bind(&c.ev_streams)
            .bind(&c.ev_types)
            .bind(&c.ev_versions)
            .bind(&c.ids)
            .bind(&c.event_types)
            .bind(&c.schema_versions)
            .bind(&c.payloads)
            .bind(&c.metadatas)
            .bind(&c.recorded)
            .bind(&c.prev_hashes)
            .bind(&c.hashes)
            .bind(&c.kids)
            .bind(&c.ob_streams)
            .bind(&c.ob_ids)
            .bind(&c.ob_destinations)
            .bind(&c.ob_targets)
            .bind(&c.ob_routing)
            .bind(&c.ob_ordering)
            .bind(&c.ob_headers)
            .bind(&c.ob_payloads)
    }

    /// One outcome per append, in order, given the streams whose head moved.
    pub fn outcomes(&self, moved: &[Uuid]) -> Vec<Result<AppendOutcome, StoreError>> {
        if !moved.is_empty() {
            // Readers of the feed and the outbox in this process look again shortly (they
            // find the rows once the caller commits).
            crate::wake::appended();
        }
        let mut heads = self
            .cols
            .heads
            .iter()
            .zip(&self.cols.versions)
            .zip(&self.cols.head_hashes);
        self.appends
            .iter()
            .map(|a| {
                if a.events.is_empty() {
                    return Ok(AppendOutcome {
                        version: a.expected.version,
                        head_hash: a.expected.head_hash.clone(),
                        recorded_at: a.recorded_at,
                    });
                }
                let ((id, version), head_hash) = heads.next().expect("one head per written append");
                if moved.contains(id) {
                    Ok(AppendOutcome {
                        version: *version,
                        head_hash: head_hash.clone(),
                        recorded_at: a.recorded_at,
                    })
                } else {
                    Err(StoreError::Conflict {
                        stream_id: a.stream_id,
                        expected: a.expected.version,
                    })
                }
            })
            .collect()
    }
}

/// The column arrays of a batch: per stream, per event and per outbox message.
#[derive(Default)]
struct Columns<'a> {
    heads: Vec<Uuid>,
    head_types: Vec<&'a str>,
    expected: Vec<i64>,
    versions: Vec<i64>,
    head_hashes: Vec<Vec<u8>>,
    ev_streams: Vec<Uuid>,
    ev_types: Vec<&'a str>,
    ev_versions: Vec<i64>,
    ids: Vec<Uuid>,
    event_types: Vec<&'a str>,
    schema_versions: Vec<i32>,
    payloads: Vec<Json<&'a Value>>,
    metadatas: Vec<Json<Value>>,
    recorded: Vec<DateTime<Utc>>,
    prev_hashes: Vec<Vec<u8>>,
    hashes: Vec<Vec<u8>>,
    kids: Vec<Option<&'static str>>,
    ob_streams: Vec<Uuid>,
    ob_ids: Vec<Uuid>,
    ob_destinations: Vec<&'a str>,
    ob_targets: Vec<&'a str>,
    ob_routing: Vec<&'a str>,
    ob_ordering: Vec<&'a str>,
    ob_headers: Vec<Json<&'a Value>>,
    ob_payloads: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    /// Adds one stream's append: its events chained (versions and hashes) onto `expected`.
    fn push(&mut self, a: &Append<'a>) {
        let mut prev = a.expected.head_hash.clone();
        for (i, e) in a.events.iter().enumerate() {
            let version = a.expected.version + 1 + i as i64;
            let metadata = serde_json::to_value(&e.metadata).expect("metadata serializes");
            let (hash, kid) = hash::sign(
                &prev,
                &HashInput {
                    stream_id: a.stream_id,
                    stream_version: version,
                    event_id: e.event_id,
                    event_type: &e.event_type,
                    schema_version: e.schema_version,
                    payload: &e.payload,
                    metadata: &metadata,
                    recorded_at: a.recorded_at,
                },
            );
            self.ev_streams.push(a.stream_id);
            self.ev_types.push(a.stream_type);
            self.ev_versions.push(version);
            self.ids.push(e.event_id);
            self.event_types.push(&e.event_type);
            self.schema_versions.push(e.schema_version);
            self.payloads.push(Json(&e.payload));
            self.metadatas.push(Json(metadata));
            self.recorded.push(a.recorded_at);
            self.prev_hashes
                .push(std::mem::replace(&mut prev, hash.clone()));
            self.hashes.push(hash);
            self.kids.push(kid);
        }
        for m in a.outbox {
            self.ob_streams.push(a.stream_id);
            self.ob_ids.push(m.message_id);
            self.ob_destinations.push(m.destination.as_str());
            self.ob_targets.push(&m.target);
            self.ob_routing.push(&m.routing_key);
            self.ob_ordering.push(&m.ordering_key);
            self.ob_headers.push(Json(&m.headers));
            self.ob_payloads.push(&m.payload);
        }
        self.heads.push(a.stream_id);
        self.head_types.push(a.stream_type);
        self.expected.push(a.expected.version);
        self.versions
            .push(a.expected.version + a.events.len() as i64);
        self.head_hashes.push(prev);
    }
}

/// Appends to several streams at once, in the caller's transaction, with one statement:
/// each stream's events and outbox rows are written if and only if it is at its expected
/// version, so one stream's conflict costs the others nothing. Returns one outcome per
/// append, in order: its [`AppendOutcome`] or [`StoreError::Conflict`].
///
/// The streams must be distinct (panics otherwise). An `Err` of the whole call (a database
/// error, or the events' unique key as the second line of defence) leaves the transaction
/// failed: the caller rolls back, and may retry the appends one by one to isolate it.
pub async fn append_many(
    conn: &mut PgConnection,
    appends: &[Append<'_>],
) -> Result<Vec<Result<AppendOutcome, StoreError>>, sqlx::Error> {
    let batch = AppendBatch::new(appends);
    if batch.is_empty() {
        return Ok(batch.outcomes(&[]));
    }
    // ev and ob run to completion whether or not they are read (data-modifying CTEs).
    let sql = format!(
        "WITH {} SELECT stream_id FROM head",
        AppendBatch::ctes(None, 1)
    );
    let moved: Vec<Uuid> = batch
        .bind(sqlx::query(&sql))
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(batch.outcomes(&moved))
}

/// The events table's own unique key is a second line of defence behind the head row.
fn map_conflict(e: sqlx::Error, stream_id: Uuid, expected: i64) -> StoreError {
    if let sqlx::Error::Database(db) = &e
        && db.constraint() == Some("events_stream_version_key")
    {
        return StoreError::Conflict {
            stream_id,
            expected,
        };
    }
    StoreError::Database(e)
}

/// The current time truncated to microseconds (what `timestamptz` keeps).
pub fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).expect("current time is in range")
}

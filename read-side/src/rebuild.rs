//! Rebuild by replay: a new version of a projection built from the event store while the
//! current one keeps serving, then an atomic switch.
//!
//! 1. [`start`] takes the projection's rebuild lock (a session advisory lock: a second rebuild
//!    is refused, a crashed one releases it) and creates `<base>_v<N+1>` next to the active
//!    version, or resumes an interrupted rebuild from its stored cursor.
//! 2. [`Rebuild::run`] reads the gap-free feed in large batches and folds them into the new
//!    tables; each batch commits with the cursor, so a crash resumes exactly where it stopped.
//!    Nothing is announced or published: a rebuild has no side effects.
//! 3. Near the head, the switch transaction takes the projection's write lock exclusively (the
//!    live projector waits), reads the rest of the feed, copies in any order the live version
//!    has seen further than the feed horizon (from the event store), repoints the views and
//!    records the new active version. Readers see the old version or the new one, never an
//!    empty table. The old tables are dropped afterwards.
//!
//! A rebuild started with [`RebuildOptions::hold`] (the console's) stops short of step 3: it
//! is `ready`, keeps following the feed so it stays caught up, and switches only when an
//! operator says so ([`switch`]) or stops when one aborts it ([`abort`]). A runner that dies
//! meanwhile is resumed by the rebuild worker and waits again.

use std::collections::HashMap;

use event_store::FeedCursor;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::{
    envelope::{Envelope, OrderEnvelope},
    projection::{self, ApplyError, Decoded, Kind, REBUILD_LOCK_NS, Target, versioned},
    registry,
};

#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// Events per transaction (read in pages of 10,000). Larger windows write each order's
    /// row fewer times.
    pub batch_size: i64,
    /// Start from scratch even if an interrupted rebuild could be resumed.
    pub restart: bool,
    /// Once caught up, follow the feed and wait for an operator's [`switch`] instead of
    /// switching at once (kept with the rebuild: a resumed one waits too).
    pub hold: bool,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        Self {
            batch_size: 100_000,
            restart: false,
            hold: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("a rebuild of `{0}` is already running")]
    AlreadyRunning(&'static str),
    #[error(
        "rebuild of `{projection}` stopped at event position {position} (order {stream_id} v{stream_version}): {message}. \
         Fix the cause and run the rebuild again: it resumes from there"
    )]
    Poison {
        projection: &'static str,
        position: i64,
        stream_id: Uuid,
        stream_version: i64,
        message: String,
    },
    /// An operator aborted it ([`abort`]): the new version's tables are gone and the active
    /// version kept serving throughout.
    #[error("the rebuild of `{0}` was aborted by an operator")]
    Aborted(&'static str),
    #[error("unknown projection `{0}`; known: {known}", known = known_names().join(", "))]
    Unknown(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Every projection an operator can rebuild, analytics last.
pub fn known_names() -> Vec<&'static str> {
    let mut known: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
    known.push(crate::analytics::NAME);
    known
}

/// Starts rebuilding the projection `name` in the background (or resumes an interrupted
/// rebuild) and returns the version being built; progress shows in [`crate::status::all`].
/// `analytics` is instead reset, so its group replays its Kafka topics from offset 0 (`None`).
/// The GraphQL mutation and the console both start rebuilds here; the console's `hold` one
/// waits for its [`switch`].
pub async fn request(pool: &PgPool, name: &str, hold: bool) -> Result<Option<i32>, RebuildError> {
    if name == crate::analytics::NAME {
        crate::analytics::rebuild(pool).await?;
        return Ok(None);
    }
    let kind = Kind::parse(name).ok_or_else(|| RebuildError::Unknown(name.to_owned()))?;
    let options = RebuildOptions {
        hold,
        ..RebuildOptions::default()
    };
    let started = start(pool, kind, &options).await?;
    let version = started.version();
    // Runs here at once; if it fails or this process dies, the rebuild stays interrupted and
    // the `rebuilds` role of `shop run` resumes it (run_worker).
    tokio::spawn(async move {
        match started.run(|_| {}).await {
            Ok(_) => {}
            Err(e @ RebuildError::Aborted(_)) => tracing::info!(error = %e, "rebuild aborted"),
            Err(e) => tracing::error!(projection = kind.name(), error = %e, "rebuild failed"),
        }
    });
    Ok(Some(version))
}

/// What [`abort`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// No rebuild ran: the interrupted one's tables are dropped now.
    Dropped { version: i32 },
    /// A rebuild is running: it stops at its next batch (or before switching) and drops
    /// its tables itself.
    Requested { version: i32 },
    /// There was no rebuild to abort.
    Nothing,
}

/// Aborts the rebuild of `kind`, running or interrupted; the active version is untouched.
pub async fn abort(pool: &PgPool, kind: Kind) -> Result<Abort, RebuildError> {
    let mut lock = pool.acquire().await?.detach();
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(REBUILD_LOCK_NS)
        .bind(kind.name())
        .fetch_one(&mut lock)
        .await?;
    let outcome = if free {
        let version: Option<i32> =
            sqlx::query_scalar("SELECT rebuild_version FROM projections WHERE name = $1")
                .bind(kind.name())
                .fetch_one(&mut lock)
                .await?;
        match version {
            Some(version) => {
                discard(pool, kind, version).await?;
                Abort::Dropped { version }
            }
            None => Abort::Nothing,
        }
    } else {
        let version: Option<i32> = sqlx::query_scalar(
            "UPDATE projections SET rebuild_state = 'aborting', rebuild_updated_at = now()
             WHERE name = $1 AND rebuild_version IS NOT NULL RETURNING rebuild_version",
        )
        .bind(kind.name())
        .fetch_optional(&mut lock)
        .await?;
        version.map_or(Abort::Nothing, |version| Abort::Requested { version })
    };
    if free {
        sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
            .bind(REBUILD_LOCK_NS)
            .bind(kind.name())
            .execute(&mut lock)
            .await?;
    }
    let _ = sqlx::Connection::close(lock).await;
    tracing::info!(projection = kind.name(), outcome = ?outcome, "rebuild abort");
    Ok(outcome)
}

/// What [`switch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// The rebuild had caught up: it switches in within a second.
    Now { version: i32 },
    /// The rebuild is still replaying: it switches in by itself once it has caught up.
    WhenCaughtUp { version: i32 },
    /// There was no rebuild to switch to (none, or one being aborted).
    Nothing,
}

/// Lets the held rebuild of `kind` switch in ([`RebuildOptions::hold`]); its runner does the
/// atomic switch and drops the previous version.
pub async fn switch(pool: &PgPool, kind: Kind) -> Result<Switch, RebuildError> {
    let released: Option<(i32, Option<String>)> = sqlx::query_as(
        "UPDATE projections SET rebuild_hold = false
         WHERE name = $1 AND rebuild_version IS NOT NULL AND rebuild_state IS DISTINCT FROM 'aborting'
         RETURNING rebuild_version, rebuild_state",
    )
    .bind(kind.name())
    .fetch_optional(pool)
    .await?;
    let outcome = match released {
        Some((version, state)) if state.as_deref() == Some("ready") => Switch::Now { version },
        Some((version, _)) => Switch::WhenCaughtUp { version },
        None => Switch::Nothing,
    };
    tracing::info!(projection = kind.name(), outcome = ?outcome, "rebuild switch");
    Ok(outcome)
}

/// How often a held rebuild reads the feed for events appended since.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Drops an aborted rebuild's tables and clears it from the projection's row (the caller
/// holds the rebuild lock).
async fn discard(pool: &PgPool, kind: Kind, version: i32) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for base in registry::get(kind).tables() {
        drop_table(&mut tx, &versioned(base, version)).await?;
    }
    sqlx::query(
        "UPDATE projections SET rebuild_version = NULL, rebuild_state = NULL, rebuild_cursor_tx = NULL,
                rebuild_cursor_pos = NULL, rebuild_processed = 0, rebuild_total = NULL,
                rebuild_started_at = NULL, rebuild_updated_at = NULL, rebuild_error = NULL,
                rebuild_hold = false
         WHERE name = $1 AND rebuild_version = $2",
    )
    .bind(kind.name())
    .bind(version)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Whether an operator asked the rebuild of `name` to stop.
async fn aborting(conn: &mut PgConnection, name: &str) -> Result<bool, sqlx::Error> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT rebuild_state FROM projections WHERE name = $1")
            .bind(name)
            .fetch_one(conn)
            .await?;
    Ok(state.as_deref() == Some("aborting"))
}

/// How far a rebuild is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub processed: i64,
    /// Events in the store when the rebuild started (an estimate of the work: the feed grows).
    pub total: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub projection: &'static str,
    pub version: i32,
    pub events: i64,
    pub resumed: bool,
}

/// Events per feed read.
const PAGE: i64 = 10_000;

/// Decoded events of the feed, applied in one transaction.
struct Window {
    decoded: Vec<Decoded>,
    /// Feed events read (including other stream types, which no projection here reads).
    read: usize,
    cursor: FeedCursor,
}

/// How long a rebuild waits at the feed horizon for transactions that began before it.
const HORIZON_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads the feed from `cursor` in pages, sending windows of about `window` events, until a
/// page comes back short (the feed horizon) once every transaction that began before the read
/// has ended (waiting at most [`HORIZON_WAIT`]: a short transaction elsewhere in the cluster
/// must not leave committed events to chance; a long one is left to the switch's catch-up).
/// Stops early when the receiver is gone.
async fn read_windows(
    pool: PgPool,
    kind: Kind,
    mut cursor: FeedCursor,
    window: i64,
    out: tokio::sync::mpsc::Sender<Result<Window, RebuildError>>,
) {
    let result: Result<(), RebuildError> = async {
        let mut conn = pool.acquire().await?;
        let page = PAGE.min(window);
        let mark = event_store::feed_mark(&mut conn).await?;
        let mut waiting_since: Option<std::time::Instant> = None;
        loop {
            let mut w = Window {
                decoded: Vec::new(),
                read: 0,
                cursor,
            };
            let mut at_horizon = false;
            while (w.read as i64) < window {
                let (events, next) = event_store::read_feed(&mut conn, cursor, page).await?;
                at_horizon = (events.len() as i64) < page;
                w.read += events.len();
                w.decoded.extend(decode(kind, events)?);
                cursor = next;
                w.cursor = next;
                if at_horizon {
                    let since = *waiting_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() < HORIZON_WAIT
                        && !event_store::feed_reached(&mut conn, mark).await?
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                    break;
                }
            }
            if w.read > 0 && out.send(Ok(w)).await.is_err() {
                return Ok(());
            }
            if at_horizon {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(e) = result {
        let _ = out.send(Err(e)).await;
    }
}

fn decode(kind: Kind, events: Vec<event_store::StoredEvent>) -> Result<Vec<Decoded>, RebuildError> {
    events
        .into_iter()
        .filter(|e| e.stream_type == "order")
        .map(|e| {
            let position = e.position;
            let env = Envelope::from_stored(e);
            match env.event() {
                Ok(event) => Ok(Decoded { env, event }),
                Err(err) => Err(RebuildError::Poison {
                    projection: kind.name(),
                    position,
                    stream_id: env.stream_id,
                    stream_version: env.stream_version,
                    message: err.to_string(),
                }),
            }
        })
        .collect()
}

/// A claimed rebuild, ready to run. Holds the rebuild lock until it is dropped.
pub struct Rebuild {
    pool: PgPool,
    kind: Kind,
    /// The session holding the rebuild lock; closed (releasing it) on drop.
    lock: PgConnection,
    from_version: i32,
    version: i32,
    cursor: FeedCursor,
    processed: i64,
    total: i64,
    batch_size: i64,
    resumed: bool,
}

// Long on purpose: claiming a rebuild is one transaction (lock, find or create the version,
// create its tables); its steps share the transaction and the decisions between them.
/// Claims the rebuild of `kind`: refuses if one is running, resumes an interrupted one unless
/// `restart`, otherwise creates the next version's empty tables.
pub async fn start(
    pool: &PgPool,
    kind: Kind,
    options: &RebuildOptions,
) -> Result<Rebuild, RebuildError> {
    let mut lock = pool.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(REBUILD_LOCK_NS)
        .bind(kind.name())
        .fetch_one(&mut lock)
        .await?;
    if !locked {
        return Err(RebuildError::AlreadyRunning(kind.name()));
    }
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "SELECT active_version, rebuild_version, rebuild_cursor_tx::text AS tx, rebuild_cursor_pos,
                rebuild_processed, rebuild_total
         FROM projections WHERE name = $1 FOR UPDATE",
    )
    .bind(kind.name())
    .fetch_one(&mut *tx)
    .await?;
    let active: i32 = row.try_get("active_version")?;
    let interrupted: Option<i32> = row.try_get("rebuild_version")?;
    let mut rebuild = Rebuild {
        pool: pool.clone(),
        kind,
        lock,
        from_version: active,
        version: active + 1,
        cursor: FeedCursor::default(),
        processed: 0,
        total: 0,
        batch_size: options.batch_size.max(1),
        resumed: false,
    };
    match interrupted {
        Some(v) if !options.restart => {
            let tx_id: Option<String> = row.try_get("tx")?;
            rebuild.version = v;
            rebuild.cursor = FeedCursor {
                tx_id: tx_id.and_then(|t| t.parse().ok()).unwrap_or(0),
                position: row
                    .try_get::<Option<i64>, _>("rebuild_cursor_pos")?
                    .unwrap_or(0),
            };
            rebuild.processed = row.try_get("rebuild_processed")?;
            rebuild.total = row.try_get::<Option<i64>, _>("rebuild_total")?.unwrap_or(0);
            rebuild.resumed = true;
            // Unlogged tables come back empty after a PostgreSQL crash: then start over.
            let first = versioned(registry::get(kind).tables()[0], v);
            let (unlogged, empty): (bool, bool) = sqlx::query_as(&format!(
                "SELECT (SELECT relpersistence = 'u' FROM pg_class WHERE oid = '{first}'::regclass),
                        NOT EXISTS (SELECT 1 FROM {first})"
            ))
            .fetch_one(&mut *tx)
            .await?;
            if unlogged && empty && rebuild.processed > 0 {
                tracing::warn!(
                    projection = kind.name(),
                    "the interrupted rebuild's tables were emptied by a database restart; starting over"
                );
                rebuild.cursor = FeedCursor::default();
                rebuild.processed = 0;
                sqlx::query("UPDATE projections SET rebuild_cursor_tx = '0'::xid8, rebuild_cursor_pos = 0, rebuild_processed = 0 WHERE name = $1")
                    .bind(kind.name())
                    .execute(&mut *tx)
                    .await?;
            }
            // An abort asked of a runner that died stays asked: the resumed run honours it.
            // A requester that wants to switch by hand (the console) holds it from now on.
            sqlx::query(
                "UPDATE projections SET rebuild_state = CASE WHEN rebuild_state = 'aborting' THEN 'aborting' ELSE 'running' END,
                        rebuild_error = NULL, rebuild_updated_at = now(), rebuild_hold = rebuild_hold OR $2
                 WHERE name = $1",
            )
            .bind(kind.name())
            .bind(options.hold)
            .execute(&mut *tx)
            .await?;
        }
        _ => {
            for base in registry::get(kind).tables() {
                if let Some(stale) = interrupted {
                    drop_table(&mut tx, &versioned(base, stale)).await?;
                }
                create_bulk_table(
                    &mut tx,
                    &versioned(base, active),
                    &versioned(base, rebuild.version),
                )
                .await?;
            }
            rebuild.total = event_store::count_events(&mut tx).await?;
            sqlx::query(
                "UPDATE projections SET rebuild_version = $2, rebuild_state = 'running', rebuild_cursor_tx = '0'::xid8,
                        rebuild_cursor_pos = 0, rebuild_processed = 0, rebuild_total = $3,
                        rebuild_started_at = now(), rebuild_updated_at = now(), rebuild_error = NULL,
                        rebuild_hold = $4
                 WHERE name = $1",
            )
            .bind(kind.name())
            .bind(rebuild.version)
            .bind(rebuild.total)
            .bind(options.hold)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    tracing::info!(
        projection = kind.name(),
        version = rebuild.version,
        resumed = rebuild.resumed,
        "rebuild started"
    );
    Ok(rebuild)
}

/// An empty copy of `like` for bulk loading: unlogged and with only its primary key. The
/// other indexes and durability come back in [`finish_bulk_table`], before the switch.
async fn create_bulk_table(
    conn: &mut PgConnection,
    like: &str,
    new: &str,
) -> Result<(), sqlx::Error> {
    drop_table(conn, new).await?;
    sqlx::query(&format!(
        "CREATE UNLOGGED TABLE {new} (LIKE {like} INCLUDING ALL EXCLUDING INDEXES)"
    ))
    .execute(&mut *conn)
    .await?;
    let pkey: Option<String> = sqlx::query_scalar(&format!(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = '{like}'::regclass AND contype = 'p'"
    ))
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(pkey) = pkey {
        sqlx::query(&format!("ALTER TABLE {new} ADD {pkey}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Gives a bulk-loaded table the secondary indexes of `like` and makes it logged (idempotent,
/// so a resumed rebuild can run it again).
async fn finish_bulk_table(
    conn: &mut PgConnection,
    like: &str,
    new: &str,
) -> Result<(), sqlx::Error> {
    let defs: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i
         WHERE i.indrelid = '{like}'::regclass AND NOT i.indisprimary ORDER BY i.indexrelid"
    ))
    .fetch_all(&mut *conn)
    .await?;
    let have: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM pg_index WHERE indrelid = '{new}'::regclass AND NOT indisprimary"
    ))
    .fetch_one(&mut *conn)
    .await?;
    if have < defs.len() as i64 {
        sqlx::query(&format!(
            "DO $$ DECLARE i record; BEGIN
               FOR i IN SELECT indexrelid FROM pg_index WHERE indrelid = '{new}'::regclass AND NOT indisprimary LOOP
                 EXECUTE 'DROP INDEX ' || i.indexrelid::regclass;
               END LOOP; END $$"
        ))
        .execute(&mut *conn)
        .await?;
        for def in &defs {
            // "CREATE [UNIQUE] INDEX name ON table USING ..." -> the same on the new table,
            // named by PostgreSQL.
            let unique = if def.starts_with("CREATE UNIQUE") {
                "UNIQUE "
            } else {
                ""
            };
            let Some((_, using)) = def.split_once(" USING ") else {
                continue;
            };
            sqlx::query(&format!("CREATE {unique}INDEX ON {new} USING {using}"))
                .execute(&mut *conn)
                .await?;
        }
    }
    sqlx::query(&format!("ALTER TABLE {new} SET LOGGED"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn drop_table(conn: &mut PgConnection, table: &str) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

impl Rebuild {
    pub fn version(&self) -> i32 {
        self.version
    }

    pub fn progress(&self) -> Progress {
        Progress {
            processed: self.processed,
            total: self.total,
        }
    }

    /// Replays the feed into the new version, switches to it and drops the old one.
    /// `on_progress` is called after every committed batch.
    pub async fn run(
        mut self,
        mut on_progress: impl FnMut(Progress),
    ) -> Result<Report, RebuildError> {
        let name = self.kind.name();
        let outcome = async {
            // Reading and decoding the next window overlaps applying the current one.
            let (windows_tx, mut windows) = tokio::sync::mpsc::channel(1);
            let reader = tokio::spawn(read_windows(
                self.pool.clone(),
                self.kind,
                self.cursor,
                self.batch_size,
                windows_tx,
            ));
            while let Some(window) = windows.recv().await {
                let window: Window = window?;
                let mut tx = self.pool.begin().await?;
                self.apply(&mut tx, &window.decoded).await?;
                self.cursor = window.cursor;
                self.processed += window.read as i64;
                sqlx::query(
                    "UPDATE projections SET rebuild_cursor_tx = $2::text::xid8, rebuild_cursor_pos = $3,
                            rebuild_processed = $4, rebuild_updated_at = now()
                     WHERE name = $1",
                )
                .bind(name)
                .bind(self.cursor.tx_id.to_string())
                .bind(self.cursor.position)
                .bind(self.processed)
                .execute(&mut *tx)
                .await?;
                let stop = aborting(&mut tx, name).await?;
                tx.commit().await?;
                if stop {
                    return Err(RebuildError::Aborted(name));
                }
                metrics::gauge!("projection_rebuild_processed", "projection" => name)
                    .set(self.processed as f64);
                metrics::gauge!("projection_rebuild_total", "projection" => name)
                    .set(self.total as f64);
                on_progress(self.progress());
            }
            reader.await.map_err(|e| RebuildError::Database(sqlx::Error::Io(std::io::Error::other(e))))?;
            // Indexes and durability before the switch, outside its lock.
            let mut tx = self.pool.begin().await?;
            for base in registry::get(self.kind).tables() {
                finish_bulk_table(
                    &mut tx,
                    &versioned(base, self.from_version),
                    &versioned(base, self.version),
                )
                .await?;
            }
            tx.commit().await?;
            self.follow(&mut on_progress).await?;
            self.switch().await
        }
        .await;
        let result = self.finish(outcome).await;
        // Released before returning, so whoever looks next sees the rebuild stopped (closing
        // the session would release it too, but only once the server has noticed).
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
            .bind(REBUILD_LOCK_NS)
            .bind(name)
            .execute(&mut self.lock)
            .await;
        if let Err(e) = unlocked {
            tracing::warn!(projection = name, error = %e, "releasing the rebuild lock failed; it goes with the session");
        }
        let _ = sqlx::Connection::close(self.lock).await;
        result
    }

    /// Logs the outcome and records a failure on the projection's row.
    async fn finish(&self, outcome: Result<(), RebuildError>) -> Result<Report, RebuildError> {
        let name = self.kind.name();
        match outcome {
            Ok(()) => {
                tracing::info!(
                    projection = name,
                    version = self.version,
                    events = self.processed,
                    "rebuild switched"
                );
                Ok(Report {
                    projection: name,
                    version: self.version,
                    events: self.processed,
                    resumed: self.resumed,
                })
            }
            Err(e @ RebuildError::Aborted(_)) => {
                discard(&self.pool, self.kind, self.version).await?;
                tracing::info!(
                    projection = name,
                    version = self.version,
                    "rebuild aborted; its tables are dropped"
                );
                Err(e)
            }
            Err(e) => {
                tracing::error!(projection = name, error = %e, "rebuild failed");
                let marked = sqlx::query(
                    "UPDATE projections SET rebuild_state = 'failed', rebuild_error = $2, rebuild_updated_at = now()
                     WHERE name = $1 AND rebuild_version = $3",
                )
                .bind(name)
                .bind(e.to_string())
                .bind(self.version)
                .execute(&self.pool)
                .await;
                if let Err(m) = marked {
                    tracing::warn!(error = %m, "could not record the rebuild failure");
                }
                Err(e)
            }
        }
    }

    /// Keeps a held rebuild ([`RebuildOptions::hold`]) caught up with the feed, marked
    /// `ready`, until [`switch`] releases it (or at once for one not held) or [`abort`]
    /// stops it.
    async fn follow(&mut self, on_progress: &mut impl FnMut(Progress)) -> Result<(), RebuildError> {
        let name = self.kind.name();
        loop {
            let mut tx = self.pool.begin().await?;
            let read = self.replay_page(&mut tx).await?;
            let (state, hold): (Option<String>, bool) = sqlx::query_as(
                "UPDATE projections SET rebuild_cursor_tx = $2::text::xid8, rebuild_cursor_pos = $3,
                        rebuild_processed = $4, rebuild_total = GREATEST(rebuild_total, $4),
                        rebuild_state = CASE WHEN rebuild_hold AND rebuild_state = 'running' AND $6 THEN 'ready' ELSE rebuild_state END,
                        rebuild_updated_at = CASE WHEN $5 THEN now() ELSE rebuild_updated_at END
                 WHERE name = $1 RETURNING rebuild_state, rebuild_hold",
            )
            .bind(name)
            .bind(self.cursor.tx_id.to_string())
            .bind(self.cursor.position)
            .bind(self.processed)
            .bind(read > 0)
            // Ready once a page comes back short: caught up with the feed's horizon.
            .bind((read as i64) < PAGE)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            self.total = self.total.max(self.processed);
            if read > 0 {
                on_progress(self.progress());
            }
            if state.as_deref() == Some("aborting") {
                return Err(RebuildError::Aborted(name));
            }
            if !hold {
                return Ok(());
            }
            if (read as i64) < PAGE {
                tokio::time::sleep(FOLLOW_EVERY).await;
            }
        }
    }

    /// Reads and applies one page of the feed after the cursor; returns how many it read.
    async fn replay_page(&mut self, conn: &mut PgConnection) -> Result<usize, RebuildError> {
        let (events, cursor) = event_store::read_feed(conn, self.cursor, PAGE).await?;
        let n = events.len();
        let decoded = decode(self.kind, events)?;
        self.apply(conn, &decoded).await?;
        self.cursor = cursor;
        self.processed += n as i64;
        Ok(n)
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        decoded: &[Decoded],
    ) -> Result<(), RebuildError> {
        if decoded.is_empty() {
            return Ok(());
        }
        match registry::get(self.kind)
            .apply(conn, Target::Version(self.version), decoded)
            .await
        {
            Ok(_) => Ok(()),
            Err(ApplyError::Database(e)) => Err(e.into()),
            Err(ApplyError::Gap { order_id, got, at }) => Err(RebuildError::Poison {
                projection: self.kind.name(),
                position: 0,
                stream_id: order_id,
                stream_version: got,
                message: format!("version gap: the rebuilt projection is at {at}"),
            }),
        }
    }

    /// The atomic switch (see the module docs), then the old tables are dropped.
    async fn switch(&mut self) -> Result<(), RebuildError> {
        let name = self.kind.name();
        let mut tx = self.pool.begin().await?;
        projection::lock_for_switch(&mut tx, self.kind).await?;
        // The row locked: an abort asked from now on waits for this transaction, then finds
        // no rebuild (it was switched); one asked before is seen here.
        let state: Option<String> =
            sqlx::query_scalar("SELECT rebuild_state FROM projections WHERE name = $1 FOR UPDATE")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
        if state.as_deref() == Some("aborting") {
            return Err(RebuildError::Aborted(name));
        }
        while self.replay_page(&mut tx).await? > 0 {}
        self.copy_ahead(&mut tx).await?;
        for base in registry::get(self.kind).tables() {
            sqlx::query(&format!(
                "CREATE OR REPLACE VIEW {base} AS SELECT * FROM {}",
                versioned(base, self.version)
            ))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE projections SET active_version = $2, rebuild_version = NULL, rebuild_state = NULL,
                    rebuild_cursor_tx = NULL, rebuild_cursor_pos = NULL, rebuild_processed = 0, rebuild_total = NULL,
                    rebuild_started_at = NULL, rebuild_updated_at = NULL, rebuild_error = NULL, last_rebuilt_at = now(),
                    rebuild_hold = false
             WHERE name = $1",
        )
        .bind(name)
        .bind(self.version)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut tx = self.pool.begin().await?;
        for base in registry::get(self.kind).tables() {
            drop_table(&mut tx, &versioned(base, self.from_version)).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Orders the live version has applied further than the new one: their transactions
    /// committed after the feed horizon. Their events are copied in from the event store.
    async fn copy_ahead(&mut self, conn: &mut PgConnection) -> Result<(), RebuildError> {
        let base = registry::get(self.kind).tables()[0];
        let ahead: Vec<(Uuid, i64)> = sqlx::query_as(&format!(
            "SELECT o.order_id, COALESCE(n.version, 0) FROM {} o LEFT JOIN {} n USING (order_id)
             WHERE o.version > COALESCE(n.version, 0)",
            versioned(base, self.from_version),
            versioned(base, self.version)
        ))
        .fetch_all(&mut *conn)
        .await?;
        if ahead.is_empty() {
            return Ok(());
        }
        let at: HashMap<Uuid, i64> = ahead.iter().copied().collect();
        let ids: Vec<Uuid> = ahead.iter().map(|(id, _)| *id).collect();
        // One query: this runs while the live projector waits on the switch lock.
        let events: Vec<_> = event_store::load_streams(conn, &ids)
            .await?
            .into_iter()
            .filter(|e| e.stream_version > at[&e.stream_id])
            .collect();
        tracing::info!(
            projection = self.kind.name(),
            orders = ahead.len(),
            events = events.len(),
            "copying events past the feed horizon"
        );
        let decoded = decode(self.kind, events)?;
        self.apply(conn, &decoded).await
    }
}

/// The rebuild worker, a supervised role of `shop run`: every 2 s it resumes any rebuild left
/// interrupted (its process crashed or was killed, its run failed, or a requester such as
/// the GraphQL mutation handed it over), so every rebuild reaches its switch without a
/// manual step. A rebuild stopped by a poison event is retried every 5 minutes (an operator
/// fixes the cause meanwhile; `shop projections status` shows the error).
pub async fn run_worker(pool: PgPool, ctx: platform::supervisor::RoleCtx) -> anyhow::Result<()> {
    // Whatever goes wrong with a rebuild is retried by the supervisor, never taken as a
    // reason to stop the process (and with it the command API): the old version keeps
    // serving meanwhile.
    worker_loop(&pool, &ctx)
        .await
        .map_err(|e| anyhow::anyhow!("rebuild worker: {e:#}"))
}

async fn worker_loop(pool: &PgPool, ctx: &platform::supervisor::RoleCtx) -> anyhow::Result<()> {
    use crate::status::{self, State};
    let mut poisoned: HashMap<&'static str, std::time::Instant> = HashMap::new();
    // One resumed run per projection, each in its own task: a held rebuild follows the feed
    // until an operator switches it, which must not keep the others' resumption waiting.
    let mut running: tokio::task::JoinSet<(&'static str, Result<Report, RebuildError>)> =
        tokio::task::JoinSet::new();
    let mut busy: std::collections::HashSet<&'static str> = std::collections::HashSet::new();
    ctx.up();
    while !ctx.shutdown().is_cancelled() {
        while let Some(done) = running.try_join_next() {
            let (name, result) = done.map_err(|e| anyhow::anyhow!("a rebuild task failed: {e}"))?;
            busy.remove(name);
            match result {
                Ok(r) => tracing::info!(
                    projection = r.projection,
                    version = r.version,
                    events = r.events,
                    "rebuild finished"
                ),
                Err(RebuildError::Aborted(_)) => {}
                Err(e @ RebuildError::Poison { .. }) => {
                    tracing::error!(projection = name, error = %e, "rebuild stopped at a poison event");
                    poisoned.insert(name, std::time::Instant::now());
                }
                Err(e) => return Err(e.into()),
            }
        }
        for p in status::all(pool, None).await? {
            let Some(kind) = Kind::parse(p.name) else {
                continue;
            };
            let cooling = poisoned
                .get(p.name)
                .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(300));
            if p.state != State::RebuildInterrupted || cooling || busy.contains(p.name) {
                continue;
            }
            let rebuild = match start(pool, kind, &RebuildOptions::default()).await {
                Ok(r) => r,
                Err(RebuildError::AlreadyRunning(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            tracing::info!(
                projection = p.name,
                version = rebuild.version(),
                "resuming an interrupted rebuild"
            );
            busy.insert(kind.name());
            running.spawn(async move { (kind.name(), rebuild.run(|_| {}).await) });
        }
        tokio::select! {
            _ = ctx.shutdown().cancelled() => break,
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
        }
    }
    // Dropping a run releases its lock; the next start resumes where it was.
    running.shutdown().await;
    Ok(())
}

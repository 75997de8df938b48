//! Whole-system invariants, for fault-injection tests.
//!
//! A fault test (broker restart, PostgreSQL restart, SIGKILL of `shop run`) under load must
//! prove more than "the orders finished": that the system *healed*, i.e. nothing was lost,
//! duplicated into a wrong state, left held or left stuck anywhere. This module checks that
//! from the outside, reading PostgreSQL, Kafka, RabbitMQ and GraphQL directly, and returns
//! every violation it finds instead of stopping at the first, so one failed run explains
//! itself.
//!
//! Invariants, for the given orders (and system-wide where noted):
//! 1. GraphQL shows each order in a terminal status (CONFIRMED or CANCELLED) with the status
//!    and version the event store has (last event type and stream version).
//! 2. The Kafka topic holds every event of each order (stream id, version and event id),
//!    redeliveries allowed, first arrivals in version order.
//! 3. Participants agree with the outcome: a CONFIRMED order keeps its reservation `held`, its
//!    payment `authorized` and has a shipment; a CANCELLED order holds no reservation and no
//!    authorized payment. System-wide, every SKU's stock is sane (0 <= reserved <= on hand)
//!    and its `reserved` equals the sum of the held reservations.
//! 4. The hash chains of each order's stream and saga stream verify.
//! 5. The outbox is drained (system-wide): nothing pending, nothing set aside as failed.
//! 6. No open read-side dead letters and no parked events (system-wide), and the saga's
//!    RabbitMQ dead-letter queues are empty (a missing queue counts as empty).
//! 7. Each order's saga finished with the order's outcome, and no deadline is armed for it.
//!
//! [`wait_settled`] polls the invariants that legitimately lag behind a fault (1, 3's
//! per-order part, 5's pending rows, 7) until they hold, then runs [`check`] once.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    time::Duration,
};

use domain::{order::OrderStatus, saga::Phase, values::OrderId};
use sqlx::PgPool;
use uuid::Uuid;

/// The running system under test and how to reach each part of it.
pub struct System {
    /// The database the `shop run` process under test uses.
    pub pool: PgPool,
    pub kafka_brokers: String,
    /// Full name of the orders events topic, e.g. `format!("{prefix}orders.events")`.
    pub topic: String,
    /// E.g. `http://127.0.0.1:PORT/graphql`.
    pub graphql_url: String,
    /// A bearer token with the operator role (may read every order).
    pub operator_token: String,
    pub amqp_url: String,
    /// `SAGA_QUEUE_PREFIX` of the process under test.
    pub queue_prefix: String,
    /// `SAGA_STEP_ATTEMPTS` of the process under test (3 unless the test sets it): the saga's
    /// state is a replay of its recorded inputs, and a timed-out step means "retry" or
    /// "compensate" depending on it.
    pub step_attempts: u32,
}

/// What [`check`] found. Counts come from the event store (the source of truth).
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub violations: Vec<String>,
    pub confirmed: usize,
    pub cancelled: usize,
    /// Orders whose last event is not terminal (or that have no events).
    pub unsettled: usize,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// Panics listing every violation.
    #[track_caller]
    pub fn assert_ok(&self) {
        assert!(self.is_ok(), "system invariants violated: {self}");
    }

    fn add(&mut self, violation: impl Into<String>) {
        self.violations.push(violation.into());
    }

    fn extend(&mut self, violations: impl IntoIterator<Item = String>) {
        self.violations.extend(violations);
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 100;
        write!(
            f,
            "{} violation(s); {} confirmed, {} cancelled, {} unsettled",
            self.violations.len(),
            self.confirmed,
            self.cancelled,
            self.unsettled
        )?;
        for v in self.violations.iter().take(SHOWN) {
            write!(f, "\n  - {v}")?;
        }
        if self.violations.len() > SHOWN {
            write!(f, "\n  ... and {} more", self.violations.len() - SHOWN)?;
        }
        Ok(())
    }
}

/// Polls until the invariants that may lag behind a fault hold for `orders` (every order
/// terminal in GraphQL and matching the event store, compensations done, outbox drained,
/// sagas finished) or `timeout` passes, then returns [`check`]'s full report. The final
/// check runs after the timeout and may itself take up to a minute when Kafka lacks events.
pub async fn wait_settled(sys: &System, orders: &[Uuid], timeout: Duration) -> Report {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut settling = Report::default();
        settling_checks(sys, orders, &mut settling).await;
        if settling.is_ok() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    check(sys, orders).await
}

/// Checks every invariant once; an empty `violations` means all hold.
pub async fn check(sys: &System, orders: &[Uuid]) -> Report {
    let mut report = Report::default();
    settling_checks(sys, orders, &mut report).await;
    check_stock(&sys.pool, &mut report).await;
    check_outbox_failed(&sys.pool, &mut report).await;
    check_topic(sys, orders, &mut report).await;
    check_audit(&sys.pool, orders, &mut report).await;
    check_read_dead_letters(&sys.pool, &mut report).await;
    check_saga_dead_letter_queues(sys, &mut report).await;
    report
}

/// The invariants that converge on their own after a fault, cheap enough to poll.
async fn settling_checks(sys: &System, orders: &[Uuid], report: &mut Report) {
    let heads = store_heads(&sys.pool, orders, report).await;
    report.confirmed = heads
        .values()
        .filter(|(s, _)| *s == OrderStatus::Confirmed)
        .count();
    report.cancelled = heads
        .values()
        .filter(|(s, _)| *s == OrderStatus::Cancelled)
        .count();
    report.unsettled = orders
        .len()
        .saturating_sub(report.confirmed + report.cancelled);
    check_statuses(sys, orders, &heads, report).await;
    check_outcomes(&sys.pool, orders, &heads, report).await;
    check_outbox_pending(&sys.pool, report).await;
    check_sagas(sys, orders, &heads, report).await;
}

// ---- 1. GraphQL agrees with the event store -------------------------------------------

/// The status the read side shows after an event of this type (as `order_summary::fold`
/// maps events); `None` for a type that is not an order event.
pub fn status_after(event_type: &str) -> Option<OrderStatus> {
    use domain::wire::*;
    Some(match event_type {
        ORDER_PLACED => OrderStatus::Pending,
        INVENTORY_RESERVED => OrderStatus::InventoryReserved,
        PAYMENT_AUTHORIZED => OrderStatus::PaymentAuthorized,
        ORDER_CONFIRMED => OrderStatus::Confirmed,
        ORDER_CANCELLED => OrderStatus::Cancelled,
        _ => return None,
    })
}

fn is_terminal(status: OrderStatus) -> bool {
    matches!(status, OrderStatus::Confirmed | OrderStatus::Cancelled)
}

/// Each order's status and version folded from the event store (its last event).
async fn store_heads(
    pool: &PgPool,
    orders: &[Uuid],
    report: &mut Report,
) -> HashMap<Uuid, (OrderStatus, i64)> {
    let rows: Vec<(Uuid, i64, String)> = match sqlx::query_as(
        "SELECT DISTINCT ON (stream_id) stream_id, stream_version, event_type
         FROM events WHERE stream_id = ANY($1) ORDER BY stream_id, stream_version DESC",
    )
    .bind(orders)
    .fetch_all(pool)
    .await
    {
        Ok(rows) => rows,
        Err(e) => {
            report.add(format!("event store: cannot read the orders' streams: {e}"));
            return HashMap::new();
        }
    };
    let mut heads = HashMap::new();
    for (order, version, event_type) in rows {
        match status_after(&event_type) {
            Some(status) => {
                heads.insert(order, (status, version));
            }
            None => report.add(format!(
                "order {order}: last event v{version} has type {event_type}, not an order event"
            )),
        }
    }
    heads
}

/// What GraphQL says about one order: its status and version, or why there is none.
type GraphqlView = Result<(String, i64), String>;

async fn check_statuses(
    sys: &System,
    orders: &[Uuid],
    heads: &HashMap<Uuid, (OrderStatus, i64)>,
    report: &mut Report,
) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(http) => http,
        Err(e) => return report.add(format!("GraphQL: cannot build an HTTP client: {e}")),
    };
    // Aliased `order` fields, 50 per request (complexity 3 each, the limit is 500).
    for chunk in orders.chunks(50) {
        match graphql_orders(&http, sys, chunk).await {
            Ok(views) => {
                for (order, view) in chunk.iter().zip(&views) {
                    report.extend(status_problems(*order, view, heads.get(order).copied()));
                }
            }
            Err(e) => report.add(format!(
                "GraphQL: cannot read {} orders from {}: {e}",
                chunk.len(),
                chunk[0]
            )),
        }
    }
}

/// One request reading `order(id) { status version }` for each order of `chunk`, in order.
async fn graphql_orders(
    http: &reqwest::Client,
    sys: &System,
    chunk: &[Uuid],
) -> Result<Vec<GraphqlView>, String> {
    let fields: Vec<String> = chunk
        .iter()
        .enumerate()
        .map(|(i, id)| format!("o{i}: order(id: \"{id}\") {{ status version }}"))
        .collect();
    let query = format!("{{ {} }}", fields.join(" "));
    let response = http
        .post(&sys.graphql_url)
        .bearer_auth(&sys.operator_token)
        .json(&serde_json::json!({ "query": query }))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let http_status = response.status();
    let text = response.text().await.map_err(|e| e.to_string())?;
    let body: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("HTTP {http_status}, {e}: {text}"))?;
    let data = &body["data"];
    if !http_status.is_success() || !data.is_object() {
        return Err(format!("HTTP {http_status}: {text}"));
    }
    // Field errors name their alias in `path`; the field itself is then null.
    let mut errors: HashMap<&str, String> = HashMap::new();
    for e in body["errors"].as_array().into_iter().flatten() {
        if let Some(alias) = e["path"][0].as_str() {
            errors.insert(
                alias,
                format!(
                    "{} ({})",
                    e["message"].as_str().unwrap_or("no message"),
                    e["extensions"]["code"].as_str().unwrap_or("no code")
                ),
            );
        }
    }
    Ok((0..chunk.len())
        .map(|i| {
            let alias = format!("o{i}");
            if let Some(e) = errors.get(alias.as_str()) {
                return Err(e.clone());
            }
            let v = &data[&alias];
            match (v["status"].as_str(), v["version"].as_i64()) {
                (Some(s), Some(n)) => Ok((s.to_owned(), n)),
                _ if v.is_null() => Err("not found (null)".to_owned()),
                _ => Err(format!("unexpected answer {v}")),
            }
        })
        .collect())
}

/// Invariant 1 for one order: terminal in the event store, and GraphQL shows exactly that.
fn status_problems(
    order: Uuid,
    graphql: &GraphqlView,
    store: Option<(OrderStatus, i64)>,
) -> Vec<String> {
    let Some((status, version)) = store else {
        return vec![format!("order {order}: no order events in the event store")];
    };
    let mut out = Vec::new();
    if !is_terminal(status) {
        out.push(format!(
            "order {order}: still {status} at v{version} in the event store"
        ));
    }
    match graphql {
        Err(e) => out.push(format!("order {order}: GraphQL: {e}")),
        Ok((s, v)) if (s.as_str(), *v) != (status.as_str(), version) => out.push(format!(
            "order {order}: GraphQL shows {s} v{v}, the event store {status} v{version}"
        )),
        Ok(_) => {}
    }
    out
}

// ---- 2. Kafka holds every event, in order ----------------------------------------------

async fn check_topic(sys: &System, orders: &[Uuid], report: &mut Report) {
    // The topic carries every order event of the database; read until all were seen.
    let all: Result<i64, _> =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_type = $1")
            .bind(orders::ORDER_STREAM)
            .fetch_one(&sys.pool)
            .await;
    let rows: Result<Vec<(Uuid, i64, Uuid)>, _> = sqlx::query_as(
        "SELECT stream_id, stream_version, event_id FROM events
         WHERE stream_id = ANY($1) ORDER BY stream_id, stream_version",
    )
    .bind(orders)
    .fetch_all(&sys.pool)
    .await;
    let (all, rows) = match (all, rows) {
        (Ok(all), Ok(rows)) => (all, rows),
        (Err(e), _) | (_, Err(e)) => {
            return report.add(format!("Kafka check: cannot read the event store: {e}"));
        }
    };
    let mut expected: BTreeMap<Uuid, Vec<(i64, Uuid)>> = BTreeMap::new();
    for (order, version, event_id) in rows {
        expected.entry(order).or_default().push((version, event_id));
    }
    // Panics (like every caller of this helper) on a message that is not an envelope.
    let want = usize::try_from(all).unwrap_or(0);
    let (per_key, ids) = crate::consume_envelopes(&sys.kafka_brokers, &sys.topic, want).await;
    report.extend(topic_problems(&expected, &per_key, &ids));
}

/// Versions in the order they first arrived (redeliveries dropped).
fn first_arrivals(versions: &[i64]) -> Vec<i64> {
    let mut seen = HashSet::new();
    versions
        .iter()
        .copied()
        .filter(|v| seen.insert(*v))
        .collect()
}

/// Invariant 2: each order's versions first arrived as the event store has them (1, 2, ...),
/// and every stored event id is in the topic.
fn topic_problems(
    expected: &BTreeMap<Uuid, Vec<(i64, Uuid)>>,
    per_key: &HashMap<String, Vec<i64>>,
    ids: &HashSet<String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (order, events) in expected {
        let arrived = per_key
            .get(&order.to_string())
            .map_or(&[][..], Vec::as_slice);
        let firsts = first_arrivals(arrived);
        let stored: Vec<i64> = events.iter().map(|(v, _)| *v).collect();
        if firsts != stored {
            out.push(format!(
                "order {order}: the topic has versions {arrived:?} (first arrivals {firsts:?}), \
                 the event store {stored:?}"
            ));
        }
        for (version, event_id) in events {
            if arrived.contains(version) && !ids.contains(&event_id.to_string()) {
                out.push(format!(
                    "order {order} v{version}: the topic has the version but not event {event_id}"
                ));
            }
        }
    }
    out
}

// ---- 3. Stock and payments agree with the outcomes ---------------------------------------

async fn check_outcomes(
    pool: &PgPool,
    orders: &[Uuid],
    heads: &HashMap<Uuid, (OrderStatus, i64)>,
    report: &mut Report,
) {
    let rows: Vec<(Uuid, Option<String>, Option<String>, bool)> = match sqlx::query_as(
        "SELECT o.id, r.status, p.status, s.order_id IS NOT NULL
         FROM unnest($1::uuid[]) AS o(id)
         LEFT JOIN inventory_reservations r ON r.order_id = o.id
         LEFT JOIN payments p ON p.order_id = o.id
         LEFT JOIN shipments s ON s.order_id = o.id",
    )
    .bind(orders)
    .fetch_all(pool)
    .await
    {
        Ok(rows) => rows,
        Err(e) => return report.add(format!("participants: cannot read their tables: {e}")),
    };
    for (order, reservation, payment, shipped) in rows {
        if let Some((status, _)) = heads.get(&order) {
            report.extend(outcome_problems(
                order,
                *status,
                reservation.as_deref(),
                payment.as_deref(),
                shipped,
            ));
        }
    }
}

/// Invariant 3 for one order, given its reservation and payment status (`None`: no row).
/// Confirmed orders keep their reservation `held` (there is no separate commit step) and
/// their payment `authorized` (there is no capture step).
fn outcome_problems(
    order: Uuid,
    status: OrderStatus,
    reservation: Option<&str>,
    payment: Option<&str>,
    shipped: bool,
) -> Vec<String> {
    let describe = |s: Option<&str>| s.unwrap_or("missing").to_owned();
    let mut out = Vec::new();
    match status {
        OrderStatus::Confirmed => {
            if reservation != Some("held") {
                let r = describe(reservation);
                out.push(format!(
                    "order {order}: CONFIRMED but its reservation is {r}"
                ));
            }
            if payment != Some("authorized") {
                let p = describe(payment);
                out.push(format!("order {order}: CONFIRMED but its payment is {p}"));
            }
            if !shipped {
                out.push(format!("order {order}: CONFIRMED without a shipment"));
            }
        }
        OrderStatus::Cancelled => {
            if reservation == Some("held") {
                out.push(format!(
                    "order {order}: CANCELLED but its stock is still held"
                ));
            }
            if payment == Some("authorized") {
                out.push(format!(
                    "order {order}: CANCELLED but its payment is still authorized"
                ));
            }
        }
        _ => {} // not settled: reported by invariant 1
    }
    out
}

/// System-wide: stock is sane and `reserved` is exactly what held reservations hold.
async fn check_stock(pool: &PgPool, report: &mut Report) {
    let rows: Vec<(String, Option<i64>, Option<i64>, i64)> = match sqlx::query_as(
        "WITH held AS (
             SELECT l.key AS sku, sum(l.value::bigint)::bigint AS qty
             FROM inventory_reservations r, jsonb_each_text(r.lines) l
             WHERE r.status = 'held' GROUP BY l.key)
         SELECT COALESCE(s.sku, h.sku), s.on_hand, s.reserved, COALESCE(h.qty, 0)
         FROM inventory_stock s FULL JOIN held h ON h.sku = s.sku
         WHERE s.sku IS NULL OR s.reserved < 0 OR s.reserved > s.on_hand
            OR s.reserved <> COALESCE(h.qty, 0)
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    {
        Ok(rows) => rows,
        Err(e) => return report.add(format!("inventory: cannot read stock: {e}")),
    };
    for (sku, on_hand, reserved, held) in rows {
        let (on_hand, reserved) = (on_hand.unwrap_or(0), reserved.unwrap_or(0));
        report.add(format!(
            "stock {sku}: on hand {on_hand}, reserved {reserved}, held by reservations {held} \
             (want 0 <= reserved <= on hand and reserved = held)"
        ));
    }
}

// ---- 4. Hash chains ----------------------------------------------------------------------

async fn check_audit(pool: &PgPool, orders: &[Uuid], report: &mut Report) {
    let mut conn = match pool.acquire().await {
        Ok(conn) => conn,
        Err(e) => return report.add(format!("audit: no database connection: {e}")),
    };
    for order in orders {
        let saga = saga::orchestrator::saga_stream_id(OrderId(*order));
        for (what, stream) in [("order", *order), ("saga", saga)] {
            match event_store::audit::verify_stream(&mut conn, stream).await {
                Ok(r) => {
                    if let Some(b) = r.broken {
                        report.add(format!(
                            "order {order}: the {what} stream's hash chain breaks at v{}: {:?}",
                            b.stream_version, b.problem
                        ));
                    }
                }
                Err(e) => report.add(format!(
                    "order {order}: cannot verify the {what} stream: {e}"
                )),
            }
        }
    }
}

// ---- 5. The outbox is drained ------------------------------------------------------------

async fn check_outbox_pending(pool: &PgPool, report: &mut Report) {
    let pending: Result<(i64, Option<f64>), _> = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8 FROM outbox
         WHERE published_at IS NULL AND failed_at IS NULL",
    )
    .fetch_one(pool)
    .await;
    match pending {
        Ok((0, _)) => {}
        Ok((n, age)) => report.add(format!(
            "outbox: {n} rows unpublished, the oldest for {:.1} s",
            age.unwrap_or(0.0)
        )),
        Err(e) => report.add(format!("outbox: cannot count pending rows: {e}")),
    }
}

/// An outbox row set aside: id, destination, ordering key, last error.
type FailedRow = (i64, String, String, Option<String>);

async fn check_outbox_failed(pool: &PgPool, report: &mut Report) {
    let failed: Result<Vec<FailedRow>, _> = sqlx::query_as(
        "SELECT id, destination, ordering_key, last_error FROM outbox
         WHERE failed_at IS NOT NULL AND published_at IS NULL ORDER BY id",
    )
    .fetch_all(pool)
    .await;
    match failed {
        Ok(rows) => {
            for (id, destination, key, error) in rows {
                let error = error.unwrap_or_default();
                report.add(format!(
                    "outbox: row {id} to {destination} (key {key}) set aside as failed: {error}"
                ));
            }
        }
        Err(e) => report.add(format!("outbox: cannot read failed rows: {e}")),
    }
}

// ---- 6. No dead letters ------------------------------------------------------------------

/// An open dead letter: id, projection, stream id, stream version, error class and message.
type DeadLetterRow = (i64, String, Option<Uuid>, Option<i64>, String, String);

async fn check_read_dead_letters(pool: &PgPool, report: &mut Report) {
    let open: Result<Vec<DeadLetterRow>, _> = sqlx::query_as(
        "SELECT id, projection, stream_id, stream_version, error_class, error_message
         FROM dead_letters WHERE status = 'open' ORDER BY id",
    )
    .fetch_all(pool)
    .await;
    match open {
        Ok(rows) => {
            for (id, projection, stream, version, class, message) in rows {
                report.add(format!(
                    "read side: open dead letter {id} of {projection} for {stream:?} v{version:?}: \
                     {class}: {message}"
                ));
            }
        }
        Err(e) => report.add(format!("read side: cannot read dead letters: {e}")),
    }
    let parked: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM parked_events")
        .fetch_one(pool)
        .await;
    match parked {
        Ok(0) => {}
        Ok(n) => report.add(format!("read side: {n} events parked behind dead letters")),
        Err(e) => report.add(format!("read side: cannot count parked events: {e}")),
    }
}

async fn check_saga_dead_letter_queues(sys: &System, report: &mut Report) {
    let conn = match platform::amqp::connect(&sys.amqp_url, "shop-tests-invariants").await {
        Ok(conn) => conn,
        Err(e) => return report.add(format!("RabbitMQ at {}: {e}", sys.amqp_url)),
    };
    let names = saga::topology::Names::new(&sys.queue_prefix);
    for destination in saga::topology::DESTINATIONS {
        let queue = names.dead_letter_queue(destination);
        match dead_letter_depth(&conn, &queue).await {
            Ok(0) => {}
            Ok(n) => report.add(format!(
                "RabbitMQ: {n} messages in dead-letter queue {queue}"
            )),
            Err(e) => report.add(format!("RabbitMQ: cannot inspect {queue}: {e}")),
        }
    }
    conn.close(200, "checked".into()).await.ok();
}

/// Messages in `queue` by a passive declare (which creates nothing); a missing queue is
/// empty. A fresh channel per queue, since the broker closes the channel on "not found".
async fn dead_letter_depth(conn: &lapin::Connection, queue: &str) -> Result<u32, lapin::Error> {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    let ch = conn.create_channel().await?;
    let declared = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await;
    match declared {
        Ok(q) => {
            ch.close(200, "checked".into()).await.ok();
            Ok(q.message_count())
        }
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(p)
                if *p.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) =>
            {
                Ok(0)
            }
            _ => Err(e),
        },
    }
}

// ---- 7. Sagas finished -------------------------------------------------------------------

async fn check_sagas(
    sys: &System,
    orders: &[Uuid],
    heads: &HashMap<Uuid, (OrderStatus, i64)>,
    report: &mut Report,
) {
    let armed: Result<Vec<(Uuid, String, i32)>, _> = sqlx::query_as(
        "SELECT order_id, step, attempt FROM saga_deadlines WHERE order_id = ANY($1) ORDER BY 1",
    )
    .bind(orders)
    .fetch_all(&sys.pool)
    .await;
    match armed {
        Ok(rows) => {
            for (order, step, attempt) in rows {
                report.add(format!(
                    "order {order}: saga deadline still armed ({step}, attempt {attempt})"
                ));
            }
        }
        Err(e) => report.add(format!("saga: cannot read deadlines: {e}")),
    }
    let phases = match saga_phases(&sys.pool, orders, sys.step_attempts).await {
        Ok(phases) => phases,
        Err(e) => return report.add(format!("saga: cannot read saga streams: {e}")),
    };
    for order in orders {
        let outcome = heads.get(order).map(|(s, _)| *s);
        match phases.get(order) {
            Some(Ok(phase)) => report.extend(saga_problem(*order, *phase, outcome)),
            Some(Err(e)) => report.add(format!("order {order}: saga stream unreadable: {e}")),
            None => report.extend(saga_problem(*order, Phase::NotStarted, outcome)),
        }
    }
}

/// Each order's saga phase, folded from its stream as the orchestrator loads it (one query
/// for all sagas). Orders without a saga stream are absent.
async fn saga_phases(
    pool: &PgPool,
    orders: &[Uuid],
    step_attempts: u32,
) -> Result<HashMap<Uuid, Result<Phase, String>>, sqlx::Error> {
    let by_stream: HashMap<Uuid, Uuid> = orders
        .iter()
        .map(|o| (saga::orchestrator::saga_stream_id(OrderId(*o)), *o))
        .collect();
    let streams: Vec<Uuid> = by_stream.keys().copied().collect();
    let rows: Vec<(Uuid, String, serde_json::Value)> = sqlx::query_as(
        "SELECT stream_id, event_type, payload FROM events
         WHERE stream_id = ANY($1) ORDER BY stream_id, stream_version",
    )
    .bind(&streams)
    .fetch_all(pool)
    .await?;
    let mut events: HashMap<Uuid, Vec<(String, serde_json::Value)>> = HashMap::new();
    for (stream, event_type, payload) in rows {
        events
            .entry(by_stream[&stream])
            .or_default()
            .push((event_type, payload));
    }
    Ok(events
        .into_iter()
        .map(|(order, events)| {
            let phase = saga::orchestrator::fold_stream(step_attempts, events)
                .map(|s| s.phase)
                .map_err(|e| e.to_string());
            (order, phase)
        })
        .collect())
}

/// Invariant 7 for one order: its saga ended, with the order's outcome.
fn saga_problem(order: Uuid, phase: Phase, outcome: Option<OrderStatus>) -> Option<String> {
    let agrees = match phase {
        Phase::NotStarted => return Some(format!("order {order}: its saga never started")),
        Phase::Awaiting(step) => {
            return Some(format!(
                "order {order}: its saga still awaits the {step:?} step"
            ));
        }
        Phase::Confirmed => outcome == Some(OrderStatus::Confirmed),
        Phase::Cancelled => outcome == Some(OrderStatus::Cancelled),
    };
    let outcome = outcome.map_or("unknown".to_owned(), |s| s.to_string());
    (!agrees).then(|| format!("order {order}: saga ended {phase:?} but the order is {outcome}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_order_event_type_maps_to_the_status_the_read_side_shows() {
        for (event_type, _) in domain::wire::CURRENT_VERSIONS {
            assert!(
                status_after(event_type).is_some(),
                "{event_type} has no status"
            );
        }
        assert_eq!(status_after("OrderPlaced"), Some(OrderStatus::Pending));
        assert_eq!(
            status_after("InventoryReserved"),
            Some(OrderStatus::InventoryReserved)
        );
        assert_eq!(
            status_after("PaymentAuthorized"),
            Some(OrderStatus::PaymentAuthorized)
        );
        assert_eq!(status_after("OrderConfirmed"), Some(OrderStatus::Confirmed));
        assert_eq!(status_after("OrderCancelled"), Some(OrderStatus::Cancelled));
        assert_eq!(status_after("SagaInputRecorded"), None);
    }

    #[test]
    fn graphql_must_show_the_terminal_status_and_version_of_the_store() {
        let id = Uuid::nil();
        let shown = |s: &str, v| Ok((s.to_owned(), v));
        let confirmed = Some((OrderStatus::Confirmed, 5));
        assert!(status_problems(id, &shown("CONFIRMED", 5), confirmed).is_empty());
        assert_eq!(
            status_problems(id, &shown("CONFIRMED", 4), confirmed).len(),
            1
        );
        assert_eq!(
            status_problems(id, &shown("CANCELLED", 5), confirmed).len(),
            1
        );
        assert_eq!(status_problems(id, &Err("null".into()), confirmed).len(), 1);
        let pending = Some((OrderStatus::Pending, 1));
        assert_eq!(status_problems(id, &shown("PENDING", 1), pending).len(), 1);
        assert_eq!(status_problems(id, &shown("CONFIRMED", 5), None).len(), 1);
    }

    #[test]
    fn the_topic_may_redeliver_but_not_lose_or_reorder() {
        let id = Uuid::now_v7();
        let (e1, e2) = (Uuid::now_v7(), Uuid::now_v7());
        let expected = BTreeMap::from([(id, vec![(1, e1), (2, e2)])]);
        let ids: HashSet<String> = [e1.to_string(), e2.to_string()].into();
        let topic = |versions: Vec<i64>| HashMap::from([(id.to_string(), versions)]);
        assert!(topic_problems(&expected, &topic(vec![1, 2, 1, 2]), &ids).is_empty());
        assert!(topic_problems(&expected, &topic(vec![1, 1, 2]), &ids).is_empty());
        assert_eq!(topic_problems(&expected, &topic(vec![2, 1]), &ids).len(), 1);
        assert_eq!(topic_problems(&expected, &topic(vec![1]), &ids).len(), 1);
        assert_eq!(topic_problems(&expected, &HashMap::new(), &ids).len(), 1);
        let only_e1: HashSet<String> = [e1.to_string()].into();
        assert_eq!(
            topic_problems(&expected, &topic(vec![1, 2]), &only_e1).len(),
            1
        );
        assert_eq!(first_arrivals(&[1, 2, 1, 3, 2]), vec![1, 2, 3]);
    }

    #[test]
    fn outcomes_must_match_what_participants_hold() {
        let id = Uuid::nil();
        let confirmed = OrderStatus::Confirmed;
        let cancelled = OrderStatus::Cancelled;
        assert!(outcome_problems(id, confirmed, Some("held"), Some("authorized"), true).is_empty());
        assert_eq!(
            outcome_problems(id, confirmed, Some("released"), None, false).len(),
            3
        );
        assert!(outcome_problems(id, cancelled, None, None, false).is_empty());
        assert!(outcome_problems(id, cancelled, Some("released"), Some("voided"), true).is_empty());
        assert_eq!(
            outcome_problems(id, cancelled, Some("held"), Some("authorized"), false).len(),
            2
        );
        let pending = OrderStatus::PaymentAuthorized;
        assert!(outcome_problems(id, pending, Some("held"), Some("authorized"), false).is_empty());
    }

    #[test]
    fn a_saga_must_end_with_the_order_outcome() {
        let id = Uuid::nil();
        let confirmed = Some(OrderStatus::Confirmed);
        assert_eq!(saga_problem(id, Phase::Confirmed, confirmed), None);
        assert!(saga_problem(id, Phase::Cancelled, confirmed).is_some());
        assert!(saga_problem(id, Phase::Awaiting(domain::saga::Step::Payment), None).is_some());
        assert!(saga_problem(id, Phase::NotStarted, None).is_some());
        assert_eq!(
            saga_problem(id, Phase::Cancelled, Some(OrderStatus::Cancelled)),
            None
        );
    }
}

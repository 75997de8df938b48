//! `shop-bench read-side`: rebuild throughput and live projection lag, each beside a baseline
//! in the same run.
//!
//! 1. Rebuild: N events (default 1,000,000; a quarter of orders, each placed, reserved,
//!    authorized, then confirmed or cancelled) are generated straight into the event store by
//!    SQL (the rebuild reads only the store). Baseline: reading and decoding the whole feed
//!    in the same batches without applying it. Then `order_summary` is rebuilt from it
//!    (`rebuild::start` + `run`, exactly what `shop projections rebuild` does), and checked.
//!    Each order's events are a whole chunk apart in the feed, so nearly every event after
//!    the first has to load its order's row: the unfavourable case.
//! 2. Live lag: checkouts through the command API at a steady rate (default 500/s) with the
//!    relay and the order-summary projector running; each order's time from sending the
//!    command until its read-model row commits (the projector's NOTIFY, delivered at commit:
//!    the moment GraphQL can return it, and what feeds `orderStatusChanged`). An upper bound
//!    of append -> visible, since it includes the HTTP request and the append.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use platform::{
    auth::{Authenticator, Role},
    config::InfraConfig,
};
use read_side::{
    envelope::{Envelope, OrderEnvelope},
    projection::Kind,
    rebuild::{self, RebuildOptions},
};
use sqlx::{PgPool, postgres::PgListener};
use uuid::Uuid;

#[derive(Debug, Clone, clap::Args)]
pub struct ReadBenchArgs {
    /// Events in the store for the rebuild phase (rounded down to whole orders of 4 events).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Events per rebuild transaction (window).
    #[arg(long, default_value_t = 100_000)]
    pub batch_size: i64,
    /// Checkouts per second in the lag phase.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// Length of the lag phase.
    #[arg(long, default_value = "20s", value_parser = platform::config::parse_duration)]
    pub duration: Duration,
}

/// Orders per generating transaction.
const CHUNK: usize = 25_000;

async fn generate(pool: &PgPool, orders: usize) -> anyhow::Result<()> {
    let mut done = 0;
    while done < orders {
        let n = CHUNK.min(orders - done);
        sqlx::query(
            r#"WITH o AS (SELECT gen_random_uuid() AS id, g, 'c-' || (g % 5000) AS customer FROM generate_series(1, $1) g)
            INSERT INTO events (stream_id, stream_type, stream_version, event_id, event_type, schema_version,
                                payload, metadata, recorded_at, prev_hash, hash)
            SELECT o.id, 'order', t.v, gen_random_uuid(), t.event_type, t.sv, t.payload, '{}',
                   now() - make_interval(mins => (o.g % 720)::int) + make_interval(secs => t.v), '\x00', '\x00'
            FROM o CROSS JOIN LATERAL (VALUES
                (1, 'OrderPlaced', 2, jsonb_build_object(
                    'order_id', o.id, 'customer_id', o.customer, 'currency', 'EUR',
                    'lines', jsonb_build_array(
                        jsonb_build_object('sku', 'SKU-' || (o.g % 50), 'quantity', 2, 'unit_price_minor', 1250, 'line_total_minor', 2500),
                        jsonb_build_object('sku', 'SKU-' || (o.g % 7 + 100), 'quantity', 1, 'unit_price_minor', 499, 'line_total_minor', 499)),
                    'total_minor', 2999,
                    'shipping_address', jsonb_build_object('name', 'Ada', 'line1', '1 Main St', 'city', 'Berlin', 'postal_code', '10115', 'country', 'DE'),
                    'payment_token', 'tok_visa')),
                (2, 'InventoryReserved', 1, jsonb_build_object('order_id', o.id, 'reservation_id', 'res-' || o.g)),
                (3, 'PaymentAuthorized', 1, jsonb_build_object('order_id', o.id, 'authorization_id', 'auth-' || o.g, 'amount_minor', 2999, 'currency', 'EUR')),
                (4, CASE WHEN o.g % 5 = 0 THEN 'OrderCancelled' ELSE 'OrderConfirmed' END, 1,
                    CASE WHEN o.g % 5 = 0
                         THEN jsonb_build_object('order_id', o.id, 'reason', 'shipping failed', 'cancelled_by', 'system', 'previous_status', 'PAYMENT_AUTHORIZED')
                         ELSE jsonb_build_object('order_id', o.id, 'shipment_id', 'ship-' || o.g, 'total_minor', 2999, 'currency', 'EUR') END)
            ) AS t(v, event_type, sv, payload)
            ORDER BY t.v, o.g"#,
        )
        .bind(n as i64)
        .execute(pool)
        .await?;
        done += n;
    }
    sqlx::query("ANALYZE events").execute(pool).await?;
    Ok(())
}

/// Baseline: the whole feed read and decoded in the rebuild's batches, nothing applied.
async fn read_feed_only(pool: &PgPool, batch: i64) -> anyhow::Result<usize> {
    let mut conn = pool.acquire().await?;
    let mut cursor = event_store::FeedCursor::default();
    let mut n = 0;
    loop {
        let (events, next) = event_store::read_feed(&mut conn, cursor, batch).await?;
        if events.is_empty() {
            return Ok(n);
        }
        n += events.len();
        for e in events {
            Envelope::from_stored(e).event()?;
        }
        cursor = next;
    }
}

// Long on purpose: a benchmark reads top to bottom as its phases (set-up, baseline, measured
// run, report) and splitting it would hide the order that makes the ratio fair.
pub async fn read_side(infra: &InfraConfig, args: &ReadBenchArgs) -> anyhow::Result<()> {
    print!("shop-bench read-side: ");
    let scratch = crate::append::Scratch::create(infra, 16).await?;
    let (pool, infra, prefix, topic) = (
        scratch.pool.clone(),
        scratch.infra.clone(),
        scratch.prefix.clone(),
        scratch.topic.clone(),
    );
    let db_url = infra.database_url.clone();
    let orders = args.events / 4;
    println!(
        "{} events ({orders} orders), batches of {}\n",
        orders * 4,
        args.batch_size
    );

    // 1. Rebuild.
    let started = Instant::now();
    generate(&pool, orders).await?;
    println!(
        "generated {} events in {:.1} s",
        orders * 4,
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let read = read_feed_only(&pool, args.batch_size).await?;
    let baseline = read as f64 / started.elapsed().as_secs_f64();
    let options = RebuildOptions {
        batch_size: args.batch_size,
        restart: false,
        hold: false,
    };
    let started = Instant::now();
    let report = rebuild::start(&pool, Kind::OrderSummary, &options)
        .await?
        .run(|_| {})
        .await?;
    let elapsed = started.elapsed();
    let rebuilt = report.events as f64 / elapsed.as_secs_f64();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM order_summary WHERE version = 4")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        rows == orders as i64,
        "rebuild produced {rows} complete orders of {orders}"
    );
    println!("| phase | events | seconds | events/s | vs baseline |");
    println!("|-------|-------:|--------:|---------:|------------:|");
    println!(
        "| baseline: read + decode the feed | {read} | {:.1} | {baseline:.0} | 100% |",
        read as f64 / baseline
    );
    println!(
        "| rebuild order_summary (into v{}) | {} | {:.1} | {rebuilt:.0} | {:.0}% |",
        report.version,
        report.events,
        elapsed.as_secs_f64(),
        100.0 * rebuilt / baseline
    );

    // 2. Live lag at a steady rate.
    // The benchmark's own database: it may clear the append-only events table.
    sqlx::query("ALTER TABLE events DISABLE TRIGGER USER")
        .execute(&pool)
        .await?;
    sqlx::query("TRUNCATE events, outbox, streams, idempotency_keys")
        .execute(&pool)
        .await?;
    sqlx::query("ALTER TABLE events ENABLE TRIGGER USER")
        .execute(&pool)
        .await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let relay_cfg = outbox_relay::RelayConfig {
        poll_interval: Duration::from_millis(50),
        ..outbox_relay::RelayConfig::default()
    };
    let relay = outbox_relay::Relay::new(pool.clone(), &infra, relay_cfg)?;
    let relay_task = tokio::spawn(outbox_relay::run(relay, db_url.clone(), shutdown.clone()));
    let projector = read_side::consumer::Projector::new(
        Kind::OrderSummary,
        pool.clone(),
        &infra.kafka_brokers,
        &topic,
        &prefix,
        read_side::consumer::ProjectorConfig::default(),
    )?;
    let projector_task = tokio::spawn(projector.run(shutdown.clone()));
    let auth = Authenticator::ephemeral();
    let api = write_side::build(
        &write_side::WriteSideConfig {
            http_addr: "127.0.0.1:0".parse()?,
            ..write_side::WriteSideConfig::default()
        },
        pool.clone(),
        auth.clone(),
        platform::vault::ephemeral(),
    )
    .await?;
    let base = format!("http://{}", api.local_addr());
    let api_task = tokio::spawn(api.run(shutdown.clone()));
    let token = auth.issue("bench", Role::Customer, Duration::from_secs(3600))?;

    let mut listener = PgListener::connect_with(&pool).await?;
    listener
        .listen(read_side::order_summary::STATUS_CHANNEL)
        .await?;
    let visible: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let listening = {
        let visible = visible.clone();
        tokio::spawn(async move {
            while let Ok(n) = listener.recv().await {
                if let Ok(c) = serde_json::from_str::<read_side::notify::StatusChanged>(n.payload())
                {
                    visible
                        .lock()
                        .unwrap()
                        .entry(c.order_id)
                        .or_insert_with(Instant::now);
                }
            }
        })
    };

    let total = (args.rate as f64 * args.duration.as_secs_f64()) as usize;
    let http = reqwest::Client::new();
    let body = serde_json::json!({
        "currency": "EUR",
        "items": [{"sku": "SKU-1", "quantity": 2}],
        "shipping_address": {"name": "Ada", "line1": "1 Main St", "city": "Berlin", "postal_code": "10115", "country": "DE"},
        "payment_token": "tok_visa"
    })
    .to_string();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut requests = Vec::with_capacity(total);
    for i in 0..total {
        tick.tick().await;
        let req = http
            .post(format!("{base}/orders"))
            .bearer_auth(&token)
            .header("Idempotency-Key", format!("lag-{i}"))
            .header("Content-Type", "application/json")
            .body(body.clone());
        requests.push(tokio::spawn(async move {
            let sent = Instant::now();
            let r: serde_json::Value = req.send().await?.error_for_status()?.json().await?;
            let id: Uuid = r["order_id"].as_str().unwrap_or_default().parse()?;
            anyhow::Ok((id, sent))
        }));
    }
    let mut sent = Vec::with_capacity(total);
    for r in requests {
        sent.push(r.await??);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while visible.lock().unwrap().len() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let visible = visible.lock().unwrap().clone();
    let mut lags: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, at)| visible.get(id).map(|v| v.saturating_duration_since(*at)))
        .collect();
    anyhow::ensure!(
        lags.len() == total,
        "only {} of {total} orders became visible",
        lags.len()
    );
    lags.sort();
    let pct = |p: f64| lags[((lags.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    println!(
        "\nlive lag at {} checkouts/s for {:?}: {total} orders, command sent -> read model committed p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        args.rate,
        args.duration,
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );

    shutdown.cancel();
    listening.abort();
    relay_task.await??;
    projector_task.await??;
    api_task.await??;
    scratch.cleanup().await?;
    Ok(())
}

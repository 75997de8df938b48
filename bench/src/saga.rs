//! `shop-bench saga`: checkout sagas completed per second and placed -> confirmed latency,
//! beside a same-run baseline of the bare transport.
//!
//! On a scratch database and queues of its own, with the command API, the outbox relay, the
//! orchestrator and the stand-in participants running in this process:
//! 1. **baseline**: six sequential RabbitMQ round trips (publish with confirm to a quorum
//!    queue, consume, ack), the messages a saga exchanges (three commands, three replies),
//!    with no database work: the floor of placed -> confirmed over this broker;
//! 2. **steady**: checkouts through the API at a steady rate (default 100/s); per order, from
//!    its `OrderPlaced` to its `OrderConfirmed` (both `recorded_at`, PostgreSQL's clock);
//! 3. **burst**: N checkouts sent at once (64 concurrent clients); sagas confirmed per second
//!    from the first placed to the last confirmed.

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::{
    BasicProperties,
    options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions},
};
use platform::{
    auth::{Authenticator, Role},
    config::InfraConfig,
};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, clap::Args)]
pub struct SagaBenchArgs {
    /// Checkouts per second in the steady phase.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// Length of the steady phase.
    #[arg(long, default_value = "20s", value_parser = platform::config::parse_duration)]
    pub duration: Duration,
    /// Checkouts in the burst phase.
    #[arg(long, default_value_t = 2000)]
    pub burst: usize,
    /// Messages each saga consumer handles at once (`SAGA_CONCURRENCY` of `shop run`).
    #[arg(long, default_value_t = saga::SagaConfig::default().concurrency)]
    pub saga_concurrency: usize,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// Six sequential confirmed round trips, `trials` times; milliseconds per trial, sorted.
async fn transport_baseline(
    conn: &lapin::Connection,
    queue: &str,
    trials: usize,
) -> anyhow::Result<Vec<f64>> {
    let publisher = platform::amqp::confirm_channel(conn).await?;
    let ch = platform::amqp::consumer_channel(conn, 10).await?;
    platform::amqp::declare_command_queue(&ch, queue, queue).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await?;
    let mut out = Vec::with_capacity(trials);
    for _ in 0..trials {
        let started = Instant::now();
        for _ in 0..6 {
            publisher
                .basic_publish(
                    platform::amqp::COMMANDS_EXCHANGE.into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    b"{}",
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?
                .await?;
            let d = consumer
                .next()
                .await
                .ok_or_else(|| anyhow::anyhow!("consumer closed"))??;
            d.ack(BasicAckOptions::default()).await?;
        }
        out.push(started.elapsed().as_secs_f64() * 1e3);
    }
    ch.queue_delete(queue.into(), Default::default()).await?;
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// Placed -> confirmed per order of `orders` (ms, sorted) and the span from the first placed
/// to the last confirmed (s).
async fn saga_latencies(pool: &PgPool, orders: &[Uuid]) -> anyhow::Result<(Vec<f64>, f64)> {
    let rows: Vec<(f64, f64, f64)> = sqlx::query_as(
        "SELECT EXTRACT(EPOCH FROM c.recorded_at - p.recorded_at)::float8 * 1000,
                EXTRACT(EPOCH FROM p.recorded_at)::float8, EXTRACT(EPOCH FROM c.recorded_at)::float8
         FROM events p JOIN events c ON c.stream_id = p.stream_id AND c.event_type = 'OrderConfirmed'
         WHERE p.event_type = 'OrderPlaced' AND p.stream_id = ANY($1)",
    )
    .bind(orders)
    .fetch_all(pool)
    .await?;
    anyhow::ensure!(
        rows.len() == orders.len(),
        "{} of {} sagas confirmed",
        rows.len(),
        orders.len()
    );
    let first = rows.iter().map(|r| r.1).fold(f64::MAX, f64::min);
    let last = rows.iter().map(|r| r.2).fold(f64::MIN, f64::max);
    let mut l: Vec<f64> = rows.iter().map(|r| r.0).collect();
    l.sort_by(f64::total_cmp);
    Ok((l, last - first))
}

async fn wait_confirmed(pool: &PgPool, orders: &[Uuid]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE event_type IN ('OrderConfirmed', 'OrderCancelled') AND stream_id = ANY($1)",
        )
        .bind(orders)
        .fetch_one(pool)
        .await?;
        if done as usize >= orders.len() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {done} of {} sagas finished",
            orders.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// Long on purpose: a benchmark reads top to bottom as its phases (set-up, baseline, measured
// run, report) and splitting it would hide the order that makes the ratio fair.
pub async fn saga(infra: &InfraConfig, args: &SagaBenchArgs) -> anyhow::Result<()> {
    print!("shop-bench saga: ");
    let scratch = crate::append::Scratch::create(infra, 32).await?;
    let (pool, infra, prefix) = (
        scratch.pool.clone(),
        scratch.infra.clone(),
        scratch.prefix.clone(),
    );
    let db_url = infra.database_url.clone();
    for sku in ["SKU-1", "SKU-2"] {
        saga::participants::set_stock(&pool, &domain::values::Sku::parse(sku)?, 100_000_000)
            .await?;
    }

    // 1. Transport baseline.
    let conn = platform::amqp::connect(&infra.amqp_url, "bench-saga").await?;
    let baseline = transport_baseline(&conn, &format!("{prefix}baseline"), 300).await?;

    // The system.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let relay = outbox_relay::Relay::new(
        pool.clone(),
        &infra,
        outbox_relay::RelayConfig {
            poll_interval: Duration::from_millis(50),
            ..outbox_relay::RelayConfig::default()
        },
    )?;
    let relay_task = tokio::spawn(outbox_relay::run(relay, db_url.clone(), shutdown.clone()));
    let saga_cfg = saga::SagaConfig {
        queue_prefix: prefix.clone(),
        concurrency: args.saga_concurrency,
        ..saga::SagaConfig::default()
    };
    let names = saga::topology::Names::new(&prefix);
    let retry_delays = saga_cfg.retry_delays();
    saga::topology::declare(&conn, &names, &retry_delays).await?;
    // One vault for both: the shipping participant opens what the command API sealed.
    let vault = platform::vault::ephemeral();
    let saga_task = tokio::spawn(saga::run(
        pool.clone(),
        infra.amqp_url.clone(),
        saga_cfg,
        vault.clone(),
        shutdown.clone(),
    ));
    let auth = Authenticator::ephemeral();
    let api = write_side::build(
        &write_side::WriteSideConfig {
            http_addr: "127.0.0.1:0".parse()?,
            ..write_side::WriteSideConfig::default()
        },
        pool.clone(),
        auth.clone(),
        vault,
    )
    .await?;
    let base = format!("http://{}", api.local_addr());
    let api_task = tokio::spawn(api.run(shutdown.clone()));
    let token = auth.issue("bench", Role::Customer, Duration::from_secs(3600))?;
    let http = reqwest::Client::new();
    let body = serde_json::json!({
        "currency": "EUR",
        "items": [{"sku": "SKU-1", "quantity": 2}, {"sku": "SKU-2", "quantity": 1}],
        "shipping_address": {"name": "Ada", "line1": "1 Main St", "city": "Berlin", "postal_code": "10115", "country": "DE"},
        "payment_token": "tok_visa"
    })
    .to_string();
    let checkout = |key: String| {
        let req = http
            .post(format!("{base}/orders"))
            .bearer_auth(&token)
            .header("Idempotency-Key", key)
            .header("Content-Type", "application/json")
            .body(body.clone());
        async move {
            let r: serde_json::Value = req.send().await?.error_for_status()?.json().await?;
            anyhow::Ok(r["order_id"].as_str().unwrap_or_default().parse::<Uuid>()?)
        }
    };

    // 2. Steady rate.
    let total = (args.rate as f64 * args.duration.as_secs_f64()) as usize;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = Vec::with_capacity(total);
    for i in 0..total {
        tick.tick().await;
        sent.push(tokio::spawn(checkout(format!("steady-{i}"))));
    }
    let mut steady = Vec::with_capacity(total);
    for s in sent {
        steady.push(s.await??);
    }
    wait_confirmed(&pool, &steady).await?;
    let (steady_lat, _) = saga_latencies(&pool, &steady).await?;

    // 3. Burst.
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mut sent = Vec::with_capacity(args.burst);
    for i in 0..args.burst {
        let permit = sem.clone().acquire_owned().await?;
        let f = checkout(format!("burst-{i}"));
        sent.push(tokio::spawn(async move {
            let r = f.await;
            drop(permit);
            r
        }));
    }
    let mut burst = Vec::with_capacity(args.burst);
    for s in sent {
        burst.push(s.await??);
    }
    wait_confirmed(&pool, &burst).await?;
    let (burst_lat, span) = saga_latencies(&pool, &burst).await?;

    println!("| phase | sagas | sagas/s | p50 ms | p99 ms | max ms |");
    println!("|-------|------:|--------:|-------:|-------:|-------:|");
    println!(
        "| baseline: 6 confirmed RabbitMQ round trips, no database | {} | - | {:.1} | {:.1} | {:.1} |",
        baseline.len(),
        pct(&baseline, 0.5),
        pct(&baseline, 0.99),
        pct(&baseline, 1.0)
    );
    println!(
        "| steady {} checkouts/s for {:?}: placed -> confirmed | {} | {:.0} | {:.1} | {:.1} | {:.1} |",
        args.rate,
        args.duration,
        steady.len(),
        args.rate as f64,
        pct(&steady_lat, 0.5),
        pct(&steady_lat, 0.99),
        pct(&steady_lat, 1.0)
    );
    println!(
        "| burst of {}: placed -> confirmed | {} | {:.0} | {:.1} | {:.1} | {:.1} |",
        args.burst,
        burst.len(),
        burst.len() as f64 / span,
        pct(&burst_lat, 0.5),
        pct(&burst_lat, 0.99),
        pct(&burst_lat, 1.0)
    );
    // Issue 17's cost target: `shop run`'s peak RSS under this burst. Everything `shop run`
    // runs for a checkout runs in this process (plus the benchmark's own client and
    // bookkeeping), so its high-water mark bounds it from above.
    if let Some(kib) = peak_rss_kib() {
        println!(
            "\npeak RSS of this process (command API, relay, orchestrator, participants, client): {:.0} MB",
            kib as f64 / 1024.0
        );
    }

    shutdown.cancel();
    relay_task.await??;
    saga_task.await??;
    api_task.await??;
    let ch = conn.create_channel().await?;
    for q in names.all_queues(&retry_delays) {
        ch.queue_delete(q.as_str().into(), Default::default())
            .await
            .ok();
    }
    conn.close(200, "done".into()).await.ok();
    scratch.cleanup().await?;
    Ok(())
}

/// The process's peak resident set (`VmHWM` of `/proc/self/status`), in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

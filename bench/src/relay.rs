//! `shop-bench relay`: outbox relay throughput and end-to-end publish latency, beside a raw
//! producer baseline in the same run.
//!
//! 1. Kafka throughput: N outbox rows (envelope-sized payloads) are published by a raw
//!    idempotent producer (baseline: no outbox, no database), then drained by the relay from
//!    the outbox with delivery reports.
//! 2. RabbitMQ throughput: the same for M rows to a quorum queue with publisher confirms.
//! 3. Latency: appends at a steady rate (default 500/s) while the relay runs; each message's
//!    time from append commit until a Kafka consumer receives it, and from insert until the
//!    relay marked it published after the broker's ack (both upper bounds of commit -> ack).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lapin::{
    BasicProperties,
    options::{BasicPublishOptions, QueuePurgeOptions},
};
use outbox_relay::{Relay, RelayConfig};
use platform::config::InfraConfig;
use rdkafka::{
    Message,
    consumer::{Consumer, StreamConsumer},
    producer::FutureRecord,
};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, clap::Args)]
pub struct RelayBenchArgs {
    /// Outbox rows for the Kafka throughput phase.
    #[arg(long, default_value_t = 100_000)]
    pub kafka_messages: usize,
    /// Outbox rows for the RabbitMQ throughput phase.
    #[arg(long, default_value_t = 20_000)]
    pub amqp_messages: usize,
    /// Appends per second in the latency phase.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// Length of the latency phase.
    #[arg(long, default_value = "20s", value_parser = platform::config::parse_duration)]
    pub duration: Duration,
}

const PAYLOAD_BYTES: usize = 700;

async fn fill_outbox(
    pool: &PgPool,
    n: usize,
    destination: &str,
    target: &str,
    route: &str,
) -> anyhow::Result<()> {
    // 1,000 keys, envelope-sized payloads, in one statement.
    sqlx::query(
        "INSERT INTO outbox (message_id, destination, target, routing_key, ordering_key, headers, payload)
         SELECT gen_random_uuid(), $2, $3, COALESCE($4, 'order-' || (g % 1000)), 'order-' || (g % 1000),
                '{\"event_type\":\"OrderPlaced\",\"schema_version\":\"2\",\"content-type\":\"application/json\"}',
                convert_to(repeat('x', $5), 'UTF8')
         FROM generate_series(1, $1) g",
    )
    .bind(n as i64)
    .bind(destination)
    .bind(target)
    .bind(if route.is_empty() { None } else { Some(route) })
    .bind(PAYLOAD_BYTES as i32)
    .execute(pool)
    .await?;
    Ok(())
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

// Long on purpose: a benchmark reads top to bottom as its phases (set-up, baseline, measured
// run, report) and splitting it would hide the order that makes the ratio fair.
pub async fn relay(infra: &InfraConfig, args: &RelayBenchArgs) -> anyhow::Result<()> {
    print!("shop-bench relay: ");
    let scratch = crate::append::Scratch::create(infra, 16).await?;
    let (pool, infra, prefix, topic) = (
        scratch.pool.clone(),
        scratch.infra.clone(),
        scratch.prefix.clone(),
        scratch.topic.clone(),
    );
    let db_url = infra.database_url.clone();
    let cfg = RelayConfig {
        batch_size: 2000,
        poll_interval: Duration::from_millis(50),
        ..RelayConfig::default()
    };

    // 1. Kafka: raw producer baseline, then the relay.
    let n = args.kafka_messages;
    let payload = vec![b'x'; PAYLOAD_BYTES];
    let producer = platform::kafka::producer(&infra.kafka_brokers)?;
    let started = Instant::now();
    let mut futs = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("order-{}", i % 1000);
        loop {
            match producer.send_result(FutureRecord::to(&topic).key(&key).payload(&payload)) {
                Ok(f) => {
                    futs.push(f);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    for f in futs {
        f.await?.map_err(|(e, _)| e)?;
    }
    let raw_kafka = rate(n, started.elapsed());

    fill_outbox(&pool, n, "kafka", "orders.events", "").await?;
    let mut relay = Relay::new(pool.clone(), &infra, cfg.clone())?;
    let started = Instant::now();
    let published = relay.drain().await?;
    let relay_kafka = rate(published, started.elapsed());
    anyhow::ensure!(published == n, "relay published {published} of {n}");

    // 2. RabbitMQ: raw confirmed publisher baseline, then the relay.
    let m = args.amqp_messages;
    let conn = platform::amqp::connect(&infra.amqp_url, "bench").await?;
    let ch = platform::amqp::confirm_channel(&conn).await?;
    let queue = format!("{prefix}bench");
    platform::amqp::declare_command_queue(&ch, &queue, &queue).await?;
    let started = Instant::now();
    let mut confirms = Vec::with_capacity(m);
    for _ in 0..m {
        confirms.push(
            ch.basic_publish(
                outbox_relay::amqp::COMMANDS_EXCHANGE.into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?,
        );
    }
    for c in confirms {
        anyhow::ensure!(c.await?.is_ack(), "broker nacked a baseline message");
    }
    let raw_amqp = rate(m, started.elapsed());
    fill_outbox(
        &pool,
        m,
        "amqp",
        outbox_relay::amqp::COMMANDS_EXCHANGE,
        &queue,
    )
    .await?;
    let started = Instant::now();
    let published = relay.drain().await?;
    let relay_amqp = rate(published, started.elapsed());
    anyhow::ensure!(published == m, "relay published {published} of {m}");
    ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    ch.queue_delete(queue.as_str().into(), Default::default())
        .await?;

    println!("| destination | raw producer msg/s | relay from outbox msg/s | relay / raw |");
    println!("|-------------|-------------------:|------------------------:|------------:|");
    println!(
        "| Kafka ({n} msgs)    | {raw_kafka:>10.0} | {relay_kafka:>10.0} | {:>5.0}% |",
        100.0 * relay_kafka / raw_kafka
    );
    println!(
        "| RabbitMQ ({m} msgs) | {raw_amqp:>10.0} | {relay_amqp:>10.0} | {:>5.0}% |",
        100.0 * relay_amqp / raw_amqp
    );

    // 3. Latency at a steady append rate, relay running. The throughput phases left 120k
    // updated rows behind: vacuum them first, so the measurement is of the steady state and
    // not of autovacuum catching up with the burst on this 2-core machine.
    sqlx::query("DELETE FROM outbox").execute(&pool).await?;
    sqlx::query("VACUUM ANALYZE outbox").execute(&pool).await?;
    let group = format!("{prefix}latency");
    let consumer: StreamConsumer = platform::kafka::consumer_config(&infra.kafka_brokers, &group)
        .set("auto.offset.reset", "latest")
        .create()?;
    consumer.subscribe(&[&topic])?;
    // Wait for the assignment so no message is missed.
    while consumer.assignment()?.count() == 0 {
        let _ = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await;
    }
    let committed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let relay = Relay::new(pool.clone(), &infra, cfg)?;
    let relay_task = tokio::spawn(outbox_relay::run(relay, db_url.clone(), shutdown.clone()));
    let total = (args.rate as f64 * args.duration.as_secs_f64()) as usize;
    let appender = {
        let (pool, committed, rate) = (pool.clone(), committed.clone(), args.rate);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut handles = Vec::with_capacity(total);
            for i in 0..total {
                tick.tick().await;
                let (pool, committed) = (pool.clone(), committed.clone());
                handles.push(tokio::spawn(async move {
                    let id = Uuid::now_v7();
                    sqlx::query(
                        "INSERT INTO outbox (message_id, destination, target, routing_key, ordering_key, headers, payload)
                         VALUES ($1, 'kafka', 'orders.events', $2, $2, '{}', $3)",
                    )
                    .bind(id)
                    .bind(format!("order-{}", i % 1000))
                    .bind(id.to_string().into_bytes())
                    .execute(&pool)
                    .await?;
                    committed.lock().unwrap().insert(id.to_string(), Instant::now());
                    anyhow::Ok(())
                }));
            }
            for h in handles {
                h.await??;
            }
            anyhow::Ok(())
        })
    };
    let mut latencies = Vec::with_capacity(total);
    let deadline = Instant::now() + args.duration + Duration::from_secs(30);
    while latencies.len() < total && Instant::now() < deadline {
        let Ok(msg) = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await else {
            continue;
        };
        let msg = msg?;
        let received = Instant::now();
        let id = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
        // The commit time is recorded just after the INSERT returns; wait for it if the message
        // overtook the bookkeeping.
        let at = loop {
            if let Some(at) = committed.lock().unwrap().get(&id).copied() {
                break at;
            }
            tokio::task::yield_now().await;
        };
        latencies.push(received.saturating_duration_since(at));
    }
    appender.await??;
    shutdown.cancel();
    relay_task.await??;
    latencies.sort();
    anyhow::ensure!(
        !latencies.is_empty(),
        "no message received in the latency phase"
    );
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    println!(
        "\nlatency at {} appends/s for {:?}: {} messages, commit -> consumer p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        args.rate,
        args.duration,
        latencies.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    // The same rows, from insert to being marked published (after the broker's ack): an upper
    // bound of append -> ack that leaves out the consumer's fetch.
    let (p50, p99, max): (f64, f64, f64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), percentile_cont(0.99) WITHIN GROUP (ORDER BY d), max(d)
         FROM (SELECT EXTRACT(EPOCH FROM published_at - created_at)::float8 * 1000 AS d
               FROM outbox WHERE destination = 'kafka' AND length(payload) = 36) x",
    )
    .fetch_one(&pool)
    .await?;
    println!(
        "latency at {} appends/s: insert -> marked published (after ack) p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
        args.rate
    );

    scratch.cleanup().await?;
    consumer.unsubscribe();
    Ok(())
}

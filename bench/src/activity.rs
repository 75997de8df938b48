//! `shop-bench activity`: user-activity ingestion beside a raw producer baseline in the same
//! run, and how fast the analytics group counts what was ingested.
//!
//! 1. Baseline: batches of the same events produced straight to the topic by an idempotent
//!    producer (`acks=all`), each batch awaited whole, as the endpoint awaits it.
//! 2. `POST /activity` over HTTP against the command API served in this process (schema
//!    check, catalog lookup, produce, wait for every ack), anonymous, as many concurrent
//!    clients.
//! 3. Analytics catch-up: the group, started after phase 2, counts everything in the topic;
//!    reported as events/s from its start until its lag is 0.
//! 4. Analytics lag: a steady stream (`--rate` events/s for `--duration`) produced while the
//!    group runs; the lag (events in the topics beyond its checkpoints) is sampled every
//!    100 ms and reported as median and maximum.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::Utc;
use rdkafka::producer::FutureRecord;
use serde_json::{Value, json};

use crate::append::{Scratch, load, print_header};

#[derive(Debug, Clone, clap::Args)]
pub struct ActivityBenchArgs {
    /// Batches per measured phase.
    #[arg(long, default_value_t = 5_000)]
    pub batches: usize,
    /// Events per batch.
    #[arg(long, default_value_t = 20)]
    pub batch_size: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Events per second in the lag phase.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Length of the lag phase.
    #[arg(long, default_value = "10s", value_parser = platform::config::parse_duration)]
    pub duration: Duration,
}

fn batch(i: usize, size: usize) -> Value {
    let at = Utc::now().to_rfc3339();
    let events: Vec<Value> = (0..size)
        .map(|j| match j % 4 {
            0 => json!({"type": "page_view", "occurred_at": at, "properties": {"path": format!("/p/{j}")}}),
            1 => json!({"type": "product_view", "occurred_at": at, "product_sku": "SKU-1", "properties": {"n": j}}),
            2 => json!({"type": "search", "occurred_at": at, "properties": {"query": format!("q{j}")}}),
            _ => json!({"type": "add_to_cart", "occurred_at": at, "product_sku": "SKU-2", "properties": {"n": j}}),
        })
        .collect();
    json!({"session_id": format!("bench-session-{i:08}"), "events": events})
}

// Long on purpose: a benchmark reads top to bottom as its phases (set-up, baseline, measured
// run, report) and splitting it would hide the order that makes the ratio fair.
pub async fn activity(
    infra: &platform::config::InfraConfig,
    args: &ActivityBenchArgs,
) -> anyhow::Result<()> {
    let (n, size, c) = (args.batches, args.batch_size, args.concurrency);
    print!("shop-bench activity: {n} batches of {size} events per phase, {c} concurrent clients, ");
    let scratch = Scratch::create(infra, 16).await?;
    let activity_topic = scratch.infra.topic(read_side::analytics::ACTIVITY_TOPIC);
    platform::kafka::ensure_topics(
        &scratch.infra.kafka_brokers,
        std::slice::from_ref(&activity_topic),
        scratch.infra.kafka_partitions,
    )
    .await?;
    let brokers = scratch.infra.kafka_brokers.clone();

    // 1. Baseline: the same events as the endpoint writes them, straight to the topic.
    let producer = platform::kafka::producer(&brokers)?;
    let sample: Vec<Vec<u8>> = {
        let b: domain::activity::Batch = serde_json::from_value(batch(0, size))?;
        let bounds = domain::activity::TimeBounds {
            max_skew: chrono::TimeDelta::minutes(5),
            max_age: chrono::TimeDelta::hours(24),
        };
        b.events
            .iter()
            .map(|e| {
                let a = domain::activity::accept(
                    e,
                    &b.session_id,
                    None,
                    &domain::personal::Protected::Clear("127.0.0.0/24".into()),
                    Utc::now(),
                    bounds,
                )
                .expect("a valid event");
                serde_json::to_vec(&a).expect("serializes")
            })
            .collect()
    };
    let sample = Arc::new(sample);
    let (p, t, s) = (producer.clone(), activity_topic.clone(), sample.clone());
    let raw = move |i: usize| {
        let (p, t, s) = (p.clone(), t.clone(), s.clone());
        async move {
            let key = format!("session:bench-session-{i:08}");
            let sends = s.iter().map(|payload| {
                p.send(
                    FutureRecord::to(&t).key(&key).payload(payload),
                    Duration::from_secs(10),
                )
            });
            for r in futures::future::join_all(sends).await {
                r.map_err(|(e, _)| e)?;
            }
            Ok(())
        }
    };
    let warm = raw.clone();
    load("warm-up", 200, c, warm).await?;
    let baseline = load("baseline: raw producer, batch acked", n, c, raw).await?;

    // 2. The endpoint over HTTP.
    let cfg = write_side::WriteSideConfig {
        http_addr: "127.0.0.1:0".parse()?,
        ..write_side::WriteSideConfig::default()
    };
    // One client address drives it all: lift its per-caller event budget.
    let ingest = write_side::activity::Ingest::new(
        &brokers,
        &activity_topic,
        &write_side::activity::ActivityConfig {
            activity_events_per_second: 10_000_000,
            ..write_side::activity::ActivityConfig::default()
        },
    )?;
    let state = write_side::http::AppState::new(
        scratch.pool.clone(),
        platform::auth::Authenticator::ephemeral(),
        platform::vault::ephemeral(),
    )
    .with_activity(ingest);
    let app = write_side::bind(&cfg, state).await?;
    let url = format!("http://{}/activity", app.local_addr());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(app.run(shutdown.clone()));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(c)
        .build()?;
    let http_op = move |i: usize| {
        let req = client
            .post(&url)
            .header("Content-Type", "application/json")
            .body(batch(i, size).to_string())
            .send();
        async move {
            let r = req.await?;
            anyhow::ensure!(r.status() == 202, "unexpected status {}", r.status());
            Ok(())
        }
    };
    let warm = http_op.clone();
    load("warm-up", 200, c, move |i| warm(n + i)).await?;
    let http = load("POST /activity over HTTP", n, c, http_op).await?;
    shutdown.cancel();
    let _ = server.await;

    // 3. Analytics: count everything from offset 0.
    let watermarks = read_side::status::Watermarks::new(&brokers, &scratch.topic)?;
    let topics = [
        watermarks.sibling(read_side::analytics::ACTIVITY_TOPIC),
        watermarks,
    ];
    let total = read_side::analytics::lag(&scratch.pool, &topics)
        .await?
        .unwrap_or(0);
    let stop = tokio_util::sync::CancellationToken::new();
    let (pool, b, prefix, s) = (
        scratch.pool.clone(),
        brokers.clone(),
        scratch.prefix.clone(),
        stop.clone(),
    );
    let topics_cfg = read_side::analytics::Topics {
        activity: activity_topic.clone(),
        orders: scratch.topic.clone(),
    };
    let started = Instant::now();
    let group = tokio::spawn(async move {
        read_side::analytics::run(
            pool,
            &b,
            topics_cfg,
            &prefix,
            Duration::from_secs(30),
            &s,
            || {},
        )
        .await
    });
    loop {
        let lag = read_side::analytics::lag(&scratch.pool, &topics).await?;
        if lag == Some(0) {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "analytics never caught up: {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain = started.elapsed();

    // 4. Lag under a steady stream (batches of `size`, every 1/rate*size s).
    let every = Duration::from_secs_f64(size as f64 / args.rate.max(1) as f64);
    let (p, t, smp) = (producer.clone(), activity_topic.clone(), sample.clone());
    let steady_until = Instant::now() + args.duration;
    let stream = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut i = 0usize;
        while Instant::now() < steady_until {
            tick.tick().await;
            i += 1;
            let key = format!("session:steady-{i}");
            for payload in smp.iter() {
                // Fresh ids: the group counts each (a copy of the sample would be a duplicate).
                let mut v: Value = serde_json::from_slice(payload)?;
                v["event_id"] = json!(uuid::Uuid::new_v4());
                let bytes = serde_json::to_vec(&v)?;
                let _ = p.send_result(FutureRecord::to(&t).key(&key).payload(&bytes));
            }
        }
        anyhow::Ok(())
    });
    let mut samples = Vec::new();
    while Instant::now() < steady_until {
        if let Some(lag) = read_side::analytics::lag(&scratch.pool, &topics).await? {
            samples.push(lag);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stream.await??;
    stop.cancel();
    group.await??;
    samples.sort_unstable();

    println!();
    print_header("vs baseline");
    println!("{}", baseline.row(None));
    println!("{}", http.row(Some(&baseline)));
    println!(
        "\nevents/s (x{size} per batch): baseline {:.0}, POST /activity {:.0}",
        baseline.per_sec() * size as f64,
        http.per_sec() * size as f64
    );
    println!(
        "analytics catch-up: {total} messages counted from offset 0 in {:.2} s = {:.0} events/s",
        drain.as_secs_f64(),
        total as f64 / drain.as_secs_f64()
    );
    println!(
        "analytics lag at {} events/s for {:?}: median {} events, max {} events ({} samples)",
        args.rate,
        args.duration,
        samples.get(samples.len() / 2).copied().unwrap_or(0),
        samples.last().copied().unwrap_or(0),
        samples.len()
    );
    scratch.cleanup().await?;
    platform::kafka::delete_topics(&brokers, &[activity_topic])
        .await
        .ok();
    Ok(())
}

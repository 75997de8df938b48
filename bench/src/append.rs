//! `shop-bench append`: throughput and latency of the write path, each beside a baseline run in
//! the same process against the same PostgreSQL, because this machine is noisy and only
//! ratios compare across runs.
//!
//! `shop-bench append` runs, on a fresh scratch database, for each client count (default 16
//! and 64), in order:
//! 1. the peer: cqrs-es 0.5 with postgres-es doing the same new-order command ([`crate::peer`]),
//!    the baseline every ratio is against;
//! 2. plain `INSERT`s of the same event row and outbox row, one transaction each (the floor
//!    of what this schema costs);
//! 3. the event-store append in-process (decide + records + one-statement append), one
//!    transaction per append;
//! 4. the same appends group-committed ([`event_store::group`], as the command API writes);
//! 5. `POST /orders` over HTTP against the command API served in this process.
//!
//! Every phase reports operations/s, p50/p99 latency and its ratio to the peer. Results go
//! in `docs/benchmarks.md`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use domain::{
    order::{self, NewLine, Order, OrderCommand, PlaceOrder},
    values::{Currency, CustomerId, MinorUnits, OrderId, Quantity, ShippingAddress, Sku},
};
use event_store::{Expected, Metadata};
use orders::{ORDER_STREAM, order_records};
use platform::auth::{Authenticator, Role};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use uuid::Uuid;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Operations per measured phase.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Concurrent clients: every phase runs at each count.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    pub clients: Vec<usize>,
    /// Phases to run, in this order (one alone, e.g. under a profiler: `--phases http`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "peer,plain,single,group,http"
    )]
    pub phases: Vec<Phase>,
}

/// A phase of `shop-bench append`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// cqrs-es 0.5 + postgres-es: the baseline.
    Peer,
    /// Plain INSERTs of the same rows, one transaction each.
    Plain,
    /// The event-store append, one transaction each.
    Single,
    /// The event-store append, group-committed.
    Group,
    /// `POST /orders` over HTTP.
    Http,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Peer => "cqrs-es 0.5 + postgres-es (peer)",
            Phase::Plain => "plain INSERTs, event + outbox (1 tx)",
            Phase::Single => "event-store append, 1 tx each",
            Phase::Group => "event-store append, group commit",
            Phase::Http => "POST /orders over HTTP",
        }
    }
}

pub(crate) struct Stats {
    name: &'static str,
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Stats {
    pub(crate) fn per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn pct(&self, p: f64) -> Duration {
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }

    pub(crate) fn row(&self, baseline: Option<&Stats>) -> String {
        let ratio = baseline.map_or("-".to_owned(), |b| {
            format!("{:.0}%", 100.0 * self.per_sec() / b.per_sec())
        });
        format!(
            "| {:<36} | {:>7} | {:>10.0} | {:>8.2} | {:>8.2} | {:>10} |",
            self.name,
            self.ops,
            self.per_sec(),
            self.pct(0.50).as_secs_f64() * 1e3,
            self.pct(0.99).as_secs_f64() * 1e3,
            ratio
        )
    }
}

/// Runs `op(i)` for i in 0..n with `concurrency` workers; collects per-op latency.
pub(crate) async fn load<F, Fut>(
    name: &'static str,
    n: usize,
    concurrency: usize,
    op: F,
) -> anyhow::Result<Stats>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (op, next) = (op.clone(), next.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<_, anyhow::Error>(lat);
                    }
                    let t = Instant::now();
                    op(i).await?;
                    lat.push(t.elapsed());
                }
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(n);
    for w in workers {
        latencies.extend(w.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Ok(Stats {
        name,
        ops: n,
        elapsed,
        latencies,
    })
}

pub(crate) fn place_command(i: usize) -> PlaceOrder {
    let order_id = OrderId(Uuid::now_v7());
    PlaceOrder {
        order_id,
        customer_id: CustomerId::parse(&format!("bench-{}", i % 1000)).unwrap(),
        currency: Currency::parse("EUR").unwrap(),
        lines: vec![
            NewLine {
                sku: Sku::parse("SKU-1").unwrap(),
                quantity: Quantity::parse(2).unwrap(),
                unit_price_minor: MinorUnits::parse(1250).unwrap(),
            },
            NewLine {
                sku: Sku::parse("SKU-2").unwrap(),
                quantity: Quantity::parse(1).unwrap(),
                unit_price_minor: MinorUnits::parse(499).unwrap(),
            },
        ],
        shipping_address: SEALING_KEY.with(|key| {
            key.seal(
                &domain::personal::shipping_address_context(order_id),
                &ShippingAddress::parse("Ada Lovelace", "1 Main St", "Berlin", "10115", "DE")
                    .unwrap(),
            )
        }),
        payment_ref: domain::personal::PaymentRef(Uuid::now_v7()),
    }
}

thread_local! {
    /// The in-process baseline seals like the command API does, with a key never stored.
    static SEALING_KEY: platform::vault::DataKey = platform::vault::DataKey::ephemeral();
}

pub(crate) fn bench_metadata(order_id: OrderId) -> Metadata {
    Metadata {
        correlation_id: order_id.0,
        causation_id: Uuid::now_v7(),
        actor: "customer:bench".into(),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        command_id: Some(Uuid::new_v4().to_string()),
    }
}

/// The same rows the append path writes, as plain INSERTs in one transaction.
async fn baseline_op(pool: PgPool, i: usize) -> anyhow::Result<()> {
    let cmd = place_command(i);
    let id = cmd.order_id;
    let events = order::decide(&Order::NotPlaced, OrderCommand::Place(cmd))?;
    let at = event_store::now_micros();
    let (stored, outbox) = order_records(id, 1, &events, &bench_metadata(id), at);
    let (e, m) = (&stored[0], &outbox[0]);
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO events (stream_id, stream_type, stream_version, event_id, event_type, schema_version,
                             payload, metadata, recorded_at, prev_hash, hash)
         VALUES ($1, 'baseline', 1, $2, $3, $4, $5, $6, $7, $8, $8)",
    )
    .bind(id.0)
    .bind(e.event_id)
    .bind(&e.event_type)
    .bind(e.schema_version)
    .bind(&e.payload)
    .bind(serde_json::to_value(&e.metadata)?)
    .bind(at)
    .bind(vec![0u8; 32])
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO outbox (message_id, destination, target, routing_key, ordering_key, headers, payload)
         VALUES ($1, 'kafka', $2, $3, $4, $5, $6)",
    )
    .bind(m.message_id)
    .bind(&m.target)
    .bind(&m.routing_key)
    .bind(&m.ordering_key)
    .bind(&m.headers)
    .bind(&m.payload)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

async fn append_op(pool: PgPool, i: usize) -> anyhow::Result<()> {
    let cmd = place_command(i);
    let id = cmd.order_id;
    let events = order::decide(&Order::NotPlaced, OrderCommand::Place(cmd))?;
    let at = event_store::now_micros();
    let (stored, outbox) = order_records(id, 1, &events, &bench_metadata(id), at);
    let mut tx = pool.begin().await?;
    event_store::append_at(
        &mut tx,
        id.0,
        ORDER_STREAM,
        &Expected::new_stream(),
        &stored,
        &outbox,
        at,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The same append as a group-commit job: the product's write path batches concurrent
/// commands into one transaction ([`event_store::group`]).
async fn group_op(
    committer: event_store::group::Committer<event_store::group::Appends>,
    i: usize,
) -> anyhow::Result<()> {
    let cmd = place_command(i);
    let id = cmd.order_id;
    let events = order::decide(&Order::NotPlaced, OrderCommand::Place(cmd))?;
    let at = event_store::now_micros();
    let (stored, outbox) = order_records(id, 1, &events, &bench_metadata(id), at);
    committer
        .submit(event_store::group::AppendJob {
            stream_id: id.0,
            stream_type: ORDER_STREAM.into(),
            expected: Expected::new_stream(),
            events: stored,
            outbox,
            recorded_at: at,
        })
        .await??;
    Ok(())
}

/// A benchmark run's own infrastructure: a scratch database (migrated) and the order-events
/// topic under a fresh prefix. [`Scratch::cleanup`] removes both.
pub(crate) struct Scratch {
    pub pool: PgPool,
    /// The services with the scratch database and the run's topic prefix.
    pub infra: platform::config::InfraConfig,
    pub prefix: String,
    pub topic: String,
    name: String,
    admin_url: String,
}

impl Scratch {
    pub async fn create(infra: &platform::config::InfraConfig, max: u32) -> anyhow::Result<Self> {
        let admin_url = infra.database_url.clone();
        let (pool, name, db_url) = scratch_db(&admin_url, max).await?;
        let prefix = format!("bench-{}.", &Uuid::new_v4().simple().to_string()[..8]);
        let infra = platform::config::InfraConfig {
            kafka_topic_prefix: prefix.clone(),
            database_url: db_url,
            ..infra.clone()
        };
        let topic = infra.topic("orders.events");
        platform::kafka::ensure_topics(
            &infra.kafka_brokers,
            std::slice::from_ref(&topic),
            infra.kafka_partitions,
        )
        .await?;
        println!("scratch database {name}, prefix {prefix}\n");
        Ok(Self {
            pool,
            infra,
            prefix,
            topic,
            name,
            admin_url,
        })
    }

    pub async fn cleanup(self) -> anyhow::Result<()> {
        self.pool.close().await;
        platform::kafka::delete_topics(&self.infra.kafka_brokers, &[self.topic])
            .await
            .ok();
        drop_db(&self.admin_url, &self.name).await
    }
}

/// A scratch database for one benchmark run, dropped afterwards.
pub(crate) async fn scratch_db(
    admin_url: &str,
    max: u32,
) -> anyhow::Result<(PgPool, String, String)> {
    let name = format!("shopbench_{}", &Uuid::new_v4().simple().to_string()[..8]);
    let mut admin = PgConnection::connect(admin_url)
        .await
        .context("connecting to PostgreSQL")?;
    admin
        .execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
        .await?;
    let base = admin_url
        .rsplit_once('/')
        .map(|(b, _)| b)
        .unwrap_or(admin_url);
    let url = format!("{base}/{name}");
    let pool = platform::db::connect(&url, max).await?;
    platform::db::migrate(&pool).await?;
    write_side::catalog::seed(&pool).await?;
    Ok((pool, name, url))
}

// Long on purpose: a benchmark reads top to bottom as its phases (set-up, baseline, measured
// runs, report) and splitting it would hide the order that makes the ratio fair.
pub async fn append(database_url: &str, args: &BenchArgs) -> anyhow::Result<()> {
    let n = args.requests;
    let most = args.clients.iter().copied().max().unwrap_or(1).max(1);
    let (pool, name, _) = scratch_db(database_url, most as u32).await?;
    println!(
        "shop-bench append: {n} operations per phase at {:?} concurrent clients, scratch database {name}\n",
        args.clients
    );
    let peer = Arc::new(crate::peer::framework(&pool).await?);

    let cfg = write_side::WriteSideConfig {
        http_addr: "127.0.0.1:0".parse()?,
        ..write_side::WriteSideConfig::default()
    };
    let auth = Authenticator::ephemeral();
    let app = write_side::build(
        &cfg,
        pool.clone(),
        auth.clone(),
        platform::vault::ephemeral(),
    )
    .await?;
    let url = format!("http://{}/orders", app.local_addr());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(app.run(shutdown.clone()));
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..100)
            .map(|i| {
                auth.issue(
                    &format!("bench-{i}"),
                    Role::Customer,
                    Duration::from_secs(3600),
                )
                .expect("an hour is within the default cap")
            })
            .collect(),
    );
    let body = serde_json::json!({
        "currency": "EUR",
        "items": [{"sku": "SKU-1", "quantity": 2}, {"sku": "SKU-2", "quantity": 1}],
        "shipping_address": {"name": "Ada Lovelace", "line1": "1 Main St", "city": "Berlin", "postal_code": "10115", "country": "DE"},
        "payment_token": "tok_visa"
    })
    .to_string();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(most)
        .build()?;
    let run_id = Uuid::new_v4();
    let http_op = move |i: usize| {
        let req = client
            .post(&url)
            .bearer_auth(&tokens[i % tokens.len()])
            .header("Idempotency-Key", format!("{run_id}-{i}"))
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send();
        async move {
            let r = req.await?;
            anyhow::ensure!(r.status() == 202, "unexpected status {}", r.status());
            Ok(())
        }
    };

    // Warm-up: connections, caches, the API's first requests.
    let p = pool.clone();
    load("warm-up", 500, most, move |i| baseline_op(p.clone(), i)).await?;
    let warm = http_op.clone();
    load("warm-up", 500, most, move |i| warm(usize::MAX / 2 + i)).await?;

    let mut tables = Vec::new();
    for (round, &c) in args.clients.iter().enumerate() {
        // Distinct idempotency keys per round.
        let offset = round * n;
        let mut runs = Vec::new();
        for phase in &args.phases {
            let stats = match phase {
                Phase::Peer => {
                    let cqrs = peer.clone();
                    load(phase.name(), n, c, move |i| {
                        let cqrs = cqrs.clone();
                        async move { crate::peer::place(&cqrs, place_command(i)).await }
                    })
                    .await?
                }
                Phase::Plain => {
                    let p = pool.clone();
                    load(phase.name(), n, c, move |i| baseline_op(p.clone(), i)).await?
                }
                Phase::Single => {
                    let p = pool.clone();
                    load(phase.name(), n, c, move |i| append_op(p.clone(), i)).await?
                }
                Phase::Group => {
                    let committer = event_store::group::Committer::start(
                        pool.clone(),
                        event_store::group::Appends,
                        write_side::checkouts::WORKERS,
                        write_side::checkouts::MAX_BATCH,
                    );
                    load(phase.name(), n, c, move |i| group_op(committer.clone(), i)).await?
                }
                Phase::Http => {
                    let op = http_op.clone();
                    load(phase.name(), n, c, move |i| op(offset + i)).await?
                }
            };
            runs.push((*phase, stats));
        }
        tables.push((c, runs));
    }
    shutdown.cancel();
    let _ = server.await;

    for (c, runs) in &tables {
        println!("{c} concurrent clients:\n");
        print_header("vs cqrs-es");
        let peer_run = runs.iter().find(|(p, _)| *p == Phase::Peer).map(|(_, s)| s);
        for (phase, s) in runs {
            let against = if *phase == Phase::Peer {
                None
            } else {
                peer_run
            };
            println!("{}", s.row(against));
        }
        println!();
    }

    pool.close().await;
    drop_db(database_url, &name).await
}

/// The header of the table [`Stats::row`] fills.
pub(crate) fn print_header(against: &str) {
    println!(
        "| {:<36} | {:>7} | {:>10} | {:>8} | {:>8} | {:>10} |",
        "phase", "ops", "ops/s", "p50 ms", "p99 ms", against
    );
    println!(
        "|{:-<38}|{:-<9}|{:-<12}|{:-<10}|{:-<10}|{:-<13}|",
        "", "", "", "", "", ""
    );
}

/// Drops a scratch database, retrying for a minute: after large writes an autovacuum worker
/// may still be attached, which `WITH (FORCE)` cannot end for a non-superuser. If it is still
/// busy then, the database is left behind with a warning (the numbers are printed already).
pub(crate) async fn drop_db(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(admin_url).await?;
    let sql = format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#);
    for attempt in 1.. {
        match admin.execute(sql.as_str()).await {
            Ok(_) => break,
            Err(e) if attempt < 60 => {
                tracing::debug!(error = %e, "scratch database busy; retrying the drop");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                eprintln!(
                    "warning: the scratch database {name} is left behind ({e}); drop it later: DROP DATABASE \"{name}\""
                );
                break;
            }
        }
    }
    Ok(())
}

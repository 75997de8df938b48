//! `shop`: the one operator binary. Runs the service roles and the admin subcommands.
//!
//! Thin by design (STYLE 2): parse config, start telemetry, create the shutdown token, call the
//! libraries. Every subcommand's work lives in a library crate where tests can drive it.
#![forbid(unsafe_code)]

use std::{
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use platform::{
    auth::{AuthConfig, Authenticator, Role},
    config::InfraConfig,
    errors::{ErrorClass, classify},
    ops::OpsConfig,
    supervisor::Supervisor,
};
use uuid::Uuid;

mod bench;
mod bench_read;
mod bench_relay;
mod bench_saga;

#[derive(Parser)]
#[command(
    name = "shop",
    version,
    about = "Event-sourced checkout backend: services and operator tools"
)]
struct Cli {
    #[command(flatten)]
    infra: InfraConfig,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Applies pending database migrations and creates the Kafka topics.
    Setup,
    /// Applies pending database migrations only.
    Migrate,
    /// Runs every service role in this process until SIGTERM/Ctrl-C: the command API, the
    /// outbox relay, the projectors with the GraphQL API, and the checkout saga.
    Run {
        #[command(flatten)]
        write_side: write_side::WriteSideConfig,
        #[command(flatten)]
        relay: outbox_relay::RelayConfig,
        /// Address of the GraphQL read API (GraphiQL on GET /graphql).
        #[arg(long, env = "GRAPHQL_ADDR", default_value = "127.0.0.1:8081")]
        graphql_addr: std::net::SocketAddr,
        #[command(flatten)]
        projector: read_side::consumer::ProjectorConfig,
        #[command(flatten)]
        saga: saga::SagaConfig,
        #[command(flatten)]
        ops: OpsConfig,
    },
    /// Runs only the checkout saga (orchestrator, and the stand-in participants unless
    /// SAGA_PARTICIPANTS=false).
    Saga {
        #[command(flatten)]
        saga: saga::SagaConfig,
        #[command(flatten)]
        ops: OpsConfig,
    },
    /// Stand-in inventory: stock per SKU.
    Inventory {
        #[command(subcommand)]
        command: InventoryCommand,
    },
    /// Runs only the outbox relay (several may run; one publishes at a time).
    Relay {
        #[command(flatten)]
        relay: outbox_relay::RelayConfig,
        #[command(flatten)]
        ops: OpsConfig,
    },
    /// Read-side projections: status, and rebuild by replay of the event store.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Read-side dead letters: events a projection could not apply.
    /// Read-side dead letters (numeric ids) and the saga's RabbitMQ dead letters (message
    /// ids, UUIDs).
    Dlq {
        /// Prefix of the saga's queue names.
        #[arg(long, env = "SAGA_QUEUE_PREFIX", default_value = "")]
        queue_prefix: String,
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Outbox messages the brokers rejected for good.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Prints a bearer token for development.
    Token {
        #[arg(long, value_enum)]
        role: Role,
        /// The token's subject: the customer id for customers, a name for operators.
        #[arg(
            long = "customer-id",
            visible_alias = "subject",
            default_value = "operator"
        )]
        subject: String,
        /// Lifetime, e.g. 15m, 12h.
        #[arg(long, default_value = "12h", value_parser = platform::config::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        auth: AuthConfig,
    },
    /// Benchmarks that print their numbers beside a same-run baseline.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Tamper evidence of the event store.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Lists dead letters: the read side's (open ones only, unless --all), then the saga's
    /// queues'.
    List {
        #[arg(long)]
        all: bool,
    },
    /// Shows one dead letter with its error and message.
    Show { id: DeadLetterId },
    /// Read side: re-applies the event (from the event store when possible) and the events
    /// parked behind it. Saga: republishes the message to its original routing key.
    Replay { id: DeadLetterId },
    /// Gives up on a dead letter (read side: releases the events parked behind it).
    Discard { id: DeadLetterId },
}

/// A read-side dead letter's number, or a saga dead letter's message id.
#[derive(Debug, Clone, Copy)]
enum DeadLetterId {
    ReadSide(i64),
    Saga(Uuid),
}

impl std::str::FromStr for DeadLetterId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(n) = s.parse() {
            return Ok(Self::ReadSide(n));
        }
        Uuid::parse_str(s)
            .map(Self::Saga)
            .map_err(|_| format!("`{s}` is neither a dead-letter number nor a message id"))
    }
}

#[derive(Subcommand)]
enum InventoryCommand {
    /// Sets a SKU's stock on hand (refused below what is reserved).
    Set { sku: String, quantity: i64 },
    /// Stocks the default catalog (SKU-1 .. SKU-5, 1,000 each) where no stock is set.
    Seed,
}

#[derive(Subcommand)]
enum ProjectionsCommand {
    /// Lists the projections with their version, position, lag and any rebuild.
    Status,
    /// Rebuilds a projection from the event store into a new version while the current one
    /// keeps serving, then switches atomically. Resumes an interrupted rebuild unless --restart.
    Rebuild {
        /// order_summary or sales_by_product
        name: String,
        /// Start over instead of resuming an interrupted rebuild.
        #[arg(long)]
        restart: bool,
        /// Events per transaction (larger windows write each order's row fewer times).
        #[arg(long, default_value_t = 100_000)]
        batch_size: i64,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Lists rows set aside after a permanent rejection (they block later rows of their key).
    Failed,
    /// Puts a failed row back in line; the relay publishes it (and unblocks its key).
    Retry { id: i64 },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Write path: plain INSERT baseline, event-store append, POST /orders over HTTP.
    Append(bench::BenchArgs),
    /// Outbox relay: throughput to Kafka and RabbitMQ beside raw producers, and latency.
    Relay(bench_relay::RelayBenchArgs),
    /// Read side: rebuild throughput beside a feed-read baseline, and live projection lag.
    ReadSide(bench_read::ReadBenchArgs),
    /// Checkout saga: sagas/s and placed -> confirmed latency beside a transport baseline.
    Saga(bench_saga::SagaBenchArgs),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recomputes the hash chain of every order (or one) and reports the first broken event.
    Verify {
        #[arg(long = "order")]
        order: Option<Uuid>,
    },
}

/// Topics the project owns (before the configurable prefix).
const TOPICS: &[&str] = &["orders.events", "orders.events.dlq"];

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&e.into()),
    };
    let result = runtime.block_on(async_main());
    // Kafka clients are closed on the blocking pool (closing blocks while a broker is
    // down); dropping the runtime would wait for them without limit.
    runtime.shutdown_timeout(Duration::from_secs(5));
    result.unwrap_or_else(|e| fail(&e))
}

/// The error's chain on one line (a backtrace would bury it at the end of a log), exit 1.
fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("Error: {e:#}");
    ExitCode::FAILURE
}

async fn async_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    platform::telemetry::init();
    match cli.command {
        Command::Migrate => migrate(&cli.infra).await?,
        Command::Setup => setup(&cli.infra).await?,
        Command::Run {
            write_side,
            relay,
            graphql_addr,
            projector,
            saga,
            ops,
        } => {
            let roles = RoleConfigs {
                write_side: Some(write_side),
                relay: Some(relay),
                graphql_addr: Some(graphql_addr),
                projector: Some(projector),
                saga: Some(saga),
            };
            run(&cli.infra, roles, ops).await?
        }
        Command::Saga { saga, ops } => {
            let roles = RoleConfigs {
                saga: Some(saga),
                ..RoleConfigs::default()
            };
            run(&cli.infra, roles, ops).await?
        }
        Command::Inventory { command } => return inventory(&cli.infra, command).await,
        Command::Relay { relay, ops } => {
            let roles = RoleConfigs {
                relay: Some(relay),
                ..RoleConfigs::default()
            };
            run(&cli.infra, roles, ops).await?
        }
        Command::Outbox { command } => return outbox(&cli.infra, command).await,
        Command::Dlq {
            queue_prefix,
            command,
        } => return dlq(&cli.infra, &queue_prefix, command).await,
        Command::Projections { command } => return projections(&cli.infra, command).await,
        Command::Token {
            role,
            subject,
            ttl,
            auth,
        } => {
            println!(
                "{}",
                Authenticator::new(&auth.jwt_secret).issue(&subject, role, ttl)
            );
        }
        Command::Bench {
            command: BenchCommand::Append(args),
        } => bench::append(&cli.infra.database_url, &args).await?,
        Command::Bench {
            command: BenchCommand::Relay(args),
        } => bench_relay::relay(&cli.infra, &args).await?,
        Command::Bench {
            command: BenchCommand::ReadSide(args),
        } => bench_read::read_side(&cli.infra, &args).await?,
        Command::Bench {
            command: BenchCommand::Saga(args),
        } => bench_saga::saga(&cli.infra, &args).await?,
        Command::Audit {
            command: AuditCommand::Verify { order },
        } => return audit_verify(&cli.infra, order).await,
    }
    Ok(ExitCode::SUCCESS)
}

async fn migrate(infra: &InfraConfig) -> anyhow::Result<()> {
    let pool = platform::db::connect(&infra.database_url, 2)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", infra.database_url))?;
    platform::db::migrate(&pool)
        .await
        .context("applying migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

async fn setup(infra: &InfraConfig) -> anyhow::Result<()> {
    migrate(infra).await?;
    let topics: Vec<String> = TOPICS.iter().map(|t| infra.topic(t)).collect();
    platform::kafka::wait_ready(&infra.kafka_brokers, Duration::from_secs(60)).await?;
    platform::kafka::ensure_topics(&infra.kafka_brokers, &topics, infra.kafka_partitions)
        .await
        .context("creating Kafka topics")?;
    tracing::info!(
        ?topics,
        partitions = infra.kafka_partitions,
        "kafka topics ready"
    );
    Ok(())
}

/// Which roles a `shop run|relay|saga` process runs (the others stay `None`).
#[derive(Default)]
struct RoleConfigs {
    write_side: Option<write_side::WriteSideConfig>,
    relay: Option<outbox_relay::RelayConfig>,
    graphql_addr: Option<std::net::SocketAddr>,
    projector: Option<read_side::consumer::ProjectorConfig>,
    saga: Option<saga::SagaConfig>,
}

/// Sets up the database and topics, then runs the chosen roles under one supervisor with the
/// ops listener until SIGTERM/Ctrl-C (exit 0) or a permanent failure (exit non-zero).
async fn run(infra: &InfraConfig, roles: RoleConfigs, ops: OpsConfig) -> anyhow::Result<()> {
    let shutdown = platform::shutdown::token();
    // The saga alone needs no Kafka topics.
    let with_topics = roles.relay.is_some() || roles.projector.is_some();
    if !setup_with_retries(infra, &shutdown, with_topics).await? {
        return Ok(());
    }
    let pool = platform::db::connect_config(infra).await?;
    let mut sup = Supervisor::new(shutdown);
    let mut readiness = platform::ops::Readiness::new().postgres(pool.clone());
    let topic = infra.topic("orders.events");
    if let Some(cfg) = roles.write_side.as_ref() {
        let state =
            write_side::http::AppState::new(pool.clone(), Authenticator::from_config(&cfg.auth));
        let router = write_side::http::router(state, cfg.max_body_bytes);
        let addr = cfg.http_addr;
        sup.spawn("command-api", move |ctx| {
            platform::ops::serve(addr, router.clone(), ctx)
        });
    }
    if let Some(relay_cfg) = roles.relay {
        let ready = Arc::new(AtomicBool::new(true));
        readiness = readiness.flag("relay.brokers", ready.clone());
        let (pool, infra) = (pool.clone(), infra.clone());
        sup.spawn("relay", move |ctx| {
            outbox_relay::run_role(
                pool.clone(),
                infra.clone(),
                relay_cfg.clone(),
                ready.clone(),
                ctx,
            )
        });
    }
    // One client for high watermarks, shared by the lag metrics and GraphQL's `projections`
    // (none for `shop relay` and `shop saga`).
    let watermarks = if roles.projector.is_some() || roles.graphql_addr.is_some() {
        Some(read_side::status::Watermarks::new(
            &infra.kafka_brokers,
            &topic,
        )?)
    } else {
        None
    };
    if let Some(projector_cfg) = roles.projector {
        for kind in read_side::projection::Kind::ALL {
            let (pool, infra, topic, cfg) = (
                pool.clone(),
                infra.clone(),
                topic.clone(),
                projector_cfg.clone(),
            );
            sup.spawn(format!("projector:{}", kind.name()), move |ctx| {
                read_side::consumer::Projector::run_role(
                    kind,
                    pool.clone(),
                    infra.kafka_brokers.clone(),
                    topic.clone(),
                    infra.kafka_topic_prefix.clone(),
                    cfg.clone(),
                    ctx,
                )
            });
        }
        let p = pool.clone();
        sup.spawn("rebuilds", move |ctx| {
            read_side::rebuild::run_worker(p.clone(), ctx)
        });
        let (p, watermarks) = (
            pool.clone(),
            watermarks.clone().expect("made for projectors"),
        );
        sup.spawn("projection-metrics", move |ctx| {
            read_side::status::report_metrics(p.clone(), watermarks.clone(), ctx)
        });
    }
    if let (Some(addr), Some(cfg)) = (roles.graphql_addr, roles.write_side.as_ref()) {
        let graphql_api = read_side::graphql::GraphqlApi {
            pool: pool.clone(),
            auth: Authenticator::from_config(&cfg.auth),
            watermarks: watermarks.clone(),
        };
        let router = graphql_api.router();
        sup.spawn("graphql", move |ctx| {
            platform::ops::serve(addr, router.clone(), ctx)
        });
    }
    if let Some(saga_cfg) = roles.saga {
        saga::roles(&mut sup, pool.clone(), infra.amqp_url.clone(), saga_cfg);
    }
    let readiness = readiness.roles(sup.roles(), ops.ready_grace);
    let ops_router = platform::ops::router(readiness);
    sup.spawn("ops", move |ctx| {
        platform::ops::serve(ops.addr, ops_router.clone(), ctx)
    });
    let result = sup.wait().await;
    // Bounded: a connection held by a task that outlived its role (a websocket's listener)
    // must not keep the process from exiting.
    let _ = tokio::time::timeout(Duration::from_secs(5), pool.close()).await;
    match &result {
        Ok(()) => tracing::info!("stopped"),
        Err(e) => tracing::error!(
            error = format!("{e:#}"),
            "stopped after a permanent failure"
        ),
    }
    result
}

/// Runs `shop setup`, retrying transient failures (PostgreSQL or Kafka still starting) with
/// backoff until shutdown; a permanent one (a migration whose checksum changed, wrong
/// credentials) is returned. `false` when shutdown came first.
async fn setup_with_retries(
    infra: &InfraConfig,
    shutdown: &tokio_util::sync::CancellationToken,
    with_topics: bool,
) -> anyhow::Result<bool> {
    use backon::BackoffBuilder;
    let mut delays = backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let attempt = async {
            if with_topics {
                setup(infra).await
            } else {
                migrate(infra).await
            }
        };
        let e = tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            r = attempt => match r {
                Ok(()) => return Ok(true),
                Err(e) => e,
            },
        };
        if classify(&e) == ErrorClass::Permanent {
            return Err(e.context("setting up the database and topics"));
        }
        let wait = delays.next().unwrap_or(Duration::from_secs(10));
        tracing::warn!(error = format!("{e:#}"), retry_in = ?wait, "setup failed; retrying");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn dlq(
    infra: &InfraConfig,
    queue_prefix: &str,
    command: DlqCommand,
) -> anyhow::Result<ExitCode> {
    use read_side::dead_letters;
    let pool = platform::db::connect(&infra.database_url, 2).await?;
    let names = saga::topology::Names::new(queue_prefix);
    let line = |d: &dead_letters::DeadLetter| {
        format!(
            "{}\t{}\t{}\t{} v{}\t{}\tattempts={}\tlast_failure={}",
            d.id,
            d.status,
            d.projection,
            d.stream_id.map_or("-".into(), |s| s.to_string()),
            d.stream_version.map_or("-".into(), |v| v.to_string()),
            d.error_class,
            d.attempts,
            d.last_failed_at.to_rfc3339()
        )
    };
    let amqp_line = |d: &saga::dead_letters::AmqpDeadLetter| {
        format!(
            "{}\t{}\t{}\tattempts={}\tlast_failure={}",
            d.message_id.map_or("-".into(), |m| m.to_string()),
            d.queue,
            d.error_class,
            d.attempts,
            d.last_failure.map_or("-".into(), |t| t.to_rfc3339())
        )
    };
    match command {
        DlqCommand::List { all } => {
            let rows = dead_letters::list(&pool, !all).await?;
            for d in &rows {
                println!("{}", line(d));
            }
            println!("{} read-side dead letter(s)", rows.len());
            match platform::amqp::connect(&infra.amqp_url, "shop-dlq").await {
                Ok(conn) => {
                    let saga_rows = saga::dead_letters::list(&conn, &names).await?;
                    for d in &saga_rows {
                        println!("{}", amqp_line(d));
                    }
                    println!("{} saga dead letter(s)", saga_rows.len());
                }
                Err(e) => println!("saga dead letters: RabbitMQ unreachable ({e})"),
            }
        }
        DlqCommand::Show {
            id: DeadLetterId::ReadSide(id),
        } => {
            let Some(d) = dead_letters::get(&pool, id).await? else {
                eprintln!("no dead letter with id {id}");
                return Ok(ExitCode::FAILURE);
            };
            println!("{}", line(&d));
            println!(
                "source: {} partition {} offset {}",
                d.topic, d.partition, d.offset
            );
            println!("first failure: {}", d.first_failed_at.to_rfc3339());
            println!("error: {}", d.error_message);
            println!("message: {}", String::from_utf8_lossy(&d.payload));
        }
        DlqCommand::Show {
            id: DeadLetterId::Saga(id),
        } => {
            let conn = platform::amqp::connect(&infra.amqp_url, "shop-dlq").await?;
            let all = saga::dead_letters::list(&conn, &names).await?;
            let Some(d) = all.iter().find(|d| d.message_id == Some(id)) else {
                eprintln!("no saga dead letter with message id {id}");
                return Ok(ExitCode::FAILURE);
            };
            println!("{}", amqp_line(d));
            println!(
                "source: queue {} routing key {}",
                d.original_queue, d.original_routing_key
            );
            println!(
                "first failure: {}",
                d.first_failure.map_or("-".into(), |t| t.to_rfc3339())
            );
            println!("error: {}", d.error_message);
            println!("message: {}", String::from_utf8_lossy(&d.body));
        }
        DlqCommand::Replay { id } | DlqCommand::Discard { id } => {
            let replay = matches!(command, DlqCommand::Replay { .. });
            let verb = if replay { "replayed" } else { "discarded" };
            match id {
                DeadLetterId::ReadSide(id) => {
                    let result = if replay {
                        dead_letters::replay(&pool, id).await
                    } else {
                        dead_letters::discard(&pool, id).await
                    };
                    match result {
                        Ok(released) => {
                            println!("dead letter {id} {verb}; {released} parked event(s) applied")
                        }
                        Err(e) => {
                            eprintln!("{e}");
                            return Ok(ExitCode::FAILURE);
                        }
                    }
                }
                DeadLetterId::Saga(id) => {
                    let conn = platform::amqp::connect(&infra.amqp_url, "shop-dlq").await?;
                    match saga::dead_letters::resolve(&conn, &names, id, replay).await {
                        Ok(d) => println!("saga dead letter {id} from {} {verb}", d.queue),
                        Err(e) => {
                            eprintln!("{e}");
                            return Ok(ExitCode::FAILURE);
                        }
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn projections(infra: &InfraConfig, command: ProjectionsCommand) -> anyhow::Result<ExitCode> {
    use read_side::{projection::Kind, rebuild, status};
    let pool = platform::db::connect(&infra.database_url, 4).await?;
    match command {
        ProjectionsCommand::Status => {
            let watermarks =
                status::Watermarks::new(&infra.kafka_brokers, &infra.topic("orders.events"))?;
            for p in status::all(&pool, Some(&watermarks)).await? {
                println!(
                    "{}\tv{}\t{:?}\tposition={}\tlag={}{}{}",
                    p.name,
                    p.version,
                    p.state,
                    p.position,
                    p.lag.map_or("?".into(), |l| l.to_string()),
                    match p.behind_retention {
                        Some(n) if n > 0 => format!(
                            "\tBEHIND KAFKA RETENTION on {n} partition(s): rebuild it (shop projections rebuild {})",
                            p.name
                        ),
                        _ => String::new(),
                    },
                    p.rebuild.map_or(String::new(), |r| format!(
                        "\trebuild v{}: {}/{}{}",
                        r.version,
                        r.processed,
                        r.total,
                        r.error.map_or(String::new(), |e| format!(" error: {e}"))
                    ))
                );
            }
        }
        ProjectionsCommand::Rebuild {
            name,
            restart,
            batch_size,
        } => {
            let Some(kind) = Kind::parse(&name) else {
                let known: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
                eprintln!("unknown projection `{name}`; known: {}", known.join(", "));
                return Ok(ExitCode::FAILURE);
            };
            let options = rebuild::RebuildOptions {
                batch_size,
                restart,
            };
            let started = match rebuild::start(&pool, kind, &options).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let start = started.progress();
            // Drawn only on a terminal (indicatif hides itself otherwise).
            let bar = indicatif::ProgressBar::new(start.total.max(0) as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {human_pos}/{human_len} events, {per_sec}, ETA {eta}",
                )?
                .progress_chars("=> "),
            );
            bar.set_message(format!("rebuilding {} v{}", kind.name(), started.version()));
            bar.set_position(start.processed.max(0) as u64);
            let result = started
                .run(|p| {
                    bar.set_length(p.total.max(p.processed).max(0) as u64);
                    bar.set_position(p.processed.max(0) as u64);
                })
                .await;
            bar.finish_and_clear();
            match result {
                Ok(r) => println!(
                    "{} rebuilt: version {} is active ({} events{})",
                    r.projection,
                    r.version,
                    r.events,
                    if r.resumed { ", resumed" } else { "" }
                ),
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn inventory(infra: &InfraConfig, command: InventoryCommand) -> anyhow::Result<ExitCode> {
    let pool = platform::db::connect(&infra.database_url, 2).await?;
    match command {
        InventoryCommand::Set { sku, quantity } => {
            let sku = domain::values::Sku::parse(&sku).map_err(|e| anyhow::anyhow!("{e}"))?;
            anyhow::ensure!(quantity >= 0, "quantity must not be negative");
            if let Err(e) = saga::participants::set_stock(&pool, &sku, quantity).await {
                eprintln!("{e}");
                return Ok(ExitCode::FAILURE);
            }
            println!("{} on hand: {quantity}", sku.as_str());
        }
        InventoryCommand::Seed => {
            saga::participants::seed_catalog(&pool).await?;
            println!("default catalog stocked where unset (SKU-1 .. SKU-5)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn outbox(infra: &InfraConfig, command: OutboxCommand) -> anyhow::Result<ExitCode> {
    let pool = platform::db::connect(&infra.database_url, 2).await?;
    match command {
        OutboxCommand::Failed => {
            let rows = outbox_relay::store::list_failed(&pool).await?;
            for r in &rows {
                println!(
                    "{}\t{}\t{} {}\tkey={}\tattempts={}\tfailed_at={}\t{}",
                    r.id,
                    r.message_id,
                    r.destination,
                    r.target,
                    r.ordering_key,
                    r.attempts,
                    r.failed_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                    r.last_error.as_deref().unwrap_or("")
                );
            }
            println!("{} failed message(s)", rows.len());
        }
        OutboxCommand::Retry { id } => {
            if !outbox_relay::store::retry_failed(&pool, id).await? {
                eprintln!("no failed outbox message with id {id}");
                return Ok(ExitCode::FAILURE);
            }
            println!("outbox message {id} queued again");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn audit_verify(infra: &InfraConfig, order: Option<Uuid>) -> anyhow::Result<ExitCode> {
    let pool = platform::db::connect(&infra.database_url, 2).await?;
    let mut conn = pool.acquire().await?;
    let (broken, checked) = match order {
        Some(id) => {
            let r = event_store::audit::verify_stream(&mut conn, id).await?;
            anyhow::ensure!(r.events > 0, "order {id} has no events");
            (r.broken.into_iter().map(|b| (id, b)).collect::<Vec<_>>(), 1)
        }
        None => {
            let (reports, checked) =
                event_store::audit::verify_all(&mut conn, Some("order")).await?;
            (
                reports
                    .into_iter()
                    .filter_map(|r| r.broken.map(|b| (r.stream_id, b)))
                    .collect(),
                checked,
            )
        }
    };
    for (id, b) in &broken {
        println!(
            "BROKEN order {id}: first bad event at version {} (position {}, event {}): {:?}",
            b.stream_version,
            b.position.map_or("-".into(), |p| p.to_string()),
            b.event_id.map_or("-".into(), |e| e.to_string()),
            b.problem
        );
    }
    println!("{checked} stream(s) checked, {} broken", broken.len());
    Ok(if broken.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flattened config together: clap's own consistency checks (duplicate ids or
    /// long names, bad defaults) run here instead of at a user's first start.
    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// `scripts/run.sh` runs `shop run` with no arguments and only the environment that
    /// `scripts/lib.sh` exports (the same one this test runs under through scripts/test.sh).
    #[test]
    fn shop_run_parses_with_the_defaults() {
        let cli = Cli::try_parse_from(["shop", "run"]).unwrap_or_else(|e| panic!("{e}"));
        let Command::Run {
            write_side,
            relay,
            graphql_addr,
            projector,
            saga,
            ops,
        } = cli.command
        else {
            panic!("not the run command");
        };
        assert_eq!(write_side.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(graphql_addr.to_string(), "127.0.0.1:8081");
        assert_eq!(ops.addr.to_string(), "127.0.0.1:9090");
        assert_eq!(
            relay.batch_size,
            outbox_relay::RelayConfig::default().batch_size
        );
        let (p, s) = (
            read_side::consumer::ProjectorConfig::default(),
            saga::SagaConfig::default(),
        );
        assert_eq!(projector.retry_base, p.retry_base);
        assert_eq!(projector.max_attempts, p.max_attempts);
        assert_eq!(saga.retry_base, s.retry_base);
        assert_eq!(saga.step_timeout, s.step_timeout);
        assert!(saga.participants);
        // The role-prefixed flags reach their own config only.
        let cli = Cli::try_parse_from([
            "shop",
            "run",
            "--projection-retry-base",
            "1s",
            "--saga-retry-base",
            "3s",
        ])
        .unwrap();
        let Command::Run {
            projector, saga, ..
        } = cli.command
        else {
            panic!("not the run command");
        };
        assert_eq!(projector.retry_base, Duration::from_secs(1));
        assert_eq!(saga.retry_base, Duration::from_secs(3));
    }

    #[test]
    fn every_subcommand_parses_with_its_defaults() {
        for args in [
            &["shop", "relay"][..],
            &["shop", "saga"],
            &["shop", "setup"],
            &["shop", "projections", "status"],
            &["shop", "dlq", "list"],
        ] {
            Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
    }
}

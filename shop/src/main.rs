//! `shop`: the one operator binary. Runs the service roles and the admin subcommands.
//!
//! Thin by design (STYLE 2): parse config, start telemetry, create the shutdown token, call the
//! libraries. Every subcommand's work lives in a library crate where tests can drive it.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, Subcommand};
use platform::{config::InfraConfig, ops::Readiness};

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

#[derive(Subcommand)]
enum Command {
    /// Applies pending database migrations and creates the Kafka topics.
    Setup,
    /// Applies pending database migrations only.
    Migrate,
    /// Runs every service role in this process until SIGTERM/Ctrl-C.
    Run {
        /// Address of the operations endpoint (/healthz, /readyz, /metrics).
        #[arg(long, env = "OPS_ADDR", default_value = "127.0.0.1:9090")]
        ops_addr: SocketAddr,
    },
}

/// Topics the project owns (before the configurable prefix).
const TOPICS: &[&str] = &["orders.events", "orders.events.dlq"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    platform::telemetry::init();
    match cli.command {
        Command::Migrate => migrate(&cli.infra).await,
        Command::Setup => setup(&cli.infra).await,
        Command::Run { ops_addr } => run(&cli.infra, ops_addr).await,
    }
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
    platform::kafka::wait_ready(&infra.kafka_brokers, std::time::Duration::from_secs(60)).await?;
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

async fn run(infra: &InfraConfig, ops_addr: SocketAddr) -> anyhow::Result<()> {
    setup(infra).await?;
    let shutdown = platform::shutdown::token();
    let pool = platform::db::connect_config(infra).await?;
    let readiness = Readiness::new().postgres(pool.clone());
    let listener = tokio::net::TcpListener::bind(ops_addr)
        .await
        .with_context(|| {
            format!("binding the ops endpoint to {ops_addr} (port taken? set OPS_ADDR)")
        })?;
    tracing::info!(%ops_addr, "ops endpoint listening");
    axum::serve(listener, platform::ops::router(readiness))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    tracing::info!("stopped");
    Ok(())
}

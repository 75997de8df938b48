//! `shop-bench`: the benchmarks, as their own binary so the production `shop` carries none of
//! their code. Each prints its numbers beside a baseline measured in the same run (this
//! machine is noisy; only ratios compare across runs). See docs/benchmarks.md.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use platform::config::InfraConfig;

mod activity;
mod append;
mod peer;
mod read_side;
mod relay;
mod saga;

#[derive(Parser)]
#[command(
    name = "shop-bench",
    version,
    about = "Benchmarks of the checkout backend, each with a same-run baseline"
)]
struct Cli {
    #[command(flatten)]
    infra: InfraConfig,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write path: plain INSERT baseline, event-store append, POST /orders over HTTP.
    Append(append::BenchArgs),
    /// Outbox relay: throughput to Kafka and RabbitMQ beside raw producers, and latency.
    Relay(relay::RelayBenchArgs),
    /// Read side: rebuild throughput beside a feed-read baseline, and live projection lag.
    ReadSide(read_side::ReadBenchArgs),
    /// User activity: POST /activity beside a raw producer, and the analytics' catch-up.
    Activity(activity::ActivityBenchArgs),
    /// Checkout saga: sagas/s and placed -> confirmed latency beside a transport baseline.
    Saga(saga::SagaBenchArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    platform::telemetry::init();
    // Appends key their chain as `shop run` does (HMAC-SHA-256), with a throwaway key.
    let ring = platform::keys::Keyring::ephemeral("bench");
    event_store::hash::install_chain_keys(
        event_store::hash::ChainKeys::new(ring.entries()).expect("one key"),
    )?;
    match cli.command {
        Command::Append(args) => append::append(&cli.infra.database_url, &args).await,
        Command::Relay(args) => relay::relay(&cli.infra, &args).await,
        Command::ReadSide(args) => read_side::read_side(&cli.infra, &args).await,
        Command::Saga(args) => saga::saga(&cli.infra, &args).await,
        Command::Activity(args) => activity::activity(&cli.infra, &args).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}

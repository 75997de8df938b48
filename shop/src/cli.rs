//! The command line of `shop`: every subcommand and the configuration each one reads
//! (flags with environment fallbacks), in one place so clap's consistency checks and the
//! "`shop run` parses with the defaults" test see all of it at once.

use std::time::Duration;

use clap::{Parser, Subcommand};
use platform::{
    auth::{AuthConfig, Role},
    config::InfraConfig,
    ops::OpsConfig,
};
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "shop",
    version,
    about = "Event-sourced checkout backend: services and operator tools"
)]
pub struct Cli {
    #[command(flatten)]
    pub infra: InfraConfig,
    #[command(flatten)]
    pub audit_keys: crate::audit::AuditKeys,
    #[command(flatten)]
    pub master_keys: MasterKeys,
    /// Why, in your words: recorded with what a changing subcommand did (replay, discard,
    /// retry, rebuild, prices, stock, forget) in the console's action log.
    #[arg(long, global = true, default_value = "")]
    pub why: String,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Command {
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
        activity: write_side::activity::ActivityConfig,
        #[command(flatten)]
        relay: outbox_relay::RelayConfig,
        /// Address of the GraphQL read API (the query console on GET /graphql when enabled).
        #[arg(long, env = "GRAPHQL_ADDR", default_value = "127.0.0.1:8081")]
        graphql_addr: std::net::SocketAddr,
        #[command(flatten)]
        graphql: read_side::graphql::GraphqlLimits,
        #[command(flatten)]
        api_limits: platform::limits::ApiLimits,
        #[command(flatten)]
        retention: crate::retention::RetentionConfig,
        #[command(flatten)]
        checkpoints: crate::audit::CheckpointConfig,
        #[command(flatten)]
        projector: read_side::consumer::ProjectorConfig,
        #[command(flatten)]
        saga: saga::SagaConfig,
        #[command(flatten)]
        email: notifications::MailerConfig,
        #[command(flatten)]
        console: console::ConsoleConfig,
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
    /// The shop's catalog: products and their prices (checkouts never carry prices).
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
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
    /// Customers' personal data: erasure.
    Customers {
        #[command(subcommand)]
        command: CustomersCommand,
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
    /// Tamper evidence of the event store.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
pub enum DlqCommand {
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
pub enum DeadLetterId {
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
pub enum CatalogCommand {
    /// Lists every product with its price and whether it is for sale.
    List,
    /// Creates or replaces a product.
    Set {
        sku: String,
        /// Price in minor units (cents), 0 to 100,000,000,000.
        #[arg(long)]
        price_minor: i64,
        /// ISO 4217 currency.
        #[arg(long, default_value = "EUR")]
        currency: String,
        #[arg(long)]
        name: String,
        /// Not for sale (kept for the record).
        #[arg(long)]
        inactive: bool,
    },
    /// Writes the development catalog (SKU-1 .. SKU-5 in EUR) where a product is not set.
    Seed,
}

#[derive(Subcommand)]
pub enum InventoryCommand {
    /// Sets a SKU's stock on hand (refused below what is reserved).
    Set { sku: String, quantity: i64 },
    /// Stocks the default catalog (SKU-1 .. SKU-5, 1,000 each) where no stock is set.
    Seed,
}

#[derive(Subcommand)]
pub enum ProjectionsCommand {
    /// Lists the projections with their version, position, lag and any rebuild.
    Status,
    /// Rebuilds a projection from the event store into a new version while the current one
    /// keeps serving, then switches atomically. Resumes an interrupted rebuild unless --restart.
    /// `analytics` is instead reset and replayed from its Kafka topics by the running group.
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
pub enum OutboxCommand {
    /// Lists rows set aside after a permanent rejection (they block later rows of their key).
    Failed,
    /// Puts a failed row back in line; the relay publishes it (and unblocks its key).
    Retry { id: i64 },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Recomputes the hash chain of every stream (or one order's) and reports the first
    /// broken event; with --checkpoint, also what changed since that signed checkpoint.
    Verify {
        #[arg(long = "order")]
        order: Option<Uuid>,
        /// A checkpoint file written by `shop run` (AUDIT_CHECKPOINT_DIR) or `shop audit
        /// checkpoint`.
        #[arg(long)]
        checkpoint: Option<std::path::PathBuf>,
    },
    /// Takes a signed checkpoint of every stream's head now: prints it, or writes it into
    /// the directory given.
    Checkpoint {
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
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
            activity,
            relay,
            graphql_addr,
            graphql,
            api_limits,
            retention,
            checkpoints,
            projector,
            saga,
            email,
            console,
            ops,
        } = cli.command
        else {
            panic!("not the run command");
        };
        assert!(!console.secure_cookie);
        assert_eq!(graphql.max_fields, 200);
        assert_eq!(api_limits.rate_limit_per_second, 20);
        assert_eq!(activity.activity_max_age, Duration::from_secs(24 * 3600));
        assert_eq!(email.smtp_url, "smtp://127.0.0.1:2525");
        assert_eq!(
            cli.infra.activity_retention,
            Duration::from_secs(7 * 24 * 3600)
        );
        assert_eq!(
            retention.inbox_retention,
            Duration::from_secs(7 * 24 * 3600)
        );
        assert_eq!(
            checkpoints.audit_checkpoint_interval,
            Duration::from_secs(15 * 60)
        );
        assert!(!graphql.console, "the console is off unless enabled");
        assert!(!saga.fault_injection, "fault injection is off by default");
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

/// The master keys that wrap customers' data keys (`platform::vault`).
#[derive(Clone, clap::Args)]
pub struct MasterKeys {
    /// Master keys inline: `kid=secret` entries separated by commas, the first one wrapping
    /// new data keys, all unwrapping (docs/security.md). Prefer MASTER_KEYS_FILE.
    #[arg(long, env = "MASTER_KEYS", hide_env_values = true, global = true)]
    pub master_keys: Option<String>,
    /// File of master keys, one `kid=secret` per line. Keep it outside the database and its
    /// backups: whoever holds it and a backup can read personal data not yet forgotten.
    #[arg(long, env = "MASTER_KEYS_FILE", global = true)]
    pub master_keys_file: Option<std::path::PathBuf>,
}

impl MasterKeys {
    /// The vault over the configured master keys; an error when none is configured.
    pub fn vault(&self) -> anyhow::Result<platform::vault::Vault> {
        let master = platform::vault::MasterKeys::configured(
            self.master_keys.as_deref(),
            self.master_keys_file.as_deref(),
        )?;
        Ok(platform::vault::Vault::new(master))
    }
}

#[derive(Subcommand)]
pub enum CustomersCommand {
    /// Forgets a customer: deletes their data keys (every sealed copy of their personal data,
    /// in the event store, Kafka, RabbitMQ, dead letters and saga state, becomes unreadable),
    /// their profile and any payment token still held. Idempotent.
    Forget {
        /// The customer id (the token subject).
        customer_id: String,
    },
}

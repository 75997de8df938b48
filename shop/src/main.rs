//! `shop`: the one operator binary. Runs the service roles and the admin subcommands.
//!
//! Thin by design (STYLE 2): parse the command line, start telemetry, hand off to the
//! library ([`shop::run`] wires the roles, [`shop::admin`] the operator tools).
#![forbid(unsafe_code)]

use std::{process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Parser;
use platform::auth::Authenticator;

use shop::{admin::*, cli::*, run::*};

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
    // Roles that append need audit keys (or development mode); other commands use them when
    // configured (verification, checkpoints).
    platform::kafka::configure_security(platform::kafka::Security::from_config(&cli.infra));
    let appends = matches!(cli.command, Command::Run { .. } | Command::Saga { .. });
    cli.audit_keys
        .install(appends, cli.infra.dev_mode)
        .context("audit keys")?;
    // A change is recorded in the action log (shop::recorded), however it ended.
    let acting = shop::recorded::acting(&cli.command);
    let (infra, why, actor) = (cli.infra.clone(), cli.why.clone(), shop::recorded::actor());
    let result = dispatch(cli, &actor).await;
    if let Some(a) = acting {
        let outcome = shop::recorded::outcome(&result);
        if let Err(e) = shop::recorded::record(&infra, &a, &actor, &why, &outcome).await {
            eprintln!(
                "{} on {} ({outcome}) was NOT recorded in the action log: {e:#}",
                a.action, a.target
            );
            return Ok(ExitCode::FAILURE);
        }
    }
    result
}

async fn dispatch(cli: Cli, actor: &str) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Migrate => migrate(&cli.infra).await?,
        Command::Setup => setup(&cli.infra).await?,
        Command::Run {
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
        } => {
            let roles = RoleConfigs {
                write_side: Some(write_side),
                activity: Some(activity),
                relay: Some(relay),
                graphql_addr: Some(graphql_addr),
                graphql_limits: graphql,
                api_limits,
                retention: Some(retention),
                checkpoints: Some(checkpoints),
                projector: Some(projector),
                saga: Some(saga),
                email: Some(email),
                console: Some(console),
                vault: Some(cli.master_keys.vault().context("master keys")?),
            };
            run(&cli.infra, roles, ops).await?
        }
        Command::Saga { saga, ops } => {
            let roles = RoleConfigs {
                saga: Some(saga),
                vault: Some(cli.master_keys.vault().context("master keys")?),
                ..RoleConfigs::default()
            };
            run(&cli.infra, roles, ops).await?
        }
        Command::Catalog { command } => return catalog(&cli.infra, command).await,
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
        Command::Customers { command } => return customers(&cli.infra, command, actor).await,
        Command::Token {
            role,
            subject,
            ttl,
            auth,
        } => {
            let auth = Authenticator::from_config(&auth, false)?;
            println!("{}", auth.issue(&subject, role, ttl)?);
        }
        Command::Audit {
            command: AuditCommand::Verify { order, checkpoint },
        } => return shop::audit::verify(&cli.infra, order, checkpoint).await,
        Command::Audit {
            command: AuditCommand::Checkpoint { out },
        } => return shop::audit::checkpoint_now(&cli.infra, out).await,
    }
    Ok(ExitCode::SUCCESS)
}

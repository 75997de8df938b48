//! What an operator changes with `shop`, recorded in the console's action log
//! (`console_actions`) like an action taken on the console: who (`cli:<login name>`), what,
//! on which target, why (`--why`), and how it ended (`ok`, `refused` for a non-zero exit,
//! `failed: <error>`).
//!
//! Why: the action log is where operators and auditors look for "who replayed this, who
//! changed that price"; a change made from a terminal must not be missing from it. Listing
//! and showing change nothing and are not recorded. A change that cannot be recorded makes
//! the command exit non-zero (the change itself is not undone: it is said on stderr).

use std::process::ExitCode;

use platform::config::InfraConfig;
use serde_json::json;

use crate::cli::{
    CatalogCommand, Command, CustomersCommand, DeadLetterId, DlqCommand, InventoryCommand,
    OutboxCommand, ProjectionsCommand,
};

/// A change a subcommand makes.
#[derive(Debug, Clone, PartialEq)]
pub struct CliAction {
    pub action: &'static str,
    pub target: String,
    pub detail: serde_json::Value,
}

fn action(action: &'static str, target: String, detail: serde_json::Value) -> Option<CliAction> {
    Some(CliAction {
        action,
        target,
        detail,
    })
}

fn letter(id: &DeadLetterId) -> String {
    match id {
        DeadLetterId::ReadSide(n) => format!("dead-letter:read-side/{n}"),
        DeadLetterId::Saga(m) => format!("dead-letter:saga/{m}"),
    }
}

/// The change `command` makes, named as the console names it; `None` when it changes
/// nothing (lists, shows, services, tokens, audit checks).
pub fn acting(command: &Command) -> Option<CliAction> {
    let none = json!({});
    match command {
        Command::Dlq { command, .. } => match command {
            DlqCommand::Replay { id } => action("replay_dead_letter", letter(id), none),
            DlqCommand::Discard { id } => action("discard_dead_letter", letter(id), none),
            DlqCommand::List { .. } | DlqCommand::Show { .. } => None,
        },
        Command::Outbox {
            command: OutboxCommand::Retry { id },
        } => action(
            "replay_dead_letter",
            format!("dead-letter:outbox/{id}"),
            none,
        ),
        Command::Projections {
            command: ProjectionsCommand::Rebuild { name, restart, .. },
        } => action(
            "rebuild_projection",
            format!("projection:{name}"),
            json!({"restart": restart}),
        ),
        Command::Catalog { command } => match command {
            CatalogCommand::Set {
                sku,
                price_minor,
                currency,
                name,
                inactive,
            } => action(
                "set_price",
                format!("catalog:{sku}"),
                json!({"price_minor": price_minor, "currency": currency, "name": name, "active": !inactive}),
            ),
            CatalogCommand::Seed => action("seed_catalog", "catalog".into(), none),
            CatalogCommand::List => None,
        },
        Command::Inventory { command } => match command {
            InventoryCommand::Set { sku, quantity } => action(
                "set_stock",
                format!("inventory:{sku}"),
                json!({"quantity": quantity}),
            ),
            InventoryCommand::Seed => action("seed_inventory", "inventory".into(), none),
        },
        Command::Customers {
            command: CustomersCommand::Forget { customer_id },
        } => action("forget_customer", format!("customer:{customer_id}"), none),
        _ => None,
    }
}

/// `cli:<login name>` (`$USER`, `$LOGNAME`, else the uid), cut to letters, digits and
/// `._-`.
pub fn actor() -> String {
    use std::os::unix::fs::MetadataExt;
    let name = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::metadata("/proc/self")
                .ok()
                .map(|m| format!("uid-{}", m.uid()))
        })
        .unwrap_or_else(|| "unknown".into());
    let clean: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    format!("cli:{clean}")
}

/// How a command ended, as the log says it.
pub fn outcome(result: &anyhow::Result<ExitCode>) -> String {
    match result {
        Ok(code) if *code == ExitCode::SUCCESS => "ok".into(),
        Ok(_) => "refused (non-zero exit; see its output)".into(),
        Err(e) => format!("failed: {e:#}"),
    }
}

/// Records `a` in the action log.
pub async fn record(
    infra: &InfraConfig,
    a: &CliAction,
    actor: &str,
    why: &str,
    outcome: &str,
) -> anyhow::Result<()> {
    let pool = platform::db::connect(&infra.database_url, 1).await?;
    let mut detail = a.detail.clone();
    detail["via"] = json!("cli");
    console::actions::record(
        &pool,
        console::actions::NewAction {
            actor,
            action: a.action,
            target: &a.target,
            order_id: None,
            reason: why.trim(),
            outcome,
            detail: Some(detail),
        },
    )
    .await?;
    pool.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    fn parse(args: &[&str]) -> Option<CliAction> {
        let cli = Cli::try_parse_from(std::iter::once("shop").chain(args.iter().copied()))
            .expect("parses");
        acting(&cli.command)
    }

    #[test]
    fn changes_are_named_as_the_console_names_them_and_reads_are_not_recorded() {
        let a = parse(&["dlq", "replay", "12", "--why", "fixed"]).unwrap();
        assert_eq!(
            (a.action, a.target.as_str()),
            ("replay_dead_letter", "dead-letter:read-side/12")
        );
        let a = parse(&["--why", "x", "outbox", "retry", "7"]).unwrap();
        assert_eq!(a.target, "dead-letter:outbox/7");
        let a = parse(&[
            "catalog",
            "set",
            "SKU-9",
            "--price-minor",
            "100",
            "--name",
            "Nine",
        ])
        .unwrap();
        assert_eq!(a.action, "set_price");
        assert_eq!(a.detail["price_minor"], 100);
        for read in [
            &["dlq", "list"][..],
            &["dlq", "show", "3"],
            &["catalog", "list"],
            &["outbox", "failed"],
            &["projections", "status"],
            &["audit", "verify"],
        ] {
            assert_eq!(parse(read), None, "{read:?}");
        }
    }

    #[test]
    fn the_actor_is_a_clean_login_name() {
        let a = actor();
        assert!(a.starts_with("cli:") && a.len() > 4, "{a}");
        assert!(
            a[4..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
            "{a}"
        );
    }
}

//! The operator subcommands: dead letters, projections, the catalog, stock and the outbox
//! (the audit trail's are in [`crate::audit`]). Each is a thin shell over a library call; its output is for people (tables,
//! one line per item) and its exit status for scripts.

use std::process::ExitCode;

use platform::config::InfraConfig;

use crate::cli::{
    CatalogCommand, CustomersCommand, DeadLetterId, DlqCommand, InventoryCommand, OutboxCommand,
    ProjectionsCommand,
};

// Long on purpose: one arm per `shop dlq` subcommand, each a few lines of printing over a
// library call; splitting would scatter the command's output format.
pub async fn dlq(
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
            println!("message: {}", shown(&pool, &d.payload).await?);
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
            println!("message: {}", shown(&pool, &d.body).await?);
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
                    let resolution = if replay {
                        saga::dead_letters::Resolution::Replay
                    } else {
                        saga::dead_letters::Resolution::Discard
                    };
                    let conn = platform::amqp::connect(&infra.amqp_url, "shop-dlq").await?;
                    match saga::dead_letters::resolve(&conn, &names, id, &resolution).await {
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

// Long on purpose: one arm per `shop projections` subcommand, each a few lines of printing
// over a library call.
pub async fn projections(
    infra: &InfraConfig,
    command: ProjectionsCommand,
) -> anyhow::Result<ExitCode> {
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
            if name == read_side::analytics::NAME {
                let generation = read_side::analytics::rebuild(&pool).await?;
                println!(
                    "analytics reset: the running group replays both topics from offset 0 as generation {generation} (follow it with `shop projections status`)"
                );
                return Ok(ExitCode::SUCCESS);
            }
            let Some(kind) = Kind::parse(&name) else {
                let mut known: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
                known.push(read_side::analytics::NAME);
                eprintln!("unknown projection `{name}`; known: {}", known.join(", "));
                return Ok(ExitCode::FAILURE);
            };
            let options = rebuild::RebuildOptions {
                batch_size,
                restart,
                hold: false,
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

pub async fn catalog(infra: &InfraConfig, command: CatalogCommand) -> anyhow::Result<ExitCode> {
    use write_side::catalog::{self, Product};
    let pool = platform::db::connect(&infra.database_url, 2).await?;
    match command {
        CatalogCommand::List => {
            for p in catalog::list(&pool).await? {
                println!(
                    "{}\t{} {}\t{}\t{}",
                    p.sku.as_str(),
                    p.price_minor.get(),
                    p.currency.as_str(),
                    if p.active { "for sale" } else { "inactive" },
                    p.name
                );
            }
        }
        CatalogCommand::Set {
            sku,
            price_minor,
            currency,
            name,
            inactive,
        } => {
            let product = match Product::parse(&sku, &name, price_minor, &currency, !inactive) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            catalog::set(&pool, &product).await?;
            println!(
                "{}: {} {}{}",
                product.sku.as_str(),
                product.price_minor.get(),
                product.currency.as_str(),
                if product.active { "" } else { " (inactive)" }
            );
        }
        CatalogCommand::Seed => {
            let added = catalog::seed(&pool).await?;
            println!("development catalog written where unset ({added} added, SKU-1 .. SKU-5)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A dead message as an operator sees it: JSON with the sealed values of forgotten customers
/// shown as `"erased"` (`platform::vault::mark_erased`), anything else as text.
async fn shown(pool: &sqlx::PgPool, body: &[u8]) -> anyhow::Result<String> {
    let mut conn = pool.acquire().await?;
    Ok(
        match platform::vault::shown_message(&mut conn, body).await? {
            Some(value) => value.to_string(),
            None => String::from_utf8_lossy(body).into_owned(),
        },
    )
}

/// `shop customers ...`; `actor` is recorded with an erasure (who asked).
pub async fn customers(
    infra: &InfraConfig,
    command: CustomersCommand,
    actor: &str,
) -> anyhow::Result<ExitCode> {
    let pool = platform::db::connect(&infra.database_url, 2).await?;
    match command {
        CustomersCommand::Forget { customer_id } => {
            let id = domain::values::CustomerId::parse(&customer_id)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let e = write_side::customers::forget(&pool, &id, actor).await?;
            println!(
                "{}: forgotten (data keys deleted: {}, profile deleted: {}, payment tokens deleted: {})",
                id.as_str(),
                e.keys_deleted,
                e.profile_deleted,
                e.payment_tokens_deleted
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn inventory(infra: &InfraConfig, command: InventoryCommand) -> anyhow::Result<ExitCode> {
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

pub async fn outbox(infra: &InfraConfig, command: OutboxCommand) -> anyhow::Result<ExitCode> {
    let pool = platform::db::connect(&infra.database_url, 2).await?;
    match command {
        OutboxCommand::Failed => {
            let rows = event_store::outbox::list_failed(&pool).await?;
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
            if !event_store::outbox::retry_failed(&pool, id).await? {
                eprintln!("no failed outbox message with id {id}");
                return Ok(ExitCode::FAILURE);
            }
            println!("outbox message {id} queued again");
        }
    }
    Ok(ExitCode::SUCCESS)
}

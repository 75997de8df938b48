//! Setting up and running the service roles: `shop setup` (migrations and topics), and
//! `shop run|relay|saga`, which wire the chosen roles under one supervisor with the ops
//! listener until SIGTERM or a permanent failure.

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::Context;
use platform::{
    auth::Authenticator,
    config::InfraConfig,
    errors::{ErrorClass, classify},
    ops::OpsConfig,
    supervisor::Supervisor,
};

/// Topics the project owns (before the configurable prefix).
pub const TOPICS: &[&str] = &[
    "orders.events",
    "orders.events.dlq",
    read_side::analytics::ACTIVITY_TOPIC,
];

pub async fn migrate(infra: &InfraConfig) -> anyhow::Result<()> {
    let pool = platform::db::connect(&infra.database_url, 2)
        .await
        .with_context(|| {
            format!(
                "connecting to PostgreSQL at {}",
                platform::config::redacted(&infra.database_url)
            )
        })?;
    platform::db::migrate(&pool)
        .await
        .context("applying migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

pub async fn setup(infra: &InfraConfig) -> anyhow::Result<()> {
    migrate(infra).await?;
    let topics: Vec<(String, Vec<(&str, String)>)> = TOPICS
        .iter()
        .map(|t| {
            // Activity is kept for ACTIVITY_RETENTION; the order stream for the broker's
            // default (the event store is its source of truth).
            let config = if *t == read_side::analytics::ACTIVITY_TOPIC {
                vec![(
                    "retention.ms",
                    infra.activity_retention.as_millis().to_string(),
                )]
            } else {
                Vec::new()
            };
            (infra.topic(t), config)
        })
        .collect();
    platform::kafka::wait_ready(&infra.kafka_brokers, Duration::from_secs(60)).await?;
    platform::kafka::ensure_topics_with(&infra.kafka_brokers, &topics, infra.kafka_partitions)
        .await
        .context("creating Kafka topics")?;
    let topics: Vec<&String> = topics.iter().map(|t| &t.0).collect();
    tracing::info!(
        ?topics,
        partitions = infra.kafka_partitions,
        "kafka topics ready"
    );
    Ok(())
}

/// Which roles a `shop run|relay|saga` process runs (the others stay `None`).
#[derive(Default)]
pub struct RoleConfigs {
    pub write_side: Option<write_side::WriteSideConfig>,
    /// With the command API: `POST /activity` to the `user-activity` topic.
    pub activity: Option<write_side::activity::ActivityConfig>,
    pub relay: Option<outbox_relay::RelayConfig>,
    pub graphql_addr: Option<std::net::SocketAddr>,
    pub graphql_limits: read_side::graphql::GraphqlLimits,
    pub api_limits: platform::limits::ApiLimits,
    pub retention: Option<crate::retention::RetentionConfig>,
    pub checkpoints: Option<crate::audit::CheckpointConfig>,
    pub projector: Option<read_side::consumer::ProjectorConfig>,
    pub saga: Option<saga::SagaConfig>,
    /// The email group (order outcomes to customers over SMTP).
    pub email: Option<notifications::MailerConfig>,
    /// Customers' data keys: the command API seals with them, the shipping participant opens.
    pub vault: Option<platform::vault::Vault>,
    /// The operator console on the ops listener (`shop run` only: it needs the API's keys).
    pub console: Option<console::ConsoleConfig>,
}

/// Sets up the database and topics, then runs the chosen roles under one supervisor with the
/// ops listener until SIGTERM/Ctrl-C (exit 0) or a permanent failure (exit non-zero).
pub async fn run(infra: &InfraConfig, roles: RoleConfigs, ops: OpsConfig) -> anyhow::Result<()> {
    // Checked before anything is served: no key, no start (outside development mode).
    let auth = match roles.write_side.as_ref() {
        Some(cfg) => Some(
            Authenticator::from_config(&cfg.auth, infra.dev_mode).context("bearer-token keys")?,
        ),
        None => None,
    };
    if let Some(saga) = roles.saga.as_ref() {
        saga.check(infra.dev_mode).context("saga configuration")?;
    }
    let shutdown = platform::shutdown::token();
    // The saga alone needs no Kafka topics.
    let with_topics = roles.relay.is_some() || roles.projector.is_some() || roles.email.is_some();
    if !setup_with_retries(infra, &shutdown, with_topics).await? {
        return Ok(());
    }
    let pools = platform::db::Pools::connect(infra).await?;
    // A wrong or missing master key is found here, not by every shipment failing later.
    if let Some(vault) = &roles.vault {
        let mut conn = pools.workers.acquire().await?;
        vault
            .check(&mut conn)
            .await
            .context("MASTER_KEYS / MASTER_KEYS_FILE do not unwrap the stored data keys")?;
    }
    let header_timeout = roles.api_limits.header_read_timeout;
    let pool = pools.workers.clone();
    let mut sup = Supervisor::new(shutdown);
    let mut readiness = platform::ops::Readiness::new().postgres(pool.clone());
    let topic = infra.topic("orders.events");
    let vault = || {
        roles
            .vault
            .clone()
            .context("MASTER_KEYS or MASTER_KEYS_FILE: the command API and the saga need it")
    };
    if let (Some(cfg), Some(auth)) = (roles.write_side.as_ref(), auth.clone()) {
        let mut state = write_side::http::AppState::new(pools.commands.clone(), auth, vault()?)
            .with_limits(roles.api_limits.clone());
        if let Some(activity) = &roles.activity {
            let topic = infra.topic(read_side::analytics::ACTIVITY_TOPIC);
            state = state.with_activity(write_side::activity::Ingest::new(
                &infra.kafka_brokers,
                &topic,
                activity,
            )?);
        }
        let router = write_side::http::router(state, cfg.max_body_bytes);
        let addr = cfg.http_addr;
        sup.spawn("command-api", move |ctx| {
            platform::ops::serve(addr, router.clone(), header_timeout, ctx)
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
        let watermarks = watermarks.clone().expect("made for projectors");
        spawn_read_side(&mut sup, &pool, infra, &topic, projector_cfg, watermarks);
    }
    let console_auth = auth.clone();
    if let (Some(addr), Some(auth)) = (roles.graphql_addr, auth) {
        let graphql_api = read_side::graphql::GraphqlApi {
            pool: pools.queries.clone(),
            auth,
            watermarks: watermarks.clone(),
            limits: roles.graphql_limits,
            admission: Some(roles.api_limits.clone()),
        };
        let router = graphql_api.router();
        sup.spawn("graphql", move |ctx| {
            platform::ops::serve(addr, router.clone(), header_timeout, ctx)
        });
    }
    if let Some(cfg) = roles.retention {
        let p = pool.clone();
        sup.spawn("retention", move |ctx| {
            crate::retention::run_role(p.clone(), cfg.clone(), ctx)
        });
    }
    let checkpoint_dir = roles
        .checkpoints
        .as_ref()
        .and_then(|c| c.audit_checkpoint_dir.clone());
    match roles.checkpoints {
        Some(crate::audit::CheckpointConfig {
            audit_checkpoint_dir: Some(dir),
            audit_checkpoint_interval: every,
        }) => {
            let p = pool.clone();
            sup.spawn("audit-checkpoints", move |ctx| {
                crate::audit::run_role(p.clone(), dir.clone(), every, ctx)
            });
        }
        Some(_) => tracing::warn!(
            "AUDIT_CHECKPOINT_DIR is not set: no audit checkpoints are written outside the database"
        ),
        None => {}
    }
    // Checked before anything runs: a bad SMTP_URL or EMAIL_FROM is a start-up error. The
    // console resends dead emails with it.
    let mailer = match roles.email.as_ref() {
        Some(cfg) => Some(notifications::Mailer::new(cfg).context("email settings")?),
        None => None,
    };
    if let Some(cfg) = roles.email {
        let (p, infra, topic) = (pool.clone(), infra.clone(), topic.clone());
        sup.spawn("email", move |ctx| {
            notifications::run_role(
                p.clone(),
                infra.kafka_brokers.clone(),
                topic.clone(),
                infra.kafka_topic_prefix.clone(),
                cfg.clone(),
                ctx,
            )
        });
    }
    // The console's view of the saga: where its dead letters are, when an order is stuck.
    let saga_view = roles.saga.as_ref().map(|s| {
        (
            console::Amqp {
                url: infra.amqp_url.clone(),
                names: saga::topology::Names::new(&s.queue_prefix),
            },
            s.step_timeout * s.step_attempts.max(1),
            saga::orchestrator::Orchestrator::new(pool.clone(), s.clone()),
        )
    });
    if let Some(saga_cfg) = roles.saga {
        saga::roles(
            &mut sup,
            pool.clone(),
            infra.amqp_url.clone(),
            saga_cfg,
            vault()?,
        );
    }
    let readiness = readiness.roles(sup.roles(), ops.ready_grace);
    let mut ops_router = platform::ops::router(readiness.clone());
    if let (Some(cfg), Some(auth)) = (roles.console, console_auth) {
        let (amqp, stuck_after, saga) = match saga_view {
            Some((amqp, stuck_after, saga)) => (Some(amqp), stuck_after, Some(saga)),
            None => (None, Duration::from_secs(60), None),
        };
        let console = console::Console {
            pool: pools.queries.clone(),
            auth,
            amqp,
            readiness: Some(readiness),
            watermarks: watermarks.clone(),
            stuck_after,
            saga,
            mailer,
            checkpoint_dir,
            secure_cookie: cfg.secure_cookie,
        };
        ops_router = ops_router.merge(console.router());
        // The verifications operators ask for on the console's Audit page.
        let verifier_pool = pools.queries.clone();
        sup.spawn("audit-verifier", move |ctx| {
            console::audit::run_role(verifier_pool.clone(), ctx)
        });
    }
    sup.spawn("ops", move |ctx| {
        platform::ops::serve(ops.addr, ops_router.clone(), header_timeout, ctx)
    });
    let result = sup.wait().await;
    // Bounded: a connection held by a task that outlived its role (a websocket's listener)
    // must not keep the process from exiting.
    pools.close(Duration::from_secs(5)).await;
    match &result {
        Ok(()) => tracing::info!("stopped"),
        Err(e) => tracing::error!(
            error = format!("{e:#}"),
            "stopped after a permanent failure"
        ),
    }
    result
}

/// The read side's roles: a projector per projection, the analytics group, the rebuild worker
/// and the projection metrics.
fn spawn_read_side(
    sup: &mut Supervisor,
    pool: &sqlx::PgPool,
    infra: &InfraConfig,
    topic: &str,
    projector_cfg: read_side::consumer::ProjectorConfig,
    watermarks: read_side::status::Watermarks,
) {
    for kind in read_side::projection::Kind::ALL {
        let (pool, infra, topic, cfg) = (
            pool.clone(),
            infra.clone(),
            topic.to_owned(),
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
    let (p, infra) = (pool.clone(), infra.clone());
    let topics = read_side::analytics::Topics {
        activity: infra.topic(read_side::analytics::ACTIVITY_TOPIC),
        orders: topic.to_owned(),
    };
    let stuck_after = projector_cfg.stuck_after;
    sup.spawn("analytics", move |ctx| {
        read_side::analytics::run_role(
            p.clone(),
            infra.kafka_brokers.clone(),
            topics.clone(),
            infra.kafka_topic_prefix.clone(),
            stuck_after,
            ctx,
        )
    });
    let p = pool.clone();
    sup.spawn("rebuilds", move |ctx| {
        read_side::rebuild::run_worker(p.clone(), ctx)
    });
    let p = pool.clone();
    sup.spawn("projection-metrics", move |ctx| {
        read_side::status::report_metrics(p.clone(), watermarks.clone(), ctx)
    });
}

/// Runs `shop setup`, retrying transient failures (PostgreSQL or Kafka still starting) with
/// backoff until shutdown; a permanent one (a migration whose checksum changed, wrong
/// credentials) is returned. `false` when shutdown came first.
pub async fn setup_with_retries(
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

//! The audit trail's keys, checks and checkpoints: `shop audit verify|checkpoint`, and the
//! `audit-checkpoints` role of `shop run` that writes a signed checkpoint to a directory
//! outside the database at an interval.
//!
//! Why here: the event store knows how to key the chain and sign a checkpoint
//! (`event_store::hash`, `event_store::checkpoint`); where the keys come from (the key
//! convention of `platform::keys`) and where checkpoints go (files) is the binary's business.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use event_store::checkpoint::{self, Checkpoint};
use platform::{config::InfraConfig, keys::Keyring, supervisor::RoleCtx};
use sqlx::PgPool;
use uuid::Uuid;

/// The audit keys: they key every event's hash and sign checkpoints.
#[derive(Clone, clap::Args)]
pub struct AuditKeys {
    /// Audit keys inline: `kid=secret` entries separated by commas, the first one signing
    /// (docs/security.md). Prefer AUDIT_KEYS_FILE.
    #[arg(long, env = "AUDIT_KEYS", hide_env_values = true, global = true)]
    pub audit_keys: Option<String>,
    /// File of audit keys, one `kid=secret` per line, the first one signing. Keep it outside
    /// the database and its backups. `scripts/` generate one for development.
    #[arg(long, env = "AUDIT_KEYS_FILE", global = true)]
    pub audit_keys_file: Option<PathBuf>,
}

impl AuditKeys {
    /// Installs the configured keys for this process. `required` (roles that append):
    /// without keys, an error unless `dev_mode`, where events are recorded unkeyed.
    pub fn install(&self, required: bool, dev_mode: bool) -> anyhow::Result<()> {
        let ring = Keyring::configured(
            "AUDIT",
            self.audit_keys.as_deref(),
            self.audit_keys_file.as_deref(),
        )?;
        let Some(ring) = ring else {
            if required && !dev_mode {
                anyhow::bail!(platform::keys::KeyError::Missing {
                    name: "AUDIT".into(),
                    hint: "scripts/run.sh generates .local/keys/audit.keys for development".into(),
                });
            }
            if required {
                tracing::warn!(
                    "no audit key configured (AUDIT_KEYS_FILE): development mode records events with an unkeyed chain"
                );
            }
            return Ok(());
        };
        let keys =
            event_store::hash::ChainKeys::new(ring.entries()).expect("a keyring is never empty");
        event_store::hash::install_chain_keys(keys)?;
        Ok(())
    }
}

/// Where and how often `shop run` writes checkpoints.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckpointConfig {
    /// Directory (outside the database's disks and backups) for signed audit checkpoints;
    /// none are written when unset.
    #[arg(long, env = "AUDIT_CHECKPOINT_DIR")]
    pub audit_checkpoint_dir: Option<PathBuf>,
    /// How often a checkpoint is written.
    #[arg(long, env = "AUDIT_CHECKPOINT_INTERVAL", default_value = "15m", value_parser = platform::config::parse_duration)]
    pub audit_checkpoint_interval: Duration,
}

/// Writes `c` as `checkpoint-<position>-<unix time>.json` and `latest.json` in `dir`, each
/// through a temporary file and a rename, so a reader never sees half a file.
pub fn write(dir: &Path, c: &Checkpoint) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_vec_pretty(c)?;
    let name = format!(
        "checkpoint-{}-{}.json",
        c.position,
        c.created_at.timestamp()
    );
    for file in [name.as_str(), "latest.json"] {
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, &json).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(file))?;
    }
    Ok(dir.join(name))
}

/// The `audit-checkpoints` role: a checkpoint every interval (the first at start).
pub async fn run_role(
    pool: PgPool,
    dir: PathBuf,
    every: Duration,
    ctx: RoleCtx,
) -> anyhow::Result<()> {
    let shutdown = ctx.shutdown().clone();
    loop {
        let mut conn = pool.acquire().await?;
        let c = checkpoint::take(&mut conn).await?;
        drop(conn);
        let path = write(&dir, &c)?;
        ctx.up();
        metrics::gauge!("audit_checkpoint_position").set(c.position as f64);
        tracing::info!(path = %path.display(), position = c.position, streams = c.streams.len(), "audit checkpoint written");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// `shop audit checkpoint [--out DIR]`: takes one now and prints it (or writes it to DIR).
pub async fn checkpoint_now(infra: &InfraConfig, out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let pool = platform::db::connect(&infra.database_url, 2).await?;
    let mut conn = pool.acquire().await?;
    let c = checkpoint::take(&mut conn).await?;
    match out {
        Some(dir) => println!("{}", write(&dir, &c)?.display()),
        None => println!("{}", serde_json::to_string_pretty(&c)?),
    }
    Ok(ExitCode::SUCCESS)
}

/// `shop audit verify [--order ID] [--checkpoint FILE]`: every stream's chain (or one
/// order's), then what the checkpoint shows; exit 1 if anything is wrong.
pub async fn verify(
    infra: &InfraConfig,
    order: Option<Uuid>,
    checkpoint_file: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let pool = platform::db::connect(&infra.database_url, 2).await?;
    let mut conn = pool.acquire().await?;
    let (broken, checked) = match order {
        Some(id) => {
            let r = event_store::audit::verify_stream(&mut conn, id).await?;
            anyhow::ensure!(r.events > 0, "order {id} has no events");
            (r.broken.into_iter().map(|b| (id, b)).collect::<Vec<_>>(), 1)
        }
        None => {
            let (reports, checked) = event_store::audit::verify_all(&mut conn, None).await?;
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
            "BROKEN stream {id}: first bad event at version {} (position {}, event {}): {:?}",
            b.stream_version,
            b.position.map_or("-".into(), |p| p.to_string()),
            b.event_id.map_or("-".into(), |e| e.to_string()),
            b.problem
        );
    }
    println!("{checked} stream(s) checked, {} broken", broken.len());
    let mut findings = Vec::new();
    if let Some(file) = checkpoint_file {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let c: Checkpoint = serde_json::from_str(&text)
            .with_context(|| format!("{} is not an audit checkpoint", file.display()))?;
        findings = checkpoint::compare(&mut conn, &c).await?;
        for f in &findings {
            println!("CHECKPOINT {f}");
        }
        println!(
            "checkpoint of {} at position {} ({} streams): {} finding(s)",
            c.created_at,
            c.position,
            c.streams.len(),
            findings.len()
        );
    }
    Ok(if broken.is_empty() && findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

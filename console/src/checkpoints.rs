//! Audit checkpoints: the signed files the `audit-checkpoints` role of `shop run` writes
//! outside the database (`AUDIT_CHECKPOINT_DIR`), and comparing one with the store now (the
//! same check as `shop audit verify --checkpoint FILE`).
//!
//! Why: the hash chain shows an event changed in place; it cannot show a stream deleted, a
//! stream cut short, or a store rewritten with the keys. A checkpoint kept elsewhere can: it
//! names every stream's version and head hash at a moment, signed with the audit key. An
//! operator picks one of the directory's files (only those: a name is looked up in the
//! listing, never used as a path) and sees what differs since. Comparing is recorded.

use std::path::{Path, PathBuf};

use axum::extract::State;
use chrono::{DateTime, Utc};
use event_store::checkpoint::{self, Checkpoint, Finding};
use maud::{Markup, html};
use serde::Deserialize;

use crate::{
    Console, ConsoleError, actions,
    session::{Act, Operator},
    view,
};

/// Files listed at most, newest first.
const LIMIT: usize = 50;

/// The largest checkpoint file compared (a checkpoint names every stream's head: about
/// 100 bytes per stream, so this is some 2.5 million streams).
const MAX_BYTES: u64 = 256 * 1024 * 1024;

/// Findings shown at most (all are counted; the action log keeps the first 100).
const SHOWN: usize = 500;

/// One checkpoint file in the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct File {
    name: String,
    modified: Option<DateTime<Utc>>,
    bytes: u64,
}

/// A checkpoint's file name as the role writes it: `checkpoint-<position>-<unix time>.json`
/// or `latest.json`.
fn is_checkpoint_name(name: &str) -> bool {
    if name == "latest.json" {
        return true;
    }
    let Some(middle) = name
        .strip_prefix("checkpoint-")
        .and_then(|n| n.strip_suffix(".json"))
    else {
        return false;
    };
    let mut parts = middle.split('-');
    let digits =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    digits(parts.next()) && digits(parts.next()) && parts.next().is_none()
}

/// The directory's checkpoint files, newest first (at most [`LIMIT`]).
fn list(dir: &Path) -> std::io::Result<Vec<File>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_checkpoint_name(&name) {
            continue;
        }
        // Not following symbolic links; a file renamed away meanwhile is skipped.
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        files.push(File {
            name,
            modified: meta.modified().ok().map(DateTime::<Utc>::from),
            bytes: meta.len(),
        });
    }
    files.sort_by(|a, b| b.modified.cmp(&a.modified).then(b.name.cmp(&a.name)));
    files.truncate(LIMIT);
    Ok(files)
}

fn dir(console: &Console) -> Result<&PathBuf, ConsoleError> {
    console.checkpoint_dir.as_ref().ok_or_else(|| {
        ConsoleError::Refused(
            "no checkpoint directory: this process writes no audit checkpoints (AUDIT_CHECKPOINT_DIR)".into(),
        )
    })
}

pub async fn page(State(console): State<Console>, op: Operator) -> Result<Markup, ConsoleError> {
    render(&console, &op, None).await
}

#[derive(Deserialize)]
pub struct CompareForm {
    #[serde(default)]
    file: String,
    #[serde(default)]
    why: String,
}

/// What a comparison found.
struct Compared {
    file: String,
    checkpoint: Option<(DateTime<Utc>, i64, usize)>,
    findings: Result<Vec<Finding>, String>,
}

/// `POST /console/audit/checkpoints`: compares one listed file with the store.
pub async fn compare(
    State(console): State<Console>,
    act: Act<CompareForm>,
) -> Result<Markup, ConsoleError> {
    let dir = dir(&console)?.clone();
    let name = act.form.file.trim().to_owned();
    let listed =
        list(&dir).map_err(|e| ConsoleError::Refused(format!("reading {}: {e}", dir.display())))?;
    let Some(file) = listed.into_iter().find(|f| f.name == name) else {
        return Err(ConsoleError::BadRequest(format!(
            "`{name}` is not a checkpoint file of {}",
            dir.display()
        )));
    };
    let read = if file.bytes > MAX_BYTES {
        Err(std::io::Error::other(format!(
            "{} bytes, more than the {MAX_BYTES} compared here: use shop audit verify --checkpoint",
            file.bytes
        )))
    } else {
        tokio::fs::read(dir.join(&file.name)).await
    };
    let parsed = read
        .map_err(|e| format!("reading it: {e}"))
        .and_then(|bytes| {
            serde_json::from_slice::<Checkpoint>(&bytes)
                .map_err(|e| format!("not an audit checkpoint: {e}"))
        });
    let compared = match parsed {
        Err(e) => Compared {
            file: file.name.clone(),
            checkpoint: None,
            findings: Err(e),
        },
        Ok(c) => {
            let mut conn = console.pool.acquire().await?;
            let findings = checkpoint::compare(&mut conn, &c).await?;
            // What an unsigned file says of itself is not shown as if it were so.
            let signed = !findings.contains(&Finding::BadSignature);
            Compared {
                file: file.name.clone(),
                checkpoint: signed.then_some((c.created_at, c.position, c.streams.len())),
                findings: Ok(findings),
            }
        }
    };
    let outcome = match &compared.findings {
        Ok(f) if f.is_empty() => {
            Ok("no finding: the store still holds what it checkpointed".to_owned())
        }
        Ok(f) => Ok(format!("{} finding(s)", f.len())),
        Err(e) => Err(e.clone()),
    };
    let detail = compared.findings.as_ref().ok().map(|f| {
        serde_json::json!(
            f.iter()
                .take(100)
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        )
    });
    actions::record(
        &console.pool,
        actions::NewAction {
            actor: &act.operator.actor,
            action: "compare_checkpoint",
            target: &format!("checkpoint:{}", compared.file),
            order_id: None,
            reason: act.form.why.trim(),
            outcome: &actions::shown(&outcome),
            detail,
        },
    )
    .await?;
    render(&console, &act.operator, Some(compared)).await
}

async fn render(
    console: &Console,
    op: &Operator,
    compared: Option<Compared>,
) -> Result<Markup, ConsoleError> {
    let dir = console.checkpoint_dir.as_ref();
    let files = match dir.map(|d| list(d)) {
        None => {
            Err("this process writes no audit checkpoints (set AUDIT_CHECKPOINT_DIR)".to_owned())
        }
        Some(Err(e)) => Err(format!("the directory cannot be read: {e}")),
        Some(Ok(files)) => Ok(files),
    };
    Ok(view::page(
        op,
        "Audit checkpoints",
        html! {
            h1 { "Audit checkpoints" }
            p.hint {
                "Signed files the audit-checkpoints role writes outside the database"
                @if let Some(d) = dir { " (" code { (d.display()) } ")" }
                ". Comparing one with the store shows a stream deleted, cut short or rewritten since, "
                "which the hash chain alone cannot show. "
                a href="/console/audit" { "Back to the audit" }
            }
            @if let Some(c) = &compared { (result(c)) }
            @match &files {
                Err(e) => p.warn { (e) },
                Ok(files) if files.is_empty() => p.empty { "No checkpoint yet." },
                Ok(files) => {
                    table.checkpoints {
                        thead { tr { th { "File" } th { "Written" } th.num { "Bytes" } th { "" } } }
                        tbody {
                            @for f in files {
                                tr {
                                    td { code { (f.name) } }
                                    td { (f.modified.map_or("-".into(), view::time)) }
                                    td.num { (f.bytes) }
                                    td {
                                        form.inline.compare method="post" action="/console/audit/checkpoints" {
                                            (view::csrf(op))
                                            input type="hidden" name="file" value=(f.name);
                                            input name="why" placeholder="why (recorded)" aria-label="why compare" {}
                                            button type="submit" { "Compare with the store" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    ))
}

fn result(c: &Compared) -> Markup {
    html! {
        section #comparison {
            h2 { "Compared: " code { (c.file) } }
            @if let Some((at, position, streams)) = c.checkpoint {
                p { "Checkpoint of " (view::time(at)) " at feed position " (position) ", " (streams) " stream(s)." }
            }
            @match &c.findings {
                Err(e) => p.bad #outcome { (e) },
                Ok(f) if f.is_empty() => p.ok #outcome { "No finding: the store still holds every stream as checkpointed." },
                Ok(f) => {
                    p.bad #outcome { (f.len()) " finding(s):" }
                    @if f.len() > SHOWN { p.hint { "The first " (SHOWN) " are shown." } }
                    ul.findings {
                        @for finding in f.iter().take(SHOWN) {
                            li {
                                (finding.to_string())
                                @if let Some(id) = finding.stream_id() {
                                    " " a href={ "/console/orders/" (id) } { "open" }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_roles_file_names_are_checkpoints() {
        for ok in [
            "latest.json",
            "checkpoint-0-1765000000.json",
            "checkpoint-42-7.json",
        ] {
            assert!(is_checkpoint_name(ok), "{ok}");
        }
        for bad in [
            "../latest.json",
            "checkpoint-1-2.json.tmp",
            ".latest.json.tmp",
            "checkpoint--1.json",
            "checkpoint-1-2-3.json",
            "checkpoint-a-2.json",
            "checkpoint-1-2/../../etc.json",
            "notes.txt",
        ] {
            assert!(!is_checkpoint_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_listing_is_newest_first_and_skips_other_files() {
        let dir =
            std::env::temp_dir().join(format!("console-checkpoints-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["checkpoint-1-100.json", "notes.txt", ".latest.json.tmp"] {
            std::fs::write(dir.join(name), "{}").unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.join("latest.json"), "{}").unwrap();
        let names: Vec<String> = list(&dir).unwrap().into_iter().map(|f| f.name).collect();
        assert_eq!(names, ["latest.json", "checkpoint-1-100.json"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

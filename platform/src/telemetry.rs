//! Logging/tracing set-up (and the metrics recorder), once per binary.
//!
//! Human-readable output on a terminal, one JSON object per line otherwise (CI, services under
//! a supervisor) so logs can be shipped as they are. `RUST_LOG` picks levels; the default keeps
//! our crates at `info` and the noisy client libraries at `warn`. `LOG_FORMAT=json|pretty`
//! overrides the terminal detection. Spans get OpenTelemetry trace contexts
//! ([`crate::trace`]), so a log line inside a followed span carries `trace_id` and `span_id`.

use std::io::IsTerminal;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

const DEFAULT_FILTER: &str = "info,sqlx=warn,rdkafka=warn,lapin=warn,hyper=warn";

/// Installs the global subscriber. Safe to call more than once (later calls do nothing), so
/// tests may call it freely.
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = match std::env::var("LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("pretty") => false,
        _ => !std::io::stdout().is_terminal(),
    };
    let provider = crate::trace::provider();
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(crate::trace::layer(&provider));
    let result = if json {
        registry
            .with(fmt::layer().json().flatten_event(true))
            .try_init()
    } else {
        registry.with(fmt::layer()).try_init()
    };
    // Already initialised (a test harness, a second service in one process): keep the first.
    let _ = result;
    // The metrics recorder too, before any role counts anything (metrics recorded before a
    // recorder exists are lost).
    let _ = crate::ops::metrics_handle();
}

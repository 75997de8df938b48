//! One cancellation token per process, cancelled on SIGTERM or Ctrl-C.
//!
//! Every worker loop `select!`s on this token and every axum server uses it for
//! `with_graceful_shutdown`, so one signal stops taking work everywhere, lets in-flight work
//! finish and the process exit 0.

use tokio_util::sync::CancellationToken;

/// Creates the process-wide token and spawns the task that cancels it on a signal.
/// Must be called inside a Tokio runtime.
pub fn token() -> CancellationToken {
    let token = CancellationToken::new();
    let on_signal = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received, stopping");
        on_signal.cancel();
    });
    token
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM, only Ctrl-C stops this process");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

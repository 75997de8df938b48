//! Committed status changes, fanned out to GraphQL subscriptions.
//!
//! The live projection NOTIFYs inside its transaction, so PostgreSQL delivers the notice only
//! when the read-model change commits, to every process that listens, wherever the projector
//! runs. One listener per process feeds a broadcast channel; it starts with the first
//! subscriber and stops when the last one is gone.

use std::sync::{Arc, Mutex};

use serde::Deserialize;
use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::order_summary::STATUS_CHANNEL;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusChanged {
    pub order_id: Uuid,
    pub status: String,
    pub version: i64,
}

#[derive(Clone)]
pub struct StatusFeed {
    pool: PgPool,
    sender: Arc<Mutex<Option<broadcast::Sender<StatusChanged>>>>,
}

impl StatusFeed {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            sender: Arc::new(Mutex::new(None)),
        }
    }

    /// A receiver of every committed change from now on. Listening has begun when this
    /// returns, so a change committed afterwards is never missed.
    pub async fn subscribe(&self) -> Result<broadcast::Receiver<StatusChanged>, sqlx::Error> {
        if let Some(tx) = self.sender.lock().expect("feed lock").as_ref() {
            return Ok(tx.subscribe());
        }
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(STATUS_CHANNEL).await?;
        let mut slot = self.sender.lock().expect("feed lock");
        if let Some(tx) = slot.as_ref() {
            // Another subscriber started the listener meanwhile; ours is not needed.
            return Ok(tx.subscribe());
        }
        let (tx, rx) = broadcast::channel(1024);
        *slot = Some(tx.clone());
        tokio::spawn(listen(listener, tx, self.sender.clone()));
        Ok(rx)
    }
}

async fn listen(
    mut listener: PgListener,
    tx: broadcast::Sender<StatusChanged>,
    slot: Arc<Mutex<Option<broadcast::Sender<StatusChanged>>>>,
) {
    let stop_if_unused = || {
        let mut slot = slot.lock().expect("feed lock");
        if tx.receiver_count() == 0 {
            *slot = None;
            true
        } else {
            false
        }
    };
    loop {
        match listener.recv().await {
            Ok(n) => match serde_json::from_str::<StatusChanged>(n.payload()) {
                Ok(change) => {
                    let _ = tx.send(change);
                }
                Err(e) => tracing::warn!(error = %e, "malformed status notification"),
            },
            Err(e) => {
                tracing::warn!(error = %e, "status listener lost its connection; reconnecting");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        if stop_if_unused() {
            return;
        }
    }
}

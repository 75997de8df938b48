//! Group commit: concurrent commands share one transaction, one statement per table and one
//! WAL flush, instead of a transaction each.
//!
//! Why: with `synchronous_commit=on` on two cores, a transaction per command spends most of
//! PostgreSQL's time on per-transaction and per-statement work (BEGIN, parse, bind, COMMIT,
//! the flush). A [`Committer`] queues jobs; each of its workers takes what is waiting (up to
//! a batch's size, never two jobs on one stream), writes them with one call of
//! [`Batch::write`] in one transaction and commits. Nothing waits on purpose: a batch is
//! whatever arrived while the previous one was being written, so a lone command goes alone.
//!
//! Per-command isolation: [`Batch::write`] must leave no row of a job that cannot be written
//! whole (a version conflict: [`crate::append_many`] writes only the streams whose head
//! moved). If the batch fails as a whole (a database error, a unique key) or does not
//! commit, its jobs are written again one per transaction, so one bad command fails alone.
//! A commit whose answer is lost is ambiguous as for any transaction: retried alone, such a
//! job meets its own rows (a conflict, or for a command its stored idempotent response).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use crate::{AppendOutcome, Expected, NewEvent, OutboxMessage, StoreError, append::Append};

/// What a [`Committer`] writes: a job type and how a batch of them is written.
pub trait Batch: Send + Sync + 'static {
    type Job: Send + Sync + 'static;
    type Output: Send + 'static;

    /// The stream the job appends to: two jobs on one stream never share a batch.
    fn stream(job: &Self::Job) -> Uuid;

    /// Writes `jobs` in the caller's transaction; one output per job, in order. A job that
    /// cannot be written whole must leave none of its rows (its output says why).
    fn write(
        &self,
        conn: &mut PgConnection,
        jobs: &[Self::Job],
    ) -> impl Future<Output = Result<Vec<Self::Output>, sqlx::Error>> + Send;
}

/// Why a job has no output.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The committer's worker stopped while the job waited (it panicked, or the process is
    /// stopping); the job may or may not have been committed.
    #[error("the group committer stopped before answering")]
    Stopped,
}

type Reply<B> = oneshot::Sender<Result<<B as Batch>::Output, sqlx::Error>>;
type Queue<B> = mpsc::Receiver<(<B as Batch>::Job, Reply<B>)>;

/// Queues jobs for its workers; cheap to clone. The workers stop when every clone is dropped.
pub struct Committer<B: Batch> {
    jobs: mpsc::Sender<(B::Job, Reply<B>)>,
}

impl<B: Batch> Clone for Committer<B> {
    fn clone(&self) -> Self {
        Self {
            jobs: self.jobs.clone(),
        }
    }
}

impl<B: Batch> Committer<B> {
    /// Starts `workers` workers on `pool` (each holds one connection while it writes), each
    /// writing at most `max_batch` jobs per transaction.
    pub fn start(pool: PgPool, batch: B, workers: usize, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::channel((max_batch * workers * 4).max(1024));
        let rx = Arc::new(Mutex::new(rx));
        let batch = Arc::new(batch);
        for _ in 0..workers.max(1) {
            tokio::spawn(work(
                pool.clone(),
                batch.clone(),
                rx.clone(),
                max_batch.max(1),
            ));
        }
        Self { jobs: tx }
    }

    /// Jobs queued and not yet taken by a worker.
    pub fn waiting(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }

    /// Writes `job` with whatever else is waiting; its output once the batch committed.
    pub async fn submit(&self, job: B::Job) -> Result<B::Output, CommitError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send((job, reply))
            .await
            .map_err(|_| CommitError::Stopped)?;
        Ok(answer.await.map_err(|_| CommitError::Stopped)??)
    }
}

/// One worker: take a batch, write it in its own task (a panic loses that batch's answers,
/// which its callers see as [`CommitError::Stopped`], not the worker), repeat.
async fn work<B: Batch>(
    pool: PgPool,
    batch: Arc<B>,
    queue: Arc<Mutex<Queue<B>>>,
    max_batch: usize,
) {
    let mut held_back = Vec::new();
    loop {
        let Some(jobs) = take::<B>(&queue, &mut held_back, max_batch).await else {
            return;
        };
        let written = tokio::spawn(commit(pool.clone(), batch.clone(), jobs));
        if let Err(e) = written.await {
            tracing::error!(error = %e, "a group commit batch panicked; its callers get an error");
        }
    }
}

/// The next batch: jobs held back from the previous one first, then whatever is queued, never
/// two on one stream (a later one waits for the next batch). `None` once the queue is closed
/// and nothing is held back.
async fn take<B: Batch>(
    queue: &Mutex<Queue<B>>,
    held_back: &mut Vec<(B::Job, Reply<B>)>,
    max_batch: usize,
) -> Option<Vec<(B::Job, Reply<B>)>> {
    let mut jobs: Vec<(B::Job, Reply<B>)> = Vec::new();
    let mut streams = Vec::new();
    let mut admit = |job: (B::Job, Reply<B>), jobs: &mut Vec<_>, later: &mut Vec<_>| {
        let stream = B::stream(&job.0);
        if streams.contains(&stream) {
            later.push(job);
        } else {
            streams.push(stream);
            jobs.push(job);
        }
    };
    let mut later = Vec::new();
    for job in held_back.drain(..) {
        admit(job, &mut jobs, &mut later);
    }
    let mut rx = queue.lock().await;
    if jobs.is_empty() && later.is_empty() {
        admit(rx.recv().await?, &mut jobs, &mut later);
    }
    while jobs.len() < max_batch {
        match rx.try_recv() {
            Ok(job) => admit(job, &mut jobs, &mut later),
            Err(_) => break,
        }
    }
    drop(rx);
    *held_back = later;
    Some(jobs)
}

/// Writes and commits a batch; if that fails and it held more than one job, each again alone.
async fn commit<B: Batch>(pool: PgPool, batch: Arc<B>, jobs: Vec<(B::Job, Reply<B>)>) {
    let (jobs, replies): (Vec<_>, Vec<_>) = jobs.into_iter().unzip();
    match write_and_commit(&pool, &*batch, &jobs).await {
        Ok(outputs) => {
            for (reply, out) in replies.into_iter().zip(outputs) {
                let _ = reply.send(Ok(out));
            }
        }
        Err(e) if jobs.len() == 1 => {
            let _ = replies.into_iter().next().expect("one").send(Err(e));
        }
        Err(e) => {
            tracing::warn!(error = %e, jobs = jobs.len(), "a group commit failed; writing its jobs one by one");
            for (job, reply) in jobs.iter().zip(replies) {
                let one = write_and_commit(&pool, &*batch, std::slice::from_ref(job)).await;
                let _ = reply.send(one.map(|mut o| o.pop().expect("one output per job")));
            }
        }
    }
}

async fn write_and_commit<B: Batch>(
    pool: &PgPool,
    batch: &B,
    jobs: &[B::Job],
) -> Result<Vec<B::Output>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let outputs = batch.write(&mut tx, jobs).await?;
    assert_eq!(outputs.len(), jobs.len(), "one output per job");
    tx.commit().await?;
    Ok(outputs)
}

/// A plain append as a group-commit job: [`crate::append_at`] without a transaction of its own.
#[derive(Debug, Clone)]
pub struct AppendJob {
    pub stream_id: Uuid,
    pub stream_type: String,
    pub expected: Expected,
    pub events: Vec<NewEvent>,
    pub outbox: Vec<OutboxMessage>,
    pub recorded_at: DateTime<Utc>,
}

impl AppendJob {
    pub(crate) fn as_append(&self) -> Append<'_> {
        Append {
            stream_id: self.stream_id,
            stream_type: &self.stream_type,
            expected: &self.expected,
            events: &self.events,
            outbox: &self.outbox,
            recorded_at: self.recorded_at,
        }
    }
}

/// Group-committed appends: each job's outcome, or its conflict.
pub struct Appends;

impl Batch for Appends {
    type Job = AppendJob;
    type Output = Result<AppendOutcome, StoreError>;

    fn stream(job: &AppendJob) -> Uuid {
        job.stream_id
    }

    async fn write(
        &self,
        conn: &mut PgConnection,
        jobs: &[AppendJob],
    ) -> Result<Vec<Self::Output>, sqlx::Error> {
        let appends: Vec<_> = jobs.iter().map(AppendJob::as_append).collect();
        crate::append_many(conn, &appends).await
    }
}

//! The loop that runs jobs: claim, run the kind's steps while renewing the lease, record the
//! outcome. It runs inside `panel serve` (`jobs.workers` loops) and as `panel worker`.
//!
//! Stopping is graceful: a stopping worker claims nothing more, drops the job it is running
//! at its next await point and gives it back to the queue without counting the attempt, so
//! another worker (or this panel after a restart) resumes it at once instead of after the
//! lease. Steps are idempotent, so an interrupted step simply runs again.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Notify, watch};

use super::{Job, Outcome, Settings};
use crate::db::{Db, DbError};
use crate::ids::JobId;

/// Why an attempt did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt after a backoff (a node unreachable, a database hiccup).
    #[error("{0}")]
    Retry(String),
    /// Will not get better by retrying (the node refused the request, the server is gone).
    #[error("{0}")]
    Permanent(String),
    /// Another worker took the job over: stop without writing anything.
    #[error("the job's lease was lost")]
    LeaseLost,
}

impl From<DbError> for JobError {
    fn from(e: DbError) -> JobError {
        JobError::Retry(format!("database: {e}"))
    }
}

impl From<diesel::result::Error> for JobError {
    fn from(e: diesel::result::Error) -> JobError {
        JobError::Retry(format!("database: {e}"))
    }
}

/// What a running job may do besides its own work: record progress (fenced by its lease).
#[derive(Clone)]
pub struct JobContext {
    pub db: Db,
    pub job: JobId,
    pub owner: Arc<str>,
}

impl JobContext {
    /// Records that `step` is done with its state, so a resumed job continues after it.
    pub async fn record_step(&self, step: &str, progress: serde_json::Value) -> Result<(), JobError> {
        let (id, owner, step) = (self.job.clone(), self.owner.clone(), step.to_string());
        let held = self
            .db
            .run(move |conn| super::record_step(conn, &id, &owner, &step, &progress).map_err(DbError::from))
            .await?;
        if held { Ok(()) } else { Err(JobError::LeaseLost) }
    }
}

/// What each kind of job does. Implementations must be idempotent: any attempt may be a
/// repeat of one that was interrupted at any point.
pub trait Handler: Send + Sync + 'static {
    fn run(&self, job: &Job, ctx: &JobContext) -> impl Future<Output = Result<(), JobError>> + Send;

    /// Called once a job will not be tried again (failed or dead), before it is marked so:
    /// undo what the job holds (allocations, a half-made server). If it fails, or the worker
    /// dies meanwhile, the job goes back to the queue and giving up is tried again.
    fn give_up(
        &self,
        job: &Job,
        ctx: &JobContext,
        error: &JobError,
    ) -> impl Future<Output = Result<(), JobError>> + Send {
        let _ = (job, ctx, error);
        async { Ok(()) }
    }
}

/// A worker's identity in `lease_owner`: the host and a fresh id per loop.
pub fn owner_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| "panel".into());
    format!("{host}/{}", uuid::Uuid::now_v7())
}

/// Starts `count` worker loops; they stop when `stop` turns true. Await the handles for a
/// graceful stop. An idle loop looks for work every `settings.poll_interval`, and at once
/// when `wake` is notified: `panel serve` notifies it after a request's job committed
/// (`AppState::wake_workers`), so a job in the same process starts without waiting for the
/// poll. Jobs enqueued by another process are found by the poll.
pub fn spawn<H: Handler>(
    db: Db,
    settings: Settings,
    handler: Arc<H>,
    count: usize,
    stop: watch::Receiver<bool>,
    wake: Arc<Notify>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..count)
        .map(|_| {
            let worker = Worker {
                db: db.clone(),
                settings,
                handler: handler.clone(),
                owner: owner_id().into(),
                wake: wake.clone(),
            };
            let stop = stop.clone();
            tokio::spawn(async move { worker.run(stop).await })
        })
        .collect()
}

struct Worker<H> {
    db: Db,
    settings: Settings,
    handler: Arc<H>,
    owner: Arc<str>,
    wake: Arc<Notify>,
}

impl<H: Handler> Worker<H> {
    async fn run(&self, mut stop: watch::Receiver<bool>) {
        tracing::info!(worker = %self.owner, "job worker started");
        while !*stop.borrow() {
            let (owner, lease) = (self.owner.clone(), self.settings.lease);
            let claimed = self
                .db
                .run(move |conn| super::claim(conn, &owner, lease).map_err(DbError::from))
                .await;
            match claimed {
                Ok(Some(job)) => self.execute(job, &mut stop).await,
                Ok(None) => {
                    // `notify_one` keeps a permit when no loop is waiting, so a job committed
                    // between the claim above and this wait is not missed.
                    tokio::select! {
                        _ = tokio::time::sleep(self.settings.poll_interval) => {}
                        _ = self.wake.notified() => {}
                        _ = stop.changed() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(worker = %self.owner, error = %e, "claiming a job failed");
                    tokio::select! {
                        _ = tokio::time::sleep(self.settings.poll_interval.max(std::time::Duration::from_secs(1))) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
        tracing::info!(worker = %self.owner, "job worker stopped");
    }

    async fn execute(&self, job: Job, stop: &mut watch::Receiver<bool>) {
        let ctx = JobContext {
            db: self.db.clone(),
            job: job.id.clone(),
            owner: self.owner.clone(),
        };
        let max = job
            .max_attempts
            .map_or(self.settings.max_attempts, |m| u32::try_from(m).unwrap_or(0));
        if u32::try_from(job.attempts).unwrap_or(u32::MAX) > max {
            // Its last attempt died with its worker (or while giving up): finish giving up.
            let error = JobError::Retry(
                job.last_error
                    .clone()
                    .unwrap_or_else(|| "the last attempt was interrupted".into()),
            );
            self.finish(&job, &ctx, Err(error)).await;
            return;
        }
        tracing::info!(job.id = %job.id, job.kind = job.kind.as_str(), attempt = job.attempts, "job started");
        let result = tokio::select! {
            r = self.handler.run(&job, &ctx) => r,
            lost = self.keep_lease(&job.id) => lost,
            _ = stop.changed() => {
                let (id, owner) = (job.id.clone(), self.owner.clone());
                let released = self
                    .db
                    .run(move |conn| super::release(conn, &id, &owner).map_err(DbError::from))
                    .await;
                tracing::info!(job.id = %job.id, ?released, "worker stopping; job given back to the queue");
                return;
            }
        };
        self.finish(&job, &ctx, result).await;
    }

    /// Renews the lease at a third of its length; returns only when it is lost.
    async fn keep_lease(&self, id: &JobId) -> Result<(), JobError> {
        loop {
            tokio::time::sleep(self.settings.lease / 3).await;
            let (id, owner, lease) = (id.clone(), self.owner.clone(), self.settings.lease);
            match self
                .db
                .run(move |conn| super::renew(conn, &id, &owner, lease).map_err(DbError::from))
                .await
            {
                Ok(true) => {}
                Ok(false) => return Err(JobError::LeaseLost),
                // The database may come back before the lease runs out; keep trying.
                Err(e) => tracing::warn!(error = %e, "renewing a job lease failed"),
            }
        }
    }

    async fn finish(&self, job: &Job, ctx: &JobContext, result: Result<(), JobError>) {
        let (id, owner) = (job.id.clone(), self.owner.clone());
        match result {
            Ok(()) => {
                let done = self
                    .db
                    .run(move |conn| super::succeed(conn, &id, &owner).map_err(DbError::from))
                    .await;
                tracing::info!(job.id = %job.id, job.kind = job.kind.as_str(), ?done, "job succeeded");
            }
            Err(JobError::LeaseLost) => {
                tracing::warn!(job.id = %job.id, "job lease lost; another worker has it");
            }
            Err(error) => {
                let retryable = matches!(error, JobError::Retry(_));
                let mut retry_in = super::next_try(job, retryable, &self.settings);
                let mut message = error.to_string();
                if retry_in.is_none()
                    && let Err(undo) = self.handler.give_up(job, ctx, &error).await
                {
                    // Not marked finished while it still holds something: try again later.
                    message = format!("{message}; undoing it failed: {undo}");
                    let attempts = u32::try_from(job.attempts).unwrap_or(u32::MAX);
                    retry_in = Some(super::backoff(
                        attempts,
                        self.settings.backoff_base,
                        self.settings.backoff_cap,
                    ));
                }
                let outcome = self
                    .db
                    .run(move |conn| {
                        super::fail(conn, &id, &owner, &message, retry_in, retryable).map_err(DbError::from)
                    })
                    .await;
                match outcome {
                    Ok(Outcome::Requeued { run_after }) => {
                        tracing::warn!(job.id = %job.id, %error, run_after, "job attempt failed; retrying later");
                    }
                    Ok(outcome) => {
                        tracing::error!(job.id = %job.id, %error, ?outcome, "job gave up");
                    }
                    Err(e) => tracing::error!(job.id = %job.id, error = %e, "recording a job failure failed"),
                }
            }
        }
    }
}

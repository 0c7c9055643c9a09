//! Durable jobs (ADR 0010): the work the panel must carry out on nodes (install a server,
//! power it, delete it ...), stored as rows so that no request is lost between the change
//! that causes the work and the work itself.
//!
//! - [`enqueue`] writes a job inside the caller's transaction: the job exists exactly when
//!   the change that causes it committed.
//! - A worker [`claim`]s a job by taking a lease (its id, a deadline) and renews the lease
//!   while it works. A worker that dies stops renewing; once the lease has run out the job is
//!   claimable again, and since every step is idempotent, running it again is safe.
//!   Completion and progress writes are fenced by the lease owner, so a worker that lost its
//!   lease cannot overwrite the new owner's state.
//! - Claiming is safe with many workers on both backends. PostgreSQL: the candidate row is
//!   taken `FOR UPDATE SKIP LOCKED`, then a transaction-scoped advisory lock per server
//!   serialises the final "nothing else of this server runs" check. SQLite: the whole claim
//!   is one `BEGIN IMMEDIATE` transaction, so there is one claimer at a time.
//! - Jobs of one server run one at a time, oldest (by id, a UUIDv7) first: a job is not
//!   claimed while an older job of its server is queued or running, or while any other job
//!   of its server holds a live lease.
//! - Failures: a retryable error requeues the job after an exponential backoff with jitter;
//!   after `max_attempts` attempts it is `dead` (the dead-letter list). A permanent error
//!   makes it `failed` at once. Operators can put either back in the queue ([`retry`]).
//! - History: finished jobs are deleted once their retention ran out ([`prune`], every ten
//!   minutes in `panel serve`); succeeded ones after `jobs.succeeded_retention_hours`, dead
//!   and failed ones, which operators act on, after the longer `jobs.dead_retention_days`.
//!
//! The worker loop that runs jobs lives in [`worker`]; what each kind does lives in
//! `provisioning`.

pub mod worker;

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::audit::{self, Actor, Event};
use crate::authz::TenantScope;
use crate::db::schema::jobs;
use crate::db::{DbConnection, now_ms};
use crate::error::ApiError;
use crate::ids::{JobId, ServerId, TenantId};
use crate::pagination::{Page, PageRequest};
use crate::request_meta::RequestMeta;

/// What a job does. Stored as its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    ServerInstall,
    ServerUpdate,
    ServerReinstall,
    ServerDelete,
    ServerPower,
    ServerBackup,
    ServerBackupRestore,
    ServerBackupDelete,
}

impl JobKind {
    pub const ALL: [JobKind; 8] = [
        JobKind::ServerInstall,
        JobKind::ServerUpdate,
        JobKind::ServerReinstall,
        JobKind::ServerDelete,
        JobKind::ServerPower,
        JobKind::ServerBackup,
        JobKind::ServerBackupRestore,
        JobKind::ServerBackupDelete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::ServerInstall => "server_install",
            JobKind::ServerUpdate => "server_update",
            JobKind::ServerReinstall => "server_reinstall",
            JobKind::ServerDelete => "server_delete",
            JobKind::ServerPower => "server_power",
            JobKind::ServerBackup => "server_backup",
            JobKind::ServerBackupRestore => "server_backup_restore",
            JobKind::ServerBackupDelete => "server_backup_delete",
        }
    }

    pub fn parse(s: &str) -> Option<JobKind> {
        JobKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    /// A permanent error: not retried.
    Failed,
    /// Retries exhausted: the dead-letter list.
    Dead,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// The engine's settings (`[jobs]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// How long a claim lasts without renewal; the worker renews at a third of it.
    pub lease: Duration,
    /// Attempts before a job with retryable errors is dead (unless the job names its own).
    pub max_attempts: u32,
    /// Backoff after the first failed attempt; doubled per further attempt up to `backoff_cap`.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How often an idle worker looks for work.
    pub poll_interval: Duration,
}

impl Settings {
    pub fn from_config(config: &crate::config::JobsConfig) -> Settings {
        Settings {
            lease: Duration::from_secs(config.lease_secs),
            max_attempts: config.max_attempts,
            backoff_base: Duration::from_millis(config.backoff_base_ms),
            backoff_cap: Duration::from_secs(config.backoff_cap_secs),
            poll_interval: Duration::from_millis(config.poll_interval_ms),
        }
    }
}

/// One job, as workers, operators and tenants see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Job {
    #[schema(value_type = String)]
    pub id: JobId,
    #[schema(value_type = Option<String>)]
    pub tenant_id: Option<TenantId>,
    #[schema(value_type = Option<String>)]
    pub server_id: Option<ServerId>,
    pub kind: JobKind,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub status: JobStatus,
    /// Attempts started so far (a claim counts as one).
    pub attempts: i32,
    /// `null`: the configured `jobs.max_attempts`.
    pub max_attempts: Option<i32>,
    /// A queued job is not started before this (ms since the epoch).
    pub run_after: i64,
    /// The worker holding the job (operators' view only).
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub last_error: Option<String>,
    /// The last step the job completed.
    pub step: Option<String>,
    /// That step's state, so a resumed job continues where it was.
    #[schema(value_type = Object)]
    pub progress: serde_json::Value,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = jobs)]
struct JobRow {
    id: String,
    tenant_id: Option<String>,
    server_id: Option<String>,
    kind: String,
    payload: String,
    status: String,
    attempts: i32,
    max_attempts: Option<i32>,
    run_after: i64,
    lease_owner: Option<String>,
    lease_expires_at: Option<i64>,
    last_error: Option<String>,
    step: Option<String>,
    progress: String,
    created_at: i64,
    updated_at: i64,
    finished_at: Option<i64>,
}

impl JobRow {
    /// `None` for a kind or status this version does not know (written by a newer panel):
    /// such jobs are neither claimed nor listed here.
    fn into_job(self) -> Option<Job> {
        Some(Job {
            id: JobId::from_db(self.id),
            tenant_id: self.tenant_id.map(TenantId::from_db),
            server_id: self.server_id.map(ServerId::from_db),
            kind: JobKind::parse(&self.kind)?,
            payload: serde_json::from_str(&self.payload).unwrap_or(serde_json::Value::Null),
            status: JobStatus::parse(&self.status)?,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            run_after: self.run_after,
            lease_owner: self.lease_owner,
            lease_expires_at: self.lease_expires_at,
            last_error: self.last_error,
            step: self.step,
            progress: serde_json::from_str(&self.progress).unwrap_or_else(|_| json!({})),
            created_at: self.created_at,
            updated_at: self.updated_at,
            finished_at: self.finished_at,
        })
    }
}

fn known_kinds() -> Vec<&'static str> {
    JobKind::ALL.iter().map(|k| k.as_str()).collect()
}

/// Writes a queued job. Call it INSIDE the transaction of the change that causes it, so the
/// job exists exactly when the change does.
pub fn enqueue(
    conn: &mut DbConnection,
    tenant: Option<&TenantId>,
    server: Option<&ServerId>,
    kind: JobKind,
    payload: &serde_json::Value,
) -> QueryResult<JobId> {
    let id = JobId::generate();
    let now = now_ms();
    diesel::insert_into(jobs::table)
        .values((
            jobs::id.eq(id.as_str()),
            jobs::tenant_id.eq(tenant.map(|t| t.as_str().to_string())),
            jobs::server_id.eq(server.map(|s| s.as_str().to_string())),
            jobs::kind.eq(kind.as_str()),
            jobs::payload.eq(payload.to_string()),
            jobs::status.eq(JobStatus::Queued.as_str()),
            jobs::attempts.eq(0),
            jobs::max_attempts.eq(None::<i32>),
            jobs::run_after.eq(now),
            jobs::progress.eq("{}"),
            jobs::created_at.eq(now),
            jobs::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(id)
}

/// One job by id (operators and workers; no scope).
pub fn get(conn: &mut DbConnection, id: &JobId) -> QueryResult<Option<Job>> {
    let row: Option<JobRow> = jobs::table
        .find(id.as_str())
        .select(JobRow::as_select())
        .first(conn)
        .optional()?;
    Ok(row.and_then(JobRow::into_job))
}

/// Jobs of one server of the scope's tenant, newest first, at most `limit` (1..=100).
pub fn for_server(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    limit: i64,
) -> QueryResult<Vec<Job>> {
    let rows: Vec<JobRow> = jobs::table
        .filter(jobs::tenant_id.eq(scope.tenant().as_str()))
        .filter(jobs::server_id.eq(server.as_str()))
        .filter(jobs::kind.eq_any(known_kinds()))
        .order(jobs::id.desc())
        .limit(limit.clamp(1, 100))
        .select(JobRow::as_select())
        .load(conn)?;
    Ok(rows
        .into_iter()
        .filter_map(JobRow::into_job)
        .map(|mut job| {
            // Which panel host holds it is the operators' business.
            job.lease_owner = None;
            job
        })
        .collect())
}

/// The operators' list filter.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub kind: Option<JobKind>,
    /// A server id.
    pub server: Option<String>,
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

/// Every job matching the filter, oldest first, by cursor.
pub fn list(conn: &mut DbConnection, filter: &JobFilter, page: &PageRequest) -> QueryResult<Page<Job>> {
    let mut query = jobs::table
        .filter(jobs::kind.eq_any(known_kinds()))
        .order(jobs::id.asc())
        .select(JobRow::as_select())
        .into_boxed();
    if let Some(status) = filter.status {
        query = query.filter(jobs::status.eq(status.as_str()));
    }
    if let Some(kind) = filter.kind {
        query = query.filter(jobs::kind.eq(kind.as_str()));
    }
    if let Some(server) = &filter.server {
        query = query.filter(jobs::server_id.eq(server.clone()));
    }
    if let Some(after) = &page.after {
        query = query.filter(jobs::id.gt(after.clone()));
    }
    let rows = query.limit(page.fetch()).load(conn)?;
    let page = Page::from_rows(rows, page, |r| r.id.as_str());
    Ok(Page {
        items: page.items.into_iter().filter_map(JobRow::into_job).collect(),
        next_cursor: page.next_cursor,
    })
}

/// Puts a dead or failed job back in the queue with fresh attempts, from its first step
/// (steps are idempotent, and giving up may have undone what the earlier steps did), with
/// the audit entry `job.retry`. `prepare` runs first in the same transaction, to take back
/// what giving up released (`servers::retry_job`); its error leaves the job as it was.
/// 404 for no job, 409 for a job that is not dead or failed.
pub fn retry(
    conn: &mut DbConnection,
    id: &JobId,
    actor: &Actor,
    meta: &RequestMeta,
    prepare: impl FnOnce(&mut DbConnection, &Job) -> Result<(), ApiError>,
) -> Result<Job, ApiError> {
    crate::db::transaction(conn, |conn| {
        // A write first: on SQLite it takes the write lock before anything is read, so a
        // reservation in `prepare` never meets a stale snapshot; on PostgreSQL it locks the
        // job's row, so two retries of one job take turns.
        diesel::update(jobs::table.find(id.as_str()))
            .set(jobs::updated_at.eq(jobs::updated_at))
            .execute(conn)?;
        let job = get(conn, id)?.ok_or_else(|| ApiError::not_found("job"))?;
        if !matches!(job.status, JobStatus::Dead | JobStatus::Failed) {
            return Err(ApiError::conflict(
                "job_not_retryable",
                format!(
                    "only dead or failed jobs can be retried; this one is {}",
                    job.status.as_str()
                ),
            ));
        }
        prepare(conn, &job)?;
        let now = now_ms();
        let n = diesel::update(
            jobs::table
                .find(id.as_str())
                .filter(jobs::status.eq(job.status.as_str())),
        )
        .set((
            jobs::status.eq(JobStatus::Queued.as_str()),
            jobs::attempts.eq(0),
            jobs::run_after.eq(now),
            jobs::lease_owner.eq(None::<String>),
            jobs::lease_expires_at.eq(None::<i64>),
            jobs::finished_at.eq(None::<i64>),
            jobs::step.eq(None::<String>),
            jobs::progress.eq("{}"),
            jobs::updated_at.eq(now),
        ))
        .execute(conn)?;
        if n == 0 {
            return Err(ApiError::conflict(
                "job_not_retryable",
                "the job changed meanwhile",
            ));
        }
        audit::record(
            conn,
            actor,
            meta,
            Event {
                tenant: job.tenant_id.as_ref(),
                action: "job.retry",
                resource_type: "job",
                resource_id: Some(id.to_string()),
                metadata: json!({ "kind": job.kind, "was": job.status, "server": job.server_id }),
            },
        )?;
        get(conn, id)?.ok_or_else(|| ApiError::not_found("job"))
    })
}

#[derive(QueryableByName)]
struct Candidate {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Nullable<Text>)]
    server_id: Option<String>,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// The SQL of "claimable jobs, best first". `p` is the placeholder of the one parameter,
/// the current time (`$1` or `?1`). The kinds are our own constants, never input.
fn candidate_sql(p: &str, lock: &str) -> String {
    let kinds = known_kinds()
        .iter()
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT j.id, j.server_id FROM jobs j \
         WHERE j.kind IN ({kinds}) \
           AND ((j.status = 'queued' AND j.run_after <= {p}) \
                OR (j.status = 'running' AND j.lease_expires_at < {p})) \
           AND NOT EXISTS ({blocker}) \
         ORDER BY j.run_after, j.id LIMIT 1 {lock}",
        blocker = blocker_sql("j.id", "j.server_id", p),
    )
}

/// Other jobs of the same server that keep job `id` waiting: older ones not yet finished,
/// and any one that holds a live lease.
fn blocker_sql(id: &str, server: &str, p: &str) -> String {
    format!(
        "SELECT 1 FROM jobs e WHERE {server} IS NOT NULL AND e.server_id = {server} AND e.id <> {id} \
         AND ((e.id < {id} AND e.status IN ('queued', 'running')) \
              OR (e.status = 'running' AND e.lease_expires_at >= {p}))"
    )
}

/// Marks the candidate claimed by `owner` (status, lease, one more attempt); runs on the
/// concrete connection of either backend inside the claim's transaction.
macro_rules! take {
    ($c:expr, $id:expr, $owner:expr, $now:expr, $lease_ms:expr) => {{
        diesel::update(jobs::table.filter(jobs::id.eq($id)))
            .set((
                jobs::status.eq(JobStatus::Running.as_str()),
                jobs::lease_owner.eq($owner),
                jobs::lease_expires_at.eq($now.saturating_add($lease_ms)),
                jobs::attempts.eq(jobs::attempts + 1),
                jobs::updated_at.eq($now),
            ))
            .execute($c)
            .map(|_| $id.to_string())
    }};
}

/// Takes the next claimable job for `owner`, with a lease of `lease`, and counts the attempt.
/// `None` when nothing is claimable now.
pub fn claim(conn: &mut DbConnection, owner: &str, lease: Duration) -> QueryResult<Option<Job>> {
    let now = now_ms();
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let claimed = match conn {
        DbConnection::Postgres(c) => c.transaction(|c| {
            let candidate: Option<Candidate> =
                diesel::sql_query(candidate_sql("$1", "FOR UPDATE OF j SKIP LOCKED"))
                    .bind::<BigInt, _>(now)
                    .get_result(c)
                    .optional()?;
            let Some(candidate) = candidate else {
                return Ok(None);
            };
            if let Some(server) = &candidate.server_id {
                // Claims of one server's jobs take turns here, and each sees what the
                // previous one committed: two of its jobs never run at once.
                diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                    .bind::<Text, _>(format!("mamba.job.server:{server}"))
                    .execute(c)?;
                let blocked: Count = diesel::sql_query(format!(
                    "SELECT COUNT(*) AS n FROM ({}) b",
                    blocker_sql("$2", "$3", "$1")
                ))
                .bind::<BigInt, _>(now)
                .bind::<Text, _>(&candidate.id)
                .bind::<Text, _>(server)
                .get_result(c)?;
                if blocked.n > 0 {
                    return Ok(None);
                }
            }
            take!(c, candidate.id.as_str(), owner, now, lease_ms).map(Some)
        })?,
        DbConnection::Sqlite(c) => c.immediate_transaction(|c| {
            // BEGIN IMMEDIATE holds the write lock from here on: one claimer at a time.
            let candidate: Option<Candidate> = diesel::sql_query(candidate_sql("?1", ""))
                .bind::<BigInt, _>(now)
                .get_result(c)
                .optional()?;
            match candidate {
                Some(candidate) => take!(c, candidate.id.as_str(), owner, now, lease_ms).map(Some),
                None => Ok(None),
            }
        })?,
    };
    let Some(id) = claimed else {
        return Ok(None);
    };
    get(conn, &JobId::from_db(id))
}

/// Extends the lease of a job `owner` holds. `false`: the job is no longer this owner's
/// (its lease ran out and another worker took it, or it was finished).
pub fn renew(conn: &mut DbConnection, id: &JobId, owner: &str, lease: Duration) -> QueryResult<bool> {
    let now = now_ms();
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let n = diesel::update(owned(id, owner))
        .set((
            jobs::lease_expires_at.eq(now.saturating_add(lease_ms)),
            jobs::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(n == 1)
}

type Owned<'a> = diesel::dsl::Filter<
    diesel::dsl::Filter<
        diesel::dsl::Filter<jobs::table, diesel::dsl::Eq<jobs::id, &'a str>>,
        diesel::dsl::Eq<jobs::lease_owner, &'a str>,
    >,
    diesel::dsl::Eq<jobs::status, &'static str>,
>;

/// The job's row, only while `owner` holds it: every write of a worker is fenced by this.
fn owned<'a>(id: &'a JobId, owner: &'a str) -> Owned<'a> {
    jobs::table
        .filter(jobs::id.eq(id.as_str()))
        .filter(jobs::lease_owner.eq(owner))
        .filter(jobs::status.eq(JobStatus::Running.as_str()))
}

/// Records the step a job completed and its state. `false`: the lease is lost.
pub fn record_step(
    conn: &mut DbConnection,
    id: &JobId,
    owner: &str,
    step: &str,
    progress: &serde_json::Value,
) -> QueryResult<bool> {
    let n = diesel::update(owned(id, owner))
        .set((
            jobs::step.eq(step),
            jobs::progress.eq(progress.to_string()),
            jobs::updated_at.eq(now_ms()),
        ))
        .execute(conn)?;
    Ok(n == 1)
}

/// Marks the job done. `false`: the lease was lost first.
pub fn succeed(conn: &mut DbConnection, id: &JobId, owner: &str) -> QueryResult<bool> {
    let now = now_ms();
    let n = diesel::update(owned(id, owner))
        .set((
            jobs::status.eq(JobStatus::Succeeded.as_str()),
            jobs::lease_owner.eq(None::<String>),
            jobs::lease_expires_at.eq(None::<i64>),
            jobs::finished_at.eq(Some(now)),
            jobs::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(n == 1)
}

/// What became of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Queued again, not before this time.
    Requeued {
        run_after: i64,
    },
    Failed,
    Dead,
    /// The lease was lost meanwhile; nothing was written.
    LeaseLost,
}

/// Whether a failed attempt is tried again: `Some(backoff)` for a retryable error with
/// attempts left, `None` when the job ends here.
pub fn next_try(job: &Job, retryable: bool, settings: &Settings) -> Option<Duration> {
    let max = job
        .max_attempts
        .map_or(settings.max_attempts, |m| u32::try_from(m).unwrap_or(0));
    let attempts = u32::try_from(job.attempts).unwrap_or(u32::MAX);
    (retryable && attempts < max).then(|| backoff(attempts, settings.backoff_base, settings.backoff_cap))
}

/// Records a failed attempt: requeued after `retry_in`, or else `dead` (retryable error,
/// attempts exhausted) or `failed` (permanent error).
pub fn fail(
    conn: &mut DbConnection,
    id: &JobId,
    owner: &str,
    error: &str,
    retry_in: Option<Duration>,
    retryable: bool,
) -> QueryResult<Outcome> {
    let now = now_ms();
    let error: String = error.chars().take(2000).collect();
    let (outcome, status, run_after, finished) = match retry_in {
        Some(delay) => {
            let at = now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
            (Outcome::Requeued { run_after: at }, JobStatus::Queued, at, None)
        }
        None if retryable => (Outcome::Dead, JobStatus::Dead, now, Some(now)),
        None => (Outcome::Failed, JobStatus::Failed, now, Some(now)),
    };
    let n = diesel::update(owned(id, owner))
        .set((
            jobs::status.eq(status.as_str()),
            jobs::run_after.eq(run_after),
            jobs::last_error.eq(Some(error)),
            jobs::lease_owner.eq(None::<String>),
            jobs::lease_expires_at.eq(None::<i64>),
            jobs::finished_at.eq(finished),
            jobs::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(if n == 1 { outcome } else { Outcome::LeaseLost })
}

/// Gives a job back to the queue without counting the attempt (a worker stopping).
pub fn release(conn: &mut DbConnection, id: &JobId, owner: &str) -> QueryResult<bool> {
    let now = now_ms();
    let n = diesel::update(owned(id, owner))
        .set((
            jobs::status.eq(JobStatus::Queued.as_str()),
            jobs::attempts.eq(jobs::attempts - 1),
            jobs::run_after.eq(now),
            jobs::lease_owner.eq(None::<String>),
            jobs::lease_expires_at.eq(None::<i64>),
            jobs::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(n == 1)
}

/// How long finished jobs stay as history (`jobs.succeeded_retention_hours` and
/// `jobs.dead_retention_days`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub succeeded: Duration,
    /// Dead and failed jobs: kept longer, since operators retry them from this list.
    pub dead: Duration,
}

impl Retention {
    pub fn from_config(config: &crate::config::JobsConfig) -> Retention {
        Retention {
            succeeded: Duration::from_secs(config.succeeded_retention_hours.saturating_mul(3600)),
            dead: Duration::from_secs(config.dead_retention_days.saturating_mul(86_400)),
        }
    }
}

/// Deletes the jobs that finished before their retention ran out at `now`: succeeded ones
/// after `retention.succeeded`, dead and failed ones after `retention.dead` (a retried job
/// is queued again, with no finish time, so it is never pruned). Answers how many.
pub fn prune(conn: &mut DbConnection, retention: Retention, now: i64) -> QueryResult<usize> {
    let before = |keep: Duration| now.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
    let mut pruned = 0;
    for (statuses, cutoff) in [
        (vec![JobStatus::Succeeded.as_str()], before(retention.succeeded)),
        (
            vec![JobStatus::Dead.as_str(), JobStatus::Failed.as_str()],
            before(retention.dead),
        ),
    ] {
        // A job's run_after is never later than its finish, so the (status, run_after) index
        // narrows the scan and finished_at decides.
        pruned += diesel::delete(
            jobs::table
                .filter(jobs::status.eq_any(statuses))
                .filter(jobs::run_after.lt(cutoff))
                .filter(jobs::finished_at.lt(cutoff)),
        )
        .execute(conn)?;
    }
    Ok(pruned)
}

/// Runs [`prune`] at start and then every ten minutes, logging failures (the next run
/// catches up).
pub fn spawn_pruning(db: crate::db::Db, retention: Retention) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let pruned = db
                .run(move |conn| prune(conn, retention, now_ms()).map_err(crate::db::DbError::from))
                .await;
            match pruned {
                Ok(0) => {}
                Ok(n) => tracing::info!(pruned = n, "finished jobs past their retention deleted"),
                Err(e) => tracing::warn!(error = %e, "pruning finished jobs failed; retrying next period"),
            }
        }
    });
}

/// The wait before attempt `attempts + 1`: `base × 2^(attempts-1)`, capped at `cap`, then a
/// random point in its upper half, so jobs that failed together do not retry together.
pub fn backoff(attempts: u32, base: Duration, cap: Duration) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    let full = base.saturating_mul(1u32 << exp).min(cap);
    let half = full / 2;
    let span = u64::try_from((full - half).as_millis()).unwrap_or(u64::MAX);
    let r = crate::tokens::random_bytes::<8>()
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    let jitter = if span == 0 { 0 } else { r % (span + 1) };
    half + Duration::from_millis(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_stays_in_its_upper_half_and_is_capped() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(60);
        for attempts in 1..=12u32 {
            let full = (base * 2u32.pow(attempts - 1)).min(cap);
            for _ in 0..50 {
                let d = backoff(attempts, base, cap);
                assert!(
                    d >= full / 2 && d <= full,
                    "attempt {attempts}: {d:?} outside {full:?}"
                );
            }
        }
        assert!(backoff(200, base, cap) <= cap);
    }

    #[test]
    fn kinds_and_statuses_round_trip_their_names() {
        for k in JobKind::ALL {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), json!(k.as_str()));
        }
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        }
    }

    #[test]
    fn the_placeholder_is_the_only_parameter_of_the_candidate_query() {
        let sql = candidate_sql("?1", "");
        assert!(!sql.contains('$'));
        assert!(sql.contains("NOT EXISTS"));
    }
}

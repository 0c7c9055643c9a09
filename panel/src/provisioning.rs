//! What each kind of job does on the nodes: the [`Handler`] the job workers run.
//!
//! Every step is idempotent, because any attempt may repeat one that was cut off at any
//! point (a panel killed mid-install resumes the job after its lease runs out):
//! - install pushes the spec to wings, where the server id is the key: a 409 means an
//!   earlier attempt already pushed it, and the job goes on to waiting for it;
//! - waiting reads wings' view of the server, so it works the same on a resumed job;
//! - delete treats wings' 404 as done, and removing the record of a server that is already
//!   gone does nothing.
//!
//! Workers read the current rows (server, allocations, node, blueprint) rather than a copy
//! in the job, so payloads stay small and a job never acts on stale data.
//!
//! Errors: wings unreachable, database trouble and timeouts are retried with backoff; wings
//! refusing a request (4xx other than the conflicts above) fails the job at once. An install
//! that gives up (failed or dead) deletes what wings may hold, frees the server's ports and
//! leaves the server as `install_failed`: no port stays taken by a server that never ran.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use mamba_shared::wings_api::{
    Allocation as WireAllocation, Allocations, BackupAdapter, BackupState, CreateBackupRequest,
    CreateServerRequest, InstallStatus, Limits, PowerAction, RestoreBackupRequest, RestoreState, ServerState,
    ServerView,
};
use serde_json::json;

use crate::audit::Actor;
use crate::backups::{self, BackupRow};
use crate::db::schema::servers;
use crate::db::{Db, DbError, now_ms};
use crate::error::ApiError;
use crate::ids::{BackupId, ServerId};
use crate::jobs::worker::{Handler, JobContext, JobError};
use crate::jobs::{Job, JobKind};
use crate::node_pki::PanelPki;
use crate::request_meta::RequestMeta;
use crate::wings_client::{WingsClient, WingsError};

/// Server statuses the worker writes (the routes read them; defined once in `servers`).
pub mod status {
    pub use crate::servers::{
        STATUS_DELETING as DELETING, STATUS_INSTALL_FAILED as INSTALL_FAILED,
        STATUS_INSTALLING as INSTALLING, STATUS_OFFLINE as OFFLINE, STATUS_RUNNING as RUNNING,
        STATUS_STARTING as STARTING, STATUS_STOPPING as STOPPING,
    };
}

/// The steps a job records, so a resumed job knows where it was.
pub mod step {
    pub const PUSHED: &str = "pushed";
    pub const REINSTALL_REQUESTED: &str = "reinstall_requested";
    pub const REMOVED_FROM_NODE: &str = "removed_from_node";
    /// Progress: `{"started_at_ms"}` of the node's restore this job asked for.
    pub const RESTORE_REQUESTED: &str = "restore_requested";
}

/// The job handler of `panel serve` and `panel worker`.
pub struct Provisioner {
    pub db: Db,
    pub pki: Arc<PanelPki>,
    pub blueprints: Arc<crate::blueprints::Registry>,
    /// How long an install (or reinstall) may take until the server runs, per attempt.
    pub install_timeout: Duration,
    /// The longest wait between two questions to wings while waiting for a state; the first
    /// ones come sooner ([`Pacer`]).
    pub poll_interval: Duration,
    /// Opens backups' sealed encryption keys.
    pub secrets: crate::secrets::SecretBox,
    /// How long a backup or restore may take on the node, per attempt.
    pub backup_timeout: Duration,
}

/// The waits between reads of a node's view of a server: a tenth of the time waited so
/// far, at least 50 ms and at most the poll interval, so a change is seen at most about 10%
/// after it happened (a server running after 1.3 s is seen by 1.45 s), while a long install
/// costs about one read per interval.
struct Pacer {
    started: Instant,
    max: Duration,
}

impl Pacer {
    const FIRST: Duration = Duration::from_millis(50);

    fn new(max: Duration) -> Pacer {
        Pacer {
            started: Instant::now(),
            max,
        }
    }

    async fn wait(&self) {
        let next = (self.started.elapsed() / 10).clamp(Pacer::FIRST.min(self.max), self.max);
        tokio::time::sleep(next).await;
    }
}

/// The server's row, as the worker needs it.
#[derive(Debug, Clone, Queryable)]
struct ServerRow {
    id: String,
    node_id: String,
    blueprint: String,
    memory_mb: i64,
    cpu_percent: i64,
    disk_mb: i64,
    variables: String,
    status: String,
    image: Option<String>,
}

fn wings_error(e: WingsError) -> JobError {
    if e.is_retryable() {
        JobError::Retry(e.to_string())
    } else {
        JobError::Permanent(e.to_string())
    }
}

fn api_error(e: ApiError) -> JobError {
    if e.status.is_server_error() {
        JobError::Retry(e.message)
    } else {
        JobError::Permanent(e.message)
    }
}

fn wire_id(id: &ServerId) -> Result<mamba_shared::ids::ServerId, JobError> {
    mamba_shared::ids::ServerId::new(id.as_str()).map_err(|e| JobError::Permanent(e.to_string()))
}

/// The status a server has in the panel while wings reports `state`.
pub fn status_of(view: &ServerView) -> &'static str {
    if matches!(
        view.install.status,
        InstallStatus::Pending | InstallStatus::Installing
    ) {
        return status::INSTALLING;
    }
    match view.state {
        ServerState::Installing => status::INSTALLING,
        ServerState::Starting => status::STARTING,
        ServerState::Running => status::RUNNING,
        ServerState::Stopping => status::STOPPING,
        ServerState::Offline | ServerState::Crashed => status::OFFLINE,
    }
}

impl Provisioner {
    /// The handler `panel serve` and `panel worker` run, from the panel's state.
    pub fn from_state(state: &crate::http::AppState) -> Provisioner {
        Provisioner {
            db: state.db.clone(),
            pki: state.pki.clone(),
            blueprints: state.blueprints.clone(),
            install_timeout: Duration::from_secs(state.config.jobs.install_timeout_secs),
            poll_interval: Duration::from_secs(1),
            secrets: state.secrets.clone(),
            backup_timeout: Duration::from_secs(state.config.backups.timeout_secs),
        }
    }

    async fn server_row(&self, id: &ServerId) -> Result<Option<ServerRow>, JobError> {
        let id = id.clone();
        Ok(self
            .db
            .run(move |conn| {
                servers::table
                    .find(id.as_str())
                    .select((
                        servers::id,
                        servers::node_id,
                        servers::blueprint,
                        servers::memory_mb,
                        servers::cpu_percent,
                        servers::disk_mb,
                        servers::variables,
                        servers::status,
                        servers::image,
                    ))
                    .first::<ServerRow>(conn)
                    .optional()
                    .map_err(DbError::from)
            })
            .await?)
    }

    async fn set_status(&self, id: &ServerId, status: &'static str) -> Result<(), JobError> {
        let id = id.clone();
        self.db
            .run(move |conn| {
                // A delete in progress wins over whatever an older job learnt.
                diesel::update(
                    servers::table
                        .find(id.as_str())
                        .filter(servers::status.ne(status::DELETING)),
                )
                .set((servers::status.eq(status), servers::updated_at.eq(now_ms())))
                .execute(conn)
                .map_err(DbError::from)
            })
            .await?;
        Ok(())
    }

    async fn client(&self, node: &str) -> Result<WingsClient, JobError> {
        let id = crate::ids::NodeId::from_db(node.to_string());
        let node = self
            .db
            .run(move |conn| crate::nodes::get(conn, &id).map_err(DbError::from))
            .await?
            .ok_or_else(|| JobError::Permanent("the server's node no longer exists".into()))?;
        WingsClient::new(&self.pki, &node).map_err(wings_error)
    }

    /// The complete create request wings needs, from the current rows.
    async fn create_request(&self, row: &ServerRow) -> Result<CreateServerRequest, JobError> {
        let (registry, slug, id) = (
            self.blueprints.clone(),
            row.blueprint.clone(),
            ServerId::from_db(row.id.clone()),
        );
        let (found, allocations) = self
            .db
            .run(move |conn| {
                let found = crate::blueprints::find(conn, &registry, &slug)?;
                let allocations = crate::allocation::server_allocations(conn, &id)?;
                Ok::<_, DbError>((found, allocations))
            })
            .await?;
        let blueprint = found
            .ok_or_else(|| JobError::Permanent(format!("blueprint {} no longer exists", row.blueprint)))?
            .blueprint;
        let mut ports = allocations.iter().map(|a| {
            a.ip.parse()
                .map(|ip| WireAllocation { ip, port: a.port })
                .map_err(|_| JobError::Permanent(format!("allocation {} has no valid address", a.id)))
        });
        let default = ports
            .next()
            .ok_or_else(|| JobError::Permanent("the server holds no allocation".into()))??;
        let additional = ports.collect::<Result<Vec<_>, _>>()?;
        let variables: BTreeMap<String, String> = serde_json::from_str(&row.variables).unwrap_or_default();
        Ok(CreateServerRequest {
            id: wire_id(&ServerId::from_db(row.id.clone()))?,
            limits: Some(Limits {
                memory_mb: u64::try_from(row.memory_mb).unwrap_or(0),
                cpu_percent: u32::try_from(row.cpu_percent).unwrap_or(0),
                disk_mb: u64::try_from(row.disk_mb).unwrap_or(0),
                pids: blueprint.limits.pids,
                io_weight: 500,
            }),
            blueprint,
            variables,
            allocations: Allocations { default, additional },
            image: row.image.clone(),
            start_on_completion: true,
            skip_install: false,
        })
    }

    /// Polls wings until the install finished and the server runs. An install that failed
    /// is permanent; running out of time is retried (the next attempt waits again).
    async fn wait_running(&self, client: &WingsClient, id: &ServerId) -> Result<(), JobError> {
        let deadline = Instant::now() + self.install_timeout;
        let mut last = "";
        let pacer = Pacer::new(self.poll_interval);
        loop {
            let view = client.server(id).await.map_err(wings_error)?;
            if view.install.status == InstallStatus::Failed {
                let why = view
                    .install
                    .error
                    .clone()
                    .unwrap_or_else(|| format!("exit code {:?}", view.install.exit_code));
                return Err(JobError::Permanent(format!("the install failed: {why}")));
            }
            let now = status_of(&view);
            if now != last {
                self.set_status(id, now).await?;
                last = now;
            }
            if view.install.status == InstallStatus::Installed && view.state == ServerState::Running {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(JobError::Retry(format!(
                    "the server was not running after {}s (wings says {:?})",
                    self.install_timeout.as_secs(),
                    view.state
                )));
            }
            pacer.wait().await;
        }
    }

    async fn install(&self, job: &Job, ctx: &JobContext, id: &ServerId) -> Result<(), JobError> {
        let Some(row) = self.server_row(id).await? else {
            // Deleted before it was installed: nothing to do.
            return Ok(());
        };
        if row.status == status::DELETING {
            return Ok(());
        }
        if row.status == status::INSTALL_FAILED {
            return Err(JobError::Permanent(
                "the install gave up earlier and freed the server's ports; retry it as an operator (which reserves them again) or delete the server"
                    .into(),
            ));
        }
        let client = self.client(&row.node_id).await?;
        if job.step.as_deref() != Some(step::PUSHED) {
            let request = self.create_request(&row).await?;
            match client.create_server(&request).await {
                Ok(_) => {}
                // An earlier attempt pushed it (and may have died before recording so).
                Err(e) if e.is_conflict() => {}
                Err(e) => return Err(wings_error(e)),
            }
            ctx.record_step(step::PUSHED, json!({})).await?;
        }
        self.wait_running(&client, id).await
    }

    async fn reinstall(&self, job: &Job, ctx: &JobContext, id: &ServerId) -> Result<(), JobError> {
        let row = self
            .server_row(id)
            .await?
            .ok_or_else(|| JobError::Permanent("the server no longer exists".into()))?;
        let client = self.client(&row.node_id).await?;
        if job.step.as_deref() != Some(step::REINSTALL_REQUESTED) {
            self.set_status(id, status::INSTALLING).await?;
            client.reinstall(id).await.map_err(wings_error)?;
            ctx.record_step(step::REINSTALL_REQUESTED, json!({})).await?;
        }
        self.wait_running(&client, id).await
    }

    /// Pushes the server's current rows as its new spec. Idempotent: it always sends what
    /// the database holds now, so a retry or a later update carries the latest change. A
    /// server not yet on its node gets the change with its install instead.
    async fn update(&self, id: &ServerId) -> Result<(), JobError> {
        let Some(row) = self.server_row(id).await? else {
            return Ok(());
        };
        if matches!(row.status.as_str(), status::DELETING | status::INSTALL_FAILED) {
            return Ok(());
        }
        let client = self.client(&row.node_id).await?;
        let request = self.create_request(&row).await?;
        match client.update_server(&request).await {
            Ok(updated) => {
                if updated.restart_required {
                    tracing::info!(server.id = %id, "spec updated; limits apply at the next start");
                }
                Ok(())
            }
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(wings_error(e)),
        }
    }

    async fn power(&self, job: &Job, id: &ServerId) -> Result<(), JobError> {
        let action: PowerAction = serde_json::from_value(job.payload["action"].clone())
            .map_err(|_| JobError::Permanent(format!("unknown power action {}", job.payload["action"])))?;
        let row = self
            .server_row(id)
            .await?
            .ok_or_else(|| JobError::Permanent("the server no longer exists".into()))?;
        let client = self.client(&row.node_id).await?;
        match client.power(id, action).await {
            Ok(()) => {}
            // Already in the asked-for state.
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(wings_error(e)),
        }
        // Done when the node reports the state the action leads to, so the server's status
        // never rests on a passing `stopping` or `starting`.
        let wanted = match action {
            PowerAction::Start | PowerAction::Restart => ServerState::Running,
            PowerAction::Stop | PowerAction::Kill => ServerState::Offline,
        };
        let deadline = Instant::now() + self.install_timeout;
        let pacer = Pacer::new(self.poll_interval);
        loop {
            let view = client.server(id).await.map_err(wings_error)?;
            self.set_status(id, status_of(&view)).await?;
            let settled = view.state == wanted
                || (wanted == ServerState::Offline && view.state == ServerState::Crashed);
            if settled {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(JobError::Retry(format!(
                    "the server was {:?}, not {wanted:?}, after {}s",
                    view.state,
                    self.install_timeout.as_secs()
                )));
            }
            pacer.wait().await;
        }
    }

    async fn delete(&self, job: &Job, ctx: &JobContext, id: &ServerId) -> Result<(), JobError> {
        let Some(row) = self.server_row(id).await? else {
            return Ok(());
        };
        if job.step.as_deref() != Some(step::REMOVED_FROM_NODE) {
            let client = self.client(&row.node_id).await?;
            match client.delete_server(id).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(wings_error(e)),
            }
            ctx.record_step(step::REMOVED_FROM_NODE, json!({})).await?;
        }
        let id = id.clone();
        self.db
            .run(move |conn| {
                crate::allocation::remove_server(conn, &id, &Actor::System, &RequestMeta::system())
            })
            .await
            .map_err(api_error)?;
        Ok(())
    }

    /// An install that will not be tried again: remove what wings may hold, free the ports,
    /// mark the server. Each part is idempotent; an error here leaves the job to be reclaimed
    /// and given up again.
    async fn abandon_install(&self, id: &ServerId) -> Result<(), JobError> {
        let Some(row) = self.server_row(id).await? else {
            return Ok(());
        };
        let client = self.client(&row.node_id).await?;
        match client.delete_server(id).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(wings_error(e)),
        }
        let id = id.clone();
        self.db
            .run(move |conn| crate::servers::install_gave_up(conn, &id))
            .await
            .map_err(api_error)?;
        Ok(())
    }
}

impl Handler for Provisioner {
    async fn run(&self, job: &Job, ctx: &JobContext) -> Result<(), JobError> {
        let Some(id) = job.server_id.clone() else {
            return Err(JobError::Permanent("a server job without a server".into()));
        };
        match job.kind {
            JobKind::ServerInstall => self.install(job, ctx, &id).await,
            JobKind::ServerReinstall => self.reinstall(job, ctx, &id).await,
            JobKind::ServerPower => self.power(job, &id).await,
            JobKind::ServerDelete => self.delete(job, ctx, &id).await,
            JobKind::ServerUpdate => self.update(&id).await,
            JobKind::ServerBackup => self.backup(job, &id).await,
            JobKind::ServerBackupRestore => self.restore(job, ctx, &id).await,
            JobKind::ServerBackupDelete => self.delete_backup(job, &id).await,
        }
    }

    async fn give_up(&self, job: &Job, _ctx: &JobContext, error: &JobError) -> Result<(), JobError> {
        match job.kind {
            JobKind::ServerBackup => {
                return self
                    .backup_gave_up(
                        job,
                        &[backups::STATUS_PENDING, backups::STATUS_RUNNING],
                        backups::STATUS_FAILED,
                        error,
                        "",
                    )
                    .await;
            }
            // The archive is as it was; the backup can be restored or deleted again.
            JobKind::ServerBackupRestore => {
                return self
                    .backup_gave_up(
                        job,
                        &[backups::STATUS_RESTORING],
                        backups::STATUS_COMPLETED,
                        error,
                        "restore failed: ",
                    )
                    .await;
            }
            JobKind::ServerBackupDelete => {
                return self
                    .backup_gave_up(
                        job,
                        &[backups::STATUS_DELETING],
                        backups::STATUS_FAILED,
                        error,
                        "delete failed: ",
                    )
                    .await;
            }
            JobKind::ServerInstall => {}
            _ => return Ok(()),
        }
        let Some(id) = &job.server_id else {
            return Ok(());
        };
        tracing::warn!(server.id = %id, %error, "install gave up; freeing the server's ports");
        self.abandon_install(id).await
    }
}

/// Backups: one idempotent routine per job kind. The panel's backup id is the node's, so a
/// repeated request finds what an earlier attempt started (wings answers 409 for an id it
/// has) and goes on waiting for it; wings' 404 on a delete means it is gone already.
impl Provisioner {
    /// The backup a job names, with its server's node; `None` when either is gone (nothing
    /// left to do).
    async fn backup_of(&self, job: &Job) -> Result<Option<(BackupRow, ServerRow)>, JobError> {
        let backup = job.payload["backup"]
            .as_str()
            .and_then(BackupId::parse)
            .ok_or_else(|| JobError::Permanent(format!("a backup job without a backup: {}", job.payload)))?;
        let Some(row) = self
            .db
            .run(move |conn| backups::row_any_tenant(conn, &backup).map_err(DbError::from))
            .await?
        else {
            return Ok(None);
        };
        let server = ServerId::from_db(row.server_id.clone());
        Ok(self.server_row(&server).await?.map(|s| (row, s)))
    }

    async fn backup_key(&self, row: &BackupRow) -> Result<Option<String>, JobError> {
        let (secrets, row) = (self.secrets.clone(), row.clone());
        self.db
            .run(move |conn| backups::open_key(conn, &secrets, &row))
            .await
            .map_err(|e| JobError::Permanent(format!("the backup's key cannot be opened: {}", e.message)))
    }

    async fn transition(
        &self,
        backup: &str,
        from: &'static [&'static str],
        to: &'static str,
        error: Option<String>,
    ) -> Result<bool, JobError> {
        let id = BackupId::from_db(backup.to_string());
        Ok(self
            .db
            .run(move |conn| {
                backups::transition(conn, &id, from, to, error.as_deref()).map_err(DbError::from)
            })
            .await?)
    }

    async fn backup(&self, job: &Job, server: &ServerId) -> Result<(), JobError> {
        let Some((row, server_row)) = self.backup_of(job).await? else {
            return Ok(());
        };
        if row.status != backups::STATUS_PENDING && row.status != backups::STATUS_RUNNING {
            // Completed by an earlier attempt, or being deleted: nothing to make.
            return Ok(());
        }
        if server_row.status == status::DELETING {
            // The server's delete takes its backups along.
            return Ok(());
        }
        let adapter = match row.adapter.as_str() {
            "s3" => BackupAdapter::S3,
            _ => BackupAdapter::Local,
        };
        let request = CreateBackupRequest {
            id: row.id.clone(),
            adapter,
            ignore: row.ignore(),
            encryption_key: self.backup_key(&row).await?,
        };
        let client = self.client(&server_row.node_id).await?;
        self.transition(&row.id, &[backups::STATUS_PENDING], backups::STATUS_RUNNING, None)
            .await?;
        match client.create_backup(server, &request).await {
            Ok(_) => {}
            // A backup with this id exists on the node: an earlier attempt started it. (A
            // restore in progress also answers 409; then the backup is not found below and
            // the attempt is retried later.)
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(wings_error(e)),
        }
        let deadline = Instant::now() + self.backup_timeout;
        let pacer = Pacer::new(self.poll_interval);
        loop {
            let view = match client.backup(server, &row.id).await {
                Ok(view) => view,
                Err(e) if e.is_not_found() => {
                    return Err(JobError::Retry(
                        "the node has not started the backup (a restore is running?)".into(),
                    ));
                }
                Err(e) => return Err(wings_error(e)),
            };
            match view.state {
                BackupState::Complete => {
                    let size = view.size.and_then(|s| i64::try_from(s).ok()).unwrap_or(0);
                    let sha256 = view.sha256.unwrap_or_default();
                    let id = BackupId::from_db(row.id.clone());
                    self.db
                        .run(move |conn| backups::complete(conn, &id, size, &sha256).map_err(DbError::from))
                        .await?;
                    return Ok(());
                }
                BackupState::Failed => {
                    return Err(JobError::Permanent(
                        view.error
                            .unwrap_or_else(|| "the node reports the backup failed".into()),
                    ));
                }
                BackupState::Running => {}
            }
            if Instant::now() >= deadline {
                return Err(JobError::Retry(format!(
                    "the backup was still running after {}s",
                    self.backup_timeout.as_secs()
                )));
            }
            pacer.wait().await;
        }
    }

    async fn restore(&self, job: &Job, ctx: &JobContext, server: &ServerId) -> Result<(), JobError> {
        let Some((row, server_row)) = self.backup_of(job).await? else {
            return Ok(());
        };
        if row.status != backups::STATUS_RESTORING {
            return Ok(());
        }
        let request = RestoreBackupRequest {
            truncate: job.payload["truncate"].as_bool().unwrap_or(false),
            encryption_key: self.backup_key(&row).await?,
        };
        let client = self.client(&server_row.node_id).await?;
        // The node's restore this job waits for, known by its start time on the node.
        let mut started = if job.step.as_deref() == Some(step::RESTORE_REQUESTED) {
            job.progress["started_at_ms"].as_u64()
        } else {
            None
        };
        let deadline = Instant::now() + self.backup_timeout;
        let pacer = Pacer::new(self.poll_interval);
        loop {
            let view = client.backup(server, &row.id).await.map_err(wings_error)?;
            let ours = view
                .restore
                .as_ref()
                .filter(|r| started.is_some_and(|s| s == r.started_at_ms));
            match ours {
                Some(r) if r.state == RestoreState::Complete => break,
                Some(r) if r.state == RestoreState::Failed => {
                    return Err(JobError::Permanent(
                        r.error.clone().unwrap_or_else(|| "the restore failed".into()),
                    ));
                }
                Some(_) => {}
                // Not asked yet, or the node lost it (a wings restart marks it failed; an
                // older restore has another start time): ask now.
                None => {
                    let asked = match client.restore_backup(server, &row.id, &request).await {
                        Ok(view) => view.restore.map(|r| r.started_at_ms),
                        // A restore runs already: ours, if an attempt died before recording
                        // it (jobs of one server never run side by side).
                        Err(e) if e.is_conflict() => view
                            .restore
                            .filter(|r| r.state == RestoreState::Running)
                            .map(|r| r.started_at_ms),
                        Err(e) => return Err(wings_error(e)),
                    };
                    let Some(at) = asked else {
                        return Err(JobError::Retry("the node did not start the restore".into()));
                    };
                    ctx.record_step(step::RESTORE_REQUESTED, json!({ "started_at_ms": at }))
                        .await?;
                    started = Some(at);
                }
            }
            if Instant::now() >= deadline {
                return Err(JobError::Retry(format!(
                    "the restore was still running after {}s",
                    self.backup_timeout.as_secs()
                )));
            }
            pacer.wait().await;
        }
        self.transition(
            &row.id,
            &[backups::STATUS_RESTORING],
            backups::STATUS_COMPLETED,
            None,
        )
        .await?;
        // The node stopped the server for the extract and starts it again if it was up:
        // the server's status follows until it settles, as after a power action.
        let deadline = Instant::now() + self.install_timeout;
        let pacer = Pacer::new(self.poll_interval);
        loop {
            let view = client.server(server).await.map_err(wings_error)?;
            self.set_status(server, status_of(&view)).await?;
            if !matches!(view.state, ServerState::Starting | ServerState::Stopping)
                || Instant::now() >= deadline
            {
                return Ok(());
            }
            pacer.wait().await;
        }
    }

    async fn delete_backup(&self, job: &Job, server: &ServerId) -> Result<(), JobError> {
        let Some((row, server_row)) = self.backup_of(job).await? else {
            return Ok(());
        };
        if row.status != backups::STATUS_DELETING {
            return Ok(());
        }
        let client = self.client(&server_row.node_id).await?;
        match client.delete_backup(server, &row.id).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(wings_error(e)),
        }
        let id = BackupId::from_db(row.id);
        self.db
            .run(move |conn| backups::remove(conn, &id).map_err(DbError::from))
            .await?;
        Ok(())
    }

    /// A backup job that will not be tried again leaves its backup in `to`, with the error.
    async fn backup_gave_up(
        &self,
        job: &Job,
        from: &'static [&'static str],
        to: &'static str,
        error: &JobError,
        prefix: &str,
    ) -> Result<(), JobError> {
        let Some(backup) = job.payload["backup"].as_str() else {
            return Ok(());
        };
        tracing::warn!(backup, kind = job.kind.as_str(), %error, "backup job gave up");
        self.transition(backup, from, to, Some(format!("{prefix}{error}")))
            .await?;
        Ok(())
    }
}

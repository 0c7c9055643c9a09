//! The backup service: starts, tracks, restores and deletes backups, with a per-node limit
//! on how many run at once.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mamba_shared::ids::ServerId;
use mamba_shared::wings_api::{
    BackupAdapter, BackupState, BackupView, CreateBackupRequest, RestoreBackupRequest, RestoreState,
    RestoreView,
};
use object_store::path::Path as ObjectPath;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::crypto::BackupKey;
use super::format::{Digest, IgnoreList, WriteOptions};
use super::pipeline::{self, Archived, BackupJob, ExtractJob};
use super::record::{BackupRecord, RecordStore, valid_id};
use super::store::{StoreError, Stores};
use super::tree::Extracted;
use crate::config::BackupsConfig;
use crate::files::ServerFs;
use crate::server::Server;
use crate::server::console::ConsoleEvent;
use crate::websocket::protocol::outbound;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Invalid(String),
    #[error("backup {0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0} backups or restores are already running on this node; try again later")]
    Busy(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

fn internal(e: impl std::fmt::Display) -> BackupError {
    BackupError::Internal(e.to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

struct Running {
    cancel: CancellationToken,
    /// Closed when the backup's task has cleaned up and written its final record.
    finished: tokio::sync::watch::Receiver<bool>,
}

pub struct Backups {
    config: BackupsConfig,
    local_dir: PathBuf,
    records: RecordStore,
    stores: Arc<Stores>,
    permits: Arc<Semaphore>,
    running: Mutex<HashMap<(ServerId, String), Running>>,
    restoring: Mutex<HashSet<ServerId>>,
    /// Serialises record writes of running backups with deletes.
    record_lock: Mutex<()>,
}

impl std::fmt::Debug for Backups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backups")
            .field("local_dir", &self.local_dir)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Backups {
    /// Opens the stores and sweeps what a previous run left: every record still "running"
    /// becomes "failed", its S3 upload is aborted and its partial files removed.
    pub async fn open(config: &BackupsConfig, data_dir: &std::path::Path) -> anyhow::Result<Arc<Backups>> {
        let stores = Stores::new(config, data_dir)?;
        let backups = Arc::new(Backups {
            config: config.clone(),
            local_dir: config.local_dir(data_dir),
            records: RecordStore::new(data_dir),
            stores: Arc::new(stores),
            permits: Arc::new(Semaphore::new(config.max_concurrent)),
            running: Mutex::new(HashMap::new()),
            restoring: Mutex::new(HashSet::new()),
            record_lock: Mutex::new(()),
        });
        backups.sweep().await;
        Ok(backups)
    }

    async fn sweep(&self) {
        let records = match self.records.all() {
            Ok(records) => records,
            Err(e) => {
                tracing::error!("cannot read backup records: {e}");
                return;
            }
        };
        for mut record in records
            .iter()
            .filter(|r| {
                r.restore
                    .as_ref()
                    .is_some_and(|x| x.state == RestoreState::Running)
            })
            .cloned()
        {
            tracing::warn!(server.id = %record.server, backup = %record.id, "restore interrupted by a wings restart; marking it failed");
            if let Some(restore) = record.restore.as_mut() {
                restore.state = RestoreState::Failed;
                restore.error = Some("wings stopped while the restore was running".into());
                restore.finished_at_ms = Some(now_ms());
            }
            if let Err(e) = self.records.save(&record) {
                tracing::error!(backup = %record.id, "cannot save the backup record: {e}");
            }
        }
        for mut record in records.into_iter().filter(|r| r.state == BackupState::Running) {
            tracing::warn!(server.id = %record.server, backup = %record.id, "backup interrupted by a wings restart; marking it failed");
            self.clean_up(&record).await;
            record.state = BackupState::Failed;
            record.error = Some("wings stopped while the backup was running".into());
            record.finished_at_ms = Some(now_ms());
            record.upload_id = None;
            if let Err(e) = self.records.save(&record) {
                tracing::error!(backup = %record.id, "cannot save the backup record: {e}");
            }
        }
    }

    /// Removes every trace of an unfinished upload: the S3 multipart upload, local staging
    /// files, and the object itself in case it was completed but never recorded as such.
    async fn clean_up(&self, record: &BackupRecord) {
        let path = ObjectPath::from(record.object.as_str());
        if let Some(id) = &record.upload_id
            && let Err(e) = self.stores.abort_s3_upload(&path, id).await
        {
            tracing::warn!(backup = %record.id, "cannot abort the S3 upload: {e}");
        }
        if record.adapter == BackupAdapter::Local {
            self.stores.remove_local_staging(&self.local_dir, &path);
        }
        if let Err(e) = self.stores.delete(record.adapter, &path).await {
            tracing::warn!(backup = %record.id, "cannot delete the partial object: {e}");
        }
    }

    pub fn list(&self, server: &ServerId) -> Result<Vec<BackupView>, BackupError> {
        Ok(self
            .records
            .list(server)
            .map_err(internal)?
            .iter()
            .map(BackupRecord::view)
            .collect())
    }

    pub fn get(&self, server: &ServerId, backup: &str) -> Result<BackupRecord, BackupError> {
        self.records
            .load(server, backup)
            .map_err(internal)?
            .ok_or_else(|| BackupError::NotFound(backup.to_string()))
    }

    fn permit(&self) -> Result<OwnedSemaphorePermit, BackupError> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| BackupError::Busy(self.config.max_concurrent))
    }

    fn write_options(&self, key: Option<BackupKey>) -> WriteOptions {
        let threads = match self.config.compression_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1)),
            n => n,
        };
        WriteOptions {
            level: self.config.compression_level,
            threads,
            key,
        }
    }

    /// Starts a backup of `server` and answers its record at once ("running").
    pub fn start(
        self: &Arc<Self>,
        server: Arc<Server>,
        fs: ServerFs,
        request: CreateBackupRequest,
    ) -> Result<BackupView, BackupError> {
        if !valid_id(&request.id) {
            return Err(BackupError::Invalid("id: give 1 to 64 of A-Z a-z 0-9 - _".into()));
        }
        let ignore =
            IgnoreList::new(&request.ignore).map_err(|e| BackupError::Invalid(format!("ignore{e}")))?;
        let key =
            match &request.encryption_key {
                None => None,
                Some(text) => Some(BackupKey::from_base64(text).ok_or_else(|| {
                    BackupError::Invalid("encryption_key: give the base64 of 32 bytes".into())
                })?),
            };
        self.stores
            .check_adapter(request.adapter)
            .map_err(|e| BackupError::Invalid(format!("adapter: {e}")))?;
        if lock(&self.restoring).contains(&server.id) {
            return Err(BackupError::Conflict("the server is being restored".into()));
        }
        let permit = self.permit()?;
        let record = {
            let _guard = lock(&self.record_lock);
            if self
                .records
                .load(&server.id, &request.id)
                .map_err(internal)?
                .is_some()
            {
                return Err(BackupError::Conflict(format!(
                    "backup {} already exists",
                    request.id
                )));
            }
            let record = BackupRecord {
                id: request.id.clone(),
                server: server.id.clone(),
                adapter: request.adapter,
                state: BackupState::Running,
                object: self
                    .stores
                    .object_path(request.adapter, server.id.as_str(), &request.id)
                    .to_string(),
                size: None,
                sha256: None,
                key_fingerprint: key.as_ref().map(BackupKey::fingerprint),
                ignore: request.ignore.clone(),
                files: 0,
                content_bytes: 0,
                started_at_ms: now_ms(),
                finished_at_ms: None,
                error: None,
                upload_id: None,
                restore: None,
            };
            self.records.save(&record).map_err(internal)?;
            record
        };
        let cancel = CancellationToken::new();
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        lock(&self.running).insert(
            (server.id.clone(), record.id.clone()),
            Running {
                cancel: cancel.clone(),
                finished: done_rx,
            },
        );
        let view = record.view();
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let running_key = (server.id.clone(), record.id.clone());
            this.run_backup(&server, fs, record, ignore, key, &cancel).await;
            lock(&this.running).remove(&running_key);
            let _ = done_tx.send(true);
        });
        Ok(view)
    }

    async fn run_backup(
        &self,
        server: &Arc<Server>,
        fs: ServerFs,
        mut record: BackupRecord,
        ignore: IgnoreList,
        key: Option<BackupKey>,
        cancel: &CancellationToken,
    ) {
        server.console.daemon(&format!("Backup {} started", record.id));
        let result = self
            .upload_archive(server, fs, &mut record, ignore, key, cancel)
            .await;
        record.finished_at_ms = Some(now_ms());
        record.upload_id = None;
        let event = match result {
            Ok(written) => {
                record.state = BackupState::Complete;
                record.size = Some(written.digest.size);
                record.sha256 = Some(written.digest.sha256.clone());
                record.files = written.files;
                record.content_bytes = written.content_bytes;
                json!({
                    "backup": record.id, "successful": true, "checksum": written.digest.sha256,
                    "checksum_type": "sha256", "size": written.digest.size,
                })
            }
            Err(e) => {
                record.state = BackupState::Failed;
                record.error = Some(e.clone());
                json!({"backup": record.id, "successful": false, "error": e})
            }
        };
        {
            let _guard = lock(&self.record_lock);
            // A backup deleted while it ran has no record to bring back.
            let deleted = cancel.is_cancelled()
                && self
                    .records
                    .load(&record.server, &record.id)
                    .ok()
                    .flatten()
                    .is_none();
            if !deleted && let Err(e) = self.records.save(&record) {
                tracing::error!(backup = %record.id, "cannot save the backup record: {e}");
            }
        }
        let message = match record.state {
            BackupState::Complete => format!("Backup {} completed", record.id),
            _ => format!(
                "Backup {} failed: {}",
                record.id,
                record.error.as_deref().unwrap_or("")
            ),
        };
        server.console.daemon(&message);
        server.report(
            if record.state == BackupState::Complete {
                mamba_shared::node_api::EventKind::BackupCompleted
            } else {
                mamba_shared::node_api::EventKind::BackupFailed
            },
            message.clone(),
            serde_json::json!({ "backup_id": record.id.to_string() }),
        );
        server.console.broadcast(ConsoleEvent::Backup {
            event: outbound::BACKUP_COMPLETED,
            data: Arc::new(event),
        });
    }

    async fn upload_archive(
        &self,
        server: &Arc<Server>,
        fs: ServerFs,
        record: &mut BackupRecord,
        ignore: IgnoreList,
        key: Option<BackupKey>,
        cancel: &CancellationToken,
    ) -> Result<Archived, String> {
        let job = BackupJob {
            adapter: record.adapter,
            path: ObjectPath::from(record.object.as_str()),
            fs,
            ignore,
            options: self.write_options(key),
            progress_interval: Duration::from_millis(self.config.progress_interval_ms),
        };
        let (server, backup) = (server.clone(), record.id.clone());
        let started = |upload_id: Option<&str>| {
            let Some(id) = upload_id else {
                return Ok(());
            };
            record.upload_id = Some(id.to_string());
            let _guard = lock(&self.record_lock);
            self.records
                .save(record)
                .map_err(|e| format!("cannot save the backup record: {e}"))
        };
        let progress = move |files: u64, bytes: u64| {
            server.console.broadcast(ConsoleEvent::Backup {
                event: outbound::BACKUP_PROGRESS,
                data: Arc::new(json!({
                    "backup": backup, "operation": "backup", "files": files, "bytes": bytes,
                    "total_bytes": null,
                })),
            });
        };
        pipeline::backup(&self.stores, job, started, progress, cancel).await
    }

    /// Deletes a backup: a running one is cancelled first (its upload aborted).
    pub async fn delete(&self, server: &ServerId, backup: &str) -> Result<(), BackupError> {
        let record = self.get(server, backup)?;
        let running = lock(&self.running)
            .get(&(server.clone(), backup.to_string()))
            .map(|r| (r.cancel.clone(), r.finished.clone()));
        if let Some((cancel, mut finished)) = running {
            {
                let _guard = lock(&self.record_lock);
                self.records.remove(server, backup).map_err(internal)?;
            }
            cancel.cancel();
            let _ = finished.wait_for(|done| *done).await;
            self.clean_up(&record).await;
            return Ok(());
        }
        self.stores
            .delete(record.adapter, &ObjectPath::from(record.object.as_str()))
            .await?;
        let _guard = lock(&self.record_lock);
        self.records.remove(server, backup).map_err(internal)
    }

    /// Checks a restore request and starts it; the restore runs in the background and
    /// reports through console events.
    pub fn restore(
        self: &Arc<Self>,
        server: Arc<Server>,
        fs: ServerFs,
        backup: &str,
        request: RestoreBackupRequest,
    ) -> Result<BackupView, BackupError> {
        let record = self.get(&server.id, backup)?;
        if record.state != BackupState::Complete {
            return Err(BackupError::Conflict(format!("backup {backup} is not complete")));
        }
        let key = match (&record.key_fingerprint, &request.encryption_key) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(BackupError::Invalid(
                    "encryption_key: this backup is encrypted".into(),
                ));
            }
            (Some(fingerprint), Some(text)) => {
                let key = BackupKey::from_base64(text).ok_or_else(|| {
                    BackupError::Invalid("encryption_key: give the base64 of 32 bytes".into())
                })?;
                if &key.fingerprint() != fingerprint {
                    return Err(BackupError::Invalid(
                        "encryption_key: not the key this backup was made with".into(),
                    ));
                }
                Some(key)
            }
        };
        let expected = match (record.size, &record.sha256) {
            (Some(size), Some(sha256)) => Digest {
                size,
                sha256: sha256.clone(),
            },
            _ => return Err(BackupError::Conflict(format!("backup {backup} has no checksum"))),
        };
        if lock(&self.running).keys().any(|(s, _)| s == &server.id) {
            return Err(BackupError::Conflict("a backup of this server is running".into()));
        }
        if !lock(&self.restoring).insert(server.id.clone()) {
            return Err(BackupError::Conflict(
                "the server is already being restored".into(),
            ));
        }
        let permit = match self.permit() {
            Ok(p) => p,
            Err(e) => {
                lock(&self.restoring).remove(&server.id);
                return Err(e);
            }
        };
        let started = RestoreView {
            state: RestoreState::Running,
            started_at_ms: now_ms(),
            finished_at_ms: None,
            truncate: request.truncate,
            refused: Vec::new(),
            error: None,
        };
        if let Err(e) = self.set_restore(&record, started.clone()) {
            lock(&self.restoring).remove(&server.id);
            return Err(e);
        }
        let mut record = record;
        record.restore = Some(started.clone());
        let this = self.clone();
        let view = record.view();
        tokio::spawn(async move {
            let _permit = permit;
            let result = this
                .run_restore(&server, fs, &record, key, &expected, request.truncate)
                .await;
            let mut outcome = started;
            outcome.finished_at_ms = Some(now_ms());
            match &result {
                Ok(done) => {
                    outcome.state = RestoreState::Complete;
                    outcome.refused = done.refused.clone();
                }
                Err(e) => {
                    outcome.state = RestoreState::Failed;
                    outcome.error = Some(e.clone());
                }
            }
            if let Err(e) = this.set_restore(&record, outcome) {
                tracing::error!(backup = %record.id, "cannot record the restore's outcome: {e}");
            }
            lock(&this.restoring).remove(&server.id);
            let (message, event) = match &result {
                Ok(done) => {
                    let mut message = format!("Restored backup {} ({} files)", record.id, done.files);
                    if !done.refused.is_empty() {
                        message.push_str(&format!(
                            "; {} entries refused: {}",
                            done.refused.len(),
                            done.refused.join(", ")
                        ));
                    }
                    (
                        message,
                        json!({"backup": record.id, "successful": true, "refused": done.refused}),
                    )
                }
                Err(e) => (
                    format!("Restore of backup {} failed: {e}", record.id),
                    json!({"backup": record.id, "successful": false, "error": e}),
                ),
            };
            server.console.daemon(&message);
            server.console.broadcast(ConsoleEvent::Backup {
                event: outbound::BACKUP_RESTORE_COMPLETED,
                data: Arc::new(event),
            });
        });
        Ok(view)
    }

    /// Writes a restore's state into the backup's record; a record deleted meanwhile stays
    /// deleted.
    fn set_restore(&self, record: &BackupRecord, restore: RestoreView) -> Result<(), BackupError> {
        let _guard = lock(&self.record_lock);
        let Some(mut current) = self.records.load(&record.server, &record.id).map_err(internal)? else {
            return Ok(());
        };
        current.restore = Some(restore);
        self.records.save(&current).map_err(internal)
    }

    async fn run_restore(
        &self,
        server: &Arc<Server>,
        fs: ServerFs,
        record: &BackupRecord,
        key: Option<BackupKey>,
        expected: &Digest,
        truncate: bool,
    ) -> Result<Extracted, String> {
        let path = ObjectPath::from(record.object.as_str());
        server
            .console
            .daemon(&format!("Verifying backup {} before restoring it", record.id));
        // Pass 1, with the server still running: nothing is touched unless the whole
        // archive checks out.
        let verified = pipeline::verify(&self.stores, record.adapter, &path, key.clone(), expected)
            .await
            .map_err(|e| format!("{e}; nothing was changed"))?;
        let job = ExtractJob {
            adapter: record.adapter,
            path,
            verified,
            fs,
            key,
            expected: expected.clone(),
            truncate,
            progress_interval: Duration::from_millis(self.config.progress_interval_ms),
        };
        let (progress_server, backup, total) = (server.clone(), record.id.clone(), record.content_bytes);
        let progress = move |files: u64, bytes: u64| {
            progress_server.console.broadcast(ConsoleEvent::Backup {
                event: outbound::BACKUP_PROGRESS,
                data: Arc::new(json!({
                    "backup": backup, "operation": "restore", "files": files, "bytes": bytes,
                    "total_bytes": total,
                })),
            });
        };
        // Pass 2, inside the server's queue with the game stopped.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stores = self.stores.clone();
        let console_server = server.clone();
        let work: crate::server::StoppedWork = Box::pin(async move {
            console_server.console.daemon("Server stopped for the restore");
            let result = pipeline::extract(&stores, job, progress, &CancellationToken::new()).await;
            let outcome = result.as_ref().map(|_| ()).map_err(Clone::clone);
            let _ = tx.send(result);
            outcome
        });
        server.while_stopped(work).await?;
        rx.await.map_err(|_| "the restore did not run".to_string())?
    }

    /// The stored archive, for the signed download route: its size and its bytes.
    pub async fn download(
        &self,
        server: &ServerId,
        backup: &str,
    ) -> Result<
        (
            u64,
            futures_util::stream::BoxStream<'static, Result<Bytes, object_store::Error>>,
        ),
        BackupError,
    > {
        let record = self.get(server, backup)?;
        if record.state != BackupState::Complete {
            return Err(BackupError::Conflict(format!("backup {backup} is not complete")));
        }
        let (size, _, stream) = self
            .stores
            .get(record.adapter, &ObjectPath::from(record.object.as_str()), None)
            .await?;
        Ok((size, stream))
    }

    /// Deletes every backup of a server (when the server itself is deleted).
    pub async fn delete_all(&self, server: &ServerId) {
        if let Ok(records) = self.records.list(server) {
            for record in records {
                if let Err(e) = self.delete(server, &record.id).await {
                    tracing::warn!(backup = %record.id, "cannot delete the backup: {e}");
                }
            }
        }
    }
}

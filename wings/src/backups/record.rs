//! Each backup's record: `<data_dir>/backups/<server>/<backup>.json`, written atomically.
//!
//! A record is written "running" (with the S3 upload id as soon as there is one) before any
//! byte is uploaded, and "complete" only after the store reported the finished object's
//! size. So after a crash a record is never complete unless the backup is, and a running one
//! says exactly what to clean up.

use std::path::{Path, PathBuf};

use mamba_shared::ids::ServerId;
use mamba_shared::wings_api::{BackupAdapter, BackupState, BackupView, RestoreView};
use serde::{Deserialize, Serialize};

use crate::server::store::write_atomically;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    pub id: String,
    pub server: ServerId,
    pub adapter: BackupAdapter,
    pub state: BackupState,
    /// The object's name in its store.
    pub object: String,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    /// Fingerprint of the key when encrypted (never the key).
    pub key_fingerprint: Option<String>,
    pub ignore: Vec<String>,
    pub files: u64,
    pub content_bytes: u64,
    pub started_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub error: Option<String>,
    /// The S3 multipart upload in progress, so a crash can abort it.
    #[serde(default)]
    pub upload_id: Option<String>,
    /// The latest restore from this backup.
    #[serde(default)]
    pub restore: Option<RestoreView>,
}

impl BackupRecord {
    pub fn view(&self) -> BackupView {
        BackupView {
            id: self.id.clone(),
            server: self.server.clone(),
            adapter: self.adapter,
            state: self.state,
            size: self.size,
            sha256: self.sha256.clone(),
            encrypted: self.key_fingerprint.is_some(),
            files: self.files,
            content_bytes: self.content_bytes,
            ignore: self.ignore.clone(),
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
            error: self.error.clone(),
            restore: self.restore.clone(),
        }
    }
}

/// Backup ids are the panel's (UUIDs in practice); the rule keeps them safe as file and
/// object names.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[derive(Debug, Clone)]
pub struct RecordStore {
    dir: PathBuf,
}

impl RecordStore {
    pub fn new(data_dir: &Path) -> RecordStore {
        RecordStore {
            dir: data_dir.join("backups"),
        }
    }

    fn path(&self, server: &ServerId, backup: &str) -> PathBuf {
        self.dir.join(server.as_str()).join(format!("{backup}.json"))
    }

    pub fn save(&self, record: &BackupRecord) -> std::io::Result<()> {
        let path = self.path(&record.server, &record.id);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_atomically(&path, &serde_json::to_vec_pretty(record)?)
    }

    pub fn load(&self, server: &ServerId, backup: &str) -> std::io::Result<Option<BackupRecord>> {
        if !valid_id(backup) {
            return Ok(None);
        }
        match std::fs::read(self.path(server, backup)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn remove(&self, server: &ServerId, backup: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(server, backup)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One server's records, oldest first.
    pub fn list(&self, server: &ServerId) -> std::io::Result<Vec<BackupRecord>> {
        let mut records = Vec::new();
        let dir = self.dir.join(server.as_str());
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(records),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json")
                && let Ok(bytes) = std::fs::read(&path)
                && let Ok(record) = serde_json::from_slice::<BackupRecord>(&bytes)
            {
                records.push(record);
            }
        }
        records.sort_by(|a, b| (a.started_at_ms, &a.id).cmp(&(b.started_at_ms, &b.id)));
        Ok(records)
    }

    /// Every record on the node (for the startup sweep).
    pub fn all(&self) -> std::io::Result<Vec<BackupRecord>> {
        let mut records = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(records),
            Err(e) => return Err(e),
        };
        for entry in entries.flatten() {
            if let Some(server) = entry.file_name().to_str().and_then(|n| ServerId::new(n).ok()) {
                records.extend(self.list(&server)?);
            }
        }
        Ok(records)
    }
}

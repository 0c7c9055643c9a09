//! On-disk state of each server: `servers/<id>/server.json`, replaced atomically.

use std::io::Write;
use std::path::{Path, PathBuf};

use mamba_shared::wings_api::{CrashInfo, InstallInfo, ServerState};
use serde::{Deserialize, Serialize};

use super::spec::ServerSpec;

/// What the operator (or panel) last asked for. Recovery drives the container towards it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Offline,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerRecord {
    pub spec: ServerSpec,
    pub desired: Desired,
    pub state: ServerState,
    pub install: InstallInfo,
    pub crash: CrashInfo,
    pub container_id: Option<String>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub start_on_completion: bool,
    /// Unexpected exits inside the crash guard's window (Unix milliseconds).
    #[serde(default)]
    pub crash_exits_ms: Vec<u64>,
}

pub fn record_path(dir: &Path) -> PathBuf {
    dir.join("server.json")
}

pub fn save(dir: &Path, record: &ServerRecord) -> std::io::Result<()> {
    write_atomically(&record_path(dir), &serde_json::to_vec_pretty(record)?)
}

/// Writes to a temporary file, fsyncs it, renames it over `path` and fsyncs the folder, so a
/// crash at any point leaves either the old contents or the new ones.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

pub fn load(dir: &Path) -> std::io::Result<ServerRecord> {
    let bytes = std::fs::read(record_path(dir))?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

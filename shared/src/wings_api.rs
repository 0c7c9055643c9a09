//! Requests and answers of the wings HTTP API (`/api/...`), as the panel sends and reads them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::blueprint::Blueprint;
use crate::ids::ServerId;

/// `POST /api/servers`. Self-contained: wings needs no blueprint files of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateServerRequest {
    pub id: ServerId,
    pub blueprint: Blueprint,
    /// Variable values by env name; missing ones take the blueprint default.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// Missing limits take the blueprint defaults.
    #[serde(default)]
    pub limits: Option<Limits>,
    pub allocations: Allocations,
    /// One of the blueprint's images; default the first.
    #[serde(default)]
    pub image: Option<String>,
    /// Start the server as soon as its install finishes.
    #[serde(default)]
    pub start_on_completion: bool,
    /// Skip the blueprint's install script.
    #[serde(default)]
    pub skip_install: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub memory_mb: u64,
    pub cpu_percent: u32,
    pub disk_mb: u64,
    pub pids: u32,
    /// Relative block-I/O weight, 10 to 1000 (applied where the kernel supports it).
    #[serde(default = "default_io_weight")]
    pub io_weight: u16,
}

fn default_io_weight() -> u16 {
    500
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allocations {
    pub default: Allocation,
    #[serde(default)]
    pub additional: Vec<Allocation>,
}

impl Allocations {
    pub fn all(&self) -> impl Iterator<Item = &Allocation> {
        std::iter::once(&self.default).chain(self.additional.iter())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allocation {
    pub ip: IpAddr,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerAction {
    Start,
    Stop,
    Restart,
    Kill,
}

/// `POST /api/servers/{id}/power`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerRequest {
    pub action: PowerAction,
}

/// `POST /api/servers/{id}/commands`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsRequest {
    pub commands: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerState {
    Installing,
    Offline,
    Starting,
    Running,
    Stopping,
    /// Gave up restarting after repeated unexpected exits.
    Crashed,
}

impl ServerState {
    pub fn is_up(self) -> bool {
        matches!(self, ServerState::Starting | ServerState::Running)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallStatus {
    Pending,
    Installing,
    Installed,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallInfo {
    pub status: InstallStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl InstallInfo {
    pub fn new(status: InstallStatus) -> InstallInfo {
        InstallInfo {
            status,
            exit_code: None,
            error: None,
        }
    }

    pub fn failed(exit_code: Option<i64>, error: impl Into<String>) -> InstallInfo {
        InstallInfo {
            status: InstallStatus::Failed,
            exit_code,
            error: Some(error.into()),
        }
    }
}

/// Why a server last stopped without being asked to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub exit_code: i64,
    pub oom_killed: bool,
    /// Unix seconds.
    pub at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrashInfo {
    /// Unexpected exits inside the current crash-guard window.
    pub attempts: u32,
    pub last_exit: Option<ExitInfo>,
    /// Unix milliseconds of the next automatic restart, while one is scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_restart_at_ms: Option<u64>,
}

/// The answer to `PUT /api/servers/{id}` (body: a [`CreateServerRequest`] for the same id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerUpdated {
    pub server: ServerView,
    /// The server is running on its old container: limits, variables and image apply at
    /// its next start (the disk quota applies at once).
    pub restart_required: bool,
}

/// One server as wings reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerView {
    pub id: ServerId,
    pub blueprint: String,
    pub state: ServerState,
    pub install: InstallInfo,
    pub limits: Limits,
    pub allocations: Allocations,
    pub image: String,
    pub container_id: Option<String>,
    pub crash: CrashInfo,
    /// Power actions in the server's queue, counting the one running now.
    pub queued_actions: usize,
    /// The last power action that failed, with why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsResponse {
    pub lines: Vec<String>,
}

/// `202 Accepted` answer to a power action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerAccepted {
    pub action: PowerAction,
    /// Actions ahead of this one in the server's queue, counting the one running now.
    pub queued_behind: usize,
}

/// `GET /api/system`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemInfo {
    pub version: String,
    pub hostname: String,
    pub kernel: String,
    pub os: String,
    pub architecture: String,
    pub cpu_count: usize,
    pub cpu_usage_percent: f32,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_available_bytes: u64,
    pub docker: DockerInfo,
    pub servers: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerInfo {
    pub version: String,
    pub api_version: String,
    pub storage_driver: String,
    pub cgroup_version: String,
    pub containers_running: i64,
}

/// A server's resource use: `GET /api/servers/{id}/resources`, and the `stats` event of the
/// console socket (there as a JSON string, as Pterodactyl-style front ends expect).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceStats {
    pub state: ServerState,
    /// CPU use in percent of one core (200 = two cores fully busy).
    pub cpu_absolute: f64,
    /// Memory in use, without the kernel's reclaimable page cache.
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    pub network: NetworkStats,
    /// Bytes used by the server's files.
    pub disk_bytes: u64,
    /// Milliseconds since the container started; 0 when it is not running.
    pub uptime_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkStats {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// `POST /api/servers/{id}/deauthorize`: closes the user's console sockets on the server and
/// refuses every token issued to them until now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeauthorizeRequest {
    pub user: String,
}

/// `POST /api/tokens/deny`: puts token ids on the deny list until the tokens expire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyTokensRequest {
    pub tokens: Vec<DeniedToken>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeniedToken {
    pub jti: String,
    /// The token's `exp` (Unix seconds); the entry is forgotten after it.
    pub expires_at: u64,
}

/// Where a backup is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupAdapter {
    /// A folder on the node (`backups.local_dir`).
    Local,
    /// An S3-compatible bucket (`[backups.s3]`).
    S3,
}

/// `POST /api/servers/{id}/backups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBackupRequest {
    /// The panel's id for the backup: 1 to 64 of `A-Z a-z 0-9 - _`.
    pub id: String,
    pub adapter: BackupAdapter,
    /// Gitignore-style patterns, relative to the server root.
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Base64 of a 32-byte key: the archive is then encrypted (AES-256-GCM). Wings never
    /// stores the key; the same key must be given to restore.
    #[serde(default)]
    pub encryption_key: Option<String>,
}

/// `POST /api/servers/{id}/backups/{backup}/restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreBackupRequest {
    /// Empty the server root before extracting.
    #[serde(default)]
    pub truncate: bool,
    /// Required when the backup is encrypted.
    #[serde(default)]
    pub encryption_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupState {
    Running,
    /// Uploaded and verified; `size` and `sha256` are set.
    Complete,
    /// Failed, cancelled, or interrupted by a wings restart; nothing is left in the store.
    Failed,
}

/// A backup as wings reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupView {
    pub id: String,
    pub server: ServerId,
    pub adapter: BackupAdapter,
    pub state: BackupState,
    /// Size of the stored archive, in bytes.
    pub size: Option<u64>,
    /// SHA-256 (hex) of the stored archive.
    pub sha256: Option<String>,
    pub encrypted: bool,
    /// Files and bytes of file content archived so far.
    pub files: u64,
    pub content_bytes: u64,
    pub ignore: Vec<String>,
    pub started_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub error: Option<String>,
    /// The latest restore from this backup, if any was started: how the panel learns that a
    /// restore it asked for has finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreView>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreState {
    Running,
    Complete,
    /// Refused by the verify pass (nothing changed), failed while extracting, or interrupted
    /// by a wings restart.
    Failed,
}

/// The latest restore from a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreView {
    pub state: RestoreState,
    pub started_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub truncate: bool,
    /// Archive entries refused while extracting (absolute paths, `..`, links out of the root).
    #[serde(default)]
    pub refused: Vec<String>,
    pub error: Option<String>,
}

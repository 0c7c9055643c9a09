//! Activity: who did what to a server's files on a node (file manager routes, signed-URL
//! uploads, SFTP). Wings records an entry when the action happens and sends batches to the
//! panel's node listener (mutual TLS), through its on-disk outbox, like events.
//!
//! Delivery is at-least-once: each entry carries an id chosen by wings, and the panel stores
//! an entry once per (node, id), so a re-sent batch adds nothing.

use serde::{Deserialize, Serialize};

/// `POST` an [`ActivityBatch`]; answered with [`ActivityReport`].
pub const ACTIVITY_PATH: &str = "/api/node/v1/activity";

/// Most entries one batch may carry.
pub const MAX_ACTIVITY_PER_BATCH: usize = 1_000;
/// Longest event name, actor and IP text (characters).
pub const MAX_ACTIVITY_EVENT_CHARS: usize = 64;
pub const MAX_ACTIVITY_ACTOR_CHARS: usize = 128;
pub const MAX_ACTIVITY_IP_CHARS: usize = 64;
/// Largest `properties` (bytes of JSON).
pub const MAX_ACTIVITY_PROPERTIES_BYTES: usize = 8_192;

/// The actor of an action made by wings on the panel's behalf with no user named (the panel
/// calling a file route without `x-mamba-user`).
pub const ACTOR_PANEL: &str = "panel";

/// The header the panel sets on a file manager request to name the user it acts for, and the
/// one naming that user's address. Trusted only on the panel's mutual-TLS listener.
pub const USER_HEADER: &str = "x-mamba-user";
pub const USER_IP_HEADER: &str = "x-mamba-user-ip";

/// Event names. `sftp.*` come from SFTP sessions, `file.*` from the file manager routes and
/// signed-URL uploads.
pub mod events {
    pub const SFTP_LOGIN: &str = "sftp.login";
    /// Many WRITEs to one open file are one entry, recorded when the handle closes.
    pub const SFTP_WRITE: &str = "sftp.write";
    pub const SFTP_CREATE: &str = "sftp.create";
    pub const SFTP_DELETE: &str = "sftp.delete";
    pub const SFTP_RENAME: &str = "sftp.rename";
    pub const SFTP_CREATE_DIRECTORY: &str = "sftp.create-directory";
    pub const FILE_WRITE: &str = "file.write";
    pub const FILE_UPLOAD: &str = "file.upload";
    pub const FILE_DELETE: &str = "file.delete";
    pub const FILE_RENAME: &str = "file.rename";
    pub const FILE_COPY: &str = "file.copy";
    pub const FILE_CREATE_DIRECTORY: &str = "file.create-directory";
    pub const FILE_CHMOD: &str = "file.chmod";
    pub const FILE_COMPRESS: &str = "file.compress";
    pub const FILE_DECOMPRESS: &str = "file.decompress";
    pub const FILE_PULL: &str = "file.pull";
}

/// One action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivityEntry {
    /// A UUID chosen by wings; stable across re-deliveries.
    pub id: String,
    pub server_id: String,
    /// One of [`events`], at most [`MAX_ACTIVITY_EVENT_CHARS`].
    pub event: String,
    /// The panel's user id, or [`ACTOR_PANEL`].
    pub actor: String,
    /// The address the user acted from, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Event-specific details (paths, sizes), at most [`MAX_ACTIVITY_PROPERTIES_BYTES`].
    #[serde(default)]
    pub properties: serde_json::Value,
    /// When it happened, in milliseconds since the epoch.
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivityBatch {
    pub entries: Vec<ActivityEntry>,
}

/// Why the panel refused one entry. Final: wings drops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivityRefusal {
    /// The server does not exist (any more).
    UnknownServer,
    /// Malformed: an id that is not a UUID, an event, actor or properties too long.
    Invalid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedActivity {
    pub index: usize,
    pub entry_id: String,
    pub reason: ActivityRefusal,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityReport {
    pub stored: u64,
    /// Entries the panel already had (a re-delivery).
    pub duplicates: u64,
    pub refused: Vec<RefusedActivity>,
}

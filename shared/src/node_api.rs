//! What wings sends the panel on the panel's node listener (mutual TLS), and the enrollment
//! token an operator copies from the panel to the node.

use std::fmt;

use serde::{Deserialize, Serialize};

/// `POST`: a node trades its enrollment token and a CSR for its first certificate. The only
/// node route that accepts a client without a certificate.
pub const ENROLL_PATH: &str = "/api/node/v1/enroll";
/// `POST`: a node with a valid certificate asks for a fresh one (same identity, new key).
pub const RENEW_PATH: &str = "/api/node/v1/certificate";

/// `GET`: who the panel takes this node for ([`NodeIdentityResponse`]); a cheap check that
/// the node's certificate is still admitted.
pub const IDENTITY_PATH: &str = "/api/node/v1/identity";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeIdentityResponse {
    pub node_id: String,
    /// SHA-256 of the certificate this request came with.
    pub fingerprint: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// `<secret>.<CA fingerprint>`: the secret proves the operator's intent, the fingerprint
/// (64 hex digits, SHA-256 of the CA certificate) lets the node authenticate the panel before
/// it trusts anything the panel says.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollmentToken {
    pub secret: String,
    pub ca_fingerprint: String,
}

impl fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollmentToken")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an enrollment token is <secret>.<64 hex digits of the panel CA's SHA-256 fingerprint>")]
pub struct InvalidEnrollmentToken;

impl EnrollmentToken {
    pub fn parse(text: &str) -> Result<EnrollmentToken, InvalidEnrollmentToken> {
        let (secret, fp) = text.trim().rsplit_once('.').ok_or(InvalidEnrollmentToken)?;
        let secret_ok = (16..=128).contains(&secret.len())
            && secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let fp_ok = fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_hexdigit());
        if !(secret_ok && fp_ok) {
            return Err(InvalidEnrollmentToken);
        }
        Ok(EnrollmentToken {
            secret: secret.to_owned(),
            ca_fingerprint: fp.to_ascii_lowercase(),
        })
    }
}

impl fmt::Display for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.secret, self.ca_fingerprint)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The secret part of the token only; the fingerprint was already used to pin the CA.
    pub token: String,
    pub csr_pem: String,
}

/// The answer to enrollment and renewal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateResponse {
    pub node_id: String,
    pub certificate_pem: String,
    pub ca_pem: String,
    /// The panel's Ed25519 public key (PEM, SubjectPublicKeyInfo), which signs the console
    /// and file tokens wings checks.
    pub token_public_key_pem: String,
    /// Unix seconds.
    pub not_after: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr_pem: String,
}

/// `POST` [`Heartbeat`]: the node is alive; answered with [`HeartbeatAck`].
pub const HEARTBEAT_PATH: &str = "/api/node/v1/heartbeat";
/// `POST` a [`crate::metrics::MetricsBatch`]; answered with [`crate::metrics::IngestReport`].
pub const METRICS_PATH: &str = "/api/node/v1/metrics";
/// `POST` an [`EventsBatch`]; answered with [`EventsReport`].
pub const EVENTS_PATH: &str = "/api/node/v1/events";

/// Most servers a heartbeat may list, and most events one batch may carry.
pub const MAX_HEARTBEAT_SERVERS: usize = 10_000;
pub const MAX_EVENTS_PER_BATCH: usize = 1_000;
/// Longest event message (characters) and largest event `data` (bytes of JSON).
pub const MAX_EVENT_MESSAGE_CHARS: usize = 1_024;
pub const MAX_EVENT_DATA_BYTES: usize = 4_096;

/// What a node says about itself every heartbeat interval. Not buffered: a heartbeat that
/// cannot be delivered is simply superseded by the next one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The wings version.
    pub version: String,
    /// Seconds since wings started.
    pub uptime_s: u64,
    pub resources: NodeResources,
    /// Every server wings knows, with its state (`offline`, `starting`, `running`, ...).
    pub servers: Vec<HeartbeatServer>,
}

/// The host's resources as wings sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeResources {
    pub cpu_cores: u32,
    /// One-minute load average, in thousandths.
    pub load_1m_milli: u64,
    pub memory_total_mb: u64,
    pub memory_available_mb: u64,
    /// Of the filesystem holding wings' data folder.
    pub disk_total_mb: u64,
    pub disk_free_mb: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatServer {
    pub server_id: String,
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatAck {
    pub node_id: String,
    /// The panel's clock, in milliseconds since the epoch.
    pub received_at_ms: i64,
}

/// What happened to a server, as wings reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The game exited without being asked to.
    Crashed,
    /// The crash guard started it again.
    Restarted,
    /// The crash guard gave up restarting it.
    CrashLoop,
    /// The kernel killed it for using more memory than its limit.
    OomKilled,
    InstallFinished,
    InstallFailed,
    BackupProgress,
    BackupCompleted,
    BackupFailed,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Crashed => "crashed",
            EventKind::Restarted => "restarted",
            EventKind::CrashLoop => "crash_loop",
            EventKind::OomKilled => "oom_killed",
            EventKind::InstallFinished => "install_finished",
            EventKind::InstallFailed => "install_failed",
            EventKind::BackupProgress => "backup_progress",
            EventKind::BackupCompleted => "backup_completed",
            EventKind::BackupFailed => "backup_failed",
        }
    }
}

/// One event. `id` is chosen by wings when the event happens and never changes, so a
/// re-delivered event is recognised (per node) and stored once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEvent {
    /// A UUID.
    pub id: String,
    pub server_id: String,
    pub kind: EventKind,
    /// When it happened, in milliseconds since the epoch.
    pub at_ms: i64,
    /// A human-readable line, at most [`MAX_EVENT_MESSAGE_CHARS`].
    #[serde(default)]
    pub message: String,
    /// Kind-specific details (exit code, backup id, progress), at most
    /// [`MAX_EVENT_DATA_BYTES`] of JSON.
    #[serde(default)]
    pub data: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsBatch {
    pub events: Vec<NodeEvent>,
}

/// Why the panel refused one event. Final: wings drops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventRefusal {
    /// The server does not exist (any more).
    UnknownServer,
    /// Malformed: an id that is not a UUID, a message or data too long.
    Invalid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedEvent {
    pub index: usize,
    pub event_id: String,
    pub reason: EventRefusal,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsReport {
    pub stored: u64,
    /// Events the panel already had (a re-delivery).
    pub duplicates: u64,
    pub refused: Vec<RefusedEvent>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn token_round_trips_and_rejects_junk() {
        let fp = "ab".repeat(32);
        let t = EnrollmentToken::parse(&format!("abcdefghijklmnop_-12.{}", fp.to_uppercase())).unwrap();
        assert_eq!(t.ca_fingerprint, fp);
        assert_eq!(EnrollmentToken::parse(&t.to_string()).unwrap(), t);
        for bad in [
            "",
            "x",
            &format!("short.{fp}"),
            "abcdefghijklmnopq.abc",
            &format!("a b c d e f g h i.{fp}"),
        ] {
            assert!(EnrollmentToken::parse(bad).is_err(), "{bad}");
        }
        assert!(!format!("{t:?}").contains("abcdefgh"));
    }
}

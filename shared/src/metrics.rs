//! The metrics batch wings sends to the panel (over the node mTLS listener), and the
//! panel's answer.
//!
//! Delivery is at-least-once: a batch whose answer was lost is sent again, and the panel
//! keys samples by (server, `sampled_at_ms`), so a second delivery adds nothing.

use serde::{Deserialize, Serialize};

/// One server's resource use at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSample {
    /// The panel's id of the server.
    pub server_id: String,
    /// When wings took the sample, in milliseconds since the Unix epoch. Unique per server.
    pub sampled_at_ms: i64,
    /// CPU in use, in thousandths of a core.
    pub cpu_millicores: u64,
    pub memory_mb: u64,
    /// Bytes sent since the server's previous sample: a delta, not the container's counter,
    /// so counter resets (a container restart) never make egress negative or double it.
    /// Wings computes it, and folds the deltas of samples it drops into the next one kept.
    pub egress_bytes: u64,
    /// Disk used by the server's files.
    pub disk_bytes: u64,
    /// Seconds since the server's container started (0 while stopped).
    pub uptime_s: u64,
}

/// What wings posts: samples of any of its servers, in any order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsBatch {
    pub samples: Vec<MetricSample>,
}

/// Why the panel refused one sample. Refused samples are final: wings drops them rather
/// than sending them again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleRefusal {
    /// The server is not on the reporting node (or does not exist any more).
    NotOnNode,
    /// Older than the panel keeps raw samples: it can no longer be told from a duplicate.
    TooOld,
    /// Further in the future than clock skew explains.
    InFuture,
    /// A value too large to store.
    OutOfRange,
}

/// The panel's answer to a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestReport {
    /// Samples stored now.
    pub stored: u64,
    /// Samples the panel already had (a re-delivery).
    pub duplicates: u64,
    /// Samples refused, by position in the batch.
    pub refused: Vec<RefusedSample>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedSample {
    pub index: usize,
    pub server_id: String,
    pub reason: SampleRefusal,
}

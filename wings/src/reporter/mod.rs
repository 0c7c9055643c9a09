//! Reporting to the panel once the node is enrolled (ADR 0011), over mutual TLS with the
//! node's certificate:
//!
//! - a heartbeat every `reporter.heartbeat_interval_secs` (version, uptime, host resources,
//!   each server's state), sent directly: a lost heartbeat is superseded by the next;
//! - a resource sample of every server every `reporter.sample_interval_secs`;
//! - the runtime's server events (crashes, restarts, installs, OOM kills, backups);
//! - the activity log (`crate::activity`: file manager and SFTP actions, with their actor).
//!
//! Samples, events and activity are written to the [`outbox::Outbox`] first and sent from there by one
//! sender task, oldest first, each record deleted only once the panel answered it. While the
//! panel is unreachable they stay on disk, within `reporter.outbox_max_bytes`.

pub mod outbox;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use mamba_shared::activity::{ACTIVITY_PATH, ActivityBatch, ActivityEntry, MAX_ACTIVITY_PER_BATCH};
use mamba_shared::metrics::{MetricSample, MetricsBatch};
use mamba_shared::node_api::{
    EVENTS_PATH, EventsBatch, HEARTBEAT_PATH, Heartbeat, HeartbeatServer, MAX_EVENTS_PER_BATCH, METRICS_PATH,
    NodeEvent, NodeResources,
};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use self::outbox::{Outbox, OutboxError, Record, RecordBody};
use crate::config::ReporterConfig;
use crate::node_identity::{IdentityError, NodeIdentity};
use crate::server::manager::Manager;

/// Samples per metrics record; the panel takes up to 10,000 per batch.
const SAMPLES_PER_RECORD: usize = 2_000;
/// Servers sampled at once (each reading takes Docker about a second).
const PARALLEL_SAMPLES: usize = 8;
/// Records sent per read of the outbox.
const SEND_CHUNK: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ReporterError {
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// The folder of the outbox under wings' data folder.
pub fn outbox_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("outbox")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

struct Shared {
    identity: Arc<NodeIdentity>,
    client: reqwest::Client,
    base: String,
    config: ReporterConfig,
    outbox: Mutex<Outbox>,
    wake: Notify,
}

impl Shared {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Appends on the blocking pool (the outbox fsyncs), then wakes the sender.
    async fn enqueue(self: &Arc<Self>, body: RecordBody) {
        let record = Record {
            id: uuid::Uuid::now_v7().to_string(),
            body,
        };
        let shared = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut outbox = shared.outbox.lock().unwrap_or_else(|p| p.into_inner());
            outbox.append(&record)
        })
        .await;
        match result {
            Ok(Ok(())) => self.wake.notify_one(),
            Ok(Err(e)) => tracing::error!(error = %e, "cannot write to the outbox; a report is lost"),
            Err(e) => tracing::error!(error = %e, "the outbox writer failed; a report is lost"),
        }
    }
}

/// Starts the reporter's tasks; they end when `shutdown` is cancelled.
pub fn spawn(
    identity: Arc<NodeIdentity>,
    manager: Arc<Manager>,
    data_dir: &Path,
    shutdown: CancellationToken,
) -> Result<(), ReporterError> {
    let config = manager.context().config.reporter.clone();
    let outbox = Outbox::open(
        &outbox_dir(data_dir),
        config.outbox_max_bytes,
        config.outbox_segment_bytes,
    )?;
    let pending = outbox.stats();
    if pending.records > 0 {
        tracing::info!(
            records = pending.records,
            bytes = pending.bytes,
            "outbox holds undelivered reports"
        );
    }
    let shared = Arc::new(Shared {
        client: identity.panel_client()?,
        base: identity.record.panel_url.trim_end_matches('/').to_string(),
        identity,
        config,
        outbox: Mutex::new(outbox),
        wake: Notify::new(),
    });
    let events = manager.context().reports.subscribe();
    let activity = manager.context().activity.subscribe();
    let data_dir = data_dir.to_path_buf();
    tokio::spawn(until(
        shutdown.clone(),
        heartbeats(shared.clone(), manager.clone(), data_dir),
    ));
    tokio::spawn(until(shutdown.clone(), sampler(shared.clone(), manager)));
    tokio::spawn(until(shutdown.clone(), forward_events(shared.clone(), events)));
    tokio::spawn(until(
        shutdown.clone(),
        forward_activity(shared.clone(), activity),
    ));
    tokio::spawn(until(shutdown, sender(shared)));
    Ok(())
}

async fn until(shutdown: CancellationToken, task: impl Future<Output = ()>) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = task => {}
    }
}

// ---- heartbeats ----

async fn heartbeats(shared: Arc<Shared>, manager: Arc<Manager>, data_dir: std::path::PathBuf) {
    let started = Instant::now();
    let kind = sysinfo::RefreshKind::nothing().with_memory(sysinfo::MemoryRefreshKind::nothing().with_ram());
    let mut system = sysinfo::System::new_with_specifics(kind)
        .inspect_err(|e| tracing::warn!("host memory figures are unavailable: {e}"))
        .ok();
    let mut tick = tokio::time::interval(Duration::from_secs(shared.config.heartbeat_interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        if let Some(system) = system.as_mut() {
            system.refresh_memory();
        }
        let memory_mb = |f: fn(&sysinfo::System) -> u64| system.as_ref().map_or(0, |s| f(s) / (1024 * 1024));
        let (disk_total, disk_free) = rustix::fs::statvfs(data_dir.as_path())
            .map(|s| (s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize))
            .unwrap_or((0, 0));
        let hb = Heartbeat {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: started.elapsed().as_secs(),
            resources: NodeResources {
                cpu_cores: std::thread::available_parallelism()
                    .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
                    .unwrap_or(0),
                load_1m_milli: sysinfo::System::load_average()
                    .map_or(0, |l| (l.one.max(0.0) * 1000.0).round() as u64),
                memory_total_mb: memory_mb(sysinfo::System::total_memory),
                memory_available_mb: memory_mb(sysinfo::System::available_memory),
                disk_total_mb: disk_total / (1024 * 1024),
                disk_free_mb: disk_free / (1024 * 1024),
            },
            servers: manager
                .list()
                .iter()
                .map(|s| HeartbeatServer {
                    server_id: s.id.to_string(),
                    state: serde_json::to_value(s.state())
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                })
                .collect(),
        };
        let sent = shared
            .client
            .post(shared.url(HEARTBEAT_PATH))
            .timeout(Duration::from_secs(shared.config.request_timeout_secs))
            .json(&hb)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                if failing {
                    tracing::info!("heartbeats reach the panel again");
                }
                failing = false;
            }
            other => {
                if !failing {
                    let why = match other {
                        Ok(r) => format!("status {}", r.status()),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(panel = %shared.identity.record.panel_url, error = %why, "heartbeat failed; retrying every interval");
                }
                failing = true;
            }
        }
    }
}

// ---- samples ----

/// What the previous sample of a server saw, for the egress delta.
#[derive(Debug, Default)]
struct Previous {
    run_key: String,
    tx_bytes: u64,
}

/// Bytes sent since the previous sample of the same container run; a new run (restart, a
/// new container) counts from zero, so counter resets never make egress negative or double.
fn egress_delta(previous: Option<&Previous>, run_key: &str, tx_bytes: u64) -> u64 {
    match previous {
        Some(p) if p.run_key == run_key => tx_bytes.saturating_sub(p.tx_bytes),
        _ => tx_bytes,
    }
}

async fn sampler(shared: Arc<Shared>, manager: Arc<Manager>) {
    let mut previous: HashMap<String, Previous> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(shared.config.sample_interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let servers = manager.list();
        let snapshots: Vec<_> = futures_util::stream::iter(servers)
            .map(|server| async move {
                let at = now_ms();
                let snapshot = server.snapshot().await;
                (server.id.to_string(), at, snapshot)
            })
            .buffer_unordered(PARALLEL_SAMPLES)
            .collect()
            .await;
        let mut samples = Vec::with_capacity(snapshots.len());
        let mut seen = std::collections::HashSet::new();
        for (id, at, snapshot) in snapshots {
            seen.insert(id.clone());
            let sample = match &snapshot.run {
                Some(run) => {
                    let egress = egress_delta(previous.get(&id), &run.run_key, run.tx_bytes);
                    previous.insert(
                        id.clone(),
                        Previous {
                            run_key: run.run_key.clone(),
                            tx_bytes: run.tx_bytes,
                        },
                    );
                    MetricSample {
                        server_id: id,
                        sampled_at_ms: at,
                        cpu_millicores: run.cpu_millicores,
                        memory_mb: run.memory_bytes / (1024 * 1024),
                        egress_bytes: egress,
                        disk_bytes: snapshot.disk_bytes,
                        uptime_s: run.uptime_ms / 1000,
                    }
                }
                None => {
                    previous.remove(&id);
                    MetricSample {
                        server_id: id,
                        sampled_at_ms: at,
                        cpu_millicores: 0,
                        memory_mb: 0,
                        egress_bytes: 0,
                        disk_bytes: snapshot.disk_bytes,
                        uptime_s: 0,
                    }
                }
            };
            samples.push(sample);
        }
        previous.retain(|id, _| seen.contains(id));
        samples.sort_by(|a, b| (a.sampled_at_ms, &a.server_id).cmp(&(b.sampled_at_ms, &b.server_id)));
        for chunk in samples.chunks(SAMPLES_PER_RECORD) {
            shared
                .enqueue(RecordBody::Metrics {
                    batch: MetricsBatch {
                        samples: chunk.to_vec(),
                    },
                })
                .await;
        }
    }
}

// ---- events ----

async fn forward_events(shared: Arc<Shared>, mut rx: broadcast::Receiver<NodeEvent>) {
    loop {
        let first = match rx.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    lost = n,
                    "server events came faster than the outbox took them; some are lost"
                );
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        // Whatever else is already waiting goes in the same record.
        let events = drain(first, &mut rx, MAX_EVENTS_PER_BATCH, "server events");
        shared
            .enqueue(RecordBody::Events {
                batch: EventsBatch { events },
            })
            .await;
    }
}

// ---- activity ----

/// Takes what is waiting on `rx` after `first`, up to `max` in all.
fn drain<T: Clone>(first: T, rx: &mut broadcast::Receiver<T>, max: usize, what: &str) -> Vec<T> {
    let mut items = vec![first];
    while items.len() < max {
        match rx.try_recv() {
            Ok(item) => items.push(item),
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                tracing::warn!(
                    lost = n,
                    "{what} came faster than the outbox took them; some are lost"
                );
            }
            Err(_) => break,
        }
    }
    items
}

async fn forward_activity(shared: Arc<Shared>, mut rx: broadcast::Receiver<ActivityEntry>) {
    loop {
        let first = match rx.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    lost = n,
                    "activity came faster than the outbox took it; some is lost"
                );
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        // Whatever else is already waiting goes in the same record: one fsync for a burst.
        let entries = drain(first, &mut rx, MAX_ACTIVITY_PER_BATCH, "activity entries");
        shared
            .enqueue(RecordBody::Activity {
                batch: ActivityBatch { entries },
            })
            .await;
    }
}

// ---- delivery ----

/// What became of one delivery attempt.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    /// The panel has it (or refused it for good): drop it from the outbox.
    Done,
    /// Try again later.
    Retry(String),
}

fn classify(status: reqwest::StatusCode) -> Delivery {
    if status.is_success() {
        return Delivery::Done;
    }
    match status.as_u16() {
        // The panel will never take it (a server of another node, a malformed record):
        // keeping it would block everything behind it.
        400 | 403 | 404 | 409 | 413 | 422 => Delivery::Done,
        // 401 (certificate not admitted right now), 408, 429 and 5xx may pass later.
        _ => Delivery::Retry(format!("status {status}")),
    }
}

async fn deliver(shared: &Shared, record: &Record) -> Delivery {
    let request = match &record.body {
        RecordBody::Metrics { batch } => shared.client.post(shared.url(METRICS_PATH)).json(batch),
        RecordBody::Events { batch } => shared.client.post(shared.url(EVENTS_PATH)).json(batch),
        RecordBody::Activity { batch } => shared.client.post(shared.url(ACTIVITY_PATH)).json(batch),
    };
    let sent = request
        .timeout(Duration::from_secs(shared.config.request_timeout_secs))
        .header("x-mamba-record-id", record.id.as_str())
        .send()
        .await;
    match sent {
        Ok(r) => {
            let status = r.status();
            let verdict = classify(status);
            if verdict == Delivery::Done && !status.is_success() {
                let answer: String = r.text().await.unwrap_or_default().chars().take(300).collect();
                tracing::warn!(record = %record.id, %status, %answer, "the panel refused a report for good; dropped");
            }
            verdict
        }
        Err(e) => Delivery::Retry(e.to_string()),
    }
}

async fn sender(shared: Arc<Shared>) {
    let mut backoff = Duration::from_secs(1);
    let max = Duration::from_secs(shared.config.retry_max_secs);
    let mut failing = false;
    loop {
        let s = shared.clone();
        let pending = tokio::task::spawn_blocking(move || {
            let outbox = s.outbox.lock().unwrap_or_else(|p| p.into_inner());
            outbox.pending(SEND_CHUNK)
        })
        .await;
        let (seq, pending) = match pending {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the outbox");
                tokio::time::sleep(max).await;
                continue;
            }
            Err(_) => continue,
        };
        if pending.is_empty() {
            // Woken by the next append; a permit stored meanwhile makes this return at once.
            shared.wake.notified().await;
            continue;
        }
        let mut retry = None;
        for record in pending {
            if let Some(record) = &record {
                match deliver(&shared, record).await {
                    Delivery::Done => {}
                    Delivery::Retry(why) => {
                        retry = Some(why);
                        break;
                    }
                }
            }
            let s = shared.clone();
            let acked = tokio::task::spawn_blocking(move || {
                s.outbox.lock().unwrap_or_else(|p| p.into_inner()).ack(seq)
            })
            .await;
            if let Ok(Err(e)) = acked {
                tracing::error!(error = %e, "cannot remove a delivered outbox segment");
            }
        }
        match retry {
            Some(why) => {
                if !failing {
                    tracing::warn!(error = %why, "the panel is unreachable; reports wait in the outbox");
                }
                failing = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max);
            }
            None => {
                if failing {
                    let left = shared.outbox.lock().unwrap_or_else(|p| p.into_inner()).stats();
                    tracing::info!(
                        records_left = left.records,
                        "the panel is reachable again; delivering the outbox"
                    );
                }
                failing = false;
                backoff = Duration::from_secs(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_is_a_delta_within_one_run_and_restarts_count_from_zero() {
        let p = Previous {
            run_key: "c1@1".into(),
            tx_bytes: 1000,
        };
        assert_eq!(egress_delta(Some(&p), "c1@1", 1500), 500);
        // A counter that went backwards within the same key never goes negative.
        assert_eq!(egress_delta(Some(&p), "c1@1", 10), 0);
        // A new run: everything it sent so far is new.
        assert_eq!(egress_delta(Some(&p), "c2@9", 300), 300);
        assert_eq!(egress_delta(None, "c1@1", 42), 42);
    }

    #[test]
    fn final_refusals_are_dropped_and_the_rest_retried() {
        use reqwest::StatusCode;
        assert_eq!(classify(StatusCode::OK), Delivery::Done);
        assert_eq!(classify(StatusCode::FORBIDDEN), Delivery::Done);
        assert_eq!(classify(StatusCode::BAD_REQUEST), Delivery::Done);
        assert!(matches!(classify(StatusCode::UNAUTHORIZED), Delivery::Retry(_)));
        assert!(matches!(
            classify(StatusCode::SERVICE_UNAVAILABLE),
            Delivery::Retry(_)
        ));
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS),
            Delivery::Retry(_)
        ));
    }
}

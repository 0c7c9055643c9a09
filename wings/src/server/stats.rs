//! A server's resource figures, sampled from Docker only while someone is watching: a
//! console socket, or a `GET /resources` request. The sampler stops a while after the last
//! watcher leaves, so idle servers cost the engine nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mamba_shared::wings_api::{NetworkStats, ResourceStats};
use tokio::sync::watch;

use super::Server;
use crate::docker::ResourceSample;

/// How long the sampler outlives its last watcher, so a page reload does not restart it.
const LINGER: Duration = Duration::from_secs(30);

/// A server's figures at one instant, for the reporter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub disk_bytes: u64,
    /// While a container runs.
    pub run: Option<RunSnapshot>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSnapshot {
    /// Changes when the container (and so its network counters) starts afresh.
    pub run_key: String,
    pub cpu_millicores: u64,
    pub memory_bytes: u64,
    /// The container's transmit counter since it started.
    pub tx_bytes: u64,
    pub uptime_ms: u64,
}

#[derive(Debug)]
pub struct Stats {
    tx: watch::Sender<Option<ResourceStats>>,
    sampling: AtomicBool,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            tx: watch::channel(None).0,
            sampling: AtomicBool::new(false),
        }
    }
}

impl Server {
    /// Receives the server's stats about every `websocket.stats_interval_ms`.
    pub fn watch_stats(self: &Arc<Self>) -> watch::Receiver<Option<ResourceStats>> {
        let rx = self.stats.tx.subscribe();
        if !self.stats.sampling.swap(true, Ordering::SeqCst) {
            tokio::spawn(self.clone().sample_stats());
        }
        rx
    }

    /// The latest figures, waiting briefly for a first sample when nobody was watching.
    pub async fn resources(self: &Arc<Self>) -> ResourceStats {
        let mut rx = self.watch_stats();
        let first = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|stats| stats.clone()));
        match first {
            Some(stats) => stats,
            None => self.idle_stats(self.disk_bytes().await),
        }
    }

    fn idle_stats(&self, disk_bytes: u64) -> ResourceStats {
        let state = self.state();
        ResourceStats {
            state,
            cpu_absolute: 0.0,
            memory_bytes: 0,
            memory_limit_bytes: self.spec().limits.memory_mb * 1024 * 1024,
            network: NetworkStats::default(),
            disk_bytes,
            uptime_ms: 0,
        }
    }

    async fn sample_stats(self: Arc<Self>) {
        let interval = Duration::from_millis(self.ctx.config.websocket.stats_interval_ms.max(100));
        let mut last_watched = Instant::now();
        let mut state_rx = self.subscribe_state();
        loop {
            if self.deleted.is_cancelled() {
                break;
            }
            if self.stats.tx.receiver_count() > 0 {
                last_watched = Instant::now();
            } else if last_watched.elapsed() > LINGER {
                self.stats.sampling.store(false, Ordering::SeqCst);
                // A watcher may have arrived between the check and the store.
                if self.stats.tx.receiver_count() == 0 || self.stats.sampling.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
            let container = self.with_record(|r| r.container_id.clone());
            let running = match (&container, self.state().is_up()) {
                (Some(id), true) => self
                    .ctx
                    .docker
                    .status(id)
                    .await
                    .ok()
                    .flatten()
                    .filter(|s| s.running),
                _ => None,
            };
            let Some(status) = running else {
                let idle = self.idle_stats(self.disk_bytes().await);
                self.stats.tx.send_replace(Some(idle));
                tokio::select! {
                    _ = state_rx.changed() => {}
                    () = tokio::time::sleep(interval) => {}
                    () = self.deleted.cancelled() => break,
                }
                continue;
            };
            let mut samples = Box::pin(self.ctx.docker.stats(&status.id));
            let mut published: Option<Instant> = None;
            loop {
                let sample = tokio::select! {
                    s = samples.next() => s,
                    () = self.deleted.cancelled() => None,
                    () = tokio::time::sleep(interval * 3) => None,
                };
                let Some(Ok(sample)) = sample else { break };
                if !self.state().is_up() {
                    break;
                }
                if published.is_none_or(|t| t.elapsed() + Duration::from_millis(200) >= interval) {
                    published = Some(Instant::now());
                    let disk_bytes = self.disk_bytes().await;
                    self.stats.tx.send_replace(Some(self.running_stats(
                        sample,
                        disk_bytes,
                        status.started_at_ms,
                    )));
                }
                if self.stats.tx.receiver_count() == 0 && last_watched.elapsed() > LINGER {
                    break;
                }
                if self.stats.tx.receiver_count() > 0 {
                    last_watched = Instant::now();
                }
            }
        }
        self.stats.sampling.store(false, Ordering::SeqCst);
    }

    fn running_stats(
        &self,
        sample: ResourceSample,
        disk_bytes: u64,
        started_at_ms: Option<u64>,
    ) -> ResourceStats {
        let uptime_ms = started_at_ms.map_or(0, |t| super::now_ms().saturating_sub(t));
        ResourceStats {
            state: self.state(),
            cpu_absolute: sample.cpu_absolute,
            memory_bytes: sample.memory_bytes,
            memory_limit_bytes: sample.memory_limit_bytes,
            network: NetworkStats {
                rx_bytes: sample.rx_bytes,
                tx_bytes: sample.tx_bytes,
            },
            disk_bytes,
            uptime_ms,
        }
    }

    /// A one-off reading for the reporter, independent of the console's sampler: `None`
    /// figures while the server has no running container.
    pub async fn snapshot(self: &Arc<Self>) -> Snapshot {
        let disk_bytes = self.disk_bytes().await;
        let container = self.with_record(|r| r.container_id.clone());
        let running = match (&container, self.state().is_up()) {
            (Some(id), true) => self
                .ctx
                .docker
                .status(id)
                .await
                .ok()
                .flatten()
                .filter(|s| s.running),
            _ => None,
        };
        let Some(status) = running else {
            return Snapshot {
                disk_bytes,
                run: None,
            };
        };
        let sample = self.ctx.docker.stats_once(&status.id).await.ok().flatten();
        Snapshot {
            disk_bytes,
            run: sample.map(|sample| RunSnapshot {
                // The container and its start identify one run of the network counter.
                run_key: format!("{}@{}", status.id, status.started_at_ms.unwrap_or(0)),
                cpu_millicores: (sample.cpu_absolute.max(0.0) * 10.0).round() as u64,
                memory_bytes: sample.memory_bytes,
                tx_bytes: sample.tx_bytes,
                uptime_ms: status
                    .started_at_ms
                    .map_or(0, |t| super::now_ms().saturating_sub(t)),
            }),
        }
    }

    /// The size of the server's files, as the quota counts them (kept current by every write
    /// through wings and by the periodic disk check).
    async fn disk_bytes(&self) -> u64 {
        self.files().used_bytes()
    }
}

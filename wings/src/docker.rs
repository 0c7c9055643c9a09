//! The Docker engine, through bollard. This is the only module that talks to Docker.
//!
//! Containers wings manages carry the labels below; wings only ever lists, reattaches to or
//! removes containers whose `mamba.data-dir` label is its own data folder, so two wings
//! sharing one engine (as the tests do) never touch each other's containers.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::container::{AttachContainerResults, LogOutput};
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, NetworkCreateRequest};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, EventsOptionsBuilder,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StatsOptionsBuilder,
};
use futures_util::StreamExt;

use crate::config::DockerConfig;

pub const LABEL_MANAGED: &str = "mamba.managed";
pub const LABEL_DATA_DIR: &str = "mamba.data-dir";
pub const LABEL_SERVER: &str = "mamba.server";
pub const LABEL_KIND: &str = "mamba.kind";

/// How long after a SIGKILL exit wings waits for Docker's `oom` event. containerd can publish
/// the OOM after the exit, and then `docker inspect` says `OOMKilled: false`.
const OOM_EVENT_GRACE: Duration = Duration::from_secs(2);
/// The exit code of a process killed by SIGKILL, which is how the OOM killer ends it.
const SIGKILL_EXIT_CODE: i64 = 128 + 9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerKind {
    Server,
    Install,
}

impl ContainerKind {
    pub fn label(self) -> &'static str {
        match self {
            ContainerKind::Server => "server",
            ContainerKind::Install => "install",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("docker: {0}")]
    Api(#[from] BollardError),
    #[error("docker did not answer within {0:?}")]
    Timeout(Duration),
}

impl DockerError {
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            DockerError::Api(BollardError::DockerResponseServerError { status_code: 404, .. })
        )
    }

    /// Docker answers 304 or 409 when a container is already stopped or not running.
    pub fn is_not_running(&self) -> bool {
        matches!(
            self,
            DockerError::Api(BollardError::DockerResponseServerError {
                status_code: 304 | 409,
                ..
            })
        )
    }
}

/// What wings needs to know about one of its containers.
#[derive(Debug, Clone)]
pub struct ManagedContainer {
    pub id: String,
    pub server: String,
    pub kind: Option<ContainerKind>,
    pub running: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: i64,
    pub oom_killed: bool,
}

#[derive(Debug, Clone)]
pub struct ContainerStatus {
    pub id: String,
    pub running: bool,
    pub exit: ExitStatus,
    /// When the current (or last) run started, in Unix milliseconds.
    pub started_at_ms: Option<u64>,
    /// The container's address on each network it joined.
    pub addresses: HashMap<String, String>,
}

/// One resource sample of a running container.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResourceSample {
    /// Percent of one core.
    pub cpu_absolute: f64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl ResourceSample {
    fn from_stats(stats: &bollard::models::ContainerStatsResponse) -> ResourceSample {
        let total = |c: &Option<bollard::models::ContainerCpuStats>| {
            let c = c.as_ref();
            (
                c.and_then(|c| c.cpu_usage.as_ref()?.total_usage).unwrap_or(0),
                c.and_then(|c| c.system_cpu_usage).unwrap_or(0),
            )
        };
        let (cpu, system) = total(&stats.cpu_stats);
        let (pre_cpu, pre_system) = total(&stats.precpu_stats);
        let cpus = stats
            .cpu_stats
            .as_ref()
            .and_then(|c| c.online_cpus)
            .filter(|&n| n > 0)
            .unwrap_or(1);
        let cpu_delta = cpu.saturating_sub(pre_cpu) as f64;
        let system_delta = system.saturating_sub(pre_system) as f64;
        let cpu_absolute = if pre_system > 0 && system_delta > 0.0 {
            cpu_delta / system_delta * f64::from(cpus) * 100.0
        } else {
            0.0
        };
        let memory = stats.memory_stats.as_ref();
        // Page cache the kernel can reclaim is not the game's memory (cgroup v1 and v2 names).
        let inactive_file = memory
            .and_then(|m| m.stats.as_ref())
            .and_then(|s| {
                s.get("total_inactive_file")
                    .or_else(|| s.get("inactive_file"))
                    .copied()
            })
            .unwrap_or(0);
        let memory_bytes = memory
            .and_then(|m| m.usage)
            .unwrap_or(0)
            .saturating_sub(inactive_file);
        let (rx_bytes, tx_bytes) = stats.networks.iter().flatten().fold((0, 0), |(rx, tx), (_, n)| {
            (rx + n.rx_bytes.unwrap_or(0), tx + n.tx_bytes.unwrap_or(0))
        });
        ResourceSample {
            cpu_absolute: (cpu_absolute * 1000.0).round() / 1000.0,
            memory_bytes,
            memory_limit_bytes: memory.and_then(|m| m.limit).unwrap_or(0),
            rx_bytes,
            tx_bytes,
        }
    }
}

/// Docker repeats the same warning for every container (for example that the kernel has no
/// block-I/O weight); an operator needs to see each one once.
fn warn_once(warning: &str) {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if !seen.iter().any(|w| w == warning) {
        tracing::warn!("docker warned: {warning}");
        seen.push(warning.to_string());
    }
}

#[derive(Clone)]
pub struct DockerClient {
    docker: Docker,
    timeout: Duration,
}

impl std::fmt::Debug for DockerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerClient")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl DockerClient {
    pub async fn connect(config: &DockerConfig) -> Result<DockerClient, DockerError> {
        let timeout = Duration::from_secs(config.timeout_secs.max(1));
        let docker =
            Docker::connect_with_unix(&config.socket, timeout.as_secs(), bollard::API_DEFAULT_VERSION)?;
        // The engine may speak an older API than bollard's default (Debian's 20.10 speaks 1.41).
        let docker = docker.negotiate_version().await?;
        Ok(DockerClient { docker, timeout })
    }

    async fn timed<T>(&self, fut: impl Future<Output = Result<T, BollardError>>) -> Result<T, DockerError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(DockerError::from),
            Err(_) => Err(DockerError::Timeout(self.timeout)),
        }
    }

    /// Creates the shared game network if it is missing.
    pub async fn ensure_network(&self, name: &str, inter_container_traffic: bool) -> Result<(), DockerError> {
        match self.timed(self.docker.inspect_network(name, None)).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        let mut options = HashMap::new();
        options.insert(
            "com.docker.network.bridge.enable_icc".to_string(),
            inter_container_traffic.to_string(),
        );
        let mut labels = HashMap::new();
        labels.insert(LABEL_MANAGED.to_string(), "true".to_string());
        let request = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            options: Some(options),
            labels: Some(labels),
            ..Default::default()
        };
        let created = match self.timed(self.docker.create_network(request)).await {
            Ok(created) => created.id,
            // Another wings on this engine created it at the same moment.
            Err(DockerError::Api(BollardError::DockerResponseServerError { status_code: 409, .. })) => {
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // Engines before API 1.44 let two creations race to two networks of one name, which
        // makes the name ambiguous. Every racer keeps the same one (the smallest id).
        let mut filters = HashMap::new();
        filters.insert("name".to_string(), vec![name.to_string()]);
        let options = ListNetworksOptionsBuilder::new().filters(&filters).build();
        let mut same_name: Vec<String> = self
            .timed(self.docker.list_networks(Some(options)))
            .await?
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(name))
            .filter_map(|n| n.id)
            .collect();
        same_name.sort();
        if same_name.len() > 1 && same_name.first() != Some(&created) {
            match self.timed(self.docker.remove_network(&created)).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub async fn image_exists(&self, image: &str) -> Result<bool, DockerError> {
        match self.timed(self.docker.inspect_image(image)).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn create(&self, name: &str, body: ContainerCreateBody) -> Result<String, DockerError> {
        let options = CreateContainerOptionsBuilder::new().name(name).build();
        let created = self
            .timed(self.docker.create_container(Some(options), body))
            .await?;
        for warning in created.warnings {
            warn_once(&warning);
        }
        Ok(created.id)
    }

    /// Attaches to stdin, stdout and stderr. Call before `start` to miss no output.
    pub async fn attach(&self, id: &str) -> Result<AttachContainerResults, DockerError> {
        let options = AttachContainerOptionsBuilder::new()
            .stream(true)
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .logs(false)
            .build();
        self.timed(self.docker.attach_container(id, Some(options))).await
    }

    pub async fn start(&self, id: &str) -> Result<(), DockerError> {
        self.timed(self.docker.start_container(id, None)).await
    }

    /// Sends a signal; a container that is not running is not an error.
    pub async fn signal(&self, id: &str, signal: &str) -> Result<(), DockerError> {
        let options = KillContainerOptionsBuilder::new().signal(signal).build();
        match self.timed(self.docker.kill_container(id, Some(options))).await {
            Err(e) if e.is_not_running() || e.is_not_found() => Ok(()),
            other => other,
        }
    }

    /// Force-removes a container; a missing one is not an error.
    pub async fn remove(&self, id_or_name: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
        match self
            .timed(self.docker.remove_container(id_or_name, Some(options)))
            .await
        {
            Err(e) if e.is_not_found() => Ok(()),
            // 409: removal already in progress.
            Err(DockerError::Api(BollardError::DockerResponseServerError { status_code: 409, .. })) => Ok(()),
            other => other,
        }
    }

    pub async fn status(&self, id_or_name: &str) -> Result<Option<ContainerStatus>, DockerError> {
        let inspected = match self.timed(self.docker.inspect_container(id_or_name, None)).await {
            Ok(c) => c,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let state = inspected.state.unwrap_or_default();
        let started_at_ms = state
            .started_at
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .filter(|&ms| ms > 0);
        let addresses = inspected
            .network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(name, endpoint)| Some((name, endpoint.ip_address.filter(|ip| !ip.is_empty())?)))
            .collect();
        Ok(Some(ContainerStatus {
            id: inspected.id.unwrap_or_default(),
            running: state.running.unwrap_or(false),
            exit: ExitStatus {
                code: state.exit_code.unwrap_or(-1),
                oom_killed: state.oom_killed.unwrap_or(false),
            },
            started_at_ms,
            addresses,
        }))
    }

    /// Resolves when the container stops, with its exit status. No timeout: it waits as long
    /// as the game runs. After a SIGKILL exit that Docker does not (yet) call an OOM kill, it
    /// waits briefly for a late `oom` event, unless `kill_unexplained()` says wings sent the
    /// kill itself.
    pub async fn wait_exit(
        &self,
        id: &str,
        kill_unexplained: impl FnOnce() -> bool,
    ) -> Result<ExitStatus, DockerError> {
        let mut stream = self.docker.wait_container(id, None);
        // bollard reports a non-zero exit as an error; either way the container has stopped.
        match stream.next().await {
            Some(Ok(_)) | Some(Err(BollardError::DockerContainerWaitError { .. })) | None => {}
            Some(Err(e)) => return Err(e.into()),
        }
        let Some(status) = self.status(id).await? else {
            return Ok(ExitStatus {
                code: -1,
                oom_killed: false,
            });
        };
        let mut exit = status.exit;
        if exit.code == SIGKILL_EXIT_CODE && !exit.oom_killed && kill_unexplained() {
            exit.oom_killed = self.oom_event_since(id, status.started_at_ms.unwrap_or(0)).await;
        }
        Ok(exit)
    }

    /// Whether Docker published an `oom` event for the container since `since_ms`, waiting
    /// up to [`OOM_EVENT_GRACE`] for one that is late. Docker replays recent events from
    /// memory, so one published before this call is seen as well.
    pub async fn oom_event_since(&self, id: &str, since_ms: u64) -> bool {
        let until = std::time::SystemTime::now() + OOM_EVENT_GRACE;
        let until_ms = until
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let seconds = |ms: u128| format!("{}.{:03}", ms / 1000, ms % 1000);
        let filters = HashMap::from([
            ("container", vec![id]),
            ("type", vec!["container"]),
            ("event", vec!["oom"]),
        ]);
        let options = EventsOptionsBuilder::default()
            .since(&seconds(u128::from(since_ms)))
            .until(&seconds(until_ms))
            .filters(&filters)
            .build();
        let mut events = self.docker.events(Some(options));
        // Docker closes the stream at `until`; the timeout covers an engine that does not.
        match tokio::time::timeout(OOM_EVENT_GRACE + self.timeout, events.next()).await {
            Ok(Some(Ok(_))) => true,
            Ok(Some(Err(e))) => {
                tracing::warn!(container = id, error = %e, "could not read Docker's events for an OOM kill");
                false
            }
            Ok(None) | Err(_) => false,
        }
    }

    /// What the container printed after `after_ns` and up to `until_ns` (Unix nanoseconds),
    /// from Docker's own log, as raw bytes; only the last `max_bytes` are kept.
    pub async fn output_between(
        &self,
        id: &str,
        after_ns: u64,
        until_ns: u64,
        max_bytes: usize,
    ) -> Result<Vec<u8>, DockerError> {
        let since = i32::try_from(after_ns / 1_000_000_000).unwrap_or(i32::MAX);
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .timestamps(true)
            .since(since)
            .build();
        let mut kept: std::collections::VecDeque<bytes::Bytes> = std::collections::VecDeque::new();
        let mut kept_bytes = 0;
        let mut stream = self.docker.logs(id, Some(options));
        let read = async {
            while let Some(item) = stream.next().await {
                let (LogOutput::StdOut { message }
                | LogOutput::StdErr { message }
                | LogOutput::Console { message }) = item?
                else {
                    continue;
                };
                // Each entry starts with its RFC 3339 timestamp and a space.
                let Some(space) = message.iter().position(|&b| b == b' ') else {
                    continue;
                };
                let stamp = std::str::from_utf8(&message[..space])
                    .ok()
                    .and_then(|t| humantime::parse_rfc3339(t).ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos() as u64);
                if stamp.is_none_or(|t| t <= after_ns || t > until_ns) {
                    continue;
                }
                let line = message.slice(space + 1..);
                kept_bytes += line.len();
                kept.push_back(line);
                while kept_bytes > max_bytes {
                    match kept.pop_front() {
                        Some(old) => kept_bytes -= old.len(),
                        None => break,
                    }
                }
            }
            Ok::<(), DockerError>(())
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| DockerError::Timeout(self.timeout))??;
        Ok(kept.into_iter().flatten().collect())
    }

    /// Docker's resource samples of a running container, about one a second, until it stops.
    pub fn stats(
        &self,
        id: &str,
    ) -> impl futures_util::Stream<Item = Result<ResourceSample, DockerError>> + use<> {
        let options = StatsOptionsBuilder::new().stream(true).build();
        self.docker.stats(id, Some(options)).map(|s| {
            s.map(|s| ResourceSample::from_stats(&s))
                .map_err(DockerError::from)
        })
    }

    /// One stats reading (Docker takes two readings a second apart to compute CPU).
    pub async fn stats_once(&self, id: &str) -> Result<Option<ResourceSample>, DockerError> {
        let options = StatsOptionsBuilder::new().stream(false).one_shot(false).build();
        let mut stream = self.docker.stats(id, Some(options));
        let first = self
            .timed(async { Ok::<_, BollardError>(stream.next().await) })
            .await?;
        match first {
            Some(Ok(s)) => Ok(Some(ResourceSample::from_stats(&s))),
            Some(Err(e)) => Err(DockerError::from(e)),
            None => Ok(None),
        }
    }

    pub async fn list_managed(&self, data_dir: &str) -> Result<Vec<ManagedContainer>, DockerError> {
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_DATA_DIR}={data_dir}"),
            ],
        );
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let list = self.timed(self.docker.list_containers(Some(options))).await?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                let kind = match labels.get(LABEL_KIND).map(String::as_str) {
                    Some("server") => Some(ContainerKind::Server),
                    Some("install") => Some(ContainerKind::Install),
                    _ => None,
                };
                Some(ManagedContainer {
                    id: c.id?,
                    server: labels.get(LABEL_SERVER).cloned().unwrap_or_default(),
                    kind,
                    running: matches!(c.state, Some(bollard::models::ContainerSummaryStateEnum::RUNNING)),
                })
            })
            .collect())
    }

    pub async fn info(&self) -> Result<mamba_shared::wings_api::DockerInfo, DockerError> {
        let info = self.timed(self.docker.info()).await?;
        Ok(mamba_shared::wings_api::DockerInfo {
            version: info.server_version.unwrap_or_default(),
            api_version: self.docker.client_version().to_string(),
            storage_driver: info.driver.unwrap_or_default(),
            cgroup_version: info.cgroup_version.map(|v| v.to_string()).unwrap_or_default(),
            containers_running: info.containers_running.unwrap_or(0),
        })
    }
}

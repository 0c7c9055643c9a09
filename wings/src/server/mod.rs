//! One game server: its state machine, its power queue and its containers.
//!
//! Each server has one actor task that owns every change to its containers. Power actions,
//! installs, container exits and deletion are all jobs in that actor's queue, so they run
//! one at a time and in order; none is dropped. Kill is the exception that always goes
//! through at once: the API signals the container directly and then queues the kill too,
//! so a stop waiting for its timeout ends as soon as the container is gone.

pub mod console;
pub mod crash_guard;
pub mod manager;
pub mod spec;
pub mod stats;
pub mod store;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::container::LogOutput;
use futures_util::{Stream, StreamExt};
use mamba_shared::blueprint::ConsoleSpec;
use mamba_shared::ids::ServerId;
use mamba_shared::wings_api::{
    CrashInfo, ExitInfo, InstallInfo, InstallStatus, PowerAction, ServerState, ServerView,
};
use regex::Regex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use self::console::{Console, ConsoleEvent, ConsoleLimits, LineSplitter};
use self::crash_guard::{CrashGuard, Verdict};
use self::spec::ServerSpec;
use self::store::{Desired, ServerRecord};
use crate::config::Config;
use crate::docker::{DockerClient, DockerError, ExitStatus};
use crate::files::ServerFs;
use crate::rcon::{RconClient, RconError};

/// What every server shares: configuration and the Docker client.
#[derive(Debug)]
pub struct Context {
    pub config: Config,
    pub docker: DockerClient,
    /// Server events for the panel (crashes, restarts, installs). Sending never blocks: the
    /// reporter subscribes once enrolled, and without it events are not kept.
    pub reports: tokio::sync::broadcast::Sender<mamba_shared::node_api::NodeEvent>,
    /// Activity on servers' files (`crate::activity`), for the panel, the same way.
    pub activity: tokio::sync::broadcast::Sender<mamba_shared::activity::ActivityEntry>,
}

impl Context {
    pub fn servers_dir(&self) -> PathBuf {
        self.config.system.data_dir.join("servers")
    }

    pub fn volumes_dir(&self) -> PathBuf {
        self.config.system.data_dir.join("volumes")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("the server is not running")]
    NotRunning,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Rcon(#[from] RconError),
}

enum Job {
    Recover,
    Power(PowerAction),
    Install { reinstall: bool },
    Exited { generation: u64, status: ExitStatus },
    Delete(oneshot::Sender<Result<(), String>>),
    WhileStopped(StoppedWork, oneshot::Sender<Result<(), String>>),
}

/// Work on a server's files that needs the game stopped (a restore). It runs as a job in the
/// actor's queue, so no power action interleaves with it.
pub type StoppedWork = Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// The container run the server is on, so a stop can wait for exactly its exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    None,
    Running(u64),
    Exited(u64),
}

type Stdin = Pin<Box<dyn AsyncWrite + Send>>;

pub struct Server {
    pub id: ServerId,
    ctx: Arc<Context>,
    record: Mutex<ServerRecord>,
    persist_lock: Mutex<()>,
    state_tx: watch::Sender<ServerState>,
    pub console: Console,
    jobs: mpsc::UnboundedSender<Job>,
    queued: AtomicUsize,
    stdin: tokio::sync::Mutex<Option<Stdin>>,
    run_tx: watch::Sender<Run>,
    generation: AtomicU64,
    expecting_exit: AtomicBool,
    running_regex: Regex,
    state_dir: PathBuf,
    root_dir: PathBuf,
    files: ServerFs,
    /// Downloads from URLs into this server (`POST files/pull`).
    pub pulls: Arc<crate::files::pull::Pulls>,
    /// Open console sockets, limited by `websocket.max_sockets_per_server`.
    pub sockets: AtomicUsize,
    /// Cancelled when the server is deleted, so sockets and samplers let go of it.
    pub deleted: tokio_util::sync::CancellationToken,
    stats: stats::Stats,
    rcon: tokio::sync::Mutex<Option<RconClient>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("id", &self.id).finish()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Server {
    /// Builds the server and spawns its actor on the current (main) runtime.
    fn spawn(ctx: Arc<Context>, record: ServerRecord) -> Result<Arc<Server>, String> {
        let id = record.spec.id.clone();
        let running_regex = regex::RegexBuilder::new(&record.spec.blueprint.running.console_regex)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| format!("running.console_regex: {e}"))?;
        let state_dir = ctx.servers_dir().join(id.as_str());
        let root_dir = ctx.volumes_dir().join(id.as_str());
        let files = open_files(&ctx, &root_dir, &record.spec)
            .map_err(|e| format!("cannot open the server folder {}: {e}", root_dir.display()))?;
        let console = Console::open(
            &state_dir,
            ConsoleLimits {
                buffer_lines: ctx.config.console.buffer_lines,
                log_file_max_bytes: ctx.config.console.log_file_max_bytes,
                lines_per_second: ctx.config.console.lines_per_second,
            },
        );
        let (jobs, rx) = mpsc::unbounded_channel();
        let (state_tx, _) = watch::channel(record.state);
        let (run_tx, _) = watch::channel(Run::None);
        let server = Arc::new(Server {
            id,
            ctx,
            record: Mutex::new(record),
            persist_lock: Mutex::new(()),
            state_tx,
            console,
            jobs,
            queued: AtomicUsize::new(0),
            stdin: tokio::sync::Mutex::new(None),
            run_tx,
            generation: AtomicU64::new(0),
            expecting_exit: AtomicBool::new(false),
            running_regex,
            state_dir,
            root_dir,
            files,
            pulls: Arc::default(),
            sockets: AtomicUsize::new(0),
            deleted: tokio_util::sync::CancellationToken::new(),
            stats: stats::Stats::default(),
            rcon: tokio::sync::Mutex::new(None),
        });
        tokio::spawn(server.clone().actor(rx));
        tokio::spawn(Server::watch_disk(Arc::downgrade(&server)));
        Ok(server)
    }

    /// The server's files: every file operation on its folder goes through this.
    pub fn files(&self) -> &ServerFs {
        &self.files
    }

    /// Walks the server's folder every `files.disk_check_interval_secs` to correct its disk
    /// usage, and handles a running server found over its quota as `files.overfill_action`
    /// says. Ends when the server is deleted.
    async fn watch_disk(server: std::sync::Weak<Server>) {
        let (interval, deleted) = match server.upgrade() {
            Some(s) => (
                Duration::from_secs(s.ctx.config.files.disk_check_interval_secs),
                s.deleted.clone(),
            ),
            None => return,
        };
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = deleted.cancelled() => return,
            }
            let Some(server) = server.upgrade() else { return };
            let files = server.files.clone();
            let counted = tokio::task::spawn_blocking(move || files.recount()).await;
            match counted {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(server.id = %server.id, "cannot count the server's disk usage: {e}");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(server.id = %server.id, "disk count task failed: {e}");
                    continue;
                }
            }
            if server.files.over_quota() && server.state().is_up() {
                server.on_overfill();
            }
        }
    }

    fn on_overfill(self: &Arc<Self>) {
        use crate::config::OverfillAction;
        let (used, limit) = (self.files.used_bytes(), self.files.limit_bytes());
        let action = self.ctx.config.files.overfill_action;
        let what = match action {
            OverfillAction::Stop => "stopping the server",
            OverfillAction::Kill => "killing the server",
            OverfillAction::Report => "writes through wings are refused",
        };
        // Reported once per run: a stop in progress is not queued again.
        if self.expecting_exit.load(Ordering::SeqCst) && action != OverfillAction::Report {
            return;
        }
        let message = format!("Disk quota exceeded: {used} bytes used of {limit}; {what}");
        tracing::warn!(server.id = %self.id, used, limit, "disk quota exceeded from inside the container; {what}");
        self.console.daemon(&message);
        let result = match action {
            OverfillAction::Stop => self.power(PowerAction::Stop),
            OverfillAction::Kill => self.power(PowerAction::Kill),
            OverfillAction::Report => return,
        };
        if let Err(e) = result {
            tracing::warn!(server.id = %self.id, "cannot stop the server over its disk quota: {e}");
        }
    }

    pub fn state(&self) -> ServerState {
        *self.state_tx.borrow()
    }

    pub fn subscribe_state(&self) -> watch::Receiver<ServerState> {
        self.state_tx.subscribe()
    }

    fn with_record<T>(&self, f: impl FnOnce(&mut ServerRecord) -> T) -> T {
        let mut guard = match self.record.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    pub fn spec(&self) -> ServerSpec {
        self.with_record(|r| r.spec.clone())
    }

    /// Takes a new spec from the panel. The disk quota and the file denylist apply at once;
    /// what the container is made of (limits, variables, image) applies when it next starts,
    /// because a container is made afresh on every start. Returns whether it is running now,
    /// that is whether a restart is needed for all of the change to apply.
    pub fn replace_spec(&self, spec: ServerSpec) -> bool {
        self.files
            .set_limit(spec.limits.disk_mb.saturating_mul(1024 * 1024));
        self.files.set_denylist(&spec.blueprint.file_denylist);
        self.with_record(|r| r.spec = spec);
        self.persist();
        self.state().is_up()
    }

    pub fn view(&self) -> ServerView {
        let queued_actions = self.queued.load(Ordering::SeqCst);
        self.with_record(|r| ServerView {
            queued_actions,
            id: r.spec.id.clone(),
            blueprint: r.spec.blueprint.slug.clone(),
            state: r.state,
            install: r.install.clone(),
            limits: r.spec.limits,
            allocations: r.spec.allocations.clone(),
            image: r.spec.image.clone(),
            container_id: r.container_id.clone(),
            crash: r.crash.clone(),
            last_error: r.last_error.clone(),
        })
    }

    /// Writes the record; writes are serialised so an older snapshot never replaces a newer one.
    fn persist(&self) {
        let _guard = self.persist_lock.lock();
        let snapshot = self.with_record(|r| r.clone());
        if let Err(e) = store::save(&self.state_dir, &snapshot) {
            tracing::error!(server.id = %self.id, "cannot save the server's state: {e}");
        }
    }

    fn set_state(&self, state: ServerState) {
        self.with_record(|r| r.state = state);
        self.state_tx.send_replace(state);
        self.persist();
    }

    fn fail(&self, message: String) {
        tracing::warn!(server.id = %self.id, "{message}");
        self.console.daemon(&message);
        self.with_record(|r| r.last_error = Some(message));
    }

    fn enqueue(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }

    /// Queues a power action and returns how many actions are ahead of it.
    pub fn power(self: &Arc<Self>, action: PowerAction) -> Result<usize, ServerError> {
        if action == PowerAction::Start {
            let install = self.with_record(|r| r.install.status);
            match install {
                InstallStatus::Installed => {}
                InstallStatus::Failed => {
                    return Err(ServerError::Conflict(
                        "the install failed; reinstall the server first".into(),
                    ));
                }
                InstallStatus::Pending | InstallStatus::Installing => {
                    return Err(ServerError::Conflict("the server is still installing".into()));
                }
            }
        }
        if action == PowerAction::Kill {
            self.kill_now();
        }
        let ahead = self.queued.fetch_add(1, Ordering::SeqCst);
        if !self.enqueue(Job::Power(action)) {
            return Err(ServerError::Conflict("the server is being deleted".into()));
        }
        Ok(ahead)
    }

    /// Kill without waiting for the queue: the container dies now, the queued kill then
    /// settles the state.
    fn kill_now(self: &Arc<Self>) {
        self.expecting_exit.store(true, Ordering::SeqCst);
        self.with_record(|r| r.desired = Desired::Offline);
        let server = self.clone();
        tokio::spawn(async move {
            let names = [
                server.spec().container_name(),
                server.spec().install_container_name(),
            ];
            for name in names {
                if let Err(e) = server.ctx.docker.signal(&name, "SIGKILL").await
                    && !e.is_not_found()
                {
                    tracing::warn!(server.id = %server.id, "kill failed: {e}");
                }
            }
        });
    }

    pub fn reinstall(&self) -> Result<(), ServerError> {
        if self.with_record(|r| r.install.status) == InstallStatus::Installing {
            return Err(ServerError::Conflict("the server is already installing".into()));
        }
        self.enqueue(Job::Install { reinstall: true });
        Ok(())
    }

    /// Sends console commands, in order, to the game: over RCON when its blueprint says so,
    /// otherwise to its standard input.
    pub async fn send_commands(&self, commands: &[String]) -> Result<(), ServerError> {
        if !self.state().is_up() {
            return Err(ServerError::NotRunning);
        }
        let (stop_command, console) = self.with_record(|r| {
            (
                r.spec.blueprint.stop.command.clone(),
                r.spec.blueprint.console.clone(),
            )
        });
        for command in commands {
            // Typing the stop command is a stop, not a crash.
            if stop_command.as_deref() == Some(command.trim()) {
                self.expecting_exit.store(true, Ordering::SeqCst);
                self.with_record(|r| r.desired = Desired::Offline);
            }
        }
        if let ConsoleSpec::Rcon { .. } = console {
            for command in commands {
                let answer = self.rcon_exec(command).await?;
                // The answer is shown like the game's own output, with the same line limits.
                let mut splitter = LineSplitter::new(self.ctx.config.console.max_line_bytes);
                let mut lines = Vec::new();
                splitter.push(answer.as_bytes(), &mut lines);
                splitter.flush(&mut lines);
                self.console.push_output(&lines);
            }
            return Ok(());
        }
        let mut stdin = self.stdin.lock().await;
        let Some(writer) = stdin.as_mut() else {
            return Err(ServerError::NotRunning);
        };
        for command in commands {
            let mut line = command.clone().into_bytes();
            line.push(b'\n');
            writer
                .write_all(&line)
                .await
                .map_err(|e| ServerError::Failed(format!("cannot write to the console: {e}")))?;
        }
        writer
            .flush()
            .await
            .map_err(|e| ServerError::Failed(format!("cannot write to the console: {e}")))?;
        Ok(())
    }

    /// Runs one command over RCON, connecting first if needed. A connection that broke since
    /// the last command is replaced once; a command is never sent twice.
    async fn rcon_exec(&self, command: &str) -> Result<String, ServerError> {
        let mut connection = self.rcon.lock().await;
        let reused = connection.is_some();
        let mut client = match connection.take() {
            Some(client) => client,
            None => self.rcon_connect().await?,
        };
        match client.exec(command).await {
            Ok(answer) => {
                *connection = Some(client);
                Ok(answer)
            }
            // The game closed an idle connection (or restarted): the command never arrived.
            Err(RconError::Io(e)) if reused && e.kind() == std::io::ErrorKind::UnexpectedEof => {
                let mut client = self.rcon_connect().await?;
                let answer = client.exec(command).await?;
                *connection = Some(client);
                Ok(answer)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn rcon_connect(&self) -> Result<RconClient, ServerError> {
        let spec = self.spec();
        let ConsoleSpec::Rcon {
            port_variable,
            password_variable,
        } = &spec.blueprint.console
        else {
            return Err(ServerError::Failed("this server's console is not RCON".into()));
        };
        let values = spec.values(&self.ctx.config.system.timezone);
        let port: u16 = values
            .get(port_variable)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| ServerError::Failed(format!("{port_variable} does not hold a port")))?;
        let password = values.get(password_variable).cloned().unwrap_or_default();
        let container = self
            .with_record(|r| r.container_id.clone())
            .ok_or(ServerError::NotRunning)?;
        let status = self
            .ctx
            .docker
            .status(&container)
            .await?
            .ok_or(ServerError::NotRunning)?;
        let ip: std::net::IpAddr = status
            .addresses
            .get(&self.ctx.config.docker.network)
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| RconError::Unavailable("the container has no address yet".into()))?;
        Ok(RconClient::connect((ip, port).into(), &password, Duration::from_secs(5)).await?)
    }

    /// Stops everything and removes the server's containers and files.
    pub async fn delete(self: &Arc<Self>) -> Result<(), String> {
        self.kill_now();
        let (tx, rx) = oneshot::channel();
        if !self.enqueue(Job::Delete(tx)) {
            return Err("the server is already being deleted".into());
        }
        rx.await.unwrap_or_else(|_| Err("the server's task ended".into()))
    }

    /// Stops the server if it is up, runs `work`, then starts the server again if it was up.
    pub async fn while_stopped(&self, work: StoppedWork) -> Result<(), String> {
        if self.with_record(|r| r.install.status) == InstallStatus::Installing {
            return Err("the server is installing".into());
        }
        let (tx, rx) = oneshot::channel();
        if !self.enqueue(Job::WhileStopped(work, tx)) {
            return Err("the server is being deleted".into());
        }
        rx.await.unwrap_or_else(|_| Err("the server's task ended".into()))
    }

    pub fn install_log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("install.log")).unwrap_or_default()
    }

    // ---- the actor ----

    async fn actor(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut guard = CrashGuard::from_history(&self.with_record(|r| r.crash_exits_ms.clone()));
        let mut restart_at: Option<tokio::time::Instant> = None;
        loop {
            let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
            let job = tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => job,
                    None => break,
                },
                () = tokio::time::sleep_until(restart_at.unwrap_or(far)), if restart_at.is_some() => {
                    restart_at = None;
                    self.with_record(|r| r.crash.next_restart_at_ms = None);
                    self.console.daemon("Restarting after an unexpected exit");
                    match self.start().await {
                        Ok(()) => self.report(
                            mamba_shared::node_api::EventKind::Restarted,
                            "restarted after an unexpected exit".into(),
                            serde_json::json!({ "attempt": guard.attempts() }),
                        ),
                        Err(e) => {
                            self.fail(format!("Restart failed: {e}"));
                            restart_at = self.on_unexpected_exit(&mut guard, ExitStatus { code: -1, oom_killed: false });
                        }
                    }
                    continue;
                }
            };
            match job {
                Job::Recover => {
                    if let Err(e) = self.recover().await {
                        self.fail(format!("Recovery after a wings restart failed: {e}"));
                        self.set_state(ServerState::Offline);
                    }
                }
                Job::Power(action) => {
                    if restart_at.take().is_some() {
                        self.with_record(|r| r.crash.next_restart_at_ms = None);
                    }
                    if matches!(action, PowerAction::Start | PowerAction::Restart) {
                        guard.reset();
                        self.with_record(|r| {
                            r.crash.attempts = 0;
                            r.crash_exits_ms.clear();
                        });
                    }
                    let result = match action {
                        PowerAction::Start => self.start().await,
                        PowerAction::Stop => self.stop(false).await,
                        PowerAction::Kill => self.stop(true).await,
                        PowerAction::Restart => match self.stop(false).await {
                            Ok(()) => self.start().await,
                            Err(e) => Err(e),
                        },
                    };
                    if let Err(e) = result {
                        self.fail(format!("{action:?} failed: {e}"));
                        if !matches!(self.state(), ServerState::Running) {
                            self.set_state(ServerState::Offline);
                        }
                    } else {
                        self.with_record(|r| r.last_error = None);
                        self.persist();
                    }
                    // Counted until done, so "queued behind" includes the action running now.
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                }
                Job::Install { reinstall } => {
                    if reinstall && let Err(e) = self.stop(false).await {
                        self.fail(format!("Stop before reinstall failed: {e}"));
                    }
                    self.install().await;
                    let (installed, start) = self.with_record(|r| {
                        (
                            r.install.status == InstallStatus::Installed,
                            r.start_on_completion,
                        )
                    });
                    if installed
                        && start
                        && !reinstall
                        && let Err(e) = self.start().await
                    {
                        self.fail(format!("Start after install failed: {e}"));
                        self.set_state(ServerState::Offline);
                    }
                }
                Job::Exited { generation, status } => {
                    if generation == self.generation.load(Ordering::SeqCst)
                        && let Some(at) = self.on_exit(&mut guard, status)
                    {
                        restart_at = Some(at);
                    }
                }
                Job::WhileStopped(work, reply) => {
                    let was_up = self.state().is_up();
                    let result = match if was_up { self.stop(false).await } else { Ok(()) } {
                        Ok(()) => work.await,
                        Err(e) => Err(format!("cannot stop the server: {e}")),
                    };
                    if was_up && let Err(e) = self.start().await {
                        self.fail(format!("Start after the restore failed: {e}"));
                        self.set_state(ServerState::Offline);
                    }
                    let _ = reply.send(result);
                }
                Job::Delete(reply) => {
                    let result = self.destroy().await;
                    let deleted = result.is_ok();
                    let _ = reply.send(result);
                    // A failed delete keeps the actor, so the delete can be retried.
                    if deleted {
                        break;
                    }
                }
            }
        }
    }

    /// What every server shares (configuration, Docker, the report channels).
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Tells the panel (through the reporter) that something happened to this server.
    pub fn report(&self, kind: mamba_shared::node_api::EventKind, message: String, data: serde_json::Value) {
        let event = mamba_shared::node_api::NodeEvent {
            id: uuid::Uuid::now_v7().to_string(),
            server_id: self.id.to_string(),
            kind,
            at_ms: i64::try_from(now_ms()).unwrap_or(i64::MAX),
            message,
            data,
        };
        // No subscriber (not enrolled): nothing to report to.
        let _ = self.ctx.reports.send(event);
    }

    /// A container run ended. Returns when to restart it, if the crash guard says so.
    fn on_exit(&self, guard: &mut CrashGuard, status: ExitStatus) -> Option<tokio::time::Instant> {
        let expected = self.expecting_exit.load(Ordering::SeqCst)
            || self.with_record(|r| r.desired == Desired::Offline)
            || self.state() == ServerState::Stopping;
        if expected {
            if self.state() != ServerState::Offline {
                self.set_state(ServerState::Offline);
            }
            return None;
        }
        self.on_unexpected_exit(guard, status)
    }

    fn on_unexpected_exit(&self, guard: &mut CrashGuard, status: ExitStatus) -> Option<tokio::time::Instant> {
        let exit = ExitInfo {
            exit_code: status.code,
            oom_killed: status.oom_killed,
            at: now_ms() / 1000,
        };
        self.console.daemon(&format!(
            "Server exited unexpectedly with code {}{}",
            status.code,
            if status.oom_killed {
                " (killed: out of memory)"
            } else {
                ""
            }
        ));
        tracing::warn!(server.id = %self.id, exit.code = status.code, exit.oom = status.oom_killed, "server exited unexpectedly");
        {
            use mamba_shared::node_api::EventKind;
            let data = serde_json::json!({ "exit_code": status.code, "oom_killed": status.oom_killed });
            if status.oom_killed {
                self.report(
                    EventKind::OomKilled,
                    "the server was killed: out of memory".into(),
                    data.clone(),
                );
            }
            self.report(
                EventKind::Crashed,
                format!("the server exited unexpectedly with code {}", status.code),
                data,
            );
        }
        let verdict = guard.on_exit(
            &self.ctx.config.crash_guard,
            status.code,
            status.oom_killed,
            now_ms(),
        );
        let attempts = guard.attempts();
        let mut restart_at = None;
        self.with_record(|r| {
            r.crash.last_exit = Some(exit);
            r.crash.attempts = attempts;
            r.crash_exits_ms = guard.history();
        });
        match verdict {
            Verdict::Ignore => {
                self.with_record(|r| r.desired = Desired::Offline);
                self.set_state(ServerState::Offline);
            }
            Verdict::RestartAfter(delay) => {
                self.console.daemon(&format!(
                    "Restarting in {} ms (attempt {attempts})",
                    delay.as_millis()
                ));
                self.with_record(|r| r.crash.next_restart_at_ms = Some(now_ms() + delay.as_millis() as u64));
                self.set_state(ServerState::Offline);
                restart_at = Some(tokio::time::Instant::now() + delay);
            }
            Verdict::GiveUp => {
                self.console.daemon(&format!(
                    "Server crashed {} times within {} s; giving up until it is started again",
                    attempts, self.ctx.config.crash_guard.window_secs
                ));
                self.with_record(|r| r.desired = Desired::Offline);
                self.set_state(ServerState::Crashed);
                self.report(
                    mamba_shared::node_api::EventKind::CrashLoop,
                    format!("crashed {attempts} times; not restarting until started again"),
                    serde_json::json!({ "attempts": attempts }),
                );
            }
        }
        restart_at
    }

    async fn start(self: &Arc<Self>) -> Result<(), ServerError> {
        if self.state().is_up() {
            return Ok(());
        }
        if self.with_record(|r| r.install.status) != InstallStatus::Installed {
            return Err(ServerError::Conflict("the server is not installed".into()));
        }
        // The install and the last run wrote from inside the container, which the counter
        // only learns from a walk: count now, so the quota check and the first figures are true.
        let files = self.files.clone();
        match tokio::task::spawn_blocking(move || files.recount()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(server.id = %self.id, "cannot count the server's disk usage: {e}"),
            Err(e) => tracing::warn!(server.id = %self.id, "disk count task failed: {e}"),
        }
        if self.files.over_quota() {
            return Err(ServerError::Conflict(format!(
                "the server's files use {} bytes, more than its disk quota of {}",
                self.files.used_bytes(),
                self.files.limit_bytes()
            )));
        }
        self.expecting_exit.store(false, Ordering::SeqCst);
        self.with_record(|r| {
            r.desired = Desired::Running;
            r.last_error = None;
        });
        self.set_state(ServerState::Starting);
        self.console.daemon("Starting server");
        let spec = self.spec();

        self.apply_config_files(&spec).await?;
        let name = spec.container_name();
        self.ctx.docker.remove(&name).await?;
        let body = spec
            .server_container(&self.ctx.config, &self.root_dir)
            .map_err(ServerError::Failed)?;
        let id = self.ctx.docker.create(&name, body).await?;
        self.with_record(|r| r.container_id = Some(id.clone()));
        let attached = self.ctx.docker.attach(&id).await?;
        let generation = self.begin_run(attached);
        if let Err(e) = self.ctx.docker.start(&id).await {
            self.run_tx.send_replace(Run::Exited(generation));
            *self.stdin.lock().await = None;
            let _ = self.ctx.docker.remove(&id).await;
            return Err(e.into());
        }
        self.watch_exit(id, generation);
        self.persist();
        Ok(())
    }

    /// Wires up a fresh (or reattached) container run: stdin for commands and a reader for
    /// its output. Returns the run's generation.
    fn begin_run(self: &Arc<Self>, attached: bollard::container::AttachContainerResults) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.run_tx.send_replace(Run::Running(generation));
        if let Ok(mut stdin) = self.stdin.try_lock() {
            *stdin = Some(attached.input);
        } else {
            let server = self.clone();
            let input = attached.input;
            tokio::spawn(async move { *server.stdin.lock().await = Some(input) });
        }
        tokio::spawn(self.clone().read_output(attached.output));
        generation
    }

    fn watch_exit(self: &Arc<Self>, container_id: String, generation: u64) {
        let server = self.clone();
        tokio::spawn(async move {
            let kill_unexplained = || !server.expecting_exit.load(Ordering::SeqCst);
            let status = match server.ctx.docker.wait_exit(&container_id, kill_unexplained).await {
                Ok(status) => status,
                Err(e) => {
                    tracing::warn!(server.id = %server.id, "waiting for the container failed: {e}");
                    ExitStatus {
                        code: -1,
                        oom_killed: false,
                    }
                }
            };
            server.run_tx.send_replace(Run::Exited(generation));
            server.enqueue(Job::Exited { generation, status });
        });
    }

    async fn read_output(
        self: Arc<Self>,
        mut output: Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>,
    ) {
        let mut splitter = LineSplitter::new(self.ctx.config.console.max_line_bytes);
        let mut lines = Vec::new();
        loop {
            let item = match tokio::time::timeout(Duration::from_millis(500), output.next()).await {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(_) => {
                    // Output paused: report lines the flood gate dropped without waiting.
                    self.console.notice_drops(true);
                    continue;
                }
            };
            match item {
                Ok(
                    LogOutput::StdOut { message }
                    | LogOutput::StdErr { message }
                    | LogOutput::Console { message },
                ) => {
                    splitter.push(&message, &mut lines);
                }
                Ok(LogOutput::StdIn { .. }) => {}
                Err(e) => {
                    tracing::debug!(server.id = %self.id, "console stream ended: {e}");
                    break;
                }
            }
            self.on_output(&mut lines);
        }
        splitter.flush(&mut lines);
        self.on_output(&mut lines);
        self.console.notice_drops(true);
    }

    fn on_output(&self, lines: &mut Vec<Arc<str>>) {
        if lines.is_empty() {
            return;
        }
        self.console.push_output(lines);
        if self.state() == ServerState::Starting && lines.iter().any(|l| self.running_regex.is_match(l)) {
            // Only a server still starting becomes running; a stop in between wins.
            let changed = self.state_tx.send_if_modified(|s| {
                if *s == ServerState::Starting {
                    *s = ServerState::Running;
                    true
                } else {
                    false
                }
            });
            if changed {
                self.with_record(|r| r.state = ServerState::Running);
                self.persist();
                tracing::info!(server.id = %self.id, "server is running");
            }
        }
        lines.clear();
    }

    async fn wait_for_exit(&self, generation: u64, timeout: Duration) -> bool {
        let mut rx = self.run_tx.subscribe();
        let done = |run: &Run| match *run {
            Run::Exited(g) => g >= generation,
            Run::Running(g) => g > generation,
            Run::None => true,
        };
        tokio::time::timeout(timeout, rx.wait_for(done))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    async fn stop(self: &Arc<Self>, kill: bool) -> Result<(), ServerError> {
        self.expecting_exit.store(true, Ordering::SeqCst);
        self.with_record(|r| r.desired = Desired::Offline);
        let state = self.state();
        if !matches!(
            state,
            ServerState::Starting | ServerState::Running | ServerState::Stopping
        ) {
            self.persist();
            return Ok(());
        }
        let Some(container) = self.with_record(|r| r.container_id.clone()) else {
            self.set_state(ServerState::Offline);
            return Ok(());
        };
        let generation = self.generation.load(Ordering::SeqCst);
        self.set_state(ServerState::Stopping);
        let spec = self.spec();
        if kill {
            self.console.daemon("Killing server");
            self.ctx.docker.signal(&container, "SIGKILL").await?;
        } else {
            self.console.daemon("Stopping server");
            self.send_stop(&spec, &container).await?;
            let timeout = Duration::from_secs(u64::from(spec.blueprint.stop.timeout_secs));
            if !self.wait_for_exit(generation, timeout).await {
                self.console.daemon(&format!(
                    "Server did not stop within {} s; killing it",
                    timeout.as_secs()
                ));
                self.ctx.docker.signal(&container, "SIGKILL").await?;
            }
        }
        if !self.wait_for_exit(generation, Duration::from_secs(30)).await {
            // The engine did not report the exit; trust its current view.
            if self
                .ctx
                .docker
                .status(&container)
                .await?
                .is_some_and(|s| s.running)
            {
                return Err(ServerError::Failed(
                    "the container is still running after SIGKILL".into(),
                ));
            }
        }
        *self.stdin.lock().await = None;
        *self.rcon.lock().await = None;
        self.set_state(ServerState::Offline);
        self.console.daemon("Server stopped");
        Ok(())
    }

    async fn send_stop(&self, spec: &ServerSpec, container: &str) -> Result<(), ServerError> {
        let stop = &spec.blueprint.stop;
        if let (Some(command), ConsoleSpec::Rcon { .. }) = (&stop.command, &spec.blueprint.console) {
            match self.rcon_exec(command).await {
                Ok(_) => return Ok(()),
                Err(e) => self
                    .console
                    .daemon(&format!("Stop over RCON failed ({e}); signalling instead")),
            }
        } else if let Some(command) = &stop.command {
            let mut stdin = self.stdin.lock().await;
            if let Some(writer) = stdin.as_mut() {
                let line = format!("{command}\n");
                if writer.write_all(line.as_bytes()).await.is_ok() && writer.flush().await.is_ok() {
                    return Ok(());
                }
            }
        }
        let signal = stop.signal.map_or("SIGTERM", |s| s.name());
        self.ctx.docker.signal(container, signal).await?;
        Ok(())
    }

    async fn apply_config_files(&self, spec: &ServerSpec) -> Result<(), ServerError> {
        if spec.blueprint.config_files.is_empty() {
            return Ok(());
        }
        let root = self.files.trusted();
        let config = self.ctx.config.system.clone();
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let values = spec.values(&config.timezone);
            for edit in &spec.blueprint.config_files {
                crate::config_files::apply(&root, edit, &values, config.max_config_file_bytes)
                    .map_err(|e| format!("config file edit failed: {e}"))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| ServerError::Failed(e.to_string()))?
        .map_err(ServerError::Failed)
    }

    async fn install(self: &Arc<Self>) {
        let spec = self.spec();
        if spec.blueprint.install.is_none() {
            self.with_record(|r| r.install = InstallInfo::new(InstallStatus::Installed));
            self.set_state(ServerState::Offline);
            return;
        }
        self.with_record(|r| r.install = InstallInfo::new(InstallStatus::Installing));
        self.set_state(ServerState::Installing);
        self.console.daemon("Installing server");
        self.console.install_event(ConsoleEvent::InstallStarted);
        let outcome = self.run_install(&spec).await;
        let _ = self.ctx.docker.remove(&spec.install_container_name()).await;
        let info = match outcome {
            Ok(0) => InstallInfo {
                exit_code: Some(0),
                ..InstallInfo::new(InstallStatus::Installed)
            },
            Ok(code) => {
                InstallInfo::failed(Some(code), format!("the install script exited with code {code}"))
            }
            Err(e) => InstallInfo::failed(None, e.to_string()),
        };
        match &info.error {
            None => {
                self.console.daemon("Install finished");
                self.report(
                    mamba_shared::node_api::EventKind::InstallFinished,
                    "install finished".into(),
                    serde_json::json!({ "exit_code": info.exit_code }),
                );
            }
            Some(e) => {
                self.fail(format!("Install failed: {e}"));
                self.report(
                    mamba_shared::node_api::EventKind::InstallFailed,
                    format!("install failed: {e}"),
                    serde_json::json!({ "exit_code": info.exit_code }),
                );
            }
        }
        self.console.install_event(ConsoleEvent::InstallCompleted {
            successful: info.error.is_none(),
        });
        self.with_record(|r| r.install = info);
        self.set_state(ServerState::Offline);
    }

    async fn run_install(self: &Arc<Self>, spec: &ServerSpec) -> Result<i64, ServerError> {
        let Some(install) = &spec.blueprint.install else {
            return Ok(0);
        };
        let script_dir = self.state_dir.join("install");
        let script = install.script.clone();
        let dir = script_dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir_all(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            std::fs::write(dir.join("install.sh"), script)?;
            std::fs::set_permissions(dir.join("install.sh"), std::fs::Permissions::from_mode(0o644))
        })
        .await
        .map_err(|e| ServerError::Failed(e.to_string()))?
        .map_err(|e| ServerError::Failed(format!("cannot write the install script: {e}")))?;

        let name = spec.install_container_name();
        self.ctx.docker.remove(&name).await?;
        let body = spec
            .install_container(&self.ctx.config, &self.root_dir, &script_dir)
            .ok_or_else(|| ServerError::Failed("no install script".into()))?;
        let id = self.ctx.docker.create(&name, body).await?;
        let attached = self.ctx.docker.attach(&id).await?;
        let log_path = self.state_dir.join("install.log");
        let server = self.clone();
        let max_line = self.ctx.config.console.max_line_bytes;
        let reader = tokio::spawn(async move {
            let mut output = attached.output;
            let mut log = tokio::fs::File::create(&log_path).await.ok();
            let mut splitter = LineSplitter::new(max_line);
            let mut lines = Vec::new();
            loop {
                let item = output.next().await;
                match &item {
                    Some(Ok(LogOutput::StdOut { message } | LogOutput::StdErr { message })) => {
                        splitter.push(message, &mut lines)
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => splitter.flush(&mut lines),
                }
                for line in lines.drain(..) {
                    if let Some(file) = log.as_mut() {
                        let _ = file.write_all(format!("{line}\n").as_bytes()).await;
                    }
                    server.console.install_event(ConsoleEvent::InstallOutput(line));
                }
                if !matches!(item, Some(Ok(_))) {
                    break;
                }
            }
            if let Some(file) = log.as_mut() {
                let _ = file.flush().await;
            }
        });
        self.ctx.docker.start(&id).await?;
        let timeout = Duration::from_secs(u64::from(install.timeout_secs));
        let status = match tokio::time::timeout(timeout, self.ctx.docker.wait_exit(&id, || true)).await {
            Ok(status) => status?,
            Err(_) => {
                self.ctx.docker.signal(&id, "SIGKILL").await?;
                let _ = reader.await;
                return Err(ServerError::Failed(format!(
                    "the install took longer than {} s",
                    timeout.as_secs()
                )));
            }
        };
        let _ = reader.await;
        if status.oom_killed {
            return Err(ServerError::Failed("the install ran out of memory".into()));
        }
        Ok(status.code)
    }

    /// After a wings restart: reattach to a running container, or bring the server to the
    /// state it should be in.
    async fn recover(self: &Arc<Self>) -> Result<(), ServerError> {
        let (spec, record) = self.with_record(|r| (r.spec.clone(), r.clone()));
        if record.install.status == InstallStatus::Installing
            || record.install.status == InstallStatus::Pending
        {
            self.with_record(|r| {
                r.install = InstallInfo::failed(None, "the install was interrupted by a wings restart")
            });
            self.console
                .daemon("The install was interrupted by a wings restart; reinstall the server");
            self.set_state(ServerState::Offline);
            return Ok(());
        }
        match self.ctx.docker.status(&spec.container_name()).await? {
            Some(status) if status.running => {
                let state = if record.state == ServerState::Running {
                    ServerState::Running
                } else {
                    ServerState::Starting
                };
                self.with_record(|r| r.container_id = Some(status.id.clone()));
                self.set_state(state);
                let attached = self.ctx.docker.attach(&status.id).await?;
                // Before reading the live stream, so the scrollback stays in order.
                self.backfill(&status, now_ms() * 1_000_000).await;
                let generation = self.begin_run(attached);
                self.watch_exit(status.id.clone(), generation);
                tracing::info!(server.id = %self.id, container.id = %status.id, "reattached to running server");
                if record.desired == Desired::Offline {
                    self.stop(false).await?;
                }
            }
            _ => {
                if record.desired == Desired::Running {
                    self.console
                        .daemon("The server was not running after a wings restart; starting it");
                    // The saved state still says it is up; it is not.
                    self.set_state(ServerState::Offline);
                    self.start().await?;
                } else if record.state != ServerState::Crashed {
                    self.set_state(ServerState::Offline);
                }
            }
        }
        Ok(())
    }

    /// Takes what the game printed while wings was not running from Docker's log into the
    /// console, so the scrollback has no hole and a ready line printed meanwhile counts.
    async fn backfill(&self, status: &crate::docker::ContainerStatus, attached_ns: u64) {
        let logged_ns = std::fs::metadata(self.state_dir.join("console.log"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        let started_ns = status.started_at_ms.unwrap_or(0) * 1_000_000;
        let console = &self.ctx.config.console;
        let max_bytes = console.buffer_lines.saturating_mul(console.max_line_bytes);
        let missed = match self
            .ctx
            .docker
            .output_between(&status.id, logged_ns.max(started_ns), attached_ns, max_bytes)
            .await
        {
            Ok(missed) => missed,
            Err(e) => {
                tracing::warn!(server.id = %self.id, "cannot read the output missed while wings was down: {e}");
                return;
            }
        };
        if missed.is_empty() {
            return;
        }
        let mut splitter = LineSplitter::new(console.max_line_bytes);
        let mut lines = Vec::new();
        splitter.push(&missed, &mut lines);
        splitter.flush(&mut lines);
        let count = lines.len();
        self.console.daemon(&format!(
            "{count} lines printed while wings was down, from Docker's log:"
        ));
        self.on_output(&mut lines);
    }

    async fn destroy(&self) -> Result<(), String> {
        self.expecting_exit.store(true, Ordering::SeqCst);
        self.deleted.cancel();
        self.pulls.cancel_all();
        let spec = self.spec();
        for name in [spec.container_name(), spec.install_container_name()] {
            self.ctx.docker.remove(&name).await.map_err(|e| e.to_string())?;
        }
        *self.stdin.lock().await = None;
        let dirs = [self.root_dir.clone(), self.state_dir.clone()];
        tokio::task::spawn_blocking(move || {
            for dir in dirs {
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("cannot remove {}: {e}", dir.display())),
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// Opens the server's folder (making it if it went missing) for [`ServerFs`].
fn open_files(ctx: &Context, root_dir: &std::path::Path, spec: &ServerSpec) -> std::io::Result<ServerFs> {
    let system = &ctx.config.system;
    if !root_dir.exists() {
        std::fs::create_dir_all(root_dir)?;
        rustix::fs::chown(
            root_dir,
            Some(rustix::fs::Uid::from_raw(system.container_uid)),
            Some(rustix::fs::Gid::from_raw(system.container_gid)),
        )?;
    }
    ServerFs::open_root(
        root_dir,
        system.container_uid,
        system.container_gid,
        spec.limits.disk_mb.saturating_mul(1024 * 1024),
        &spec.blueprint.file_denylist,
    )
}

/// A fresh record for a new server.
pub fn new_record(spec: ServerSpec, start_on_completion: bool) -> ServerRecord {
    ServerRecord {
        spec,
        desired: Desired::Offline,
        state: ServerState::Offline,
        install: InstallInfo::new(InstallStatus::Pending),
        crash: CrashInfo {
            attempts: 0,
            last_exit: None,
            next_restart_at_ms: None,
        },
        container_id: None,
        last_error: None,
        start_on_completion,
        crash_exits_ms: Vec::new(),
    }
}

//! Wings' configuration: one typed struct, read from a TOML file with `WINGS_*` environment
//! overrides (`WINGS_API__LISTEN=0.0.0.0:8080` sets `api.listen`).
//!
//! Every default lives here, and `config.example.toml` documents each one; a test keeps the
//! two in sync.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub api: ApiConfig,
    pub system: SystemConfig,
    pub docker: DockerConfig,
    pub console: ConsoleConfig,
    pub crash_guard: CrashGuardConfig,
    pub websocket: WebsocketConfig,
    pub tokens: TokensConfig,
    pub files: FilesConfig,
    pub backups: BackupsConfig,
    pub sftp: SftpConfig,
    pub reporter: ReporterConfig,
}

/// What an enrolled node reports to the panel over mutual TLS (`reporter`, ADR 0011).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReporterConfig {
    /// Seconds between heartbeats. The panel marks a node offline after
    /// `heartbeats.offline_after_secs` without one.
    pub heartbeat_interval_secs: u64,
    /// Seconds between resource samples of every server.
    pub sample_interval_secs: u64,
    /// Bytes the on-disk outbox (`<data_dir>/outbox/`) may hold while the panel is
    /// unreachable. Beyond it the oldest records are dropped (and counted in the log).
    pub outbox_max_bytes: u64,
    /// Bytes per outbox segment file (at most a quarter of `outbox_max_bytes`).
    pub outbox_segment_bytes: u64,
    /// Longest wait between delivery attempts while the panel is unreachable (they start at
    /// 1 s and double).
    pub retry_max_secs: u64,
    /// Seconds one request to the panel may take.
    pub request_timeout_secs: u64,
}

impl Default for ReporterConfig {
    fn default() -> Self {
        ReporterConfig {
            heartbeat_interval_secs: 15,
            sample_interval_secs: 30,
            outbox_max_bytes: 64 * 1024 * 1024,
            outbox_segment_bytes: 1024 * 1024,
            retry_max_secs: 60,
            request_timeout_secs: 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address the panel's API listens on: mutual TLS admitting only the panel's certificate
    /// from the CA the node enrolled with (`wings enroll`).
    pub listen: SocketAddr,
    /// The plain-HTTP listener for browsers (console sockets and other routes that carry
    /// their own signed token); the panel's routes refuse every request there.
    pub public_listen: SocketAddr,
    /// The bearer token of earlier versions, removed (ADR 0009). Read only so that a config
    /// still carrying it starts with a warning rather than an unknown-key error: the key
    /// grants nothing any more, so ignoring it cannot open anything.
    #[serde(default, skip_serializing)]
    token: Option<String>,
    /// HTTP worker threads.
    pub workers: usize,
    /// Largest JSON request body accepted, in bytes.
    pub max_json_bytes: usize,
}

impl ApiConfig {
    /// Whether the config (file or `WINGS_API__TOKEN`) still sets the removed `api.token`.
    pub fn has_legacy_token(&self) -> bool {
        self.token.is_some()
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            token: None,
            workers: 1,
            max_json_bytes: 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SystemConfig {
    /// Where server files, state and logs live.
    pub data_dir: PathBuf,
    /// The unprivileged uid and gid game and install containers run as.
    pub container_uid: u32,
    pub container_gid: u32,
    /// `TZ` inside containers.
    pub timezone: String,
    /// Largest config file the blueprint config-file editor will parse, in bytes.
    pub max_config_file_bytes: u64,
}

impl Default for SystemConfig {
    fn default() -> Self {
        SystemConfig {
            data_dir: PathBuf::from("/var/lib/mamba/wings"),
            container_uid: 988,
            container_gid: 988,
            timezone: "UTC".into(),
            max_config_file_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// The Docker engine's socket.
    pub socket: String,
    /// The bridge network every game container joins.
    pub network: String,
    /// Whether containers on that network may reach each other. Off isolates servers.
    pub inter_container_traffic: bool,
    /// Size of each container's `/tmp` tmpfs, in MiB.
    pub tmpfs_mb: u64,
    /// Docker's own log for a container is capped at this many MiB.
    pub log_max_mb: u64,
    /// Seconds to wait for a Docker API call before giving up.
    pub timeout_secs: u64,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            socket: "/var/run/docker.sock".into(),
            network: "mamba0".into(),
            inter_container_traffic: false,
            tmpfs_mb: 100,
            log_max_mb: 5,
            timeout_secs: 120,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Lines of console output kept in memory per server.
    pub buffer_lines: usize,
    /// Console lines longer than this are truncated, in bytes.
    pub max_line_bytes: usize,
    /// The on-disk console log is rotated when it reaches this size, in bytes.
    pub log_file_max_bytes: u64,
    /// Lines replayed to a console socket after it authenticates, and on `send logs`.
    pub replay_lines: usize,
    /// Per-server flood limit: lines beyond this rate are dropped (and counted for clients).
    pub lines_per_second: u32,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            buffer_lines: 500,
            max_line_bytes: 4096,
            log_file_max_bytes: 5 * 1024 * 1024,
            replay_lines: 150,
            lines_per_second: 20_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebsocketConfig {
    /// Console sockets open at once on one server; more are closed with code 1013.
    pub max_sockets_per_server: usize,
    /// Largest inbound message, in bytes; bigger ones close the socket with code 1009.
    pub max_message_bytes: usize,
    /// Inbound messages allowed per window; extra ones are dropped, and a client that keeps
    /// sending is closed with code 1008.
    pub messages_per_window: u32,
    pub message_window_ms: u64,
    /// A socket must authenticate within this many seconds (also after its token expired).
    pub auth_timeout_secs: u64,
    /// How often stats are pushed to connected sockets, in milliseconds.
    pub stats_interval_ms: u64,
    /// Browser origins allowed to open sockets (for example "https://panel.example.com").
    /// Empty allows any origin: sockets authenticate with a token, not a cookie.
    pub allowed_origins: Vec<String>,
}

impl Default for WebsocketConfig {
    fn default() -> Self {
        WebsocketConfig {
            max_sockets_per_server: 30,
            max_message_bytes: 4096,
            messages_per_window: 10,
            message_window_ms: 200,
            auth_timeout_secs: 10,
            stats_interval_ms: 2000,
            allowed_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokensConfig {
    /// The panel's Ed25519 public key (PEM) that signs console tokens. Empty refuses every
    /// token.
    pub panel_public_key_file: String,
    /// Tokens issued before this Unix time are refused: set it when the signing key changes.
    pub not_before: u64,
    /// Longest lifetime (exp - iat) a token may have, in seconds.
    pub max_lifetime_secs: u64,
}

impl Default for TokensConfig {
    fn default() -> Self {
        TokensConfig {
            panel_public_key_file: String::new(),
            not_before: 0,
            max_lifetime_secs: 900,
        }
    }
}

/// What wings does when a server's files pass its disk quota from inside the container
/// (writes through wings are refused before they pass it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverfillAction {
    /// Stop the server the way the blueprint stops it, and report it on the console.
    Stop,
    /// Kill the container at once, and report it.
    Kill,
    /// Only report it; the server keeps running (writes through wings stay refused).
    Report,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilesConfig {
    /// How often each server's folder is walked to correct its disk usage, in seconds. This
    /// is how fast a container writing past its quota from inside is noticed.
    pub disk_check_interval_secs: u64,
    /// What happens to a running server found over its quota.
    pub overfill_action: OverfillAction,
    /// Most entries one `list` page may hold (`per_page`).
    pub list_max_per_page: usize,
    /// Decompressing stops when the bytes written pass this many times the archive's size.
    pub decompress_max_ratio: u64,
    /// Decompressing stops after this many entries.
    pub decompress_max_entries: u64,
    /// `search` stops after this many hits, and after looking at `search_max_entries`.
    pub search_max_results: usize,
    pub search_max_entries: usize,
    /// Whether `POST files/pull` is allowed at all.
    pub pull_enabled: bool,
    /// Largest download a pull may write, in bytes (the disk quota applies as well).
    pub pull_max_bytes: u64,
    /// A pull is cancelled after this many seconds.
    pub pull_timeout_secs: u64,
    /// Pulls running at once per server.
    pub pull_max_concurrent: usize,
    /// Networks (CIDR) a pull may reach although they are private, loopback or link-local,
    /// for example an internal mirror. Empty: only public addresses.
    pub pull_allowed_networks: Vec<String>,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            disk_check_interval_secs: 5,
            overfill_action: OverfillAction::Stop,
            list_max_per_page: 100_000,
            decompress_max_ratio: 200,
            decompress_max_entries: 200_000,
            search_max_results: 1000,
            search_max_entries: 1_000_000,
            pull_enabled: true,
            pull_max_bytes: 16 * 1024 * 1024 * 1024,
            pull_timeout_secs: 3600,
            pull_max_concurrent: 3,
            pull_allowed_networks: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupsConfig {
    /// Folder of the "local" adapter's archives. Empty means `<system.data_dir>/backup-archives`.
    pub local_dir: String,
    /// Backups and restores running at once on this node; more are refused with 429.
    pub max_concurrent: usize,
    /// zstd level, 1 (fastest) to 19.
    pub compression_level: i32,
    /// zstd worker threads per backup; 0 means one per CPU.
    pub compression_threads: u32,
    /// Size of each uploaded part, in MiB (S3 needs at least 5).
    pub part_size_mb: u64,
    /// Parts of one backup uploaded at once.
    pub upload_concurrency: usize,
    /// How often a running backup or restore reports progress to console sockets, in ms.
    pub progress_interval_ms: u64,
    pub s3: S3Config,
}

impl Default for BackupsConfig {
    fn default() -> Self {
        BackupsConfig {
            local_dir: String::new(),
            max_concurrent: 2,
            compression_level: 3,
            compression_threads: 0,
            part_size_mb: 16,
            upload_concurrency: 4,
            progress_interval_ms: 1000,
            s3: S3Config::default(),
        }
    }
}

impl BackupsConfig {
    pub fn local_dir(&self, data_dir: &Path) -> PathBuf {
        if self.local_dir.is_empty() {
            data_dir.join("backup-archives")
        } else {
            PathBuf::from(&self.local_dir)
        }
    }
}

/// The "s3" adapter's bucket. Unset (empty bucket) refuses S3 backups.
#[derive(Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL for S3-compatible stores (MinIO, Garage, R2...). Empty means AWS.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    /// Better set through `WINGS_BACKUPS__S3__SECRET_ACCESS_KEY` than in the file.
    pub secret_access_key: String,
    /// Prepended to every object name (`<prefix><server>/<backup>.tar.zst`).
    pub prefix: String,
    /// Allow a plain `http://` endpoint (for a store on the same host or in tests).
    pub allow_http: bool,
    /// Address buckets as `<bucket>.<endpoint>` rather than `<endpoint>/<bucket>`.
    pub virtual_hosted_style: bool,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftpConfig {
    /// Serve SFTP at all.
    pub enabled: bool,
    /// Address the SFTP server listens on.
    pub listen: SocketAddr,
    /// The server's Ed25519 host key (OpenSSH format). Empty means `<data_dir>/sftp/host_ed25519`;
    /// a missing file is generated on first start with mode 0600.
    pub host_key_file: String,
    /// Who checks logins: `auto` (the panel once this node is enrolled, else the credential
    /// file), `panel` (refuse to start unless enrolled) or `file`.
    pub auth: SftpAuthMode,
    /// How long a login the panel accepted is reused without asking again (0: always ask).
    /// Refusals are never reused; the deauthorize route drops the user's entries at once.
    pub panel_cache_secs: u64,
    /// The static credential file (TOML) that vouches for logins when the panel does not.
    /// Empty refuses every login.
    pub credentials_file: String,
    /// Connections open at once, and from one IP address.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Sessions logged in to one game server at once, whoever holds them; one more gets no
    /// SFTP subsystem, and its client is told why.
    pub max_sessions_per_server: usize,
    /// A connection must log in within this many seconds.
    pub login_timeout_secs: u64,
    /// Authentication attempts allowed on one connection.
    pub max_auth_attempts: usize,
    /// Failed logins allowed per window from one IP address, and for one user name; past them
    /// the address (every method) or the user name (passwords) is refused until the window ends.
    pub failed_logins_per_ip: u32,
    pub failed_logins_per_user: u32,
    pub failed_login_window_secs: u64,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout_secs: u64,
    /// SFTP requests of one session processed at once (reads and writes run concurrently).
    pub requests_in_flight: usize,
}

/// Where SFTP logins are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SftpAuthMode {
    Auto,
    Panel,
    File,
}

impl Default for SftpConfig {
    fn default() -> Self {
        SftpConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 2022)),
            host_key_file: String::new(),
            auth: SftpAuthMode::Auto,
            panel_cache_secs: 30,
            credentials_file: String::new(),
            max_connections: 512,
            max_connections_per_ip: 32,
            max_sessions_per_server: 16,
            login_timeout_secs: 30,
            max_auth_attempts: 6,
            failed_logins_per_ip: 20,
            failed_logins_per_user: 10,
            failed_login_window_secs: 300,
            idle_timeout_secs: 900,
            requests_in_flight: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrashGuardConfig {
    /// Restart servers that exit without being asked to.
    pub enabled: bool,
    /// Restarts attempted within `window_secs` before the server is marked crashed.
    pub max_attempts: u32,
    pub window_secs: u64,
    /// Delay before the first restart; it doubles with each attempt.
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Whether an exit with code 0 that nobody asked for counts as a crash.
    pub clean_exit_is_crash: bool,
}

impl Default for CrashGuardConfig {
    fn default() -> Self {
        CrashGuardConfig {
            enabled: true,
            max_attempts: 3,
            window_secs: 600,
            initial_backoff_ms: 1000,
            max_backoff_ms: 60_000,
            clean_exit_is_crash: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads `path`, then `WINGS_*` environment variables on top.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::Invalid(format!("{} does not exist", path.display())));
        }
        Self::from_figment(Figment::from(Serialized::defaults(Config::default())).merge(Toml::file(path)))
    }

    fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment
            // WINGS_CONFIG, WINGS_LOG_JSON and WINGS_ENROLL_TOKEN are command-line options,
            // not config keys.
            .merge(
                Env::prefixed("WINGS_")
                    .ignore(&["config", "log_json", "enroll_token"])
                    .split("__"),
            )
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if self.api.workers == 0 {
            return bad("api.workers must be at least 1");
        }
        if !self.system.data_dir.is_absolute() {
            return bad("system.data_dir must be an absolute path");
        }
        if self.system.container_uid == 0 || self.system.container_gid == 0 {
            return bad("system.container_uid and container_gid must not be 0: games never run as root");
        }
        if self.console.buffer_lines == 0 || self.console.max_line_bytes < 80 {
            return bad("console.buffer_lines must be at least 1 and console.max_line_bytes at least 80");
        }
        if self.console.lines_per_second == 0 {
            return bad("console.lines_per_second must be at least 1");
        }
        let ws = &self.websocket;
        if ws.max_sockets_per_server == 0 || ws.messages_per_window == 0 || ws.message_window_ms == 0 {
            return bad(
                "websocket.max_sockets_per_server, messages_per_window and message_window_ms must be at least 1",
            );
        }
        if ws.max_message_bytes < 1024 {
            return bad("websocket.max_message_bytes must be at least 1024 (a token must fit)");
        }
        if !(60..=3600).contains(&self.tokens.max_lifetime_secs) {
            return bad("tokens.max_lifetime_secs must be between 60 and 3600");
        }
        if self.crash_guard.max_attempts == 0 {
            return bad("crash_guard.max_attempts must be at least 1");
        }
        let files = &self.files;
        if !(1..=3600).contains(&files.disk_check_interval_secs) {
            return bad("files.disk_check_interval_secs must be between 1 and 3600");
        }
        let r = &self.reporter;
        if !(1..=3600).contains(&r.heartbeat_interval_secs) || !(1..=3600).contains(&r.sample_interval_secs) {
            return bad(
                "reporter.heartbeat_interval_secs and reporter.sample_interval_secs must be between 1 and 3600",
            );
        }
        if r.outbox_max_bytes < 4096
            || r.outbox_segment_bytes == 0
            || r.outbox_segment_bytes > r.outbox_max_bytes / 4
        {
            return bad(
                "reporter.outbox_max_bytes must be at least 4096 and reporter.outbox_segment_bytes between 1 and a quarter of it",
            );
        }
        if r.retry_max_secs == 0 || r.request_timeout_secs == 0 {
            return bad("reporter.retry_max_secs and reporter.request_timeout_secs must be at least 1");
        }
        let sftp = &self.sftp;
        if sftp.max_connections == 0
            || sftp.max_connections_per_ip == 0
            || sftp.max_sessions_per_server == 0
            || sftp.max_auth_attempts == 0
            || sftp.failed_logins_per_ip == 0
            || sftp.failed_logins_per_user == 0
            || sftp.failed_login_window_secs == 0
            || sftp.login_timeout_secs == 0
            || sftp.idle_timeout_secs == 0
            || sftp.requests_in_flight == 0
        {
            return bad(
                "sftp limits (connections, attempts, failed logins, windows, timeouts, requests_in_flight) must be at least 1",
            );
        }
        if files.list_max_per_page == 0
            || files.decompress_max_ratio == 0
            || files.decompress_max_entries == 0
            || files.search_max_results == 0
            || files.search_max_entries == 0
            || files.pull_timeout_secs == 0
            || files.pull_max_concurrent == 0
        {
            return bad("files: limits must be at least 1");
        }
        if let Some(bad_net) = files
            .pull_allowed_networks
            .iter()
            .find(|n| crate::files::pull::parse_network(n).is_none())
        {
            return Err(ConfigError::Invalid(format!(
                "files.pull_allowed_networks: {bad_net:?} is not a CIDR network (like 10.1.2.0/24)"
            )));
        }
        if self.docker.network.is_empty() {
            return bad("docker.network must not be empty");
        }
        let b = &self.backups;
        if b.max_concurrent == 0 || b.upload_concurrency == 0 || b.progress_interval_ms == 0 {
            return bad(
                "backups.max_concurrent, upload_concurrency and progress_interval_ms must be at least 1",
            );
        }
        if !(1..=19).contains(&b.compression_level) {
            return bad("backups.compression_level must be between 1 and 19");
        }
        if !(5..=1024).contains(&b.part_size_mb) {
            return bad("backups.part_size_mb must be between 5 and 1024");
        }
        if !b.local_dir.is_empty() && !Path::new(&b.local_dir).is_absolute() {
            return bad("backups.local_dir must be an absolute path");
        }
        if !b.s3.bucket.is_empty() && b.s3.region.is_empty() {
            return bad("backups.s3.region must be set with backups.s3.bucket");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../config.example.toml");

    fn keys(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(table) = value {
            for (k, v) in table {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                keys(v, &path, out);
                out.push(path);
            }
        }
    }

    /// The example documents exactly the defaults, and every key.
    #[test]
    fn example_config_matches_defaults() {
        let example: Config = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(example, Config::default());
        let mut documented = Vec::new();
        keys(
            &toml::from_str::<toml::Value>(EXAMPLE).unwrap(),
            "",
            &mut documented,
        );
        let mut all = Vec::new();
        keys(&toml::Value::try_from(Config::default()).unwrap(), "", &mut all);
        documented.sort();
        all.sort();
        assert_eq!(documented, all, "config.example.toml must list every key");
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment's test jail fixes the closure's error type"
    )]
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wings.toml");
        std::fs::write(&path, "[api]\nworkers = 2\n").unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("WINGS_API__LISTEN", "127.0.0.1:9999");
            jail.set_env("WINGS_CRASH_GUARD__MAX_ATTEMPTS", "7");
            jail.set_env("WINGS_CONFIG", "/elsewhere.toml");
            jail.set_env("WINGS_LOG_JSON", "true");
            jail.set_env("WINGS_ENROLL_TOKEN", "mamba-enroll-token");
            let config = Config::load(&path).unwrap();
            assert_eq!(config.api.listen.port(), 9999);
            assert_eq!(config.crash_guard.max_attempts, 7);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wings.toml");
        std::fs::write(&path, "[api]\nlisten_addr = \"x\"\n").unwrap();
        assert!(
            Config::load(&path)
                .unwrap_err()
                .to_string()
                .contains("listen_addr")
        );
    }

    /// The removed bearer token still loads, is flagged for the start-up warning, and is
    /// never printed back.
    #[test]
    fn the_removed_token_is_noticed_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wings.toml");
        std::fs::write(&path, "[api]\ntoken = \"0123456789abcdef0123456789abcdef\"\n").unwrap();
        let config = Config::load(&path).unwrap();
        assert!(config.api.has_legacy_token());
        assert!(!toml::to_string(&config).unwrap().contains("0123456789abcdef"));
        assert!(!Config::default().api.has_legacy_token());
    }
}

//! The panel's configuration: one typed struct, read from a TOML file with `PANEL_*`
//! environment overrides (`PANEL_HTTP__LISTEN=0.0.0.0:8090` sets `http.listen`). The
//! conventional `DATABASE_URL` and `REDIS_URL` variables override `database.url` and
//! `redis.url`, so container platforms that inject them just work.
//!
//! Every default lives here, and `config.example.toml` documents each one; a test keeps the
//! two in sync.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub auth: AuthConfig,
    pub smtp: SmtpConfig,
    pub rate_limits: RateLimitConfig,
    pub api_keys: ApiKeyConfig,
    pub plans: PlanConfig,
    pub blueprints: BlueprintsConfig,
    pub node_listener: NodeListenerConfig,
    pub server_metrics: ServerMetricsConfig,
    pub jobs: JobsConfig,
    pub servers: ServersConfig,
    pub quotas: QuotaConfig,
    pub backups: BackupsConfig,
    pub heartbeats: HeartbeatsConfig,
    pub notifications: NotificationsConfig,
    pub activity: ActivityConfig,
}

/// Servers' activity log as nodes report it (`activity`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActivityConfig {
    /// Days an entry is kept after the panel received it (1 to 3650).
    pub retention_days: u32,
    /// Seconds between prunes of older entries inside `panel serve` (60 to 86400).
    pub prune_interval_secs: u64,
}

impl Default for ActivityConfig {
    fn default() -> Self {
        ActivityConfig {
            retention_days: 90,
            prune_interval_secs: 3600,
        }
    }
}

/// Servers' backups through the panel (`backups`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupsConfig {
    /// Where nodes store new backups: `local` (the node's `backups.local_dir`) or `s3` (only
    /// when every node has `[backups.s3]` configured; wings refuses it otherwise).
    pub adapter: String,
    /// Encrypt each backup with its own key (AES-256-GCM on the node), kept sealed in the
    /// panel. Downloads are then the encrypted archive.
    pub encrypt: bool,
    /// Seconds one attempt of a backup or restore job waits for the node to finish it.
    pub timeout_secs: u64,
    /// Seconds a signed download URL stays valid (wings refuses longer than its
    /// `tokens.max_lifetime_secs`, 900 by default).
    pub download_url_secs: u64,
}

impl Default for BackupsConfig {
    fn default() -> Self {
        BackupsConfig {
            adapter: "local".into(),
            encrypt: false,
            timeout_secs: 3600,
            download_url_secs: 300,
        }
    }
}

/// Node heartbeats (`telemetry`): when a silent node counts as offline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatsConfig {
    /// Seconds without a heartbeat after which an online node is marked offline (and
    /// placement skips it). Its next heartbeat brings it back. Keep it a few times wings'
    /// `reporter.heartbeat_interval_secs`.
    pub offline_after_secs: u64,
    /// Seconds between the checks for silent nodes inside `panel serve`.
    pub check_interval_secs: u64,
}

impl Default for HeartbeatsConfig {
    fn default() -> Self {
        HeartbeatsConfig {
            offline_after_secs: 60,
            check_interval_secs: 15,
        }
    }
}

/// The notification hook for server events (`notify`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotificationsConfig {
    /// Each stored server event is POSTed here as JSON. Empty: no webhook.
    pub webhook_url: String,
    /// The HMAC-SHA256 key of the `X-Mamba-Signature` header (at least 16 characters when a
    /// webhook is set). Prefer PANEL_NOTIFICATIONS__WEBHOOK_SECRET over the file.
    pub webhook_secret: String,
    /// Seconds one delivery attempt may take.
    pub timeout_secs: u64,
    /// Longest wait between retries of a failed delivery (they start at 1 s and double).
    pub max_backoff_secs: u64,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        NotificationsConfig {
            webhook_url: String::new(),
            webhook_secret: String::new(),
            timeout_secs: 10,
            max_backoff_secs: 600,
        }
    }
}

/// The durable job engine (`jobs`): the workers that install, power and delete servers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Worker loops inside `panel serve`; 0 runs none (then run `panel worker` elsewhere).
    pub workers: usize,
    /// Milliseconds an idle worker waits before looking for work again.
    pub poll_interval_ms: u64,
    /// Seconds a claimed job stays with its worker without renewal (renewed every third of
    /// it); after a crash, the job is picked up again this long after the last renewal.
    pub lease_secs: u64,
    /// Attempts before a job that keeps failing with retryable errors is dead.
    pub max_attempts: u32,
    /// Milliseconds before the second attempt; doubled for each further one.
    pub backoff_base_ms: u64,
    /// Seconds the backoff never exceeds.
    pub backoff_cap_secs: u64,
    /// Seconds one attempt of an install or reinstall waits for the server to run before it
    /// counts as failed (and is retried).
    pub install_timeout_secs: u64,
    /// Hours a succeeded job stays in the history before it is deleted.
    pub succeeded_retention_hours: u64,
    /// Days a dead or failed job stays (unless retried) before it is deleted.
    pub dead_retention_days: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            workers: 2,
            poll_interval_ms: 1000,
            lease_secs: 30,
            max_attempts: 8,
            backoff_base_ms: 2000,
            backoff_cap_secs: 300,
            install_timeout_secs: 1800,
            succeeded_retention_hours: 168,
            dead_retention_days: 90,
        }
    }
}

/// Servers through the panel (`http::servers`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServersConfig {
    /// Seconds a console token lives (wings refuses tokens longer than its own
    /// `tokens.max_lifetime_secs`, 900 by default).
    pub console_token_secs: u64,
}

impl Default for ServersConfig {
    fn default() -> Self {
        ServersConfig {
            console_token_secs: 300,
        }
    }
}

/// What a tenant may hold unless an operator set its own quota (`tenants.max_*`). The same
/// for every tenant, operators' own included: a quota is a limit on a tenant, not a
/// permission of a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaConfig {
    pub max_servers: i64,
    /// Memory of all the tenant's servers together, in MB.
    pub max_memory_mb: i64,
    /// CPU of all the tenant's servers together, 100 per core.
    pub max_cpu_percent: i64,
    /// Disk of all the tenant's servers together, in MB.
    pub max_disk_mb: i64,
    /// Backups each server may keep (failed ones do not count).
    pub max_backups_per_server: i64,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            max_servers: 10,
            max_memory_mb: 32_768,
            max_cpu_percent: 1600,
            max_disk_mb: 204_800,
            max_backups_per_server: 5,
        }
    }
}

/// Servers' stored resource samples (`metrics_store`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerMetricsConfig {
    /// Hours raw samples are kept after their hour is rolled up. Also the latest a sample
    /// may arrive (older ones are refused), so it bounds how long wings may buffer.
    pub raw_retention_hours: u32,
    /// Seconds between runs of the rollup and prune job inside `panel serve`.
    pub rollup_interval_secs: u64,
}

impl Default for ServerMetricsConfig {
    fn default() -> Self {
        ServerMetricsConfig {
            raw_retention_hours: 24,
            rollup_interval_secs: 300,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlueprintsConfig {
    /// The folder of `<slug>.yaml` blueprint files, read at start. Relative paths are taken
    /// from the working directory.
    pub dir: String,
    /// Largest egg or blueprint an operator may import, in bytes.
    pub max_import_bytes: usize,
}

impl Default for BlueprintsConfig {
    fn default() -> Self {
        BlueprintsConfig {
            dir: "blueprints".into(),
            max_import_bytes: 2 * 1024 * 1024,
        }
    }
}

/// The listener nodes talk to: mutual TLS with certificates from the panel's own CA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeListenerConfig {
    /// Address the node listener binds.
    pub listen: SocketAddr,
    /// The address nodes reach it at: what `wings enroll --panel` is given.
    pub public_url: String,
    /// Days a node certificate is valid; nodes renew at two thirds of that.
    pub certificate_days: u64,
}

impl Default for NodeListenerConfig {
    fn default() -> Self {
        NodeListenerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8091)),
            public_url: "https://127.0.0.1:8091".into(),
            certificate_days: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Live (unrevoked) keys one user may hold, across tenants.
    pub max_per_user: u32,
}

impl Default for ApiKeyConfig {
    fn default() -> Self {
        ApiKeyConfig { max_per_user: 25 }
    }
}

/// Requests per hour an API key may make, by its tenant's plan. 0 means unlimited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlanConfig {
    pub free_per_hour: u32,
    pub premium_per_hour: u32,
    pub enterprise_per_hour: u32,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            free_per_hour: 100,
            premium_per_hour: 1000,
            enterprise_per_hour: 0,
        }
    }
}

impl PlanConfig {
    /// `None`: no limit.
    pub fn hourly_limit(&self, plan: &str) -> Option<u32> {
        let limit = match plan {
            "premium" => self.premium_per_hour,
            "enterprise" => self.enterprise_per_hour,
            _ => self.free_per_hour,
        };
        (limit > 0).then_some(limit)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// HTTP worker threads.
    pub workers: usize,
    /// Largest JSON request body accepted, in bytes.
    pub max_json_bytes: usize,
    /// The address people reach the panel at; links in emails start with it.
    pub public_url: String,
    /// Peers whose `X-Forwarded-For` is believed. Everyone else's is ignored.
    pub trusted_proxies: Vec<IpAddr>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8090)),
            workers: 2,
            max_json_bytes: 64 * 1024,
            public_url: "http://127.0.0.1:8090".into(),
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite:///absolute/path.db` or `postgres://user:pass@host/db`.
    pub url: String,
    /// Connections kept open; queries wait for a free one.
    pub pool_size: u32,
    /// Seconds a query waits for a free connection before the request fails.
    pub acquire_timeout_secs: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "sqlite:///var/lib/mamba/panel.db".into(),
            pool_size: 8,
            acquire_timeout_secs: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:6379/0`. Empty: rate limits and events are kept in this process only.
    pub url: String,
    /// Prepended to every key and pub/sub channel this panel uses.
    pub key_prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: String::new(),
            key_prefix: "mamba".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Memory argon2id uses per password hash, in KiB.
    pub argon2_memory_kib: u32,
    /// argon2id passes over that memory.
    pub argon2_iterations: u32,
    /// Browser sessions last this long.
    pub session_hours: u64,
    /// API refresh tokens (and so a login) last this long, however often they rotate.
    pub refresh_days: u64,
    /// Email verification and password-reset links expire after this long.
    pub link_hours: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        // OWASP's argon2id baseline (19 MiB, 2 passes, 1 lane).
        AuthConfig {
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            session_hours: 24 * 7,
            refresh_days: 30,
            link_hours: 24,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// TLS from the first byte (usually port 465).
    Tls,
    /// Plain connection upgraded with STARTTLS, which is required (usually port 587).
    Starttls,
    /// No encryption: only for a relay on the same host, or a test sink.
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// Empty: emails are written to the log instead of sent.
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub username: String,
    /// Prefer PANEL_SMTP__PASSWORD over writing it in the file.
    pub password: String,
    /// The sender, e.g. `Mamba <noreply@example.com>`.
    pub from: String,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            host: String::new(),
            port: 587,
            security: SmtpSecurity::Starttls,
            username: String::new(),
            password: String::new(),
            from: "Mamba <noreply@localhost>".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Login attempts one client address may make per minute, whatever the accounts.
    pub login_per_ip_per_minute: u32,
    /// Login attempts on one account from one address per 15 minutes. Keyed by both, so an
    /// attacker exhausts only their own allowance and never locks the owner out.
    pub login_per_account_per_15min: u32,
    /// Registration and password-reset requests one address may make per hour.
    pub email_requests_per_ip_per_hour: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            login_per_ip_per_minute: 30,
            login_per_account_per_15min: 10,
            email_requests_per_ip_per_hour: 20,
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
    /// Reads `path` when it exists (the panel also runs from the environment alone), then
    /// the environment on top.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::Invalid(format!("{} does not exist", path.display())));
            }
            figment = figment.merge(Toml::file(path));
        }
        Self::from_figment(figment)
    }

    fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment
            // PANEL_CONFIG and PANEL_LOG_JSON are command-line options; PANEL_MASTER_KEY and
            // PANEL_NEW_MASTER_KEY are secrets read on their own, never part of the config.
            .merge(
                Env::prefixed("PANEL_")
                    .ignore(&["config", "log_json", "master_key", "new_master_key"])
                    .split("__"),
            )
            .merge(Env::raw().only(&["database_url"]).map(|_| "database.url".into()))
            .merge(Env::raw().only(&["redis_url"]).map(|_| "redis.url".into()))
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if self.http.workers == 0 {
            return bad("http.workers must be at least 1");
        }
        if !(self.http.public_url.starts_with("http://") || self.http.public_url.starts_with("https://")) {
            return bad("http.public_url must start with http:// or https://");
        }
        if crate::db::DatabaseUrl::parse(&self.database.url).is_err() {
            return bad("database.url (DATABASE_URL) must start with sqlite:// or postgres://");
        }
        if self.database.pool_size == 0 {
            return bad("database.pool_size must be at least 1");
        }
        if !self.redis.url.is_empty() && !self.redis.url.starts_with("redis://") {
            return bad("redis.url (REDIS_URL) must start with redis://");
        }
        if self.auth.argon2_memory_kib < 8 * 1024 || self.auth.argon2_iterations == 0 {
            return bad("auth.argon2_memory_kib must be at least 8192 and auth.argon2_iterations at least 1");
        }
        if self.auth.session_hours == 0 || self.auth.refresh_days == 0 || self.auth.link_hours == 0 {
            return bad("auth.session_hours, auth.refresh_days and auth.link_hours must be at least 1");
        }
        if !self.node_listener.public_url.starts_with("https://") {
            return bad("node_listener.public_url must start with https://");
        }
        if self.node_listener.certificate_days == 0 || self.node_listener.certificate_days > 397 {
            return bad("node_listener.certificate_days must be between 1 and 397");
        }
        if !(2..=24 * 31).contains(&self.server_metrics.raw_retention_hours) {
            return bad("server_metrics.raw_retention_hours must be between 2 and 744");
        }
        if !(10..=3600).contains(&self.server_metrics.rollup_interval_secs) {
            return bad("server_metrics.rollup_interval_secs must be between 10 and 3600");
        }
        if !(1..=3650).contains(&self.activity.retention_days) {
            return bad("activity.retention_days must be between 1 and 3650");
        }
        if !(60..=86_400).contains(&self.activity.prune_interval_secs) {
            return bad("activity.prune_interval_secs must be between 60 and 86400");
        }
        if self.jobs.workers > 64 {
            return bad("jobs.workers must be at most 64");
        }
        if !(50..=60_000).contains(&self.jobs.poll_interval_ms) {
            return bad("jobs.poll_interval_ms must be between 50 and 60000");
        }
        if !(3..=3600).contains(&self.jobs.lease_secs) {
            return bad("jobs.lease_secs must be between 3 and 3600");
        }
        if !(1..=100).contains(&self.jobs.max_attempts) {
            return bad("jobs.max_attempts must be between 1 and 100");
        }
        if self.jobs.backoff_base_ms == 0
            || self.jobs.backoff_cap_secs.saturating_mul(1000) < self.jobs.backoff_base_ms
        {
            return bad("jobs.backoff_base_ms must be positive and at most jobs.backoff_cap_secs");
        }
        if !(10..=86_400).contains(&self.jobs.install_timeout_secs) {
            return bad("jobs.install_timeout_secs must be between 10 and 86400");
        }
        if !(1..=24 * 366).contains(&self.jobs.succeeded_retention_hours) {
            return bad("jobs.succeeded_retention_hours must be between 1 and 8784");
        }
        if !(1..=3660).contains(&self.jobs.dead_retention_days) {
            return bad("jobs.dead_retention_days must be between 1 and 3660");
        }
        if !matches!(self.backups.adapter.as_str(), "local" | "s3") {
            return bad("backups.adapter must be local or s3");
        }
        if !(10..=604_800).contains(&self.backups.timeout_secs) {
            return bad("backups.timeout_secs must be between 10 and 604800");
        }
        if !(10..=3600).contains(&self.backups.download_url_secs) {
            return bad("backups.download_url_secs must be between 10 and 3600");
        }
        if !(0..=1000).contains(&self.quotas.max_backups_per_server) {
            return bad("quotas.max_backups_per_server must be between 0 and 1000");
        }
        if !(30..=3600).contains(&self.servers.console_token_secs) {
            return bad("servers.console_token_secs must be between 30 and 3600");
        }
        let q = &self.quotas;
        if [q.max_servers, q.max_memory_mb, q.max_cpu_percent, q.max_disk_mb]
            .iter()
            .any(|v| !(0..=1 << 40).contains(v))
        {
            return bad("quotas.max_* must be between 0 and 2^40");
        }
        if !(1..=86_400).contains(&self.heartbeats.offline_after_secs)
            || !(1..=3600).contains(&self.heartbeats.check_interval_secs)
        {
            return bad(
                "heartbeats.offline_after_secs must be between 1 and 86400, heartbeats.check_interval_secs between 1 and 3600",
            );
        }
        let hook = &self.notifications.webhook_url;
        if !hook.is_empty() {
            if !(hook.starts_with("http://") || hook.starts_with("https://")) {
                return bad("notifications.webhook_url must start with http:// or https://");
            }
            if self.notifications.webhook_secret.len() < 16 {
                return bad(
                    "notifications.webhook_secret must have at least 16 characters when a webhook is set",
                );
            }
        }
        if !self.smtp.host.is_empty() && self.smtp.from.parse::<lettre::message::Mailbox>().is_err() {
            return bad("smtp.from must be an address such as `Mamba <noreply@example.com>`");
        }
        Ok(())
    }
}

#[cfg(test)]
#[expect(
    clippy::result_large_err,
    reason = "figment's test jail fixes the closure's error type"
)]
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
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("panel.toml", "[http]\nworkers = 3\n")?;
            jail.set_env("PANEL_HTTP__LISTEN", "0.0.0.0:9000");
            jail.set_env("DATABASE_URL", "postgres://u@db/panel");
            jail.set_env("REDIS_URL", "redis://cache:6379/0");
            jail.set_env("PANEL_MASTER_KEY", "never-a-config-key");
            let config = Config::load(Some(Path::new("panel.toml"))).unwrap();
            assert_eq!(config.http.workers, 3);
            assert_eq!(config.http.listen, "0.0.0.0:9000".parse().unwrap());
            assert_eq!(config.database.url, "postgres://u@db/panel");
            assert_eq!(config.redis.url, "redis://cache:6379/0");
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_refused_with_the_key_named() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DATABASE_URL", "mysql://nope");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("database.url"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("PANEL_HTTP__WORKERS", "0");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("http.workers"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("PANEL_HTTP__NOT_A_KEY", "1");
            assert!(Config::load(None).is_err(), "unknown keys are refused");
            Ok(())
        });
    }
}

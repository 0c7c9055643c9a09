//! The SFTP server (russh for SSH, russh-sftp for the SFTP wire format) on its own port.
//!
//! - `auth`: the pluggable [`auth::AuthSource`] that decides logins (`<user>.<server short id>`
//!   with a password or a public key) and the static credential file that implements it.
//! - `panel_auth`: the same over the panel (mutual TLS), with a short cache of grants.
//! - `ratelimit`: failed-login limits per IP address and per user name.
//! - `session`: one SSH connection: authentication, the `sftp` subsystem (nothing else), and
//!   the watch that closes the connection when access is revoked or the server is deleted.
//! - `protocol`: the `sftp` subsystem: requests decoded, run (reads and writes concurrently)
//!   and answered against the server's jailed filesystem.
//! - `hostkey`: the Ed25519 host key, generated on first start.

pub mod auth;
pub mod hostkey;
pub mod panel_auth;
mod protocol;
pub mod ratelimit;
mod session;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::MethodKind;
use russh::server::Config as SshConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use mamba_shared::ids::ServerId;

use self::auth::AuthSource;
use self::ratelimit::FailureLimiter;
use crate::config::SftpConfig;
use crate::server::manager::Manager;
use crate::tokens::TokenVerifier;

/// Everything the SFTP connections share.
pub struct SftpContext {
    pub config: SftpConfig,
    pub manager: Arc<Manager>,
    pub auth: Arc<dyn AuthSource>,
    pub tokens: Arc<TokenVerifier>,
    ip_failures: FailureLimiter<IpAddr>,
    user_failures: FailureLimiter<String>,
    connections: Mutex<Connections>,
}

#[derive(Default)]
struct Connections {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    /// Logged-in sessions per game server.
    per_server: HashMap<ServerId, usize>,
}

/// Holds a connection's place in the connection limits until dropped.
struct ConnectionSlot {
    ctx: Arc<SftpContext>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self.ctx.connections.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        release(&mut c.per_ip, &self.ip);
    }
}

/// Gives back one place counted under `key`, forgetting keys that hold none.
fn release<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// Holds a logged-in session's place in its server's session limit until dropped.
struct ServerSessionSlot {
    ctx: Arc<SftpContext>,
    server: ServerId,
}

impl Drop for ServerSessionSlot {
    fn drop(&mut self) {
        let mut c = self.ctx.connections.lock().unwrap_or_else(|p| p.into_inner());
        release(&mut c.per_server, &self.server);
    }
}

impl SftpContext {
    pub fn new(
        config: SftpConfig,
        manager: Arc<Manager>,
        auth: Arc<dyn AuthSource>,
        tokens: Arc<TokenVerifier>,
    ) -> Arc<SftpContext> {
        let window = Duration::from_secs(config.failed_login_window_secs);
        Arc::new(SftpContext {
            ip_failures: FailureLimiter::new(config.failed_logins_per_ip, window),
            user_failures: FailureLimiter::new(config.failed_logins_per_user, window),
            connections: Mutex::new(Connections::default()),
            config,
            manager,
            auth,
            tokens,
        })
    }

    fn take_slot(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionSlot> {
        let mut c = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        if c.total >= self.config.max_connections || from_ip >= self.config.max_connections_per_ip {
            return None;
        }
        c.total += 1;
        *c.per_ip.entry(ip).or_default() += 1;
        Some(ConnectionSlot {
            ctx: self.clone(),
            ip,
        })
    }

    fn take_server_slot(self: &Arc<Self>, server: &ServerId) -> Option<ServerSessionSlot> {
        let mut c = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let open = c.per_server.entry(server.clone()).or_default();
        if *open >= self.config.max_sessions_per_server {
            return None;
        }
        *open += 1;
        Some(ServerSessionSlot {
            ctx: self.clone(),
            server: server.clone(),
        })
    }
}

/// Where the host key lives when the config leaves it empty.
pub fn host_key_path(config: &SftpConfig, data_dir: &std::path::Path) -> PathBuf {
    if config.host_key_file.is_empty() {
        data_dir.join("sftp").join("host_ed25519")
    } else {
        PathBuf::from(&config.host_key_file)
    }
}

/// A bound SFTP listener, ready to serve.
pub struct SftpServer {
    listener: TcpListener,
    ssh: Arc<SshConfig>,
    ctx: Arc<SftpContext>,
}

impl SftpServer {
    /// Loads (or makes) the host key and binds the port, so that both fail at start.
    pub async fn bind(ctx: Arc<SftpContext>, host_key: PathBuf) -> anyhow::Result<SftpServer> {
        let key = hostkey::load_or_generate(&host_key)?;
        let config = &ctx.config;
        let ssh = SshConfig {
            server_id: russh::SshId::Standard(
                format!("SSH-2.0-mamba_wings_{}", env!("CARGO_PKG_VERSION")).into(),
            ),
            methods: (&[MethodKind::PublicKey, MethodKind::Password][..]).into(),
            // Every refusal takes as long, so timing tells nothing; the first "none" probe
            // of OpenSSH clients is answered at once.
            auth_rejection_time: Duration::from_secs(1),
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![key],
            max_auth_attempts: config.max_auth_attempts,
            inactivity_timeout: Some(Duration::from_secs(config.idle_timeout_secs)),
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 3,
            nodelay: true,
            ..SshConfig::default()
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for SFTP on {}: {e}", config.listen))?;
        Ok(SftpServer {
            listener,
            ssh: Arc::new(ssh),
            ctx,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `shutdown` is cancelled; each runs on its own task.
    pub async fn serve(self, shutdown: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            let (socket, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!("SFTP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let ip = canonical_ip(peer.ip());
            if self.ctx.ip_failures.is_blocked(&ip) {
                tracing::debug!(%peer, "SFTP connection from a blocked address closed");
                continue;
            }
            let Some(slot) = self.ctx.take_slot(ip) else {
                tracing::debug!(%peer, "SFTP connection limit reached; connection closed");
                continue;
            };
            let ctx = self.ctx.clone();
            let ssh = self.ssh.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                session::run(ctx, ssh, socket, peer, shutdown).await;
                drop(slot);
            });
        }
    }
}

/// IPv4 clients on a dual-stack socket count as their IPv4 address.
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

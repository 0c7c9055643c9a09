//! Downloads from a URL into a server (`POST files/pull`), without reaching anything but
//! public addresses.
//!
//! The address check happens on the connection actually made: the HTTP client's resolver
//! hands the connector only addresses that pass, IP-literal hosts (however they were written:
//! the URL parser normalises `2130706433`, `0x7f.1` and `127.1` to `127.0.0.1`) are checked
//! before the request and on every redirect, and the peer address of the response is checked
//! again. Proxies from the environment are ignored, so the connection is always direct.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use mamba_shared::files_api::PullView;
use tokio_util::sync::CancellationToken;

use super::stream::{commit_temp, joined, spawn_writer, temp_sibling};
use super::{FsError, OpenOptions, ServerFs};
use crate::config::FilesConfig;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("invalid URL: {0}")]
    BadUrl(String),
    #[error("{0} is not a public address; pulls may only reach public hosts")]
    Forbidden(String),
    #[error("pulls are disabled on this node")]
    Disabled,
    #[error("{0} pulls are already running for this server")]
    TooMany(usize),
    #[error("the download failed: {0}")]
    Remote(String),
    #[error("the download passed the limit of {0} bytes")]
    TooLarge(u64),
    #[error("the download was cancelled")]
    Cancelled,
    #[error("the download took longer than {0} seconds")]
    TimedOut(u64),
    #[error(transparent)]
    Files(#[from] FsError),
}

/// A CIDR network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Parses `10.0.0.0/8` or `fd00::/8` (a bare address is a single host).
pub fn parse_network(text: &str) -> Option<Network> {
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
        None => {
            let a = text.parse::<IpAddr>().ok()?;
            (a, if a.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some(Network { addr, prefix })
}

/// An IPv6 address that carries an IPv4 one (mapped `::ffff:a.b.c.d`, compatible
/// `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`) is judged as that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            let embedded = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
            if s[..6] == [0, 0, 0, 0, 0, 0] && !v6.is_loopback() && !v6.is_unspecified() {
                return IpAddr::V4(embedded);
            }
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return IpAddr::V4(embedded);
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// Whether `ip` is an ordinary public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_unspecified()
                || o[0] == 0 // 0.0.0.0/8 "this network"
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 CGNAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 IETF
                || (o[0] == 192 && o[1] == 0 && o[2] == 2) // documentation
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
                || (o[0] == 198 && o[1] == 51 && o[2] == 100)
                || (o[0] == 203 && o[1] == 0 && o[2] == 113)
                || v4.is_multicast()
                || o[0] >= 240) // reserved and broadcast
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x2001 && s[1] == 0) // Teredo
                || s[0] == 0x2002 // 6to4 carries an IPv4 address
                || (s[0] == 0x0100 && s[1..4] == [0, 0, 0])) // discard
        }
    }
}

/// The address policy: public addresses, plus the operator's allowed networks.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allowed: Vec<Network>,
}

impl AddressPolicy {
    pub fn new(config: &FilesConfig) -> AddressPolicy {
        AddressPolicy {
            allowed: config
                .pull_allowed_networks
                .iter()
                .filter_map(|n| parse_network(n))
                .collect(),
        }
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.allowed.iter().any(|n| n.contains(ip))
    }
}

/// Resolves names and keeps only addresses the policy allows, so the connector can only
/// ever dial those.
struct GuardedResolver {
    policy: AddressPolicy,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found.iter().copied().filter(|a| policy.allows(a.ip())).collect();
            if allowed.is_empty() {
                let shown = found
                    .first()
                    .map_or_else(|| host.clone(), |a| format!("{host} ({})", a.ip()));
                return Err(Box::new(PullError::Forbidden(shown)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Checks a URL's scheme and, for an IP-literal host, its address.
fn check_url(url: &url::Url, policy: &AddressPolicy) -> Result<(), PullError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(PullError::BadUrl(format!(
            "scheme {:?} is not http or https",
            url.scheme()
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(PullError::BadUrl("credentials in the URL are not allowed".into()));
    }
    let ip = match url.host() {
        None => return Err(PullError::BadUrl("the URL has no host".into())),
        Some(url::Host::Domain(_)) => return Ok(()),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
    };
    if policy.allows(ip) {
        Ok(())
    } else {
        Err(PullError::Forbidden(ip.to_string()))
    }
}

const MAX_REDIRECTS: usize = 5;

/// The HTTP client for pulls: direct connections only, guarded resolver, redirects checked.
pub fn client(config: &FilesConfig) -> Result<reqwest::Client, PullError> {
    let policy = AddressPolicy::new(config);
    let redirect_policy = policy.clone();
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| PullError::Remote(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .dns_resolver(GuardedResolver { policy })
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(PullError::Remote("too many redirects".into()));
            }
            match check_url(attempt.url(), &redirect_policy) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(e),
            }
        }))
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("mamba-wings/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| PullError::Remote(e.to_string()))
}

struct Running {
    view: PullView,
    bytes: Arc<AtomicU64>,
    cancel: CancellationToken,
}

/// The pulls of one server.
#[derive(Default)]
pub struct Pulls {
    running: Mutex<HashMap<String, Running>>,
}

impl std::fmt::Debug for Pulls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pulls").finish()
    }
}

impl Pulls {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self) -> Vec<PullView> {
        let mut views: Vec<PullView> = self
            .lock()
            .values()
            .map(|r| PullView {
                bytes: r.bytes.load(Ordering::Relaxed),
                ..r.view.clone()
            })
            .collect();
        views.sort_by(|a, b| a.started_at.cmp(&b.started_at).then_with(|| a.id.cmp(&b.id)));
        views
    }

    /// Cancels a running pull; false if there is none with that id.
    pub fn cancel(&self, id: &str) -> bool {
        self.lock().get(id).map(|r| r.cancel.cancel()).is_some()
    }

    pub fn cancel_all(&self) {
        for r in self.lock().values() {
            r.cancel.cancel();
        }
    }
}

/// One accepted pull, ready to run.
pub struct PullJob {
    pulls: Arc<Pulls>,
    fs: ServerFs,
    client: reqwest::Client,
    url: url::Url,
    pub target: String,
    /// The hidden file the download goes to until it is complete.
    tmp: String,
    pub id: String,
    bytes: Arc<AtomicU64>,
    cancel: CancellationToken,
    max_bytes: u64,
    timeout: Duration,
    policy: AddressPolicy,
}

impl std::fmt::Debug for PullJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullJob").field("id", &self.id).finish()
    }
}

/// Checks a pull request and registers it: the URL, the target path (which must not exist)
/// and the per-server limit.
pub fn prepare(
    pulls: &Arc<Pulls>,
    fs: &ServerFs,
    config: &FilesConfig,
    client: reqwest::Client,
    raw_url: &str,
    directory: &str,
    file_name: Option<&str>,
) -> Result<PullJob, PullError> {
    if !config.pull_enabled {
        return Err(PullError::Disabled);
    }
    if raw_url.len() > 8192 {
        return Err(PullError::BadUrl("longer than 8192 bytes".into()));
    }
    let url = url::Url::parse(raw_url).map_err(|e| PullError::BadUrl(e.to_string()))?;
    check_url(&url, &AddressPolicy::new(config))?;
    let name = match file_name {
        Some(n) => n.to_string(),
        None => url
            .path_segments()
            .and_then(|mut s| s.next_back().map(str::to_string))
            .filter(|n| !n.is_empty())
            .and_then(|n| percent_decode(&n))
            .unwrap_or_else(|| "download".into()),
    };
    if name.is_empty() || name.contains(['/', '\\', '\0']) || name == "." || name == ".." {
        return Err(PullError::Files(FsError::BadPath(name)));
    }
    let directory = super::clean_path(directory)?;
    let target = super::join(directory, &name);
    let target = super::clean_path(&target)?.to_string();
    match fs.lstat(&target) {
        Ok(_) => return Err(PullError::Files(FsError::Exists(target))),
        Err(FsError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    if fs.is_denied(&target) {
        return Err(PullError::Files(FsError::Denied(target)));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let bytes = Arc::new(AtomicU64::new(0));
    let cancel = CancellationToken::new();
    {
        let mut running = pulls.lock();
        if running.len() >= config.pull_max_concurrent {
            return Err(PullError::TooMany(running.len()));
        }
        running.insert(
            id.clone(),
            Running {
                view: PullView {
                    id: id.clone(),
                    url: url.to_string(),
                    file: target.clone(),
                    bytes: 0,
                    total: None,
                    started_at: crate::tokens::now_secs(),
                },
                bytes: bytes.clone(),
                cancel: cancel.clone(),
            },
        );
    }
    Ok(PullJob {
        pulls: pulls.clone(),
        fs: fs.clone(),
        client,
        url,
        tmp: temp_sibling(&target, "pull")?,
        target,
        id,
        bytes,
        cancel,
        max_bytes: config.pull_max_bytes,
        timeout: Duration::from_secs(config.pull_timeout_secs),
        policy: AddressPolicy::new(config),
    })
}

fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl PullJob {
    /// Runs the download to its end; the pull is unregistered whatever happens, and a partial
    /// file never stays behind.
    pub async fn run(self) -> Result<(String, u64), PullError> {
        let timeout = self.timeout;
        let cancel = self.cancel.clone();
        let pulls = self.pulls.clone();
        let id = self.id.clone();
        let (self_fs, self_tmp) = (self.fs.clone(), self.tmp.clone());
        let result = tokio::select! {
            r = tokio::time::timeout(timeout, self.download()) => {
                r.unwrap_or(Err(PullError::TimedOut(timeout.as_secs())))
            }
            () = cancel.cancelled() => Err(PullError::Cancelled),
        };
        pulls.lock().remove(&id);
        if result.is_err() {
            // Cancelled or timed out mid-download: the partial file goes.
            let (fs, tmp) = (self_fs, self_tmp);
            let _ = tokio::task::spawn_blocking(move || fs.remove_file(&tmp)).await;
        }
        result
    }

    async fn download(&self) -> Result<(String, u64), PullError> {
        let response = self
            .client
            .get(self.url.clone())
            .send()
            .await
            .map_err(|e| describe(&e))?;
        // The resolver only offered allowed addresses; this checks the socket once more.
        if let Some(peer) = response.remote_addr()
            && !self.policy.allows(peer.ip())
        {
            return Err(PullError::Forbidden(peer.ip().to_string()));
        }
        if !response.status().is_success() {
            return Err(PullError::Remote(format!(
                "the server answered {}",
                response.status()
            )));
        }
        let total = response.content_length();
        if total.is_some_and(|t| t > self.max_bytes) {
            return Err(PullError::TooLarge(self.max_bytes));
        }
        if let Some(r) = self.pulls.lock().get_mut(&self.id) {
            r.view.total = total;
        }
        let tmp = self.tmp.clone();
        let fs = self.fs.clone();
        let tmp_for_open = tmp.clone();
        let file = tokio::task::spawn_blocking(move || {
            fs.open(
                &tmp_for_open,
                &OpenOptions {
                    write: true,
                    create: true,
                    exclusive: true,
                    ..OpenOptions::default()
                },
            )
        })
        .await
        .map_err(|e| PullError::Remote(e.to_string()))??;
        let (tx, writer) = spawn_writer(file);
        let mut body = response.bytes_stream();
        let mut received = 0u64;
        let mut failure = None;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    failure = Some(describe(&e));
                    break;
                }
            };
            received += chunk.len() as u64;
            if received > self.max_bytes {
                failure = Some(PullError::TooLarge(self.max_bytes));
                break;
            }
            self.bytes.store(received, Ordering::Relaxed);
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
        drop(tx);
        let written = joined(writer.await, &tmp);
        let fs = self.fs.clone();
        let target = self.target.clone();
        let outcome = match (failure, written) {
            (Some(e), _) => Err(e),
            (None, Err(e)) => Err(e.into()),
            (None, Ok(n)) => Ok(n),
        };
        tokio::task::spawn_blocking(move || match outcome {
            Ok(n) => commit_temp(&fs, &tmp, &target, false)
                .map(|()| (target, n))
                .map_err(PullError::from),
            Err(e) => {
                let _ = fs.remove_file(&tmp);
                Err(e)
            }
        })
        .await
        .map_err(|e| PullError::Remote(e.to_string()))?
    }
}

/// A reqwest error with its cause (the resolver's refusal shows up as the source).
fn describe(e: &reqwest::Error) -> PullError {
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(PullError::Forbidden(what)) = s.downcast_ref::<PullError>() {
            return PullError::Forbidden(what.clone());
        }
        source = s.source();
    }
    if e.is_timeout() {
        return PullError::Remote("the remote server timed out".into());
    }
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    PullError::Remote(message)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for bad in [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            assert!(!is_public(bad.parse().unwrap()), "{bad} must be refused");
        }
        for good in [
            "1.1.1.1",
            "8.8.8.8",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert!(is_public(good.parse().unwrap()), "{good} is public");
        }
    }

    #[test]
    fn every_way_of_writing_an_address_is_normalised_and_checked() {
        let policy = AddressPolicy::default();
        for url in [
            "http://127.0.0.1/x",
            "http://2130706433/x",
            "http://0x7f000001/x",
            "http://0x7f.1/x",
            "http://127.1/x",
            "http://0177.0.0.1/x",
            "http://[::1]/x",
            "http://[::ffff:7f00:1]/x",
            "http://[::ffff:169.254.169.254]/latest/meta-data",
            "http://169.254.169.254/latest/meta-data",
            "http://0/x",
        ] {
            let parsed = url::Url::parse(url).unwrap();
            assert!(
                matches!(check_url(&parsed, &policy), Err(PullError::Forbidden(_))),
                "{url} must be refused"
            );
        }
        for bad in [
            "file:///etc/passwd",
            "ftp://example.com/x",
            "http://user:pw@example.com/",
        ] {
            assert!(matches!(
                check_url(&url::Url::parse(bad).unwrap(), &policy),
                Err(PullError::BadUrl(_))
            ));
        }
        assert!(check_url(&url::Url::parse("https://example.com/a.jar").unwrap(), &policy).is_ok());
    }

    #[test]
    fn allowed_networks_open_a_hole_only_where_configured() {
        let policy = AddressPolicy {
            allowed: vec![
                parse_network("127.0.0.1/32").unwrap(),
                parse_network("fd00::/8").unwrap(),
            ],
        };
        assert!(policy.allows("127.0.0.1".parse().unwrap()));
        assert!(policy.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(policy.allows("fd00::5".parse().unwrap()));
        assert!(!policy.allows("127.0.0.2".parse().unwrap()));
        assert!(!policy.allows("10.0.0.1".parse().unwrap()));
        assert!(parse_network("10.0.0.0/33").is_none());
        assert!(parse_network("nonsense").is_none());
    }
}

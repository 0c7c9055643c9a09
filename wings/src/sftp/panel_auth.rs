//! [`AuthSource`] over the panel: each login is checked by `POST /api/node/v1/sftp/auth` on
//! the panel's node listener, with this node's certificate (mutual TLS).
//!
//! Successful answers are cached for `sftp.panel_cache_secs`, so an SFTP client that opens
//! several connections (or offers a key, then signs with it) costs the panel one check.
//! Refusals are never cached: the limits (here and at the panel) decide how often a client
//! may retry. A cached grant is dropped as soon as the deauthorize route names its user and
//! server, so a revocation takes effect for new logins at once, not after the cache time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mamba_shared::ids::ServerId;
use mamba_shared::node_sftp::{SFTP_AUTH_PATH, SftpAuthGrant, SftpAuthRequest, SftpCredential};
use sha2::{Digest, Sha256};

use super::auth::{AuthSource, AuthSourceError, Credential, Grant, LoginName};
use crate::node_identity::NodeIdentity;
use crate::tokens::{TokenVerifier, now_secs};

/// Grants remembered at once; past this the oldest half is dropped.
const MAX_CACHED: usize = 10_000;
/// Longest panel answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

struct Cached {
    grant: Grant,
    /// Unix seconds, compared with deauthorization times.
    granted_at: u64,
    expires: Instant,
}

pub struct PanelAuthSource {
    client: reqwest::Client,
    url: url::Url,
    ttl: Duration,
    tokens: Arc<TokenVerifier>,
    /// Keys are salted digests of login and credential, so no password sits in memory
    /// longer than its check.
    salt: [u8; 32],
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PanelAuthError {
    #[error(transparent)]
    Identity(#[from] crate::node_identity::IdentityError),
    #[error("panel URL: {0}")]
    Url(String),
    #[error("no randomness for the cache salt")]
    Random,
}

impl PanelAuthSource {
    /// Checks logins with the panel this node is enrolled with; `cache` is how long a
    /// successful check is reused (zero: never).
    pub fn new(
        identity: &NodeIdentity,
        tokens: Arc<TokenVerifier>,
        cache: Duration,
    ) -> Result<PanelAuthSource, PanelAuthError> {
        let url = url::Url::parse(&identity.record.panel_url)
            .and_then(|base| base.join(SFTP_AUTH_PATH))
            .map_err(|e| PanelAuthError::Url(e.to_string()))?;
        let mut salt = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .map_err(|_| PanelAuthError::Random)?;
        Ok(PanelAuthSource {
            // The client presents the live certificate slot, so renewals need no new client.
            client: identity.panel_client()?,
            url,
            ttl: cache,
            tokens,
            salt,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn cache_key(&self, login: &LoginName, credential: &SftpCredential) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.salt);
        for part in [login.user.as_bytes(), login.server_short.as_bytes()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        match credential {
            SftpCredential::Password { password } => {
                h.update(b"p");
                h.update(password.as_bytes());
            }
            SftpCredential::PublicKey { public_key } => {
                h.update(b"k");
                h.update(public_key.as_bytes());
            }
        }
        h.finalize().into()
    }

    /// A cached grant still valid: not expired, and its user not deauthorized on its server
    /// since it was granted.
    fn cached(&self, key: &[u8; 32]) -> Option<Grant> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let entry = cache.get(key)?;
        let revoked = self
            .tokens
            .deauthorized_at(&entry.grant.server, &entry.grant.user_id)
            .is_some_and(|at| at >= entry.granted_at);
        if revoked || entry.expires <= Instant::now() {
            cache.remove(key);
            return None;
        }
        Some(entry.grant.clone())
    }

    fn remember(&self, key: [u8; 32], grant: &Grant) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, c| c.expires > now);
            if cache.len() >= MAX_CACHED {
                let mut by_age: Vec<_> = cache.iter().map(|(k, c)| (c.expires, *k)).collect();
                by_age.sort_unstable();
                for (_, k) in by_age.into_iter().take(MAX_CACHED / 2) {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(
            key,
            Cached {
                grant: grant.clone(),
                granted_at: now_secs(),
                expires: now + self.ttl,
            },
        );
    }

    /// Grants cached now (for tests and metrics).
    pub fn cached_len(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    async fn ask(&self, body: &SftpAuthRequest) -> Result<Option<Grant>, AuthSourceError> {
        let unavailable = |e: String| AuthSourceError::Unavailable(e);
        let response = self
            .client
            .post(self.url.clone())
            .json(body)
            .send()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let status = response.status().as_u16();
        match status {
            200 => {}
            // Wrong credential, no access, over a limit or a login the panel cannot parse:
            // a refusal, counted like any other.
            400 | 401 | 403 | 422 | 429 => {
                tracing::debug!(status, user = %body.user.escape_debug(), "the panel refused an SFTP login");
                return Ok(None);
            }
            _ => return Err(unavailable(format!("the panel answered {status}"))),
        }
        let bytes = response.bytes().await.map_err(|e| unavailable(e.to_string()))?;
        if bytes.len() > MAX_ANSWER_BYTES {
            return Err(unavailable("the panel's answer is too long".into()));
        }
        let grant: SftpAuthGrant =
            serde_json::from_slice(&bytes).map_err(|e| unavailable(format!("the panel's answer: {e}")))?;
        let server =
            ServerId::new(grant.server_id).map_err(|e| unavailable(format!("the panel's answer: {e}")))?;
        // A grant for a server the login did not name is not for this login.
        if !super::auth::names_server(&server, &body.server_short) {
            return Err(unavailable("the panel granted another server".into()));
        }
        Ok(Some(Grant {
            user_id: grant.user_id,
            server,
            permissions: grant.permissions,
        }))
    }
}

#[async_trait]
impl AuthSource for PanelAuthSource {
    async fn authenticate(
        &self,
        login: &LoginName,
        credential: Credential<'_>,
        client: IpAddr,
    ) -> Result<Option<Grant>, AuthSourceError> {
        let credential = match credential {
            Credential::Password(password) => SftpCredential::Password {
                password: password.to_string(),
            },
            Credential::PublicKey(key) => SftpCredential::PublicKey {
                public_key: key
                    .to_openssh()
                    .map_err(|e| AuthSourceError::Unavailable(e.to_string()))?,
            },
        };
        let key = self.cache_key(login, &credential);
        if let Some(grant) = self.cached(&key) {
            return Ok(Some(grant));
        }
        let body = SftpAuthRequest {
            user: login.user.clone(),
            server_short: login.server_short.clone(),
            client_ip: client,
            credential,
        };
        let grant = self.ask(&body).await?;
        if let Some(grant) = &grant {
            self.remember(key, grant);
        }
        Ok(grant)
    }
}

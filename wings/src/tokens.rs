//! Console tokens: EdDSA JWTs signed by the panel, checked against its public key, and the
//! revocations that refuse tokens before they expire (denied token ids, deauthorized users).
//!
//! Revocations are kept in `<data_dir>/tokens.json`, so a wings restart forgets none of them;
//! each entry is dropped once every token it could refuse has expired.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mamba_shared::files_api::SignedUrlClaims;
use mamba_shared::ids::ServerId;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::config::TokensConfig;
use crate::server::store::write_atomically;

/// The only scope a console socket accepts.
pub const WEBSOCKET_SCOPE: &str = "websocket";

/// What the panel puts in a console token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id.
    pub sub: String,
    /// The server the token is for.
    pub server: String,
    pub permissions: Vec<String>,
    pub scope: String,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
}

impl Claims {
    /// `"*"` grants every permission (the panel's operators).
    pub fn can(&self, permission: &str) -> bool {
        self.permissions.iter().any(|p| p == permission || p == "*")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("no token signing key is configured on this node")]
    NoKey,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("the token is for another server")]
    WrongServer,
    #[error("the token is not for this purpose")]
    WrongScope,
    #[error("the token was issued before the current signing key")]
    BeforeKey,
    #[error("the token lives longer than this node allows")]
    TooLong,
    #[error("the token has been revoked")]
    Revoked,
    #[error("the token has already been used")]
    Used,
}

/// A revocation that live sockets must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    User { server: ServerId, user: String },
    Token { jti: String },
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Revocations {
    /// Denied token ids, with the time their token expires.
    denied: BTreeMap<String, u64>,
    /// server id -> user id -> when the user was deauthorized (Unix seconds).
    deauthorized: BTreeMap<String, BTreeMap<String, u64>>,
}

pub struct TokenVerifier {
    key: Option<DecodingKey>,
    config: TokensConfig,
    path: PathBuf,
    revocations: Mutex<Revocations>,
    events: broadcast::Sender<Revocation>,
    /// Ids of signed-URL tokens already used, with their expiry, kept in
    /// `<data_dir>/used-tokens.json` so a restart does not make them usable again.
    used: Mutex<BTreeMap<String, u64>>,
    used_path: PathBuf,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("has_key", &self.key.is_some())
            .finish()
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum TokenSetupError {
    #[error("tokens.panel_public_key_file {path}: {source}")]
    ReadKey { path: String, source: std::io::Error },
    #[error("tokens.panel_public_key_file {path} is not an Ed25519 public key in PEM: {source}")]
    BadKey {
        path: String,
        source: jsonwebtoken::errors::Error,
    },
}

impl TokenVerifier {
    pub fn new(config: &TokensConfig, data_dir: &Path) -> Result<TokenVerifier, TokenSetupError> {
        let key = if config.panel_public_key_file.is_empty() {
            tracing::warn!("tokens.panel_public_key_file is not set: console sockets refuse every token");
            None
        } else {
            let path = config.panel_public_key_file.clone();
            let pem = std::fs::read(&path).map_err(|source| TokenSetupError::ReadKey {
                path: path.clone(),
                source,
            })?;
            Some(DecodingKey::from_ed_pem(&pem).map_err(|source| TokenSetupError::BadKey { path, source })?)
        };
        let path = data_dir.join("tokens.json");
        let revocations = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %path.display(), "unreadable revocation list, starting empty: {e}");
                Revocations::default()
            }),
            Err(_) => Revocations::default(),
        };
        let (events, _) = broadcast::channel(256);
        let used_path = data_dir.join("used-tokens.json");
        let used = match std::fs::read(&used_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %used_path.display(), "unreadable used-token list, starting empty: {e}");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        Ok(TokenVerifier {
            key,
            config: config.clone(),
            path,
            revocations: Mutex::new(revocations),
            events,
            used: Mutex::new(used),
            used_path,
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.events.subscribe()
    }

    /// Checks signature, lifetime, scope, server and revocations.
    pub fn verify(&self, token: &str, server: &ServerId) -> Result<Claims, TokenError> {
        let key = self.key.as_ref().ok_or(TokenError::NoKey)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "iat", "sub"]);
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(e.to_string()),
            })?
            .claims;
        let now = now_secs();
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        if claims.scope != WEBSOCKET_SCOPE {
            return Err(TokenError::WrongScope);
        }
        if claims.server != server.as_str() {
            return Err(TokenError::WrongServer);
        }
        // Clocks drift a little; a token from further in the future was not minted honestly.
        if claims.iat > now + 60 {
            return Err(TokenError::Invalid("iat is in the future".into()));
        }
        if claims.iat < self.config.not_before {
            return Err(TokenError::BeforeKey);
        }
        if claims.exp.saturating_sub(claims.iat) > self.config.max_lifetime_secs {
            return Err(TokenError::TooLong);
        }
        if self.is_revoked(&claims) {
            return Err(TokenError::Revoked);
        }
        Ok(claims)
    }

    /// Checks a signed-URL token: signature, lifetime, `scope`, revocations, and that it was
    /// never used (the server and file it is for are in its claims); then records it as used (saved before this returns), so it
    /// is refused from now on, also after a restart.
    pub fn redeem_signed_url(&self, token: &str, scope: &str) -> Result<SignedUrlClaims, TokenError> {
        let key = self.key.as_ref().ok_or(TokenError::NoKey)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "iat", "sub"]);
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<SignedUrlClaims>(token, key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(e.to_string()),
            })?
            .claims;
        let now = now_secs();
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        if claims.scope != scope {
            return Err(TokenError::WrongScope);
        }
        if claims.iat > now + 60 {
            return Err(TokenError::Invalid("iat is in the future".into()));
        }
        if claims.iat < self.config.not_before {
            return Err(TokenError::BeforeKey);
        }
        if claims.exp.saturating_sub(claims.iat) > self.config.max_lifetime_secs {
            return Err(TokenError::TooLong);
        }
        if claims.jti.is_empty() || claims.jti.len() > 256 {
            return Err(TokenError::Invalid("jti must be 1 to 256 bytes".into()));
        }
        {
            let revocations = self.revocations.lock().unwrap_or_else(|p| p.into_inner());
            let deauthorized = revocations
                .deauthorized
                .get(&claims.server)
                .and_then(|users| users.get(&claims.sub))
                .is_some_and(|&at| claims.iat <= at);
            if revocations.denied.contains_key(&claims.jti) || deauthorized {
                return Err(TokenError::Revoked);
            }
        }
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if used.contains_key(&claims.jti) {
            return Err(TokenError::Used);
        }
        used.insert(claims.jti.clone(), claims.exp);
        used.retain(|_, exp| *exp > now);
        let saved = serde_json::to_vec(&*used)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_atomically(&self.used_path, &bytes));
        if let Err(e) = saved {
            // Unsaved, the token could be replayed after a restart: refuse it instead.
            used.remove(&claims.jti);
            tracing::error!("cannot save the used-token list: {e}");
            return Err(TokenError::Invalid(
                "this node cannot record token use right now".into(),
            ));
        }
        Ok(claims)
    }

    pub fn is_revoked(&self, claims: &Claims) -> bool {
        let revocations = self.revocations.lock().unwrap_or_else(|p| p.into_inner());
        if revocations.denied.contains_key(&claims.jti) {
            return true;
        }
        // Tokens issued in the same second as the deauthorization are refused too.
        revocations
            .deauthorized
            .get(&claims.server)
            .and_then(|users| users.get(&claims.sub))
            .is_some_and(|&at| claims.iat <= at)
    }

    /// When `user` was last deauthorized on `server` (Unix seconds), while that is remembered.
    pub fn deauthorized_at(&self, server: &ServerId, user: &str) -> Option<u64> {
        let revocations = self.revocations.lock().unwrap_or_else(|p| p.into_inner());
        revocations
            .deauthorized
            .get(server.as_str())
            .and_then(|users| users.get(user))
            .copied()
    }

    /// Denies token ids until their tokens expire (`(jti, exp)` pairs), in one write.
    pub fn deny(&self, tokens: &[(String, u64)]) -> std::io::Result<()> {
        self.update(|r| r.denied.extend(tokens.iter().cloned()))?;
        for (jti, _) in tokens {
            let _ = self.events.send(Revocation::Token { jti: jti.clone() });
        }
        Ok(())
    }

    pub fn deauthorize(&self, server: &ServerId, user: &str) -> std::io::Result<()> {
        let now = now_secs();
        self.update(|r| {
            r.deauthorized
                .entry(server.as_str().to_string())
                .or_default()
                .insert(user.to_string(), now);
        })?;
        let _ = self.events.send(Revocation::User {
            server: server.clone(),
            user: user.to_string(),
        });
        Ok(())
    }

    /// Forgets a deleted server's entries.
    pub fn forget_server(&self, server: &ServerId) {
        if let Err(e) = self.update(|r| {
            r.deauthorized.remove(server.as_str());
        }) {
            tracing::warn!("cannot save the revocation list: {e}");
        }
    }

    /// Applies `change`, drops entries no live token can match any more, and saves.
    fn update(&self, change: impl FnOnce(&mut Revocations)) -> std::io::Result<()> {
        let mut revocations = self.revocations.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut revocations);
        let now = now_secs();
        let horizon = now.saturating_sub(self.config.max_lifetime_secs);
        revocations.denied.retain(|_, exp| *exp > now);
        for users in revocations.deauthorized.values_mut() {
            users.retain(|_, at| *at >= horizon);
        }
        revocations.deauthorized.retain(|_, users| !users.is_empty());
        let bytes = serde_json::to_vec(&*revocations)?;
        write_atomically(&self.path, &bytes)
    }
}

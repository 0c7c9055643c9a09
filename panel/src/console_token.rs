//! Console tokens: the short-lived EdDSA JWTs browsers present on a node's console socket.
//! Signed with the panel's Ed25519 token key (`PanelPki::token_signing_pkcs8`), whose public
//! half every node received at enrollment, in exactly the claims wings checks
//! (`wings/src/tokens.rs`): `sub` (user id), `server`, `permissions`, `scope` =
//! `websocket`, `iat`, `exp`, `jti`.
//!
//! A token carries only the caller's console permissions (the keys wings acts on), so a
//! socket can do no more than its holder may through the panel.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// The scope wings' console socket accepts.
pub const WEBSOCKET_SCOPE: &str = "websocket";

/// The permission keys wings checks on a console socket; a token carries the caller's subset.
pub const CONSOLE_PERMISSIONS: &[&str] = &[
    "websocket.connect",
    "control.console",
    "control.start",
    "control.stop",
    "control.restart",
    "admin.websocket.install",
    "admin.websocket.errors",
];

/// The claims, as wings reads them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleClaims {
    pub sub: String,
    pub server: String,
    pub permissions: Vec<String>,
    pub scope: String,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("the token-signing key is unusable")]
    Key,
    #[error("claims could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

/// `header.claims.signature`, each base64url without padding; the header names EdDSA.
/// Also signs the claims of signed download URLs (`mamba_shared::files_api::SignedUrlClaims`),
/// which wings verifies with the same key.
pub fn sign<C: Serialize>(pkcs8: &[u8], claims: &C) -> Result<String, SignError> {
    let pair =
        ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).map_err(|_| SignError::Key)?;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"EdDSA","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?);
    let signing_input = format!("{header}.{body}");
    let signature = pair.sign(signing_input.as_bytes());
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    ))
}

/// The console socket of `server` under a node's public URL: `http` becomes `ws`, `https`
/// becomes `wss`.
pub fn socket_url(public_url: &str, server: &str) -> String {
    let base = public_url.trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_string()
    };
    format!("{base}/api/servers/{server}/ws")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_with_the_public_key() {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        let claims = ConsoleClaims {
            sub: "u".into(),
            server: "s".into(),
            permissions: vec!["websocket.connect".into()],
            scope: WEBSOCKET_SCOPE.into(),
            iat: 1,
            exp: 2,
            jti: "j".into(),
        };
        let token = sign(doc.as_ref(), &claims).unwrap();
        let (input, sig) = token.rsplit_once('.').unwrap();
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ED25519,
            ring::signature::KeyPair::public_key(&pair).as_ref(),
        );
        public
            .verify(input.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
            .unwrap();
        let body = input.split('.').nth(1).unwrap();
        let back: ConsoleClaims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap();
        assert_eq!(back, claims);
    }

    #[test]
    fn socket_urls() {
        assert_eq!(
            socket_url("https://n.example:8443/", "abc"),
            "wss://n.example:8443/api/servers/abc/ws"
        );
        assert_eq!(
            socket_url("http://127.0.0.1:8081", "abc"),
            "ws://127.0.0.1:8081/api/servers/abc/ws"
        );
    }
}

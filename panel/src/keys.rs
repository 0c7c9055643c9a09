//! Key material derived from the master key (`PANEL_MASTER_KEY`, 32 random bytes in
//! base64), and the signed, expiring links sent by email.
//!
//! Links are stateless: `base64url(payload) "." base64url(HMAC-SHA256(payload))`. A link is
//! bound to something that changes when it has been used (the email for verification, a
//! digest of the password hash for a reset), so it works once and then dies.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::db::now_ms;

pub const MASTER_KEY_ENV: &str = "PANEL_MASTER_KEY";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{MASTER_KEY_ENV} is not set; generate one with `head -c 32 /dev/urandom | base64`")]
    Missing,
    #[error("{MASTER_KEY_ENV} must be 32 bytes, base64-encoded")]
    Malformed,
}

/// The master key. Never logged, never stored.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<hidden>)")
    }
}

impl MasterKey {
    pub fn from_base64(text: &str) -> Result<MasterKey, KeyError> {
        let bytes = STANDARD.decode(text.trim()).map_err(|_| KeyError::Malformed)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Malformed)?;
        Ok(MasterKey(key))
    }

    pub fn from_env() -> Result<MasterKey, KeyError> {
        match std::env::var(MASTER_KEY_ENV) {
            Ok(v) if !v.trim().is_empty() => MasterKey::from_base64(&v),
            _ => Err(KeyError::Missing),
        }
    }

    pub fn from_bytes(bytes: [u8; 32]) -> MasterKey {
        MasterKey(bytes)
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A short public name for this key, to tell which master key wrapped what.
    pub fn id(&self) -> String {
        hex::encode(&self.derive("key-id")[..8])
    }

    /// A key for one purpose, so that no two uses share key material.
    pub(crate) fn derive(&self, purpose: &str) -> [u8; 32] {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let tag = hmac::sign(&key, format!("mamba-panel/{purpose}").as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

/// What a link is for. A link for one purpose is refused for every other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkPurpose {
    VerifyEmail,
    ResetPassword,
    /// Confirms a new address; the binding is `old address -> new address`.
    ChangeEmail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkClaims {
    pub purpose: LinkPurpose,
    pub user: String,
    /// What must still hold when the link is used (see the module docs).
    pub binding: String,
    pub expires_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the link is not valid")]
    Invalid,
    #[error("the link has expired")]
    Expired,
}

#[derive(Clone)]
pub struct LinkSigner {
    key: hmac::Key,
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkSigner")
    }
}

impl LinkSigner {
    pub fn new(master: &MasterKey) -> LinkSigner {
        LinkSigner {
            key: hmac::Key::new(hmac::HMAC_SHA256, &master.derive("email-links")),
        }
    }

    pub fn sign(&self, claims: &LinkClaims) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let tag = hmac::sign(&self.key, payload.as_bytes());
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Checks the signature (in constant time), the purpose and the expiry.
    pub fn verify(&self, token: &str, purpose: LinkPurpose) -> Result<LinkClaims, LinkError> {
        let (payload, tag) = token.split_once('.').ok_or(LinkError::Invalid)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| LinkError::Invalid)?;
        hmac::verify(&self.key, payload.as_bytes(), &tag).map_err(|_| LinkError::Invalid)?;
        let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| LinkError::Invalid)?;
        let claims: LinkClaims = serde_json::from_slice(&json).map_err(|_| LinkError::Invalid)?;
        if claims.purpose != purpose {
            return Err(LinkError::Invalid);
        }
        if claims.expires_at < now_ms() {
            return Err(LinkError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> LinkSigner {
        LinkSigner::new(&MasterKey::from_bytes([7; 32]))
    }

    fn claims(expires_at: i64) -> LinkClaims {
        LinkClaims {
            purpose: LinkPurpose::VerifyEmail,
            user: "u".into(),
            binding: "a@example.test".into(),
            expires_at,
        }
    }

    #[test]
    fn links_verify_only_unchanged_unexpired_and_for_their_purpose() {
        let s = signer();
        let good = claims(now_ms() + 60_000);
        let token = s.sign(&good);
        assert_eq!(s.verify(&token, LinkPurpose::VerifyEmail).unwrap(), good);
        assert_eq!(
            s.verify(&token, LinkPurpose::ResetPassword),
            Err(LinkError::Invalid)
        );
        let expired = s.sign(&claims(now_ms() - 1));
        assert_eq!(
            s.verify(&expired, LinkPurpose::VerifyEmail),
            Err(LinkError::Expired)
        );
        // Any change to the payload breaks the signature.
        let (payload, tag) = token.split_once('.').unwrap();
        let mut forged = URL_SAFE_NO_PAD.decode(payload).unwrap();
        let at = forged.iter().position(|&b| b == b'a').unwrap();
        forged[at] = b'b';
        let forged = format!("{}.{tag}", URL_SAFE_NO_PAD.encode(forged));
        assert_eq!(
            s.verify(&forged, LinkPurpose::VerifyEmail),
            Err(LinkError::Invalid)
        );
        // Another master key does not accept it.
        let other = LinkSigner::new(&MasterKey::from_bytes([8; 32]));
        assert_eq!(
            other.verify(&token, LinkPurpose::VerifyEmail),
            Err(LinkError::Invalid)
        );
    }
}

//! What wings sends the panel on the panel's node listener (mutual TLS), and the enrollment
//! token an operator copies from the panel to the node.

use std::fmt;

use serde::{Deserialize, Serialize};

/// `POST`: a node trades its enrollment token and a CSR for its first certificate. The only
/// node route that accepts a client without a certificate.
pub const ENROLL_PATH: &str = "/api/node/v1/enroll";
/// `POST`: a node with a valid certificate asks for a fresh one (same identity, new key).
pub const RENEW_PATH: &str = "/api/node/v1/certificate";

/// `GET`: who the panel takes this node for ([`NodeIdentityResponse`]); a cheap check that
/// the node's certificate is still admitted.
pub const IDENTITY_PATH: &str = "/api/node/v1/identity";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeIdentityResponse {
    pub node_id: String,
    /// SHA-256 of the certificate this request came with.
    pub fingerprint: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// `<secret>.<CA fingerprint>`: the secret proves the operator's intent, the fingerprint
/// (64 hex digits, SHA-256 of the CA certificate) lets the node authenticate the panel before
/// it trusts anything the panel says.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollmentToken {
    pub secret: String,
    pub ca_fingerprint: String,
}

impl fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollmentToken")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an enrollment token is <secret>.<64 hex digits of the panel CA's SHA-256 fingerprint>")]
pub struct InvalidEnrollmentToken;

impl EnrollmentToken {
    pub fn parse(text: &str) -> Result<EnrollmentToken, InvalidEnrollmentToken> {
        let (secret, fp) = text.trim().rsplit_once('.').ok_or(InvalidEnrollmentToken)?;
        let secret_ok = (16..=128).contains(&secret.len())
            && secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let fp_ok = fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_hexdigit());
        if !(secret_ok && fp_ok) {
            return Err(InvalidEnrollmentToken);
        }
        Ok(EnrollmentToken {
            secret: secret.to_owned(),
            ca_fingerprint: fp.to_ascii_lowercase(),
        })
    }
}

impl fmt::Display for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.secret, self.ca_fingerprint)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The secret part of the token only; the fingerprint was already used to pin the CA.
    pub token: String,
    pub csr_pem: String,
}

/// The answer to enrollment and renewal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateResponse {
    pub node_id: String,
    pub certificate_pem: String,
    pub ca_pem: String,
    /// The panel's Ed25519 public key (PEM, SubjectPublicKeyInfo), which signs the console
    /// and file tokens wings checks.
    pub token_public_key_pem: String,
    /// Unix seconds.
    pub not_after: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr_pem: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn token_round_trips_and_rejects_junk() {
        let fp = "ab".repeat(32);
        let t = EnrollmentToken::parse(&format!("abcdefghijklmnop_-12.{}", fp.to_uppercase())).unwrap();
        assert_eq!(t.ca_fingerprint, fp);
        assert_eq!(EnrollmentToken::parse(&t.to_string()).unwrap(), t);
        for bad in [
            "",
            "x",
            &format!("short.{fp}"),
            "abcdefghijklmnopq.abc",
            &format!("a b c d e f g h i.{fp}"),
        ] {
            assert!(EnrollmentToken::parse(bad).is_err(), "{bad}");
        }
        assert!(!format!("{t:?}").contains("abcdefgh"));
    }
}

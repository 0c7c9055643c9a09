//! The SFTP credential check wings asks the panel for, on the panel's node listener (mutual
//! TLS). Wings sends what an SFTP client presented; the panel answers with the grant or a
//! refusal. Which node asks is taken from its certificate, never from the body.

use serde::{Deserialize, Serialize};

/// `POST` [`SftpAuthRequest`] → 200 [`SftpAuthGrant`]; 401 for a wrong credential (always
/// the same answer), 403 for a right credential without access to that server on this node,
/// 429 when the client's address or the account is over its login limit.
pub const SFTP_AUTH_PATH: &str = "/api/node/v1/sftp/auth";

/// Longest user part, password and public key the panel looks at; longer is a 400.
pub const MAX_SFTP_USER_BYTES: usize = 254;
pub const MAX_SFTP_PASSWORD_BYTES: usize = 1024;
pub const MAX_SFTP_KEY_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftpAuthRequest {
    /// The login's part before its last dot: the account's email address or its user id.
    pub user: String,
    /// The login's part after the dot: the server id's first 8 characters, or the whole id.
    pub server_short: String,
    /// The address the SFTP client connected from: the login limits count per address.
    pub client_ip: std::net::IpAddr,
    pub credential: SftpCredential,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SftpCredential {
    Password {
        password: String,
    },
    /// An OpenSSH public key (`ssh-ed25519 AAAA...`) whose possession the node verified, or
    /// that a client offered (the node then checks the signature before granting anything).
    PublicKey {
        public_key: String,
    },
}

impl std::fmt::Debug for SftpCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SftpCredential::Password { .. } => f.write_str("Password(..)"),
            SftpCredential::PublicKey { public_key } => f.debug_tuple("PublicKey").field(public_key).finish(),
        }
    }
}

/// What the user may do on that server over SFTP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftpAuthGrant {
    pub user_id: String,
    pub server_id: String,
    /// Only `file.*` permissions.
    pub permissions: Vec<String>,
}

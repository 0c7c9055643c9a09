//! Who may log in over SFTP, and with which permissions: the pluggable auth source.
//!
//! API boundary: the SFTP server only ever asks an [`AuthSource`]: the panel over mutual TLS
//! once the node is enrolled (`sftp::panel_auth`), or the static credential file
//! ([`StaticCredentials`]) on a node without a panel.
//! A source is the authority for new logins: when it stops vouching for a user, new sessions
//! are refused. Live sessions are closed by the deauthorize route (see `sftp::session`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use argon2::password_hash::PasswordVerifier;
use argon2::password_hash::phc::PasswordHash;
use async_trait::async_trait;
use mamba_shared::ids::ServerId;
use russh::keys::PublicKey;
use serde::Deserialize;

/// Every permission an SFTP session checks.
pub const FILE_READ: &str = "file.read";
pub const FILE_READ_CONTENT: &str = "file.read-content";
pub const FILE_CREATE: &str = "file.create";
pub const FILE_UPDATE: &str = "file.update";
pub const FILE_DELETE: &str = "file.delete";

/// A login name split into its two parts: `<user>.<server short id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginName {
    pub user: String,
    /// The server's short id (its first 8 characters) or, to tell apart servers whose short
    /// ids collide, its whole id.
    pub server_short: String,
}

/// Whether a login's server part names `server`: its short id or its whole id, in any case.
pub fn names_server(server: &ServerId, part: &str) -> bool {
    if part.len() == 8 {
        server.short().eq_ignore_ascii_case(part)
    } else {
        server.as_str().eq_ignore_ascii_case(part)
    }
}

/// Longest login name accepted; anything longer is refused before any lookup.
pub const MAX_LOGIN_BYTES: usize = 128;

impl LoginName {
    /// Splits at the last dot; the server part is the 8-character short id or a 36-character
    /// whole id (ASCII letters, digits, `-`, `_`, as server ids are), the user part is non-empty.
    pub fn parse(login: &str) -> Option<LoginName> {
        if login.len() > MAX_LOGIN_BYTES || login.chars().any(char::is_control) {
            return None;
        }
        let (user, short) = login.rsplit_once('.')?;
        let short_ok = (short.len() == 8 || short.len() == 36)
            && short
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if user.is_empty() || !short_ok {
            return None;
        }
        Some(LoginName {
            user: user.to_string(),
            server_short: short.to_ascii_lowercase(),
        })
    }
}

/// What a login proves.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    Password(&'a str),
    /// A key whose ownership russh has verified (or, while probing, merely offered).
    PublicKey(&'a PublicKey),
}

/// A successful login: the user, the one server the session is bound to, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The panel's user id: the deauthorize route names users by it.
    pub user_id: String,
    pub server: ServerId,
    pub permissions: Vec<String>,
}

impl Grant {
    /// `"*"` grants every permission.
    pub fn can(&self, permission: &str) -> bool {
        self.permissions.iter().any(|p| p == permission || p == "*")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSourceError {
    #[error("the auth source is unavailable: {0}")]
    Unavailable(String),
}

/// Decides logins. `Ok(None)` is a refusal (unknown user, wrong password, key not authorized,
/// no access to that server); `Err` means the source could not answer, which also refuses but
/// is not counted as a failed login.
#[async_trait]
pub trait AuthSource: Send + Sync + 'static {
    /// `client` is the address the SFTP client connected from.
    async fn authenticate(
        &self,
        login: &LoginName,
        credential: Credential<'_>,
        client: IpAddr,
    ) -> Result<Option<Grant>, AuthSourceError>;
}

/// The static credential file: TOML with one `[[users]]` table per user.
///
/// ```toml
/// [[users]]
/// name = "alice"                      # the login's part before the dot
/// id = "0192f0c4-..."                 # the panel's user id (defaults to name)
/// password_hash = "$argon2id$v=19$..." # optional; `wings hash-password` makes one
/// authorized_keys = ["ssh-ed25519 AAAA... alice@laptop"]
/// [users.servers]
/// "0b4c8a0e-7c1d-4f53-9a51-6c2f5d8e9f10" = ["file.read", "file.read-content"]
/// ```
///
/// The file is re-read when its modification time or size changes, so removing a user or a
/// server from it refuses their next login without a restart.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialFile {
    #[serde(default)]
    pub users: Vec<CredentialUser>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialUser {
    pub name: String,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub password_hash: Option<String>,
    #[serde(default)]
    pub authorized_keys: Vec<String>,
    /// Server id → permissions on it.
    #[serde(default)]
    pub servers: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialFileError {
    #[error("sftp.credentials_file {path}: {message}")]
    Invalid { path: String, message: String },
}

/// One user, checked and ready: keys parsed, server ids validated.
#[derive(Debug, Clone)]
struct Account {
    id: String,
    password_hash: Option<String>,
    keys: Vec<PublicKey>,
    servers: Vec<(ServerId, Vec<String>)>,
}

#[derive(Debug, Default)]
struct Loaded {
    stamp: Option<(SystemTime, u64)>,
    accounts: BTreeMap<String, Account>,
}

/// [`AuthSource`] over the static credential file.
#[derive(Debug)]
pub struct StaticCredentials {
    path: Option<PathBuf>,
    loaded: Mutex<Loaded>,
}

fn parse_file(path: &Path, text: &str) -> Result<BTreeMap<String, Account>, CredentialFileError> {
    let invalid = |message: String| CredentialFileError::Invalid {
        path: path.display().to_string(),
        message,
    };
    let file: CredentialFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let mut accounts = BTreeMap::new();
    for (i, user) in file.users.into_iter().enumerate() {
        let at = format!("users[{i}]");
        if user.name.is_empty() || user.name.len() > 64 || user.name.chars().any(char::is_control) {
            return Err(invalid(format!("{at}.name: give 1 to 64 printable characters")));
        }
        if let Some(hash) = &user.password_hash {
            PasswordHash::new(hash).map_err(|e| invalid(format!("{at}.password_hash: {e}")))?;
        }
        let mut keys = Vec::new();
        for (k, line) in user.authorized_keys.iter().enumerate() {
            let key = PublicKey::from_openssh(line.trim())
                .map_err(|e| invalid(format!("{at}.authorized_keys[{k}]: {e}")))?;
            keys.push(key);
        }
        let mut servers = Vec::new();
        for (id, permissions) in user.servers {
            let server = ServerId::new(id.clone()).map_err(|e| invalid(format!("{at}.servers.{id}: {e}")))?;
            servers.push((server, permissions));
        }
        let account = Account {
            id: user.id.unwrap_or_else(|| user.name.clone()),
            password_hash: user.password_hash,
            keys,
            servers,
        };
        if accounts.insert(user.name.clone(), account).is_some() {
            return Err(invalid(format!("{at}.name: {:?} appears twice", user.name)));
        }
    }
    Ok(accounts)
}

impl StaticCredentials {
    /// Reads the file once now, so that a broken file stops wings at start. `None` refuses
    /// every login.
    pub fn open(path: Option<PathBuf>) -> Result<StaticCredentials, CredentialFileError> {
        let source = StaticCredentials {
            path,
            loaded: Mutex::new(Loaded::default()),
        };
        if let Some(path) = &source.path {
            let text = std::fs::read_to_string(path).map_err(|e| CredentialFileError::Invalid {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            let accounts = parse_file(path, &text)?;
            let mut loaded = source.loaded.lock().unwrap_or_else(|p| p.into_inner());
            loaded.accounts = accounts;
            loaded.stamp = stamp(path);
        }
        Ok(source)
    }

    /// The account named `name`, re-reading the file if it changed. A file that became
    /// unreadable or invalid keeps the last good contents (and says so in the log).
    fn account(&self, name: &str) -> Option<Account> {
        let path = self.path.as_ref()?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(path);
        if now != loaded.stamp {
            match std::fs::read_to_string(path)
                .map_err(|e| CredentialFileError::Invalid {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })
                .and_then(|text| parse_file(path, &text))
            {
                Ok(accounts) => {
                    loaded.accounts = accounts;
                    tracing::info!(path = %path.display(), "reloaded the SFTP credential file");
                }
                Err(e) => tracing::error!("keeping the previous SFTP credentials: {e}"),
            }
            loaded.stamp = now;
        }
        loaded.accounts.get(name).cloned()
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Checks a password against a stored hash. Slow on purpose; call it off the async workers.
fn password_matches(password: &str, stored: &str) -> bool {
    match PasswordHash::new(stored) {
        Ok(hash) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// Hashes a password for the credential file (argon2id, random salt).
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::PasswordHasher;
    argon2::Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A hash checked for unknown users, so that they cost as much time as a wrong password.
fn decoy_hash() -> String {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY
        .get_or_init(|| hash_password("mamba: no account has this password").unwrap_or_default())
        .clone()
}

#[async_trait]
impl AuthSource for StaticCredentials {
    async fn authenticate(
        &self,
        login: &LoginName,
        credential: Credential<'_>,
        _client: IpAddr,
    ) -> Result<Option<Grant>, AuthSourceError> {
        let account = self.account(&login.user);
        let proven = match credential {
            Credential::Password(password) => {
                let stored = account
                    .as_ref()
                    .and_then(|a| a.password_hash.clone())
                    .unwrap_or_default();
                let password = password.to_string();
                let known = account.as_ref().is_some_and(|a| a.password_hash.is_some());
                let matches = tokio::task::spawn_blocking(move || {
                    let stored = if stored.is_empty() { decoy_hash() } else { stored };
                    password_matches(&password, &stored)
                })
                .await
                .map_err(|e| AuthSourceError::Unavailable(e.to_string()))?;
                known && matches
            }
            Credential::PublicKey(key) => account
                .as_ref()
                .is_some_and(|a| a.keys.iter().any(|k| k.key_data() == key.key_data())),
        };
        let Some(account) = account.filter(|_| proven) else {
            return Ok(None);
        };
        let mut matching = account
            .servers
            .iter()
            .filter(|(server, _)| names_server(server, &login.server_short));
        let (Some((server, permissions)), None) = (matching.next(), matching.next()) else {
            // No such server for this user, or two of theirs share a short id: refuse rather
            // than guess.
            return Ok(None);
        };
        Ok(Some(Grant {
            user_id: account.id.clone(),
            server: server.clone(),
            permissions: permissions.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_names_split_at_the_last_dot() {
        assert_eq!(
            LoginName::parse("alice.0b4c8a0e"),
            Some(LoginName {
                user: "alice".into(),
                server_short: "0b4c8a0e".into()
            })
        );
        assert_eq!(LoginName::parse("a.b.0B4C8A0E").unwrap().user, "a.b");
        let whole = LoginName::parse("alice.0b4c8a0e-7c1d-4f53-9a51-6c2f5d8e9f10").unwrap();
        let server = ServerId::new("0b4c8a0e-7c1d-4f53-9a51-6c2f5d8e9f10").unwrap();
        assert!(names_server(&server, &whole.server_short));
        assert!(names_server(&server, "0B4C8A0E"));
        assert!(!names_server(&server, "0b4c8a0e-7c1d-4f53-9a51-6c2f5d8e9f11"));
        for bad in [
            "alice",
            ".0b4c8a0e",
            "alice.0b4c",
            "alice.0b4c8a0e9",
            "alice.0b4c8a0e-7c1d-4f53-9a51-6c2f5d8e9f1",
            "al\nice.0b4c8a0e",
            "alice.0b4c/a0e",
        ] {
            assert_eq!(LoginName::parse(bad), None, "{bad:?}");
        }
        assert_eq!(LoginName::parse(&format!("{}.0b4c8a0e", "a".repeat(200))), None);
    }

    const TEST_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDY8IJjAKbWmQcwpsmkcx3oqcuCQkhdjC0pI9YC4xE2q test";

    fn file(dir: &Path, hash: &str) -> PathBuf {
        let path = dir.join("credentials.toml");
        std::fs::write(
            &path,
            format!(
                "[[users]]\nname = \"alice\"\nid = \"u-1\"\npassword_hash = \"{hash}\"\nauthorized_keys = [\"{KEY}\"]\n\
                 [users.servers]\n\"0b4c8a0e-7c1d\" = [\"file.read\"]\n\"11111111-aaaa\" = [\"*\"]\n"
            ),
        )
        .unwrap();
        path
    }

    #[tokio::test]
    async fn passwords_and_keys_grant_one_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path(), &hash_password("correct horse").unwrap());
        let source = StaticCredentials::open(Some(path.clone())).unwrap();
        let login = LoginName::parse("alice.0b4c8a0e").unwrap();
        let grant = source
            .authenticate(&login, Credential::Password("correct horse"), TEST_IP)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(grant.user_id, "u-1");
        assert_eq!(grant.server.as_str(), "0b4c8a0e-7c1d");
        assert!(grant.can(FILE_READ) && !grant.can(FILE_DELETE));
        assert!(
            source
                .authenticate(&login, Credential::Password("wrong"), TEST_IP)
                .await
                .unwrap()
                .is_none()
        );
        let key = PublicKey::from_openssh(KEY).unwrap();
        let other = LoginName::parse("alice.11111111").unwrap();
        assert!(
            source
                .authenticate(&other, Credential::PublicKey(&key), TEST_IP)
                .await
                .unwrap()
                .unwrap()
                .can(FILE_DELETE)
        );
        let unknown_server = LoginName::parse("alice.22222222").unwrap();
        assert!(
            source
                .authenticate(&unknown_server, Credential::PublicKey(&key), TEST_IP)
                .await
                .unwrap()
                .is_none()
        );
        let unknown_user = LoginName::parse("bob.0b4c8a0e").unwrap();
        assert!(
            source
                .authenticate(&unknown_user, Credential::Password("x"), TEST_IP)
                .await
                .unwrap()
                .is_none()
        );

        // Removing the user from the file refuses the next login, without a restart.
        std::fs::write(&path, "users = []\n").unwrap();
        assert!(
            source
                .authenticate(&login, Credential::PublicKey(&key), TEST_IP)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn broken_files_are_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        for (text, names) in [
            (
                "[[users]]\nname = \"a\"\npassword_hash = \"plain\"\n",
                "password_hash",
            ),
            (
                "[[users]]\nname = \"a\"\nauthorized_keys = [\"ssh-ed25519 nope\"]\n",
                "authorized_keys",
            ),
            (
                "[[users]]\nname = \"a\"\n[users.servers]\n\"../x\" = []\n",
                "servers",
            ),
            ("[[users]]\nname = \"a\"\n[[users]]\nname = \"a\"\n", "twice"),
            ("[[users]]\nname = \"a\"\npassword = \"x\"\n", "password"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = StaticCredentials::open(Some(path.clone()))
                .unwrap_err()
                .to_string();
            assert!(err.contains(names), "{err}");
        }
    }
}

//! Users' SSH public keys, for SFTP logins on the nodes. Keys belong to a user, not a
//! tenant: one key opens every server the user may reach, with that server's permissions.
//!
//! A key is stored in OpenSSH form without its comment, with its SHA-256 fingerprint
//! (`SHA256:<base64>`, as `ssh-keygen -l` prints it), which is what a login looks up.

use diesel::prelude::*;
use serde::Serialize;
use serde_json::json;
use ssh_key::public::KeyData;
use ssh_key::{HashAlg, PublicKey};

use crate::audit::{self, Actor, Event};
use crate::db::schema::user_ssh_keys;
use crate::db::{DbConnection, now_ms};
use crate::error::ApiError;
use crate::ids::UserId;
use crate::request_meta::RequestMeta;

/// Keys one user may hold.
pub const MAX_KEYS_PER_USER: i64 = 50;
/// RSA keys shorter than this are refused (OpenSSH's own minimum is 1024; 2048 is NIST's).
const MIN_RSA_BITS: u32 = 2048;

/// What the API shows of a key.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct SshKey {
    pub id: String,
    pub name: String,
    /// `ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa`, ...
    pub algorithm: String,
    /// OpenSSH form, without the comment.
    pub public_key: String,
    /// `SHA256:...`, as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = user_ssh_keys)]
struct Row {
    id: String,
    name: String,
    algorithm: String,
    public_key: String,
    fingerprint: String,
    created_at: i64,
}

impl From<Row> for SshKey {
    fn from(r: Row) -> SshKey {
        SshKey {
            id: r.id,
            name: r.name,
            algorithm: r.algorithm,
            public_key: r.public_key,
            fingerprint: r.fingerprint,
            created_at: r.created_at,
        }
    }
}

/// A key read from an OpenSSH line and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    pub algorithm: String,
    /// OpenSSH form without the comment: the canonical text compared at login.
    pub public_key: String,
    pub fingerprint: String,
    /// The line's comment, used as the name when none is given.
    pub comment: String,
}

/// Parses one OpenSSH public key line (`<type> <base64> [comment]`). Ed25519, ECDSA
/// (P-256/384/521) and RSA of at least 2048 bits; DSA, security-key and certificate types
/// are refused.
pub fn parse(line: &str) -> Result<ParsedKey, &'static str> {
    let line = line.trim();
    if line.is_empty() || line.len() > mamba_shared::node_sftp::MAX_SFTP_KEY_BYTES {
        return Err("must be one OpenSSH public key line");
    }
    let key = PublicKey::from_openssh(line).map_err(|_| "must be one OpenSSH public key line")?;
    match key.key_data() {
        KeyData::Ed25519(_) | KeyData::Ecdsa(_) => {}
        KeyData::Rsa(rsa) if rsa.key_size() >= MIN_RSA_BITS => {}
        KeyData::Rsa(_) => return Err("RSA keys must have at least 2048 bits"),
        _ => return Err("use an Ed25519, ECDSA or RSA key"),
    }
    let comment = key.comment().as_str_lossy().trim().to_string();
    let bare = PublicKey::new(key.key_data().clone(), "");
    let public_key = bare
        .to_openssh()
        .map_err(|_| "must be one OpenSSH public key line")?
        .trim()
        .to_string();
    Ok(ParsedKey {
        algorithm: key.algorithm().as_str().to_string(),
        public_key,
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
        comment,
    })
}

/// Checks a key's name: printable, 1 to 100 characters.
pub fn check_name(name: &str) -> Result<String, &'static str> {
    let name = name.trim();
    let chars = name.chars().count();
    if chars == 0 || chars > 100 || name.chars().any(char::is_control) {
        return Err("must be 1 to 100 printable characters");
    }
    Ok(name.to_string())
}

/// The user's keys, oldest first.
pub fn list(conn: &mut DbConnection, user: &UserId) -> QueryResult<Vec<SshKey>> {
    Ok(user_ssh_keys::table
        .filter(user_ssh_keys::user_id.eq(user.as_str()))
        .order(user_ssh_keys::id.asc())
        .select(Row::as_select())
        .load(conn)?
        .into_iter()
        .map(SshKey::from)
        .collect())
}

/// Adds a key (audited). A key the user already has is a 409, one too many a 422.
pub fn add(
    conn: &mut DbConnection,
    user: &UserId,
    name: &str,
    key: &ParsedKey,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<SshKey, ApiError> {
    crate::db::transaction(conn, |conn| {
        let held: i64 = user_ssh_keys::table
            .filter(user_ssh_keys::user_id.eq(user.as_str()))
            .count()
            .get_result(conn)?;
        if held >= MAX_KEYS_PER_USER {
            return Err(ApiError::invalid(
                "public_key",
                format!("an account holds at most {MAX_KEYS_PER_USER} keys"),
            ));
        }
        let duplicate = user_ssh_keys::table
            .filter(user_ssh_keys::user_id.eq(user.as_str()))
            .filter(user_ssh_keys::fingerprint.eq(&key.fingerprint))
            .count()
            .get_result::<i64>(conn)?
            > 0;
        if duplicate {
            return Err(ApiError::conflict(
                "ssh_key_exists",
                "this key is already on your account",
            ));
        }
        let row = Row {
            id: uuid::Uuid::now_v7().to_string(),
            name: name.to_string(),
            algorithm: key.algorithm.clone(),
            public_key: key.public_key.clone(),
            fingerprint: key.fingerprint.clone(),
            created_at: now_ms(),
        };
        diesel::insert_into(user_ssh_keys::table)
            .values((
                user_ssh_keys::id.eq(&row.id),
                user_ssh_keys::user_id.eq(user.as_str()),
                user_ssh_keys::name.eq(&row.name),
                user_ssh_keys::algorithm.eq(&row.algorithm),
                user_ssh_keys::public_key.eq(&row.public_key),
                user_ssh_keys::fingerprint.eq(&row.fingerprint),
                user_ssh_keys::created_at.eq(row.created_at),
            ))
            .execute(conn)?;
        audit::record(
            conn,
            actor,
            meta,
            Event::on_user(
                "user.ssh_key.add",
                user,
                json!({"key": row.id, "fingerprint": row.fingerprint, "algorithm": row.algorithm}),
            ),
        )?;
        Ok(SshKey::from(row))
    })
}

/// Deletes one of the user's keys (audited); `false` when the user has no such key.
pub fn delete(
    conn: &mut DbConnection,
    user: &UserId,
    id: &str,
    actor: &Actor,
    meta: &RequestMeta,
) -> QueryResult<bool> {
    crate::db::transaction(conn, |conn| {
        let fingerprint: Option<String> = user_ssh_keys::table
            .filter(user_ssh_keys::id.eq(id))
            .filter(user_ssh_keys::user_id.eq(user.as_str()))
            .select(user_ssh_keys::fingerprint)
            .first(conn)
            .optional()?;
        let Some(fingerprint) = fingerprint else {
            return Ok(false);
        };
        diesel::delete(user_ssh_keys::table.filter(user_ssh_keys::id.eq(id))).execute(conn)?;
        audit::record(
            conn,
            actor,
            meta,
            Event::on_user(
                "user.ssh_key.delete",
                user,
                json!({"key": id, "fingerprint": fingerprint}),
            ),
        )?;
        Ok(true)
    })
}

/// Whether the user holds exactly this key (compared in full, not just by fingerprint).
pub fn holds(conn: &mut DbConnection, user: &str, key: &ParsedKey) -> QueryResult<bool> {
    let stored: Option<String> = user_ssh_keys::table
        .filter(user_ssh_keys::user_id.eq(user))
        .filter(user_ssh_keys::fingerprint.eq(&key.fingerprint))
        .select(user_ssh_keys::public_key)
        .first(conn)
        .optional()?;
    Ok(stored.is_some_and(|s| s == key.public_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_fingerprints_like_ssh_keygen() {
        let line =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILC5luZSKdAsnXmQLIF1kkq8Ca552mXdEdKthWmo6ESS  me@host ";
        let k = parse(line).unwrap();
        assert_eq!(k.algorithm, "ssh-ed25519");
        assert_eq!(
            k.public_key,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILC5luZSKdAsnXmQLIF1kkq8Ca552mXdEdKthWmo6ESS"
        );
        // What `ssh-keygen -lf` prints for it.
        assert_eq!(
            k.fingerprint,
            "SHA256:WP69KUlimChNPFmNMY3rLtMg0mZ+kWEhPa4dCqV+4B4"
        );
        assert_eq!(k.comment, "me@host");
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "ssh-ed25519",
            "ssh-ed25519 !!!",
            "hello world",
            "ssh-ed25519 AAAA",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}

//! The SFTP credential check the nodes ask for (`POST /api/node/v1/sftp/auth` on the node
//! listener): who the login names, whether the credential is theirs, whether the server lives
//! on the asking node, and what the user may do with its files.
//!
//! Decisions (ADR 0012):
//! - the login's user part is the account's email address or its user id;
//! - a wrong user, password or key is one uniform answer ([`Outcome::BadCredential`]), and an
//!   unknown user costs a password hash like a known one;
//! - an account with two-factor authentication logs in with a key only: a password alone is
//!   the one factor its owner asked us not to rely on;
//! - a server on another node answers like a server that does not exist;
//! - a suspended server refuses every login.

use std::collections::BTreeSet;

use diesel::prelude::*;
use mamba_shared::node_sftp::SftpAuthGrant;

use crate::authz::role_permissions;
use crate::db::DbConnection;
use crate::db::schema::{memberships, servers, tenants};
use crate::ids::{TenantId, UserId};
use crate::password::PasswordHasherConfig;
use crate::ssh_keys::{self, ParsedKey};
use crate::users::{self, UserRow};

/// The permissions an SFTP session checks; a grant carries no others.
pub const FILE_PERMISSIONS: [&str; 5] = [
    "file.read",
    "file.read-content",
    "file.create",
    "file.update",
    "file.delete",
];

/// What the client proved.
#[derive(Debug)]
pub enum Proof {
    Password(String),
    Key(ParsedKey),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Granted(SftpAuthGrant),
    /// No such user, wrong password, key not on the account: one answer for all.
    BadCredential,
    /// The credential is right but the login is refused: `(code, message)`.
    Refused(&'static str, &'static str),
}

/// The account a login's user part names: an email address (any case) or a user id.
pub fn find_user(conn: &mut DbConnection, user: &str) -> QueryResult<Option<UserRow>> {
    if user.contains('@') {
        return users::find_by_email(conn, &user.trim().to_lowercase());
    }
    match UserId::parse(user) {
        Some(id) => users::find(conn, &id),
        None => Ok(None),
    }
}

/// A server short id as the panel makes them: the first 8 characters of a UUID.
fn valid_short(short: &str) -> bool {
    short.len() == 8 && short.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The asking node's servers a login's server part names: its short id (8 characters) or
/// its whole id (which tells apart servers whose short ids collide: UUIDv7 ids made within
/// about a minute share their first 8 characters).
fn named_servers(
    conn: &mut DbConnection,
    node: &str,
    part: &str,
) -> QueryResult<Vec<(String, String, Option<i64>)>> {
    let part = part.to_ascii_lowercase();
    let query = servers::table.filter(servers::node_id.eq(node)).select((
        servers::id,
        servers::tenant_id,
        servers::suspended_at,
    ));
    if valid_short(&part) {
        // `valid_short` admits no LIKE wildcards.
        query.filter(servers::id.like(format!("{part}%"))).load(conn)
    } else if let Some(id) = uuid::Uuid::parse_str(&part).ok().filter(|_| part.len() == 36) {
        query.filter(servers::id.eq(id.to_string())).load(conn)
    } else {
        Ok(Vec::new())
    }
}

/// Decides one login for `node`. Slow (a password hash): run it on the blocking pool.
pub fn check(
    conn: &mut DbConnection,
    hasher: &PasswordHasherConfig,
    dummy_hash: &str,
    node: &str,
    user: &str,
    server_short: &str,
    proof: &Proof,
) -> QueryResult<Outcome> {
    let found = find_user(conn, user)?;
    let proven = match (proof, &found) {
        (Proof::Password(password), Some(u)) => hasher.verify(password, &u.password_hash),
        (Proof::Password(password), None) => {
            hasher.verify(password, dummy_hash);
            false
        }
        (Proof::Key(key), Some(u)) => ssh_keys::holds(conn, &u.id, key)?,
        (Proof::Key(_), None) => false,
    };
    let Some(user) = found.filter(|_| proven) else {
        return Ok(Outcome::BadCredential);
    };
    // Only someone holding the credential learns any of the reasons below.
    if user.email_verified_at.is_none() {
        return Ok(Outcome::Refused(
            "email_not_verified",
            "verify your email address first",
        ));
    }
    if matches!(proof, Proof::Password(_)) && user.totp_enabled_at.is_some() {
        return Ok(Outcome::Refused(
            "key_required",
            "accounts with two-factor authentication log in over SFTP with an SSH key",
        ));
    }
    let candidates = named_servers(conn, node, server_short)?;
    if candidates.is_empty() {
        return Ok(Outcome::Refused("unknown_server", "no such server on this node"));
    }
    let mut granted = Vec::new();
    let mut suspended = false;
    for (server, tenant, suspended_at) in candidates {
        if let Some(permissions) = file_permissions(conn, &user, &TenantId::from_db(tenant))? {
            suspended |= suspended_at.is_some();
            granted.push((server, permissions));
        }
    }
    // A suspended server's files are closed to everyone, operators included, as its console is.
    if suspended && granted.len() == 1 {
        return Ok(Outcome::Refused("server_suspended", "this server is suspended"));
    }
    match granted.len() {
        0 => Ok(Outcome::Refused("no_access", "no file access to this server")),
        1 => {
            let Some((server_id, permissions)) = granted.pop() else {
                return Ok(Outcome::Refused("no_access", "no file access to this server"));
            };
            Ok(Outcome::Granted(SftpAuthGrant {
                user_id: user.id,
                server_id,
                permissions,
            }))
        }
        // Two servers the user can reach share the short id: refuse rather than guess.
        _ => Ok(Outcome::Refused(
            "ambiguous_server",
            "two of your servers on this node share this short id; log in with the whole server id",
        )),
    }
}

/// The `file.*` permissions `user` has in `tenant`, or `None` for no access at all. Super
/// admins have all of them anywhere; members as their role says, unless the tenant is
/// suspended or demands two-factor authentication the user has not turned on (the same
/// rules as the API's).
fn file_permissions(
    conn: &mut DbConnection,
    user: &UserRow,
    tenant: &TenantId,
) -> QueryResult<Option<Vec<String>>> {
    if user.is_super_admin {
        return Ok(Some(FILE_PERMISSIONS.iter().map(|p| (*p).to_string()).collect()));
    }
    let found: Option<(String, bool, String)> = memberships::table
        .inner_join(tenants::table)
        .filter(memberships::tenant_id.eq(tenant.as_str()))
        .filter(memberships::user_id.eq(&user.id))
        .select((memberships::role, tenants::require_two_factor, tenants::status))
        .first(conn)
        .optional()?;
    let Some((role, require_two_factor, status)) = found else {
        return Ok(None);
    };
    if status == "suspended" || (require_two_factor && user.totp_enabled_at.is_none()) {
        return Ok(None);
    }
    let role: BTreeSet<String> = role_permissions(conn, tenant, &role)?.unwrap_or_default();
    let permissions: Vec<String> = FILE_PERMISSIONS
        .iter()
        .filter(|p| role.contains(**p))
        .map(|p| (*p).to_string())
        .collect();
    Ok((!permissions.is_empty()).then_some(permissions))
}

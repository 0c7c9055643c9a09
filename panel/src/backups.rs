//! Servers' backups through the panel: the `server_backups` rows and the changes tenants ask
//! for. Every change writes its row, its audit entry and its job (`jobs::enqueue`) in one
//! transaction; the jobs worker (`provisioning`) does the work on the node and moves
//! `status`:
//!
//! - `pending` (queued) → `running` (the node is writing the archive) → `completed` (size and
//!   SHA-256 recorded) or `failed` (with `error`);
//! - `completed` → `restoring` (a restore job is queued or running) → `completed`;
//! - any but `restoring` → `deleting` → the row is gone once the node deleted the archive.
//!
//! A server keeps at most `max_backups_per_server` backups that are not failed (the
//! tenant's quota, `[quotas]` by default); the check takes the tenant's quota lock, so
//! parallel requests cannot pass it. A server cannot be deleted while one of its backups is
//! being restored; its backups go with it otherwise (wings deletes the archives with the
//! server, the rows cascade).
//!
//! A backup's encryption key (with `[backups] encrypt`) is random per backup and sealed under
//! the tenant's data key (`secrets::SecretBox::seal_for`); only the jobs worker opens it.

use base64::Engine as _;
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::audit::{self, Event};
use crate::authz::TenantScope;
use crate::config::{BackupsConfig, QuotaConfig};
use crate::db::schema::server_backups;
use crate::db::{DbConnection, now_ms};
use crate::error::ApiError;
use crate::ids::{BackupId, JobId, ServerId, TenantId};
use crate::jobs::{self, JobKind};
use crate::pagination::{Page, PageRequest};
use crate::request_meta::RequestMeta;
use crate::secrets::SecretBox;
use crate::servers;

pub const STATUS_PENDING: &str = "pending";
pub const STATUS_RUNNING: &str = "running";
pub const STATUS_COMPLETED: &str = "completed";
pub const STATUS_FAILED: &str = "failed";
pub const STATUS_RESTORING: &str = "restoring";
pub const STATUS_DELETING: &str = "deleting";

/// At most this many ignore patterns (wings' own limit).
const MAX_IGNORE_PATTERNS: usize = 1000;
const MAX_PATTERN_BYTES: usize = 1024;

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = server_backups)]
pub struct BackupRow {
    pub id: String,
    pub tenant_id: String,
    pub server_id: String,
    pub name: String,
    pub adapter: String,
    pub ignore_patterns: String,
    pub status: String,
    pub size_bytes: Option<i64>,
    pub sha256: Option<String>,
    pub sealed_key: Option<String>,
    pub error: Option<String>,
    pub created_at: i64,
    pub completed_at: Option<i64>,
    pub updated_at: i64,
}

impl BackupRow {
    pub fn ignore(&self) -> Vec<String> {
        serde_json::from_str(&self.ignore_patterns).unwrap_or_default()
    }

    /// What the key was sealed for: the tenant and this backup.
    pub fn key_owner(&self) -> String {
        format!("backup:{}", self.id)
    }
}

/// A backup as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Backup {
    #[schema(value_type = String)]
    pub id: BackupId,
    #[schema(value_type = String)]
    pub server_id: ServerId,
    pub name: String,
    /// Where the node stores it: `local` or `s3`.
    pub adapter: String,
    /// The gitignore-style patterns it was made with.
    pub ignore: Vec<String>,
    /// `pending`, `running`, `completed`, `failed`, `restoring` or `deleting`.
    pub status: String,
    /// Size of the stored archive in bytes, once completed.
    pub size_bytes: Option<i64>,
    /// SHA-256 (hex) of the stored archive, once completed: a download hashes to it.
    pub sha256: Option<String>,
    /// Whether the archive is encrypted (its key stays in the panel).
    pub encrypted: bool,
    /// Why it (or its latest restore or delete) failed.
    pub error: Option<String>,
    pub created_at: i64,
    pub completed_at: Option<i64>,
}

impl From<BackupRow> for Backup {
    fn from(row: BackupRow) -> Backup {
        Backup {
            ignore: row.ignore(),
            id: BackupId::from_db(row.id),
            server_id: ServerId::from_db(row.server_id),
            name: row.name,
            adapter: row.adapter,
            status: row.status,
            size_bytes: row.size_bytes,
            sha256: row.sha256,
            encrypted: row.sealed_key.is_some(),
            error: row.error,
            created_at: row.created_at,
            completed_at: row.completed_at,
        }
    }
}

/// A backup to make.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBackup {
    /// 1 to 100 printable characters; default `Backup <UTC time>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Gitignore-style patterns relative to the server's folder (`#` comments, `!` negates,
    /// a trailing `/` matches folders only); at most 1000.
    #[serde(default)]
    pub ignore: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreBody {
    /// Empty the server's folder before extracting (default false: files not in the
    /// backup stay).
    #[serde(default)]
    pub truncate: bool,
}

/// A backup with the job a change queued.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct BackupQueued {
    pub backup: Backup,
    #[schema(value_type = String)]
    pub job: JobId,
}

/// A backup id from a path; anything that is not an id is a backup that does not exist.
pub fn parse_id(raw: &str) -> Result<BackupId, ApiError> {
    BackupId::parse(raw).ok_or_else(|| ApiError::not_found("backup"))
}

fn check_ignore(patterns: &[String]) -> Result<(), ApiError> {
    if patterns.len() > MAX_IGNORE_PATTERNS {
        return Err(ApiError::invalid(
            "ignore",
            format!("at most {MAX_IGNORE_PATTERNS} patterns"),
        ));
    }
    if let Some(i) = patterns
        .iter()
        .position(|p| p.len() > MAX_PATTERN_BYTES || p.contains(['\n', '\r', '\0']))
    {
        return Err(ApiError::invalid(
            &format!("ignore[{i}]"),
            format!("a pattern is one line of at most {MAX_PATTERN_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn default_name(at_ms: i64) -> String {
    let secs = at_ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "Backup {y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn scoped_row(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    backup: &BackupId,
) -> Result<BackupRow, ApiError> {
    server_backups::table
        .filter(server_backups::id.eq(backup.as_str()))
        .filter(server_backups::server_id.eq(server.as_str()))
        .filter(server_backups::tenant_id.eq(scope.tenant().as_str()))
        .select(BackupRow::as_select())
        .first(conn)
        .optional()?
        .ok_or_else(|| ApiError::not_found("backup"))
}

/// Backups of the server that count against the limit (all but failed ones).
fn held(conn: &mut DbConnection, server: &ServerId) -> QueryResult<i64> {
    server_backups::table
        .filter(server_backups::server_id.eq(server.as_str()))
        .filter(server_backups::status.ne(STATUS_FAILED))
        .count()
        .get_result(conn)
}

fn audit_backup(
    conn: &mut DbConnection,
    scope: &TenantScope,
    action: &'static str,
    backup: &str,
    metadata: serde_json::Value,
    meta: &RequestMeta,
) -> Result<(), ApiError> {
    audit::record(
        conn,
        scope.actor(),
        meta,
        Event {
            tenant: Some(scope.tenant()),
            action,
            resource_type: "backup",
            resource_id: Some(backup.to_string()),
            metadata,
        },
    )?;
    Ok(())
}

/// Records a backup of the scope's server and queues `ServerBackup`, with the audit entry
/// `backup.create`, in one transaction. Refused (409) while the server is being installed or
/// deleted, and past the server's backup limit (`quota_exceeded`, field
/// `max_backups_per_server`).
#[allow(clippy::too_many_arguments)]
pub fn create(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    new: &NewBackup,
    config: &BackupsConfig,
    quotas: &QuotaConfig,
    secrets: &SecretBox,
    meta: &RequestMeta,
) -> Result<BackupQueued, ApiError> {
    scope.require("backup.create")?;
    let now = now_ms();
    let name = match &new.name {
        Some(n) => crate::users::check_display_name(n).map_err(|m| ApiError::invalid("name", m))?,
        None => default_name(now),
    };
    check_ignore(&new.ignore)?;
    crate::db::transaction(conn, |conn| {
        servers::lock_quota(conn, scope.tenant())?;
        let current = servers::row(conn, scope, server)?;
        servers::refuse_if_deleting(&current)?;
        if current.status == servers::STATUS_INSTALLING || current.status == servers::STATUS_INSTALL_FAILED {
            return Err(ApiError::conflict(
                "not_installed",
                format!("the server is {}", current.status),
            ));
        }
        let limit = servers::quota_usage_of(conn, scope.tenant(), quotas)?
            .quota
            .max_backups_per_server;
        if held(conn, server)? >= limit {
            return Err(ApiError::conflict(
                "quota_exceeded",
                format!("the server has its limit of {limit} backups; delete one first"),
            )
            .with_field("max_backups_per_server"));
        }
        let id = BackupId::generate();
        let sealed_key = if config.encrypt {
            let key: [u8; 32] = crate::tokens::random_bytes()
                .map_err(|_| ApiError::internal("the system random number generator failed"))?;
            let text = base64::engine::general_purpose::STANDARD.encode(key);
            Some(
                secrets
                    .seal_for(conn, scope.tenant(), &format!("backup:{id}"), &text)
                    .map_err(|e| ApiError::internal(e.to_string()))?,
            )
        } else {
            None
        };
        diesel::insert_into(server_backups::table)
            .values((
                server_backups::id.eq(id.as_str()),
                server_backups::tenant_id.eq(scope.tenant().as_str()),
                server_backups::server_id.eq(server.as_str()),
                server_backups::name.eq(&name),
                server_backups::adapter.eq(&config.adapter),
                server_backups::ignore_patterns.eq(serde_json::to_string(&new.ignore).unwrap_or_default()),
                server_backups::status.eq(STATUS_PENDING),
                server_backups::sealed_key.eq(&sealed_key),
                server_backups::created_at.eq(now),
                server_backups::updated_at.eq(now),
            ))
            .execute(conn)?;
        audit_backup(
            conn,
            scope,
            "backup.create",
            id.as_str(),
            json!({ "server": server, "name": name, "adapter": config.adapter, "ignore": new.ignore.len() }),
            meta,
        )?;
        let job = jobs::enqueue(
            conn,
            Some(scope.tenant()),
            Some(server),
            JobKind::ServerBackup,
            &json!({ "backup": id }),
        )?;
        Ok(BackupQueued {
            backup: scoped_row(conn, scope, server, &id)?.into(),
            job,
        })
    })
}

/// The server's backups, oldest first (404 for a server outside the scope's tenant).
pub fn list(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    page: &PageRequest,
) -> Result<Page<Backup>, ApiError> {
    scope.require("backup.read")?;
    servers::row(conn, scope, server)?;
    let mut query = server_backups::table
        .filter(server_backups::server_id.eq(server.as_str()))
        .filter(server_backups::tenant_id.eq(scope.tenant().as_str()))
        .select(BackupRow::as_select())
        .order(server_backups::id.asc())
        .into_boxed();
    if let Some(after) = &page.after {
        query = query.filter(server_backups::id.gt(after.clone()));
    }
    let rows = query.limit(page.fetch()).load(conn)?;
    Ok(Page::from_rows(rows, page, |r| r.id.as_str()).map(Backup::from))
}

/// One backup of the scope's server.
pub fn get(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    backup: &BackupId,
) -> Result<Backup, ApiError> {
    scope.require("backup.read")?;
    Ok(scoped_row(conn, scope, server, backup)?.into())
}

/// Marks a backup `deleting` and queues `ServerBackupDelete`, with the audit entry
/// `backup.delete`. Not while it is being restored or deleted.
pub fn request_delete(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    backup: &BackupId,
    meta: &RequestMeta,
) -> Result<BackupQueued, ApiError> {
    scope.require("backup.delete")?;
    crate::db::transaction(conn, |conn| {
        let row = scoped_row(conn, scope, server, backup)?;
        match row.status.as_str() {
            STATUS_RESTORING => {
                return Err(ApiError::conflict(
                    "backup_restoring",
                    "the backup is being restored",
                ));
            }
            STATUS_DELETING => {
                return Err(ApiError::conflict(
                    "backup_deleting",
                    "the backup is already being deleted",
                ));
            }
            _ => {}
        }
        set_status(conn, backup, STATUS_DELETING)?;
        audit_backup(
            conn,
            scope,
            "backup.delete",
            backup.as_str(),
            json!({ "server": server, "name": row.name, "was": row.status }),
            meta,
        )?;
        let job = jobs::enqueue(
            conn,
            Some(scope.tenant()),
            Some(server),
            JobKind::ServerBackupDelete,
            &json!({ "backup": backup }),
        )?;
        Ok(BackupQueued {
            backup: scoped_row(conn, scope, server, backup)?.into(),
            job,
        })
    })
}

/// Marks a completed backup `restoring` and queues `ServerBackupRestore`, with the audit
/// entry `backup.restore`. Not while the server is being deleted or is suspended, nor while
/// another of its backups is being restored.
pub fn request_restore(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    backup: &BackupId,
    body: &RestoreBody,
    meta: &RequestMeta,
) -> Result<BackupQueued, ApiError> {
    scope.require("backup.restore")?;
    crate::db::transaction(conn, |conn| {
        let current = servers::row(conn, scope, server)?;
        servers::refuse_if_deleting(&current)?;
        if current.is_suspended() {
            return Err(ApiError::conflict("server_suspended", "the server is suspended"));
        }
        let row = scoped_row(conn, scope, server, backup)?;
        if row.status != STATUS_COMPLETED {
            return Err(ApiError::conflict(
                "backup_not_completed",
                format!("the backup is {}", row.status),
            ));
        }
        refuse_while_restoring(conn, server)?;
        set_status(conn, backup, STATUS_RESTORING)?;
        audit_backup(
            conn,
            scope,
            "backup.restore",
            backup.as_str(),
            json!({ "server": server, "truncate": body.truncate }),
            meta,
        )?;
        let job = jobs::enqueue(
            conn,
            Some(scope.tenant()),
            Some(server),
            JobKind::ServerBackupRestore,
            &json!({ "backup": backup, "truncate": body.truncate }),
        )?;
        Ok(BackupQueued {
            backup: scoped_row(conn, scope, server, backup)?.into(),
            job,
        })
    })
}

/// A completed backup of the scope's server, for a download URL, with the audit entry
/// `backup.download`.
pub fn for_download(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    backup: &BackupId,
    jti: &str,
    meta: &RequestMeta,
) -> Result<servers::ServerRow, ApiError> {
    scope.require("backup.download")?;
    crate::db::transaction(conn, |conn| {
        let server_row = servers::row(conn, scope, server)?;
        let row = scoped_row(conn, scope, server, backup)?;
        if !matches!(row.status.as_str(), STATUS_COMPLETED | STATUS_RESTORING) {
            return Err(ApiError::conflict(
                "backup_not_completed",
                format!("the backup is {}", row.status),
            ));
        }
        audit_backup(
            conn,
            scope,
            "backup.download",
            backup.as_str(),
            json!({ "server": server, "jti": jti }),
            meta,
        )?;
        Ok(server_row)
    })
}

/// Refuses (409 `backup_restoring`) while one of the server's backups is being restored:
/// deleting a server, or starting a second restore, would race the node's extract.
pub fn refuse_while_restoring(conn: &mut DbConnection, server: &ServerId) -> Result<(), ApiError> {
    let restoring: i64 = server_backups::table
        .filter(server_backups::server_id.eq(server.as_str()))
        .filter(server_backups::status.eq(STATUS_RESTORING))
        .count()
        .get_result(conn)?;
    if restoring > 0 {
        return Err(ApiError::conflict(
            "backup_restoring",
            "a backup of this server is being restored; try again when it is done",
        ));
    }
    Ok(())
}

fn set_status(conn: &mut DbConnection, backup: &BackupId, status: &str) -> QueryResult<usize> {
    diesel::update(server_backups::table.find(backup.as_str()))
        .set((
            server_backups::status.eq(status),
            server_backups::updated_at.eq(now_ms()),
        ))
        .execute(conn)
}

// --- for the jobs worker -----------------------------------------------------------------------
// The worker acts on any tenant's backup by id (from its job), never reachable from a tenant
// route, so these take no scope.

/// A backup's row by id alone (jobs worker).
pub fn row_any_tenant(conn: &mut DbConnection, backup: &BackupId) -> QueryResult<Option<BackupRow>> {
    server_backups::table
        .find(backup.as_str())
        .select(BackupRow::as_select())
        .first(conn)
        .optional()
}

/// The backup's key, opened (jobs worker).
pub fn open_key(
    conn: &mut DbConnection,
    secrets: &SecretBox,
    row: &BackupRow,
) -> Result<Option<String>, ApiError> {
    let Some(sealed) = &row.sealed_key else {
        return Ok(None);
    };
    let tenant = TenantId::from_db(row.tenant_id.clone());
    secrets
        .open_for(conn, &tenant, &row.key_owner(), sealed)
        .map(Some)
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// Moves a backup from one of `from` to `to` (jobs worker); a backup in any other status
/// (deleted meanwhile, say) is left alone. Answers whether it moved.
pub fn transition(
    conn: &mut DbConnection,
    backup: &BackupId,
    from: &[&str],
    to: &str,
    error: Option<&str>,
) -> QueryResult<bool> {
    let n = diesel::update(
        server_backups::table
            .find(backup.as_str())
            .filter(server_backups::status.eq_any(from.to_vec())),
    )
    .set((
        server_backups::status.eq(to),
        server_backups::error.eq(error),
        server_backups::updated_at.eq(now_ms()),
    ))
    .execute(conn)?;
    Ok(n > 0)
}

/// Records a finished archive (jobs worker): `completed` with its size and checksum, unless
/// the backup is being deleted meanwhile.
pub fn complete(conn: &mut DbConnection, backup: &BackupId, size: i64, sha256: &str) -> QueryResult<bool> {
    let now = now_ms();
    let n = diesel::update(
        server_backups::table
            .find(backup.as_str())
            .filter(server_backups::status.eq_any([STATUS_PENDING, STATUS_RUNNING])),
    )
    .set((
        server_backups::status.eq(STATUS_COMPLETED),
        server_backups::size_bytes.eq(size),
        server_backups::sha256.eq(sha256),
        server_backups::error.eq(None::<String>),
        server_backups::completed_at.eq(now),
        server_backups::updated_at.eq(now),
    ))
    .execute(conn)?;
    Ok(n > 0)
}

/// Removes a backup's row once the node deleted its archive (jobs worker).
pub fn remove(conn: &mut DbConnection, backup: &BackupId) -> QueryResult<usize> {
    diesel::delete(server_backups::table.find(backup.as_str())).execute(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_carry_the_utc_time() {
        assert_eq!(default_name(0), "Backup 1970-01-01 00:00:00 UTC");
        assert_eq!(default_name(1_796_540_645_000), "Backup 2026-12-06 07:04:05 UTC");
    }

    #[test]
    fn ignore_patterns_are_bounded() {
        assert!(check_ignore(&["*.log".into(), "!keep.log".into()]).is_ok());
        assert!(check_ignore(&["a\nb".into()]).is_err());
        assert!(check_ignore(&vec!["x".into(); 1001]).is_err());
    }
}

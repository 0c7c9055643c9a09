//! API keys: made per user within a tenant, with scopes, an optional expiry, an address
//! allow-list and a memo. A key is `mak_<8 hex digits>_<secret>`; the first part is stored
//! in the clear to identify it, the whole key only as a SHA-256 digest.
//!
//! A key acts as its user in its tenant, narrowed to its scopes: the permissions it has are
//! the user's current role permissions intersected with what the scopes stand for, so a key
//! never outgrows its user, even after a demotion.

use std::collections::BTreeSet;
use std::net::IpAddr;

use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::audit::{Event, record};
use crate::authz::TenantScope;
use crate::db::schema::{api_keys, tenants, users};
use crate::db::{DbConnection, now_ms};
use crate::error::ApiError;
use crate::ids::TenantId;
use crate::pagination::{Page, PageRequest};
use crate::permissions::{self, CATALOGUE};
use crate::request_meta::RequestMeta;
use crate::tokens::{digest, random_token};
use crate::users::UserRow;

pub const KEY_PREFIX: &str = "mak_";
const MAX_ALLOWED_IPS: usize = 50;

/// Server permission groups, for the coarse `read:servers` and `write:servers` scopes.
const SERVER_GROUPS: &[&str] = &[
    "console",
    "power",
    "files",
    "backups",
    "schedules",
    "allocations",
    "startup",
    "settings",
    "activity",
    "servers",
];
const SERVER_READ: &[&str] = &[
    "file.read",
    "file.read-content",
    "backup.read",
    "schedule.read",
    "allocation.read",
    "startup.read",
    "activity.read",
];

/// The permissions one scope stands for; `None` for an unknown scope.
pub fn scope_permissions(scope: &str) -> Option<BTreeSet<String>> {
    let keys: Vec<&str> = match scope {
        "admin:all" => CATALOGUE.iter().map(|p| p.key).collect(),
        "read:servers" => SERVER_READ.to_vec(),
        "write:servers" => CATALOGUE
            .iter()
            .filter(|p| SERVER_GROUPS.contains(&p.group))
            .map(|p| p.key)
            .collect(),
        key if permissions::is_known(key) => vec![key],
        _ => return None,
    };
    Some(keys.into_iter().map(str::to_string).collect())
}

fn all_scope_permissions(scopes: &[String]) -> BTreeSet<String> {
    scopes
        .iter()
        .filter_map(|s| scope_permissions(s))
        .flatten()
        .collect()
}

/// An address or CIDR range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    base: IpAddr,
    prefix: u8,
}

impl IpRange {
    pub fn parse(s: &str) -> Option<IpRange> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let ip = s.parse::<IpAddr>().ok()?;
                (ip, if ip.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(IpRange { base: ip, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, prefix: u8, width: u8) -> u128 {
            if prefix == 0 {
                return 0;
            }
            let shift = u32::from(width - prefix);
            bits.checked_shr(shift).unwrap_or(0)
        }
        match (self.base, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                masked(u128::from(u32::from(a)), self.prefix, 32)
                    == masked(u128::from(u32::from(b)), self.prefix, 32)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                masked(u128::from(a), self.prefix, 128) == masked(u128::from(b), self.prefix, 128)
            }
            (IpAddr::V6(a), IpAddr::V4(b)) | (IpAddr::V4(b), IpAddr::V6(a)) => {
                // An IPv4 client seen through an IPv6 socket.
                a.to_ipv4_mapped() == Some(b) && self.prefix >= 96
            }
        }
    }
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = api_keys)]
pub struct ApiKeyRow {
    pub id: String,
    pub tenant_id: String,
    pub user_id: String,
    pub prefix: String,
    pub secret_hash: String,
    pub scopes: String,
    pub allowed_ips: String,
    pub memo: String,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
}

/// What the API shows of a key: never the secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub prefix: String,
    pub user_id: String,
    pub scopes: Vec<String>,
    pub allowed_ips: Vec<String>,
    pub memo: String,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub created_at: i64,
}

impl From<ApiKeyRow> for ApiKey {
    fn from(row: ApiKeyRow) -> ApiKey {
        ApiKey {
            id: row.id,
            prefix: row.prefix,
            user_id: row.user_id,
            scopes: serde_json::from_str(&row.scopes).unwrap_or_default(),
            allowed_ips: serde_json::from_str(&row.allowed_ips).unwrap_or_default(),
            memo: row.memo,
            expires_at: row.expires_at,
            last_used_at: row.last_used_at,
            created_at: row.created_at,
        }
    }
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    pub memo: String,
    pub scopes: Vec<String>,
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub allowed_ips: Vec<String>,
}

impl NewApiKey {
    /// Field-by-field checks, before any database work.
    pub fn check(&self) -> Result<(), ApiError> {
        let memo = self.memo.chars().count();
        if memo > 500 || self.memo.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "memo",
                "must be at most 500 printable characters",
            ));
        }
        if self.scopes.is_empty() {
            return Err(ApiError::invalid("scopes", "must name at least one scope"));
        }
        if let Some(bad) = self.scopes.iter().find(|s| scope_permissions(s).is_none()) {
            return Err(ApiError::invalid("scopes", format!("{bad:?} is not a scope")));
        }
        if self.expires_at.is_some_and(|e| e <= now_ms()) {
            return Err(ApiError::invalid("expires_at", "must be in the future"));
        }
        if self.allowed_ips.len() > MAX_ALLOWED_IPS {
            return Err(ApiError::invalid(
                "allowed_ips",
                format!("may list at most {MAX_ALLOWED_IPS} entries"),
            ));
        }
        if let Some(bad) = self.allowed_ips.iter().find(|s| IpRange::parse(s).is_none()) {
            return Err(ApiError::invalid(
                "allowed_ips",
                format!("{bad:?} is not an address or CIDR range"),
            ));
        }
        Ok(())
    }
}

/// Creates a key for the caller; returns it and the key itself (shown once).
pub fn create(
    conn: &mut DbConnection,
    scope: &TenantScope,
    new: &NewApiKey,
    max_per_user: u32,
    meta: &RequestMeta,
) -> Result<(ApiKey, String), ApiError> {
    // No escalation: the scopes may not stand for more than the caller holds.
    scope.may_grant(&all_scope_permissions(&new.scopes))?;
    crate::db::transaction(conn, |conn| {
        // Serialise creations per user so the maximum holds under concurrency.
        if let DbConnection::Postgres(pg) = conn {
            diesel::sql_query("SELECT id FROM users WHERE id = $1 FOR UPDATE")
                .bind::<diesel::sql_types::Text, _>(scope.user().as_str())
                .execute(pg)?;
        }
        let live: i64 = api_keys::table
            .filter(api_keys::user_id.eq(scope.user().as_str()))
            .filter(api_keys::revoked_at.is_null())
            .count()
            .get_result(conn)?;
        if live >= i64::from(max_per_user) {
            return Err(ApiError::conflict(
                "api_key_limit",
                format!("a user may hold at most {max_per_user} API keys; revoke one first"),
            ));
        }
        let id = uuid::Uuid::now_v7().to_string();
        let prefix = format!("{KEY_PREFIX}{}", hex::encode(crate::tokens::random_bytes::<4>()?));
        let key = format!("{prefix}_{}", random_token(32)?);
        let now = now_ms();
        diesel::insert_into(api_keys::table)
            .values((
                api_keys::id.eq(&id),
                api_keys::tenant_id.eq(scope.tenant().as_str()),
                api_keys::user_id.eq(scope.user().as_str()),
                api_keys::prefix.eq(&prefix),
                api_keys::secret_hash.eq(digest(&key)),
                api_keys::scopes.eq(json!(new.scopes).to_string()),
                api_keys::allowed_ips.eq(json!(new.allowed_ips).to_string()),
                api_keys::memo.eq(&new.memo),
                api_keys::expires_at.eq(new.expires_at),
                api_keys::created_at.eq(now),
            ))
            .execute(conn)?;
        record(
            conn,
            scope.actor(),
            meta,
            Event {
                tenant: Some(scope.tenant()),
                action: "api_key.create",
                resource_type: "api_key",
                resource_id: Some(id.clone()),
                metadata: json!({ "prefix": prefix, "scopes": new.scopes }),
            },
        )?;
        let row = api_keys::table
            .find(&id)
            .select(ApiKeyRow::as_select())
            .first(conn)?;
        Ok((row.into(), key))
    })
}

/// The tenant's live keys: everyone's with `apikey.read`, else the caller's own.
pub fn list(conn: &mut DbConnection, scope: &TenantScope, page: &PageRequest) -> QueryResult<Page<ApiKey>> {
    let mut query = api_keys::table
        .filter(api_keys::tenant_id.eq(scope.tenant().as_str()))
        .filter(api_keys::revoked_at.is_null())
        .select(ApiKeyRow::as_select())
        .order(api_keys::id.asc())
        .into_boxed();
    if !scope.has("apikey.read") {
        query = query.filter(api_keys::user_id.eq(scope.user().as_str()));
    }
    if let Some(after) = &page.after {
        query = query.filter(api_keys::id.gt(after.clone()));
    }
    let rows = query.limit(page.fetch()).load(conn)?;
    Ok(Page::from_rows(rows, page, |k| k.id.as_str()).map(ApiKey::from))
}

/// Revokes a key: one's own with `apikey.manage`, anyone's with `apikey.read` too.
pub fn revoke(
    conn: &mut DbConnection,
    scope: &TenantScope,
    id: &str,
    meta: &RequestMeta,
) -> Result<(), ApiError> {
    crate::db::transaction(conn, |conn| {
        let owner: Option<String> = api_keys::table
            .filter(api_keys::tenant_id.eq(scope.tenant().as_str()))
            .filter(api_keys::id.eq(id))
            .filter(api_keys::revoked_at.is_null())
            .select(api_keys::user_id)
            .first(conn)
            .optional()?;
        let owner = owner.ok_or_else(|| ApiError::not_found("api key"))?;
        scope.require("apikey.manage")?;
        if owner != scope.user().as_str() {
            scope.require("apikey.read")?;
        }
        diesel::update(api_keys::table.find(id))
            .set(api_keys::revoked_at.eq(now_ms()))
            .execute(conn)?;
        record(
            conn,
            scope.actor(),
            meta,
            Event {
                tenant: Some(scope.tenant()),
                action: "api_key.revoke",
                resource_type: "api_key",
                resource_id: Some(id.to_string()),
                metadata: json!({}),
            },
        )?;
        Ok(())
    })
}

/// A presented key that checked out.
#[derive(Debug, Clone)]
pub struct KeyAuth {
    pub key_id: String,
    pub tenant: TenantId,
    pub plan: String,
    /// What the scopes stand for (intersected with the user's role when authorising).
    pub permissions: BTreeSet<String>,
    pub user: UserRow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRefusal {
    Unknown,
    Expired,
    AddressNotAllowed,
}

/// Finds and checks a presented key (no scope: this is authentication).
pub fn authenticate(
    conn: &mut DbConnection,
    presented: &str,
    client: Option<IpAddr>,
) -> QueryResult<Result<KeyAuth, KeyRefusal>> {
    // The prefix has a fixed length; the secret after it may contain `_` itself.
    let prefix_len = KEY_PREFIX.len() + 8;
    let Some(prefix) = presented
        .get(..prefix_len)
        .filter(|_| presented.as_bytes().get(prefix_len) == Some(&b'_'))
    else {
        return Ok(Err(KeyRefusal::Unknown));
    };
    let found: Option<(ApiKeyRow, UserRow, String)> = api_keys::table
        .inner_join(users::table)
        .inner_join(tenants::table)
        .filter(api_keys::prefix.eq(prefix))
        .filter(api_keys::revoked_at.is_null())
        .select((ApiKeyRow::as_select(), UserRow::as_select(), tenants::plan))
        .first(conn)
        .optional()?;
    let Some((key, user, plan)) = found else {
        return Ok(Err(KeyRefusal::Unknown));
    };
    if !bool::from(digest(presented).as_bytes().ct_eq(key.secret_hash.as_bytes())) {
        return Ok(Err(KeyRefusal::Unknown));
    }
    let now = now_ms();
    if key.expires_at.is_some_and(|e| e <= now) {
        return Ok(Err(KeyRefusal::Expired));
    }
    let allowed: Vec<String> = serde_json::from_str(&key.allowed_ips).unwrap_or_default();
    if !allowed.is_empty() {
        let ok = client.is_some_and(|ip| {
            allowed
                .iter()
                .filter_map(|r| IpRange::parse(r))
                .any(|r| r.contains(ip))
        });
        if !ok {
            return Ok(Err(KeyRefusal::AddressNotAllowed));
        }
    }
    // Recorded at most once a minute, so busy keys do not turn every read into a write.
    diesel::update(
        api_keys::table.filter(api_keys::id.eq(&key.id)).filter(
            api_keys::last_used_at
                .is_null()
                .or(api_keys::last_used_at.lt(now - 60_000)),
        ),
    )
    .set(api_keys::last_used_at.eq(now))
    .execute(conn)?;
    let scopes: Vec<String> = serde_json::from_str(&key.scopes).unwrap_or_default();
    Ok(Ok(KeyAuth {
        key_id: key.id,
        tenant: TenantId::from_db(key.tenant_id),
        plan,
        permissions: all_scope_permissions(&scopes),
        user,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_match_addresses_and_prefixes() {
        let r = IpRange::parse("203.0.113.0/24").unwrap();
        assert!(r.contains("203.0.113.77".parse().unwrap()));
        assert!(!r.contains("203.0.114.1".parse().unwrap()));
        let one = IpRange::parse("198.51.100.7").unwrap();
        assert!(one.contains("198.51.100.7".parse().unwrap()));
        assert!(!one.contains("198.51.100.8".parse().unwrap()));
        let v6 = IpRange::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(
            IpRange::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(IpRange::parse("10.0.0.0/33").is_none());
        assert!(IpRange::parse("nonsense").is_none());
    }

    #[test]
    fn scopes_stand_for_catalogue_keys() {
        assert!(scope_permissions("read:servers").unwrap().contains("file.read"));
        assert!(!scope_permissions("read:servers").unwrap().contains("file.delete"));
        assert!(
            scope_permissions("write:servers")
                .unwrap()
                .contains("control.stop")
        );
        assert!(
            !scope_permissions("write:servers")
                .unwrap()
                .contains("member.invite")
        );
        assert_eq!(scope_permissions("admin:all").unwrap().len(), CATALOGUE.len());
        assert_eq!(scope_permissions("audit.read").unwrap().len(), 1);
        assert!(scope_permissions("root").is_none());
    }
}

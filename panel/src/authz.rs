//! Authorisation: the only place a [`TenantScope`] is made.
//!
//! Invariant: every data-layer function on tenant-owned rows takes a `&TenantScope` and
//! filters by its tenant. The scope's fields are private and it has no public constructor,
//! so holding one proves the caller passed [`authorize`]: a handler cannot reach another
//! tenant's rows by forgetting a check, and a foreign id simply matches nothing (404).

use std::collections::BTreeSet;

use diesel::prelude::*;

use crate::audit::Actor;
use crate::db::DbConnection;
use crate::db::schema::{memberships, roles, tenants};
use crate::error::ApiError;
use crate::ids::{TenantId, UserId};
use crate::permissions::BuiltInRole;
use crate::users::UserRow;

#[derive(Debug, Clone)]
pub struct TenantScope {
    tenant: TenantId,
    user: UserId,
    actor: Actor,
    role: String,
    permissions: BTreeSet<String>,
}

impl TenantScope {
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// Who the audit log names for actions taken under this scope.
    pub fn actor(&self) -> &Actor {
        &self.actor
    }

    /// The caller's role in the tenant: a built-in name or a custom role id.
    pub fn role(&self) -> &str {
        &self.role
    }

    pub fn permissions(&self) -> &BTreeSet<String> {
        &self.permissions
    }

    pub fn has(&self, permission: &str) -> bool {
        self.permissions.contains(permission)
    }

    /// 403 unless the caller holds `permission`. (The caller is a member, so the tenant's
    /// existence is no secret to them.)
    pub fn require(&self, permission: &str) -> Result<(), ApiError> {
        if self.has(permission) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this needs the {permission} permission"
            )))
        }
    }

    /// No escalation: a caller may hand out only permissions they hold themselves.
    pub fn may_grant(&self, permissions: &BTreeSet<String>) -> Result<(), ApiError> {
        let missing: Vec<&str> = permissions
            .difference(&self.permissions)
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "you cannot grant permissions you do not hold: {}",
                missing.join(", ")
            ))
            .with_code("escalation_refused"))
        }
    }
}

/// The permissions a role reference stands for in `tenant`, or `None` if it names nothing.
pub fn role_permissions(
    conn: &mut DbConnection,
    tenant: &TenantId,
    role: &str,
) -> QueryResult<Option<BTreeSet<String>>> {
    if let Some(built_in) = BuiltInRole::parse(role) {
        return Ok(Some(built_in.permissions()));
    }
    let stored: Option<String> = roles::table
        .filter(roles::id.eq(role))
        .filter(roles::tenant_id.eq(tenant.as_str()))
        .select(roles::permissions)
        .first(conn)
        .optional()?;
    Ok(stored.map(|json| serde_json::from_str::<BTreeSet<String>>(&json).unwrap_or_default()))
}

/// Resolves the caller's membership of the tenant `tenant` (an id from the URL). A tenant
/// that does not exist and one the caller is not a member of answer the same 404.
///
/// With an API key, `key` holds the key's tenant and scope permissions: another tenant
/// answers 404, and the scope keeps only permissions both the role and the key have.
pub fn authorize(
    conn: &mut DbConnection,
    user: &UserRow,
    actor: Actor,
    tenant: &str,
    key: Option<(&TenantId, &BTreeSet<String>)>,
) -> Result<TenantScope, ApiError> {
    let not_found = || ApiError::not_found("tenant");
    let tenant = TenantId::parse(tenant).ok_or_else(not_found)?;
    if key.is_some_and(|(key_tenant, _)| *key_tenant != tenant) {
        return Err(not_found());
    }
    let found: Option<(String, bool, String)> = memberships::table
        .inner_join(tenants::table)
        .filter(memberships::tenant_id.eq(tenant.as_str()))
        .filter(memberships::user_id.eq(&user.id))
        .select((memberships::role, tenants::require_two_factor, tenants::status))
        .first(conn)
        .optional()?;
    let (role, require_two_factor, status) = found.ok_or_else(not_found)?;
    if status == "suspended" && !user.is_super_admin {
        return Err(ApiError::forbidden("this tenant is suspended").with_code("tenant_suspended"));
    }
    if require_two_factor && user.totp_enabled_at.is_none() {
        return Err(ApiError::forbidden(
            "this tenant requires two-factor authentication; turn it on for your account first",
        )
        .with_code("two_factor_required"));
    }
    let mut permissions = role_permissions(conn, &tenant, &role)?.unwrap_or_default();
    if let Some((_, allowed)) = key {
        permissions.retain(|p| allowed.contains(p));
    }
    Ok(TenantScope {
        tenant,
        user: UserId::from_db(user.id.clone()),
        actor,
        role,
        permissions,
    })
}

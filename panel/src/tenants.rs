//! Tenants, members, invitations and custom roles: the data layer. Every function on
//! tenant-owned rows takes a [`TenantScope`] and filters by its tenant; each change writes
//! its audit entry in the same transaction.

use std::collections::BTreeSet;

use diesel::prelude::*;
use serde::Serialize;
use serde_json::json;

use crate::audit::{self, Actor, Event};
use crate::authz::{TenantScope, role_permissions};
use crate::db::schema::{invitations, memberships, roles, tenants, users};
use crate::db::{DbConnection, now_ms};
use crate::error::ApiError;
use crate::ids::{InvitationId, MembershipId, RoleId, TenantId, UserId};
use crate::pagination::{Page, PageRequest};
use crate::permissions::BuiltInRole;
use crate::request_meta::RequestMeta;
use crate::tokens::{digest, random_token};

pub const INVITATION_TTL_MS: i64 = 7 * 24 * 3_600_000;

#[derive(Debug, Clone, Queryable, Selectable, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
#[diesel(table_name = tenants)]
pub struct Tenant {
    pub id: String,
    pub slug: String,
    pub name: String,
    pub plan: String,
    pub status: String,
    pub require_two_factor: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Member {
    pub id: String,
    pub user_id: String,
    pub email: String,
    pub display_name: String,
    pub role: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq, utoipa::ToSchema)]
#[diesel(table_name = invitations)]
pub struct Invitation {
    pub id: String,
    pub tenant_id: String,
    pub email: String,
    pub role: String,
    #[serde(skip)]
    pub token_hash: String,
    pub invited_by: String,
    pub expires_at: i64,
    pub accepted_at: Option<i64>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Role {
    pub id: String,
    pub name: String,
    pub built_in: bool,
    pub permissions: BTreeSet<String>,
}

fn audit_in(
    conn: &mut DbConnection,
    scope: &TenantScope,
    meta: &RequestMeta,
    event: Event<'_>,
) -> QueryResult<()> {
    audit::record(
        conn,
        scope.actor(),
        meta,
        Event {
            tenant: Some(scope.tenant()),
            ..event
        },
    )?;
    Ok(())
}

fn unique_violation(e: &diesel::result::Error) -> bool {
    matches!(
        e,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
}

/// Serialises membership changes within one tenant, so "is this the last owner?" cannot
/// race. SQLite already runs one writer at a time.
fn lock_tenant(conn: &mut DbConnection, tenant: &TenantId) -> QueryResult<()> {
    if let DbConnection::Postgres(pg) = conn {
        diesel::sql_query("SELECT id FROM tenants WHERE id = $1 FOR UPDATE")
            .bind::<diesel::sql_types::Text, _>(tenant.as_str())
            .execute(pg)?;
    }
    Ok(())
}

// ---------------------------------------------------------------- tenants

/// A slug: 3 to 40 of `a-z`, `0-9` and inner `-`.
pub fn check_slug(slug: &str) -> Result<(), &'static str> {
    let ok = (3..=40).contains(&slug.len())
        && slug
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !slug.starts_with('-')
        && !slug.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err("must be 3 to 40 lowercase letters, digits and inner hyphens")
    }
}

/// Creates a tenant with `owner` as its first OWNER. (No scope: the tenant does not exist
/// yet; the caller is any logged-in user.)
pub fn create(
    conn: &mut DbConnection,
    owner: &UserId,
    slug: &str,
    name: &str,
    meta: &RequestMeta,
) -> Result<Tenant, ApiError> {
    crate::db::transaction(conn, |conn| {
        let id = TenantId::generate();
        let now = now_ms();
        let inserted = diesel::insert_into(tenants::table)
            .values((
                tenants::id.eq(id.as_str()),
                tenants::slug.eq(slug),
                tenants::name.eq(name),
                tenants::plan.eq("free"),
                tenants::status.eq("active"),
                tenants::require_two_factor.eq(false),
                tenants::created_at.eq(now),
                tenants::updated_at.eq(now),
            ))
            .execute(conn);
        match inserted {
            Err(e) if unique_violation(&e) => {
                return Err(ApiError::conflict("slug_taken", "this slug is taken").with_field("slug"));
            }
            other => other?,
        };
        diesel::insert_into(memberships::table)
            .values((
                memberships::id.eq(MembershipId::generate().as_str()),
                memberships::tenant_id.eq(id.as_str()),
                memberships::user_id.eq(owner.as_str()),
                memberships::role.eq(BuiltInRole::Owner.name()),
                memberships::created_at.eq(now),
            ))
            .execute(conn)?;
        audit::record(
            conn,
            &Actor::User(owner.clone()),
            meta,
            Event {
                tenant: Some(&id),
                action: "tenant.create",
                resource_type: "tenant",
                resource_id: Some(id.to_string()),
                metadata: json!({ "slug": slug }),
            },
        )?;
        Ok(tenants::table
            .find(id.as_str())
            .select(Tenant::as_select())
            .first(conn)?)
    })
}

/// The tenants a user belongs to.
pub fn list_for_user(
    conn: &mut DbConnection,
    user: &UserId,
    page: &PageRequest,
) -> QueryResult<Page<Tenant>> {
    let mut query = tenants::table
        .inner_join(memberships::table)
        .filter(memberships::user_id.eq(user.as_str()))
        .select(Tenant::as_select())
        .order(tenants::id.asc())
        .into_boxed();
    if let Some(after) = &page.after {
        query = query.filter(tenants::id.gt(after.clone()));
    }
    let rows = query.limit(page.fetch()).load(conn)?;
    Ok(Page::from_rows(rows, page, |t| t.id.as_str()))
}

/// Every tenant, for operators (no scope: super-admin routes only).
pub fn list_all(conn: &mut DbConnection, page: &PageRequest) -> QueryResult<Page<Tenant>> {
    let mut query = tenants::table
        .select(Tenant::as_select())
        .order(tenants::id.asc())
        .into_boxed();
    if let Some(after) = &page.after {
        query = query.filter(tenants::id.gt(after.clone()));
    }
    let rows = query.limit(page.fetch()).load(conn)?;
    Ok(Page::from_rows(rows, page, |t| t.id.as_str()))
}

/// Operators change a tenant's plan or status (no scope: super-admin routes only).
pub fn admin_update(
    conn: &mut DbConnection,
    tenant: &TenantId,
    plan: Option<&str>,
    status: Option<&str>,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<Tenant, ApiError> {
    crate::db::transaction(conn, |conn| {
        let target = tenants::table.find(tenant.as_str());
        let exists: i64 = target.count().get_result(conn)?;
        if exists == 0 {
            return Err(ApiError::not_found("tenant"));
        }
        if let Some(plan) = plan {
            diesel::update(target).set(tenants::plan.eq(plan)).execute(conn)?;
        }
        if let Some(status) = status {
            diesel::update(target)
                .set(tenants::status.eq(status))
                .execute(conn)?;
        }
        diesel::update(target)
            .set(tenants::updated_at.eq(now_ms()))
            .execute(conn)?;
        audit::record(
            conn,
            actor,
            meta,
            Event {
                tenant: Some(tenant),
                action: "tenant.admin_update",
                resource_type: "tenant",
                resource_id: Some(tenant.to_string()),
                metadata: json!({ "plan": plan, "status": status }),
            },
        )?;
        Ok(target.select(Tenant::as_select()).first(conn)?)
    })
}

pub fn get(conn: &mut DbConnection, scope: &TenantScope) -> QueryResult<Tenant> {
    tenants::table
        .find(scope.tenant().as_str())
        .select(Tenant::as_select())
        .first(conn)
}

#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantChanges {
    pub name: Option<String>,
    pub require_two_factor: Option<bool>,
}

pub fn update(
    conn: &mut DbConnection,
    scope: &TenantScope,
    changes: &TenantChanges,
    meta: &RequestMeta,
) -> Result<Tenant, ApiError> {
    crate::db::transaction(conn, |conn| {
        let target = tenants::table.find(scope.tenant().as_str());
        if let Some(name) = &changes.name {
            diesel::update(target).set(tenants::name.eq(name)).execute(conn)?;
        }
        if let Some(required) = changes.require_two_factor {
            diesel::update(target)
                .set(tenants::require_two_factor.eq(required))
                .execute(conn)?;
        }
        diesel::update(target)
            .set(tenants::updated_at.eq(now_ms()))
            .execute(conn)?;
        audit_in(
            conn,
            scope,
            meta,
            Event {
                tenant: None,
                action: "tenant.update",
                resource_type: "tenant",
                resource_id: Some(scope.tenant().to_string()),
                metadata: json!({ "name": changes.name, "require_two_factor": changes.require_two_factor }),
            },
        )?;
        Ok(get(conn, scope)?)
    })
}

// ---------------------------------------------------------------- members

type MemberTuple = (String, String, String, String, String, i64);

fn member_from(row: MemberTuple) -> Member {
    let (id, user_id, email, display_name, role, created_at) = row;
    Member {
        id,
        user_id,
        email,
        display_name,
        role,
        created_at,
    }
}

pub fn list_members(
    conn: &mut DbConnection,
    scope: &TenantScope,
    page: &PageRequest,
) -> QueryResult<Page<Member>> {
    let mut query = memberships::table
        .inner_join(users::table)
        .filter(memberships::tenant_id.eq(scope.tenant().as_str()))
        .select((
            memberships::id,
            memberships::user_id,
            users::email,
            users::display_name,
            memberships::role,
            memberships::created_at,
        ))
        .order(memberships::id.asc())
        .into_boxed();
    if let Some(after) = &page.after {
        query = query.filter(memberships::id.gt(after.clone()));
    }
    let rows: Vec<MemberTuple> = query.limit(page.fetch()).load(conn)?;
    Ok(Page::from_rows(
        rows.into_iter().map(member_from).collect(),
        page,
        |m| m.id.as_str(),
    ))
}

pub fn find_member(
    conn: &mut DbConnection,
    scope: &TenantScope,
    id: &MembershipId,
) -> QueryResult<Option<Member>> {
    let row: Option<MemberTuple> = memberships::table
        .inner_join(users::table)
        .filter(memberships::tenant_id.eq(scope.tenant().as_str()))
        .filter(memberships::id.eq(id.as_str()))
        .select((
            memberships::id,
            memberships::user_id,
            users::email,
            users::display_name,
            memberships::role,
            memberships::created_at,
        ))
        .first(conn)
        .optional()?;
    Ok(row.map(member_from))
}

fn owners(conn: &mut DbConnection, tenant: &TenantId) -> QueryResult<i64> {
    memberships::table
        .filter(memberships::tenant_id.eq(tenant.as_str()))
        .filter(memberships::role.eq(BuiltInRole::Owner.name()))
        .count()
        .get_result(conn)
}

fn last_owner() -> ApiError {
    ApiError::conflict("last_owner", "a tenant always keeps at least one owner")
}

/// The permissions `role` stands for here, or 422 naming `field`.
pub fn resolve_role(
    conn: &mut DbConnection,
    scope: &TenantScope,
    role: &str,
    field: &str,
) -> Result<BTreeSet<String>, ApiError> {
    role_permissions(conn, scope.tenant(), role)?
        .ok_or_else(|| ApiError::invalid(field, "is not a role of this tenant"))
}

/// Changes a member's role. The caller must hold every permission of both the old and the
/// new role (no escalation, and no demoting someone above you); the last owner stays.
pub fn set_member_role(
    conn: &mut DbConnection,
    scope: &TenantScope,
    id: &MembershipId,
    role: &str,
    meta: &RequestMeta,
) -> Result<Member, ApiError> {
    crate::db::transaction(conn, |conn| {
        lock_tenant(conn, scope.tenant())?;
        let member = find_member(conn, scope, id)?.ok_or_else(|| ApiError::not_found("member"))?;
        let new_permissions = resolve_role(conn, scope, role, "role")?;
        scope.may_grant(&new_permissions)?;
        let old_permissions = role_permissions(conn, scope.tenant(), &member.role)?.unwrap_or_default();
        scope.may_grant(&old_permissions)?;
        if member.role == BuiltInRole::Owner.name()
            && role != member.role
            && owners(conn, scope.tenant())? <= 1
        {
            return Err(last_owner());
        }
        diesel::update(memberships::table.find(id.as_str()))
            .set(memberships::role.eq(role))
            .execute(conn)?;
        audit_in(
            conn,
            scope,
            meta,
            Event {
                tenant: None,
                action: "member.update",
                resource_type: "member",
                resource_id: Some(id.to_string()),
                metadata: json!({ "from": member.role, "to": role }),
            },
        )?;
        find_member(conn, scope, id)?.ok_or_else(|| ApiError::not_found("member"))
    })
}

/// Removes a member (or lets one leave) and returns whose membership it was. Removing
/// someone needs `member.remove` and every permission of their role; the last owner stays.
pub fn remove_member(
    conn: &mut DbConnection,
    scope: &TenantScope,
    id: &MembershipId,
    meta: &RequestMeta,
) -> Result<UserId, ApiError> {
    crate::db::transaction(conn, |conn| {
        lock_tenant(conn, scope.tenant())?;
        let member = find_member(conn, scope, id)?.ok_or_else(|| ApiError::not_found("member"))?;
        let leaving = member.user_id == scope.user().as_str();
        if !leaving {
            scope.require("member.remove")?;
            let permissions = role_permissions(conn, scope.tenant(), &member.role)?.unwrap_or_default();
            scope.may_grant(&permissions)?;
        }
        if member.role == BuiltInRole::Owner.name() && owners(conn, scope.tenant())? <= 1 {
            return Err(last_owner());
        }
        diesel::delete(memberships::table.find(id.as_str())).execute(conn)?;
        audit_in(
            conn,
            scope,
            meta,
            Event {
                tenant: None,
                action: if leaving { "member.leave" } else { "member.remove" },
                resource_type: "member",
                resource_id: Some(id.to_string()),
                metadata: json!({ "user": member.user_id }),
            },
        )?;
        Ok(UserId::from_db(member.user_id))
    })
}

// ---------------------------------------------------------------- invitations

/// Creates an invitation; returns it and its token (sent by mail, shown once).
pub fn invite(
    conn: &mut DbConnection,
    scope: &TenantScope,
    email: &str,
    role: &str,
    meta: &RequestMeta,
) -> Result<(Invitation, String), ApiError> {
    crate::db::transaction(conn, |conn| {
        let permissions = resolve_role(conn, scope, role, "role")?;
        scope.may_grant(&permissions)?;
        let already: i64 = memberships::table
            .inner_join(users::table)
            .filter(memberships::tenant_id.eq(scope.tenant().as_str()))
            .filter(users::email.eq(email))
            .count()
            .get_result(conn)?;
        if already > 0 {
            return Err(
                ApiError::conflict("already_member", "this address already belongs to a member")
                    .with_field("email"),
            );
        }
        let token = format!("min_{}", random_token(32)?);
        let id = InvitationId::generate();
        let now = now_ms();
        diesel::insert_into(invitations::table)
            .values((
                invitations::id.eq(id.as_str()),
                invitations::tenant_id.eq(scope.tenant().as_str()),
                invitations::email.eq(email),
                invitations::role.eq(role),
                invitations::token_hash.eq(digest(&token)),
                invitations::invited_by.eq(scope.user().as_str()),
                invitations::expires_at.eq(now + INVITATION_TTL_MS),
                invitations::created_at.eq(now),
            ))
            .execute(conn)?;
        audit_in(
            conn,
            scope,
            meta,
            Event {
                tenant: None,
                action: "invitation.create",
                resource_type: "invitation",
                resource_id: Some(id.to_string()),
                metadata: json!({ "email": email, "role": role }),
            },
        )?;
        let invitation = invitations::table
            .find(id.as_str())
            .select(Invitation::as_select())
            .first(conn)?;
        Ok((invitation, token))
    })
}

pub fn list_invitations(
    conn: &mut DbConnection,
    scope: &TenantScope,
    page: &PageRequest,
) -> QueryResult<Page<Invitation>> {
    let mut query = invitations::table
        .filter(invitations::tenant_id.eq(scope.tenant().as_str()))
        .filter(invitations::accepted_at.is_null())
        .select(Invitation::as_select())
        .order(invitations::id.asc())
        .into_boxed();
    if let Some(after) = &page.after {
        query = query.filter(invitations::id.gt(after.clone()));
    }
    let rows = query.limit(page.fetch()).load(conn)?;
    Ok(Page::from_rows(rows, page, |i| i.id.as_str()))
}

pub fn revoke_invitation(
    conn: &mut DbConnection,
    scope: &TenantScope,
    id: &InvitationId,
    meta: &RequestMeta,
) -> Result<(), ApiError> {
    crate::db::transaction(conn, |conn| {
        let n = diesel::delete(
            invitations::table
                .filter(invitations::tenant_id.eq(scope.tenant().as_str()))
                .filter(invitations::id.eq(id.as_str()))
                .filter(invitations::accepted_at.is_null()),
        )
        .execute(conn)?;
        if n == 0 {
            return Err(ApiError::not_found("invitation"));
        }
        audit_in(
            conn,
            scope,
            meta,
            Event {
                tenant: None,
                action: "invitation.revoke",
                resource_type: "invitation",
                resource_id: Some(id.to_string()),
                metadata: json!({}),
            },
        )?;
        Ok(())
    })
}

/// Accepts an invitation for `user`, whose verified address must be the invited one. (No
/// scope: the token and the address authorise this.)
pub fn accept_invitation(
    conn: &mut DbConnection,
    user: &crate::users::UserRow,
    token: &str,
    meta: &RequestMeta,
) -> Result<Tenant, ApiError> {
    crate::db::transaction(conn, |conn| {
        let invalid = || ApiError::not_found("invitation");
        let invitation: Invitation = invitations::table
            .filter(invitations::token_hash.eq(digest(token)))
            .filter(invitations::accepted_at.is_null())
            .filter(invitations::expires_at.gt(now_ms()))
            .select(Invitation::as_select())
            .first(conn)
            .optional()?
            .ok_or_else(invalid)?;
        if invitation.email != user.email || user.email_verified_at.is_none() {
            return Err(invalid());
        }
        let inserted = diesel::insert_into(memberships::table)
            .values((
                memberships::id.eq(MembershipId::generate().as_str()),
                memberships::tenant_id.eq(&invitation.tenant_id),
                memberships::user_id.eq(&user.id),
                memberships::role.eq(&invitation.role),
                memberships::created_at.eq(now_ms()),
            ))
            .execute(conn);
        match inserted {
            Err(e) if unique_violation(&e) => {
                return Err(ApiError::conflict("already_member", "you are already a member"));
            }
            other => other?,
        };
        diesel::update(invitations::table.find(&invitation.id))
            .set(invitations::accepted_at.eq(now_ms()))
            .execute(conn)?;
        let tenant = TenantId::from_db(invitation.tenant_id.clone());
        audit::record(
            conn,
            &Actor::User(UserId::from_db(user.id.clone())),
            meta,
            Event {
                tenant: Some(&tenant),
                action: "invitation.accept",
                resource_type: "invitation",
                resource_id: Some(invitation.id.clone()),
                metadata: json!({ "role": invitation.role }),
            },
        )?;
        Ok(tenants::table
            .find(tenant.as_str())
            .select(Tenant::as_select())
            .first(conn)?)
    })
}

// ---------------------------------------------------------------- roles

pub fn list_roles(conn: &mut DbConnection, scope: &TenantScope) -> QueryResult<Vec<Role>> {
    let mut out: Vec<Role> = crate::permissions::BUILT_IN
        .into_iter()
        .map(|r| Role {
            id: r.name().into(),
            name: r.name().into(),
            built_in: true,
            permissions: r.permissions(),
        })
        .collect();
    let custom: Vec<(String, String, String)> = roles::table
        .filter(roles::tenant_id.eq(scope.tenant().as_str()))
        .select((roles::id, roles::name, roles::permissions))
        .order(roles::id.asc())
        .load(conn)?;
    out.extend(custom.into_iter().map(|(id, name, permissions)| Role {
        id,
        name,
        built_in: false,
        permissions: serde_json::from_str(&permissions).unwrap_or_default(),
    }));
    Ok(out)
}

pub fn create_role(
    conn: &mut DbConnection,
    scope: &TenantScope,
    name: &str,
    permissions: &BTreeSet<String>,
    meta: &RequestMeta,
) -> Result<Role, ApiError> {
    scope.may_grant(permissions)?;
    crate::db::transaction(conn, |conn| {
        let id = RoleId::generate();
        let inserted = diesel::insert_into(roles::table)
            .values((
                roles::id.eq(id.as_str()),
                roles::tenant_id.eq(scope.tenant().as_str()),
                roles::name.eq(name),
                roles::permissions.eq(serde_json::to_string(permissions).unwrap_or_else(|_| "[]".into())),
                roles::created_at.eq(now_ms()),
            ))
            .execute(conn);
        match inserted {
            Err(e) if unique_violation(&e) => {
                return Err(
                    ApiError::conflict("role_exists", "a role with this name exists").with_field("name")
                );
            }
            other => other?,
        };
        audit_in(
            conn,
            scope,
            meta,
            Event {
                tenant: None,
                action: "role.create",
                resource_type: "role",
                resource_id: Some(id.to_string()),
                metadata: json!({ "name": name, "permissions": permissions }),
            },
        )?;
        Ok(Role {
            id: id.to_string(),
            name: name.into(),
            built_in: false,
            permissions: permissions.clone(),
        })
    })
}

pub fn delete_role(
    conn: &mut DbConnection,
    scope: &TenantScope,
    id: &RoleId,
    meta: &RequestMeta,
) -> Result<(), ApiError> {
    crate::db::transaction(conn, |conn| {
        let permissions = role_permissions(conn, scope.tenant(), id.as_str())?
            .ok_or_else(|| ApiError::not_found("role"))?;
        scope.may_grant(&permissions)?;
        let in_use: i64 = memberships::table
            .filter(memberships::tenant_id.eq(scope.tenant().as_str()))
            .filter(memberships::role.eq(id.as_str()))
            .count()
            .get_result(conn)?;
        if in_use > 0 {
            return Err(ApiError::conflict("role_in_use", "members still hold this role"));
        }
        diesel::delete(
            roles::table
                .filter(roles::tenant_id.eq(scope.tenant().as_str()))
                .filter(roles::id.eq(id.as_str())),
        )
        .execute(conn)?;
        audit_in(
            conn,
            scope,
            meta,
            Event {
                tenant: None,
                action: "role.delete",
                resource_type: "role",
                resource_id: Some(id.to_string()),
                metadata: json!({}),
            },
        )?;
        Ok(())
    })
}

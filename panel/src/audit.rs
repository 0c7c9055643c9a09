//! The audit log: one append-only entry per state-changing action, written with
//! [`record`] on the same connection and inside the same transaction as the change, so the
//! two commit or fail together. The database refuses UPDATE and DELETE on the table.

use diesel::prelude::*;
use serde::Serialize;

use crate::db::schema::audit_log;
use crate::db::{DbConnection, now_ms};
use crate::ids::{AuditId, TenantId, UserId};
use crate::request_meta::RequestMeta;

/// Who did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    User(UserId),
    ApiKey { key_id: String, user: UserId },
    System,
}

impl Actor {
    fn parts(&self) -> (&'static str, Option<String>) {
        match self {
            Actor::User(id) => ("user", Some(id.to_string())),
            Actor::ApiKey { key_id, .. } => ("api_key", Some(key_id.clone())),
            Actor::System => ("system", None),
        }
    }
}

/// What happened. `action` is `resource.verb`, e.g. `user.create`.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    pub tenant: Option<&'a TenantId>,
    pub action: &'static str,
    pub resource_type: &'static str,
    pub resource_id: Option<String>,
    pub metadata: serde_json::Value,
}

impl Event<'static> {
    /// An action on a user's own account, outside any tenant.
    pub fn on_user(action: &'static str, user: &impl std::fmt::Display, metadata: serde_json::Value) -> Self {
        Event {
            tenant: None,
            action,
            resource_type: "user",
            resource_id: Some(user.to_string()),
            metadata,
        }
    }
}

#[derive(Insertable)]
#[diesel(table_name = audit_log)]
struct NewEntry {
    id: String,
    tenant_id: Option<String>,
    actor_type: String,
    actor_id: Option<String>,
    action: String,
    resource_type: String,
    resource_id: Option<String>,
    metadata: String,
    ip: Option<String>,
    user_agent: Option<String>,
    created_at: i64,
}

/// Appends one entry. Call it inside the transaction that makes the change.
pub fn record(
    conn: &mut DbConnection,
    actor: &Actor,
    meta: &RequestMeta,
    event: Event<'_>,
) -> QueryResult<AuditId> {
    let id = AuditId::generate();
    let (actor_type, actor_id) = actor.parts();
    diesel::insert_into(audit_log::table)
        .values(NewEntry {
            id: id.to_string(),
            tenant_id: event.tenant.map(ToString::to_string),
            actor_type: actor_type.into(),
            actor_id,
            action: event.action.into(),
            resource_type: event.resource_type.into(),
            resource_id: event.resource_id,
            metadata: event.metadata.to_string(),
            ip: meta.ip.map(|ip| ip.to_string()),
            user_agent: meta.user_agent.clone(),
            created_at: now_ms(),
        })
        .execute(conn)?;
    Ok(id)
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq, utoipa::ToSchema)]
#[diesel(table_name = audit_log)]
pub struct AuditEntry {
    pub id: String,
    pub tenant_id: Option<String>,
    pub actor_type: String,
    pub actor_id: Option<String>,
    pub action: String,
    pub resource_type: String,
    pub resource_id: Option<String>,
    pub metadata: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub created_at: i64,
}

/// Filters for reading a tenant's log; all optional, combined with AND.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditFilter {
    pub actor_id: Option<String>,
    pub action: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    /// Unix milliseconds, inclusive.
    pub since: Option<i64>,
    /// Unix milliseconds, exclusive.
    pub until: Option<i64>,
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

/// One tenant's entries, oldest first, by cursor.
pub fn list(
    conn: &mut DbConnection,
    scope: &crate::authz::TenantScope,
    filter: &AuditFilter,
    page: &crate::pagination::PageRequest,
) -> QueryResult<crate::pagination::Page<AuditEntry>> {
    let mut query = audit_log::table
        .filter(audit_log::tenant_id.eq(scope.tenant().as_str()))
        .select(AuditEntry::as_select())
        .order(audit_log::id.asc())
        .into_boxed();
    if let Some(v) = &filter.actor_id {
        query = query.filter(audit_log::actor_id.eq(v.clone()));
    }
    if let Some(v) = &filter.action {
        query = query.filter(audit_log::action.eq(v.clone()));
    }
    if let Some(v) = &filter.resource_type {
        query = query.filter(audit_log::resource_type.eq(v.clone()));
    }
    if let Some(v) = &filter.resource_id {
        query = query.filter(audit_log::resource_id.eq(v.clone()));
    }
    if let Some(v) = filter.since {
        query = query.filter(audit_log::created_at.ge(v));
    }
    if let Some(v) = filter.until {
        query = query.filter(audit_log::created_at.lt(v));
    }
    if let Some(after) = &page.after {
        query = query.filter(audit_log::id.gt(after.clone()));
    }
    let rows = query.limit(page.fetch()).load(conn)?;
    Ok(crate::pagination::Page::from_rows(rows, page, |e| e.id.as_str()))
}

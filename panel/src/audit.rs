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

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
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

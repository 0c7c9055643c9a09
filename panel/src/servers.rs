//! Servers as the panel records them: the minimal record that owns allocations, with the
//! variable checks that guard creating a server and changing its startup. The full
//! lifecycle (jobs, wings, power) builds on these functions.
//!
//! Variables are checked against the blueprint's rules (translated from Laravel-style rule
//! strings by `mamba_shared::rules` when a blueprint came from an egg) every time values are
//! set: at create and at every startup change, never only in the browser.

use std::collections::BTreeMap;

use diesel::prelude::*;
use mamba_shared::blueprint::{Blueprint, FieldError};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::allocation::{self, Placed, Request};
use crate::audit::{self, Event};
use crate::authz::TenantScope;
use crate::db::schema::servers;
use crate::db::{DbConnection, now_ms};
use crate::error::ApiError;
use crate::ids::{NodeId, ServerId};
use crate::nodes::Resources;
use crate::request_meta::RequestMeta;

/// Checks `given` against the blueprint's variables and fills in defaults. Unknown names and
/// values that break a rule are refused, each naming `variables.<ENV>`. Unless `privileged`
/// (an operator), variables that are not user-editable keep their current value (or the
/// default): setting one to anything else is refused.
pub fn check_variables(
    blueprint: &Blueprint,
    current: &BTreeMap<String, String>,
    given: &BTreeMap<String, String>,
    privileged: bool,
) -> Result<BTreeMap<String, String>, ApiError> {
    let mut errors = Vec::new();
    for name in given.keys() {
        if !blueprint.variables.iter().any(|v| &v.env == name) {
            errors.push(FieldError {
                field: format!("variables.{name}"),
                message: format!("{} has no variable {name}", blueprint.slug),
            });
        }
    }
    let mut out = BTreeMap::new();
    for v in &blueprint.variables {
        let kept = current.get(&v.env).unwrap_or(&v.default);
        let value = match given.get(&v.env) {
            Some(value) if value != kept && !(privileged || (v.user_editable && v.user_viewable)) => {
                errors.push(FieldError {
                    field: format!("variables.{}", v.env),
                    message: "is not editable".into(),
                });
                continue;
            }
            Some(value) => value,
            None => kept,
        };
        if let Err(message) = v.rules.check(value) {
            errors.push(FieldError {
                field: format!("variables.{}", v.env),
                message,
            });
        }
        out.insert(v.env.clone(), value.clone());
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ApiError::validation(errors))
    }
}

/// A server to create.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewServer {
    pub name: String,
    /// A blueprint slug.
    pub blueprint: String,
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// The blueprint's default limits when absent.
    #[serde(default)]
    pub limits: Option<Resources>,
    /// Place on this node only.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub node: Option<NodeId>,
    /// Place in this location only.
    #[serde(default)]
    pub location: Option<String>,
}

/// Creates a server of the scope's tenant: checks the permission, the name, the variables
/// and the limits, then places it (capacity and ports, atomically; see `allocation`).
pub fn create(
    conn: &mut DbConnection,
    scope: &TenantScope,
    blueprint: &Blueprint,
    new: &NewServer,
    meta: &RequestMeta,
) -> Result<Placed, ApiError> {
    scope.require("server.create")?;
    let name = crate::users::check_display_name(&new.name).map_err(|m| ApiError::invalid("name", m))?;
    let variables = check_variables(blueprint, &BTreeMap::new(), &new.variables, false)?;
    let resources = new.limits.unwrap_or(Resources {
        cpu_percent: i64::from(blueprint.limits.cpu_percent),
        memory_mb: i64::try_from(blueprint.limits.memory_mb).unwrap_or(i64::MAX),
        disk_mb: i64::try_from(blueprint.limits.disk_mb).unwrap_or(i64::MAX),
    });
    for (field, v) in [
        ("limits.cpu_percent", resources.cpu_percent),
        ("limits.memory_mb", resources.memory_mb),
        ("limits.disk_mb", resources.disk_mb),
    ] {
        if !(1..=1 << 40).contains(&v) {
            return Err(ApiError::invalid(field, "must be positive"));
        }
    }
    let request = Request {
        name,
        blueprint: blueprint.slug.clone(),
        resources,
        variables,
        ports: blueprint.ports.iter().map(|p| p.protocols.clone()).collect(),
        node: new.node.clone(),
        location: new.location.clone(),
    };
    Ok(allocation::place(conn, scope, &request, meta)?)
}

/// A server's stored variables, or 404 for a server outside the scope's tenant.
pub fn variables(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
) -> Result<(String, BTreeMap<String, String>), ApiError> {
    let row: Option<(String, String)> = servers::table
        .filter(servers::id.eq(server.as_str()))
        .filter(servers::tenant_id.eq(scope.tenant().as_str()))
        .select((servers::blueprint, servers::variables))
        .first(conn)
        .optional()?;
    let (blueprint, text) = row.ok_or_else(|| ApiError::not_found("server"))?;
    Ok((blueprint, serde_json::from_str(&text).unwrap_or_default()))
}

/// The outcome of a startup change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Startup {
    pub variables: BTreeMap<String, String>,
}

/// Changes a server's variables, checked against its blueprint's rules, with the audit entry
/// `server.startup_update`.
pub fn update_startup(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    blueprint: &Blueprint,
    given: &BTreeMap<String, String>,
    meta: &RequestMeta,
) -> Result<Startup, ApiError> {
    scope.require("startup.update")?;
    conn.transaction(|conn| {
        let (slug, current) = variables(conn, scope, server)?;
        if slug != blueprint.slug {
            return Err(ApiError::conflict(
                "blueprint_mismatch",
                format!("the server runs {slug}, not {}", blueprint.slug),
            ));
        }
        let checked = check_variables(blueprint, &current, given, false)?;
        diesel::update(
            servers::table
                .filter(servers::id.eq(server.as_str()))
                .filter(servers::tenant_id.eq(scope.tenant().as_str())),
        )
        .set((
            servers::variables.eq(serde_json::to_string(&checked).unwrap_or_default()),
            servers::updated_at.eq(now_ms()),
        ))
        .execute(conn)?;
        audit::record(
            conn,
            scope.actor(),
            meta,
            Event {
                tenant: Some(scope.tenant()),
                action: "server.startup_update",
                resource_type: "server",
                resource_id: Some(server.to_string()),
                metadata: json!({ "changed": given.keys().collect::<Vec<_>>() }),
            },
        )?;
        Ok(Startup { variables: checked })
    })
}

/// Deletes a server and releases its allocations (see `allocation::release_server`).
pub fn delete(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    meta: &RequestMeta,
) -> Result<usize, ApiError> {
    scope.require("server.delete")?;
    allocation::release_server(conn, scope, server, meta)
}

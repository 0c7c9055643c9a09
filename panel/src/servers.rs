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
use crate::audit::{self, Actor, Event};
use crate::authz::TenantScope;
use crate::config::QuotaConfig;
use crate::db::schema::servers;
use crate::db::{DbConnection, now_ms};
use crate::error::ApiError;
use crate::ids::{JobId, NodeId, ServerId, TenantId};
use crate::jobs::{self, JobKind};
use crate::nodes::Resources;
use crate::pagination::{Page, PageRequest};
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
    /// One of the blueprint's images (by image reference or label); default the first.
    #[serde(default)]
    pub image: Option<String>,
}

/// The limits a new server asks for: the given ones, or the blueprint's defaults; each
/// checked to be positive and bounded.
pub fn requested_limits(blueprint: &Blueprint, given: Option<Resources>) -> Result<Resources, ApiError> {
    let resources = given.unwrap_or(Resources {
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
            return Err(ApiError::invalid(field, "must be between 1 and 2^40"));
        }
    }
    Ok(resources)
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
    let resources = requested_limits(blueprint, new.limits)?;
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
    crate::db::transaction(conn, |conn| {
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
        record_action(
            conn,
            scope,
            server,
            "server.startup_update",
            json!({ "changed": given.keys().collect::<Vec<_>>() }),
            meta,
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

// ---------------------------------------------------------------------------------------
// The lifecycle through the panel: each change writes its row, its audit entry and the job
// that carries it out on the node in one transaction (`jobs::enqueue`), so no request is
// lost between them. The jobs worker moves `status`; these functions only read it to refuse
// what cannot happen now.

pub const STATUS_INSTALLING: &str = "installing";
pub const STATUS_INSTALL_FAILED: &str = "install_failed";
pub const STATUS_OFFLINE: &str = "offline";
pub const STATUS_STARTING: &str = "starting";
pub const STATUS_RUNNING: &str = "running";
pub const STATUS_STOPPING: &str = "stopping";
pub const STATUS_DELETING: &str = "deleting";

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = servers)]
pub struct ServerRow {
    pub id: String,
    pub tenant_id: String,
    pub node_id: String,
    pub name: String,
    pub blueprint: String,
    pub memory_mb: i64,
    pub cpu_percent: i64,
    pub disk_mb: i64,
    pub variables: String,
    pub status: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub suspended_at: Option<i64>,
    pub image: Option<String>,
}

/// A server as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Server {
    #[schema(value_type = String)]
    pub id: ServerId,
    #[schema(value_type = String)]
    pub tenant_id: TenantId,
    #[schema(value_type = String)]
    pub node_id: NodeId,
    pub name: String,
    /// The blueprint's slug.
    pub blueprint: String,
    pub limits: Resources,
    /// `installing`, `install_failed`, `offline`, `starting`, `running`, `stopping` or
    /// `deleting`.
    pub status: String,
    /// Set while an operator has the server suspended: it cannot be started.
    pub suspended_at: Option<i64>,
    /// The blueprint image it runs; `null` for the blueprint's first.
    pub image: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl ServerRow {
    pub fn variables(&self) -> BTreeMap<String, String> {
        serde_json::from_str(&self.variables).unwrap_or_default()
    }

    pub fn is_suspended(&self) -> bool {
        self.suspended_at.is_some()
    }
}

impl From<ServerRow> for Server {
    fn from(row: ServerRow) -> Server {
        Server {
            id: ServerId::from_db(row.id),
            tenant_id: TenantId::from_db(row.tenant_id),
            node_id: NodeId::from_db(row.node_id),
            name: row.name,
            blueprint: row.blueprint,
            limits: Resources {
                cpu_percent: row.cpu_percent,
                memory_mb: row.memory_mb,
                disk_mb: row.disk_mb,
            },
            status: row.status,
            suspended_at: row.suspended_at,
            image: row.image,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// A server id from a path; anything that is not an id is a server that does not exist.
pub fn parse_id(raw: &str) -> Result<ServerId, ApiError> {
    ServerId::parse(raw).ok_or_else(|| ApiError::not_found("server"))
}

/// The row of a server of the scope's tenant, or 404 (also for other tenants' servers).
pub fn row(conn: &mut DbConnection, scope: &TenantScope, server: &ServerId) -> Result<ServerRow, ApiError> {
    servers::table
        .filter(servers::id.eq(server.as_str()))
        .filter(servers::tenant_id.eq(scope.tenant().as_str()))
        .select(ServerRow::as_select())
        .first(conn)
        .optional()?
        .ok_or_else(|| ApiError::not_found("server"))
}

/// A server's row by id alone: for operators' routes and the jobs worker, which act on any
/// tenant's server (never reachable from a tenant route).
pub fn row_any_tenant(conn: &mut DbConnection, server: &ServerId) -> QueryResult<Option<ServerRow>> {
    servers::table
        .find(server.as_str())
        .select(ServerRow::as_select())
        .first(conn)
        .optional()
}

/// Filters of the server list; combined with AND.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ServerFilter {
    /// Exact status.
    pub status: Option<String>,
    /// Node id.
    pub node: Option<String>,
    /// Part of the name (case-sensitive).
    pub name: Option<String>,
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

/// The tenant's servers, oldest first, by cursor. Needs `server.read`.
pub fn list(
    conn: &mut DbConnection,
    scope: &TenantScope,
    filter: &ServerFilter,
    page: &PageRequest,
) -> Result<Page<Server>, ApiError> {
    scope.require("server.read")?;
    let mut query = servers::table
        .filter(servers::tenant_id.eq(scope.tenant().as_str()))
        .select(ServerRow::as_select())
        .order(servers::id.asc())
        .into_boxed();
    if let Some(status) = &filter.status {
        query = query.filter(servers::status.eq(status.clone()));
    }
    if let Some(node) = &filter.node {
        query = query.filter(servers::node_id.eq(node.clone()));
    }
    if let Some(name) = &filter.name {
        if name.chars().count() > 100 {
            return Err(ApiError::invalid("name", "must be at most 100 characters"));
        }
        let escaped = name.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
        query = query.filter(servers::name.like(format!("%{escaped}%")).escape('\\'));
    }
    if let Some(after) = &page.after {
        query = query.filter(servers::id.gt(after.clone()));
    }
    let rows = query.limit(page.fetch()).load(conn)?;
    Ok(Page::from_rows(rows, page, |r| r.id.as_str()).map(Server::from))
}

// --- quotas ---------------------------------------------------------------------------------

/// What a tenant may hold in total.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Quota {
    pub max_servers: i64,
    pub max_memory_mb: i64,
    pub max_cpu_percent: i64,
    pub max_disk_mb: i64,
    /// Backups each server may keep (failed ones do not count).
    pub max_backups_per_server: i64,
}

/// An operator's quota for one tenant; `null` fields take the panel's `[quotas]` default.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaOverrides {
    #[serde(default)]
    pub max_servers: Option<i64>,
    #[serde(default)]
    pub max_memory_mb: Option<i64>,
    #[serde(default)]
    pub max_cpu_percent: Option<i64>,
    #[serde(default)]
    pub max_disk_mb: Option<i64>,
    #[serde(default)]
    pub max_backups_per_server: Option<i64>,
}

/// A tenant's quota and what its servers hold now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct QuotaUsage {
    pub quota: Quota,
    /// The tenant's own values; `null` fields follow the panel's default.
    pub overrides: QuotaOverrides,
    pub servers: i64,
    pub used: Resources,
}

fn overrides(conn: &mut DbConnection, tenant: &TenantId) -> Result<QuotaOverrides, ApiError> {
    use crate::db::schema::tenants;
    type Row = (Option<i64>, Option<i64>, Option<i64>, Option<i64>, Option<i64>);
    let row: Option<Row> = tenants::table
        .find(tenant.as_str())
        .select((
            tenants::max_servers,
            tenants::max_memory_mb,
            tenants::max_cpu_percent,
            tenants::max_disk_mb,
            tenants::max_backups_per_server,
        ))
        .first(conn)
        .optional()?;
    let (max_servers, max_memory_mb, max_cpu_percent, max_disk_mb, max_backups_per_server) =
        row.ok_or_else(|| ApiError::not_found("tenant"))?;
    Ok(QuotaOverrides {
        max_servers,
        max_memory_mb,
        max_cpu_percent,
        max_disk_mb,
        max_backups_per_server,
    })
}

fn effective(o: &QuotaOverrides, defaults: &QuotaConfig) -> Quota {
    Quota {
        max_servers: o.max_servers.unwrap_or(defaults.max_servers),
        max_memory_mb: o.max_memory_mb.unwrap_or(defaults.max_memory_mb),
        max_cpu_percent: o.max_cpu_percent.unwrap_or(defaults.max_cpu_percent),
        max_disk_mb: o.max_disk_mb.unwrap_or(defaults.max_disk_mb),
        max_backups_per_server: o
            .max_backups_per_server
            .unwrap_or(defaults.max_backups_per_server),
    }
}

/// Count and sums over the tenant's servers (those being deleted still hold theirs).
fn tenant_usage(conn: &mut DbConnection, tenant: &TenantId) -> QueryResult<(i64, Resources)> {
    // SUM of a BIGINT is NUMERIC on PostgreSQL; the cast keeps one type on both backends.
    use diesel::dsl::sql;
    use diesel::sql_types::{BigInt, Nullable};
    let (count, cpu, memory, disk): (i64, Option<i64>, Option<i64>, Option<i64>) = servers::table
        .filter(servers::tenant_id.eq(tenant.as_str()))
        .select((
            sql::<BigInt>("COUNT(*)"),
            sql::<Nullable<BigInt>>("CAST(SUM(cpu_percent) AS BIGINT)"),
            sql::<Nullable<BigInt>>("CAST(SUM(memory_mb) AS BIGINT)"),
            sql::<Nullable<BigInt>>("CAST(SUM(disk_mb) AS BIGINT)"),
        ))
        .first(conn)?;
    Ok((
        count,
        Resources {
            cpu_percent: cpu.unwrap_or(0),
            memory_mb: memory.unwrap_or(0),
            disk_mb: disk.unwrap_or(0),
        },
    ))
}

/// The scope's tenant's quota and usage. Any member may see it.
pub fn quota_usage(
    conn: &mut DbConnection,
    scope: &TenantScope,
    defaults: &QuotaConfig,
) -> Result<QuotaUsage, ApiError> {
    quota_usage_of(conn, scope.tenant(), defaults)
}

pub(crate) fn quota_usage_of(
    conn: &mut DbConnection,
    tenant: &TenantId,
    defaults: &QuotaConfig,
) -> Result<QuotaUsage, ApiError> {
    let overrides = overrides(conn, tenant)?;
    let (servers, used) = tenant_usage(conn, tenant)?;
    Ok(QuotaUsage {
        quota: effective(&overrides, defaults),
        overrides,
        servers,
        used,
    })
}

/// Takes the tenant's quota lock for the rest of the transaction. It must be the first
/// statement of every change that adds servers or resources to a tenant: on PostgreSQL the
/// write takes the tenant's row lock, on SQLite the database's write lock, so the count and
/// sums read afterwards include every such change committed before, and none can commit in
/// between.
pub(crate) fn lock_quota(conn: &mut DbConnection, tenant: &TenantId) -> Result<(), ApiError> {
    use crate::db::schema::tenants;
    let n = diesel::update(tenants::table.find(tenant.as_str()))
        .set(tenants::quota_seq.eq(tenants::quota_seq + 1))
        .execute(conn)?;
    if n == 0 {
        return Err(ApiError::not_found("tenant"));
    }
    Ok(())
}

/// Refuses (409 `quota_exceeded`, naming the limit) when `extra_servers` more servers and
/// `extra` more resources would pass the tenant's quota. Call after [`lock_quota`].
fn check_quota(
    conn: &mut DbConnection,
    tenant: &TenantId,
    defaults: &QuotaConfig,
    extra_servers: i64,
    extra: &Resources,
) -> Result<(), ApiError> {
    let usage = quota_usage_of(conn, tenant, defaults)?;
    let after = usage.used.plus(extra);
    let q = usage.quota;
    let over = if usage.servers + extra_servers > q.max_servers && extra_servers > 0 {
        Some(("max_servers", q.max_servers))
    } else if after.memory_mb > q.max_memory_mb && extra.memory_mb > 0 {
        Some(("max_memory_mb", q.max_memory_mb))
    } else if after.cpu_percent > q.max_cpu_percent && extra.cpu_percent > 0 {
        Some(("max_cpu_percent", q.max_cpu_percent))
    } else if after.disk_mb > q.max_disk_mb && extra.disk_mb > 0 {
        Some(("max_disk_mb", q.max_disk_mb))
    } else {
        None
    };
    match over {
        None => Ok(()),
        Some((field, limit)) => Err(ApiError::conflict(
            "quota_exceeded",
            format!("this would pass the tenant's quota ({field} = {limit})"),
        )
        .with_field(field)),
    }
}

fn check_override(field: &str, v: Option<i64>) -> Result<(), ApiError> {
    match v {
        Some(v) if !(0..=1 << 40).contains(&v) => Err(ApiError::invalid(field, "must be between 0 and 2^40")),
        _ => Ok(()),
    }
}

/// Sets a tenant's quota (operators only; no scope: any tenant), with its audit entry. A
/// quota below what the tenant holds refuses new servers but touches none of the existing.
pub fn set_quota(
    conn: &mut DbConnection,
    tenant: &TenantId,
    quota: &QuotaOverrides,
    defaults: &QuotaConfig,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<QuotaUsage, ApiError> {
    use crate::db::schema::tenants;
    check_override("max_servers", quota.max_servers)?;
    check_override("max_memory_mb", quota.max_memory_mb)?;
    check_override("max_cpu_percent", quota.max_cpu_percent)?;
    check_override("max_disk_mb", quota.max_disk_mb)?;
    if let Some(v) = quota.max_backups_per_server
        && !(0..=1000).contains(&v)
    {
        return Err(ApiError::invalid(
            "max_backups_per_server",
            "must be between 0 and 1000",
        ));
    }
    crate::db::transaction(conn, |conn| {
        let n = diesel::update(tenants::table.find(tenant.as_str()))
            .set((
                tenants::max_servers.eq(quota.max_servers),
                tenants::max_memory_mb.eq(quota.max_memory_mb),
                tenants::max_cpu_percent.eq(quota.max_cpu_percent),
                tenants::max_disk_mb.eq(quota.max_disk_mb),
                tenants::max_backups_per_server.eq(quota.max_backups_per_server),
                tenants::quota_seq.eq(tenants::quota_seq + 1),
                tenants::updated_at.eq(now_ms()),
            ))
            .execute(conn)?;
        if n == 0 {
            return Err(ApiError::not_found("tenant"));
        }
        audit::record(
            conn,
            actor,
            meta,
            Event {
                tenant: Some(tenant),
                action: "tenant.quota_update",
                resource_type: "tenant",
                resource_id: Some(tenant.to_string()),
                metadata: json!(quota),
            },
        )?;
        quota_usage_of(conn, tenant, defaults)
    })
}

// --- create, change, delete -----------------------------------------------------------------

/// What a create answers: the server, its ports and the install job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Created {
    pub server: Server,
    pub allocations: Vec<crate::allocation::Allocation>,
    #[schema(value_type = String)]
    pub job: JobId,
}

/// A job a change queued.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Queued {
    pub server: Server,
    #[schema(value_type = String)]
    pub job: JobId,
}

/// The image a new server runs: one of the blueprint's, by reference or label.
fn pick_image(blueprint: &Blueprint, given: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(given) = given else {
        return Ok(None);
    };
    blueprint
        .images
        .iter()
        .find(|i| i.image == given || i.label == given)
        .map(|i| Some(i.image.clone()))
        .ok_or_else(|| ApiError::invalid("image", format!("{} has no image {given:?}", blueprint.slug)))
}

/// Creates a server of the scope's tenant and queues its install, in one transaction: the
/// tenant's quota (locked first, see [`lock_quota`]), placement on a node with its ports
/// (`allocation::place`, audit `server.create`), status `installing`, and the
/// `ServerInstall` job.
pub fn create_and_install(
    conn: &mut DbConnection,
    scope: &TenantScope,
    blueprint: &Blueprint,
    new: &NewServer,
    quotas: &QuotaConfig,
    meta: &RequestMeta,
) -> Result<Created, ApiError> {
    scope.require("server.create")?;
    let image = pick_image(blueprint, new.image.as_deref())?;
    let resources = requested_limits(blueprint, new.limits)?;
    crate::db::transaction(conn, |conn| {
        lock_quota(conn, scope.tenant())?;
        check_quota(conn, scope.tenant(), quotas, 1, &resources)?;
        let placed = create(conn, scope, blueprint, new, meta)?;
        diesel::update(servers::table.find(placed.server_id.as_str()))
            .set((servers::status.eq(STATUS_INSTALLING), servers::image.eq(&image)))
            .execute(conn)?;
        let job = jobs::enqueue(
            conn,
            Some(scope.tenant()),
            Some(&placed.server_id),
            JobKind::ServerInstall,
            &json!({}),
        )?;
        let server = row(conn, scope, &placed.server_id)?.into();
        Ok(Created {
            server,
            allocations: placed.allocations,
            job,
        })
    })
}

/// What a server update may change; absent fields stay.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerChanges {
    /// Needs `settings.rename`.
    #[serde(default)]
    pub name: Option<String>,
    /// Needs `server.update`; checked against the node's capacity and the tenant's quota.
    #[serde(default)]
    pub limits: Option<Resources>,
    /// Needs `startup.update`; checked against the blueprint's rules.
    #[serde(default)]
    pub variables: Option<BTreeMap<String, String>>,
}

pub(crate) fn refuse_if_deleting(row: &ServerRow) -> Result<(), ApiError> {
    if row.status == STATUS_DELETING {
        return Err(ApiError::conflict(
            "server_deleting",
            "the server is being deleted",
        ));
    }
    Ok(())
}

/// Changes a server and queues `ServerUpdate` (which pushes the new spec to the node), with
/// the audit entry `server.update`, in one transaction. Growing limits takes the tenant's
/// quota lock and then the node's reservation lock, as a create does, so neither the quota
/// nor the node's capacity can be passed.
pub fn update(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    blueprint: &Blueprint,
    changes: &ServerChanges,
    quotas: &QuotaConfig,
    meta: &RequestMeta,
) -> Result<Queued, ApiError> {
    if changes.name.is_none() && changes.limits.is_none() && changes.variables.is_none() {
        return Err(ApiError::bad_request(
            "give at least one of name, limits, variables",
        ));
    }
    if changes.name.is_some() {
        scope.require("settings.rename")?;
    }
    if changes.limits.is_some() {
        scope.require("server.update")?;
    }
    if changes.variables.is_some() {
        scope.require("startup.update")?;
    }
    let name = match &changes.name {
        Some(n) => Some(crate::users::check_display_name(n).map_err(|m| ApiError::invalid("name", m))?),
        None => None,
    };
    let limits = match changes.limits {
        Some(l) => Some(requested_limits(blueprint, Some(l))?),
        None => None,
    };
    crate::db::transaction(conn, |conn| {
        if limits.is_some() {
            lock_quota(conn, scope.tenant())?;
        }
        let current = row(conn, scope, server)?;
        refuse_if_deleting(&current)?;
        if current.blueprint != blueprint.slug {
            return Err(ApiError::conflict(
                "blueprint_mismatch",
                format!("the server runs {}, not {}", current.blueprint, blueprint.slug),
            ));
        }
        let variables = match &changes.variables {
            Some(given) => check_variables(blueprint, &current.variables(), given, false)?,
            None => current.variables(),
        };
        let limits = limits.unwrap_or(Resources {
            cpu_percent: current.cpu_percent,
            memory_mb: current.memory_mb,
            disk_mb: current.disk_mb,
        });
        let growth = Resources {
            cpu_percent: limits.cpu_percent - current.cpu_percent,
            memory_mb: limits.memory_mb - current.memory_mb,
            disk_mb: limits.disk_mb - current.disk_mb,
        };
        if growth.cpu_percent > 0 || growth.memory_mb > 0 || growth.disk_mb > 0 {
            check_quota(conn, scope.tenant(), quotas, 0, &growth)?;
            let node = NodeId::from_db(current.node_id.clone());
            crate::allocation::lock_node(conn, &node)?;
            let found = crate::nodes::get(conn, &node)?.ok_or_else(|| ApiError::not_found("node"))?;
            let after = crate::nodes::reserved(conn, &node)?.plus(&growth);
            if !after.fits_within(&found.limits()) {
                return Err(ApiError::conflict(
                    "insufficient_capacity",
                    "the server's node has no room for these limits",
                ));
            }
        }
        diesel::update(servers::table.find(server.as_str()))
            .set((
                servers::name.eq(name.as_ref().unwrap_or(&current.name)),
                servers::cpu_percent.eq(limits.cpu_percent),
                servers::memory_mb.eq(limits.memory_mb),
                servers::disk_mb.eq(limits.disk_mb),
                servers::variables.eq(serde_json::to_string(&variables).unwrap_or_default()),
                servers::updated_at.eq(now_ms()),
            ))
            .execute(conn)?;
        record_action(
            conn,
            scope,
            server,
            "server.update",
            json!({
                "name": name,
                "limits": changes.limits,
                "variables": changes.variables.as_ref().map(|v| v.keys().collect::<Vec<_>>()),
            }),
            meta,
        )?;
        queue(conn, scope, server, JobKind::ServerUpdate)
    })
}

/// Queues a payload-less job for the server, inside the caller's transaction, and answers
/// the server as it now is with the job.
fn queue(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    kind: JobKind,
) -> Result<Queued, ApiError> {
    let job = jobs::enqueue(conn, Some(scope.tenant()), Some(server), kind, &json!({}))?;
    Ok(Queued {
        server: row(conn, scope, server)?.into(),
        job,
    })
}

/// Marks a server `deleting` and queues `ServerDelete` (the worker removes it from its node,
/// releases its ports and then its row), with the audit entry `server.delete_request`.
pub fn request_delete(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    meta: &RequestMeta,
) -> Result<Queued, ApiError> {
    scope.require("server.delete")?;
    crate::db::transaction(conn, |conn| {
        let current = row(conn, scope, server)?;
        refuse_if_deleting(&current)?;
        crate::backups::refuse_while_restoring(conn, server)?;
        set_status(conn, server, STATUS_DELETING)?;
        record_action(
            conn,
            scope,
            server,
            "server.delete_request",
            json!({ "name": current.name }),
            meta,
        )?;
        queue(conn, scope, server, JobKind::ServerDelete)
    })
}

fn set_status(conn: &mut DbConnection, server: &ServerId, status: &str) -> QueryResult<usize> {
    diesel::update(servers::table.find(server.as_str()))
        .set((servers::status.eq(status), servers::updated_at.eq(now_ms())))
        .execute(conn)
}

/// A power action as the panel's API takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Power {
    Start,
    Stop,
    Restart,
    Kill,
}

impl Power {
    pub fn as_str(self) -> &'static str {
        match self {
            Power::Start => "start",
            Power::Stop => "stop",
            Power::Restart => "restart",
            Power::Kill => "kill",
        }
    }

    /// The permission key it needs (the names wings checks on the console socket).
    pub fn permission(self) -> &'static str {
        match self {
            Power::Start => "control.start",
            Power::Stop | Power::Kill => "control.stop",
            Power::Restart => "control.restart",
        }
    }

    pub fn starts(self) -> bool {
        matches!(self, Power::Start | Power::Restart)
    }
}

/// Refuses to start what is not installed, is being deleted or is suspended.
fn refuse_power(current: &ServerRow, action: Power) -> Result<(), ApiError> {
    refuse_if_deleting(current)?;
    if action.starts() {
        if current.is_suspended() {
            return Err(ApiError::conflict(
                "server_suspended",
                "the server is suspended and cannot be started",
            ));
        }
        if current.status == STATUS_INSTALLING || current.status == STATUS_INSTALL_FAILED {
            return Err(ApiError::conflict(
                "not_installed",
                format!("the server is {}", current.status),
            ));
        }
    }
    Ok(())
}

/// Queues a power action (`ServerPower`), with the audit entry `server.power`.
pub fn power(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    action: Power,
    meta: &RequestMeta,
) -> Result<Queued, ApiError> {
    scope.require(action.permission())?;
    crate::db::transaction(conn, |conn| {
        let current = row(conn, scope, server)?;
        refuse_power(&current, action)?;
        record_action(
            conn,
            scope,
            server,
            "server.power",
            json!({ "action": action.as_str() }),
            meta,
        )?;
        let job = jobs::enqueue(
            conn,
            Some(scope.tenant()),
            Some(server),
            JobKind::ServerPower,
            &json!({ "action": action.as_str() }),
        )?;
        Ok(Queued {
            server: current.into(),
            job,
        })
    })
}

/// Queues a reinstall (`ServerReinstall`; status `installing`), with the audit entry
/// `server.reinstall`. Not while suspended or being deleted.
pub fn reinstall(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    meta: &RequestMeta,
) -> Result<Queued, ApiError> {
    scope.require("settings.reinstall")?;
    crate::db::transaction(conn, |conn| {
        let current = row(conn, scope, server)?;
        refuse_if_deleting(&current)?;
        if current.is_suspended() {
            return Err(ApiError::conflict("server_suspended", "the server is suspended"));
        }
        if current.status == STATUS_INSTALL_FAILED {
            // It holds no ports to install on; retrying its install job reserves them again.
            return Err(ApiError::conflict(
                "install_failed",
                "the server's install gave up and released its ports; an operator can retry the install job, or delete the server",
            ));
        }
        set_status(conn, server, STATUS_INSTALLING)?;
        record_action(conn, scope, server, "server.reinstall", json!({}), meta)?;
        queue(conn, scope, server, JobKind::ServerReinstall)
    })
}

/// The database side of an install that will not be tried again (the worker has removed
/// the server from its node first): frees its ports and marks it `install_failed`, which
/// stops its capacity counting against the node (`nodes::reserved`), in one transaction
/// under the node's lock. A server being deleted stays `deleting`. Idempotent.
pub fn install_gave_up(conn: &mut DbConnection, server: &ServerId) -> Result<usize, ApiError> {
    crate::db::transaction(conn, |conn| {
        let freed = allocation::release_ports(conn, server)?;
        diesel::update(
            servers::table
                .find(server.as_str())
                .filter(servers::status.ne(STATUS_DELETING)),
        )
        .set((
            servers::status.eq(STATUS_INSTALL_FAILED),
            servers::updated_at.eq(now_ms()),
        ))
        .execute(conn)?;
        Ok(freed)
    })
}

/// An operator's retry of a dead or failed job (`POST /api/v1/admin/jobs/{id}/retry`), with
/// the audit entry `job.retry`. An install that gave up released its server's ports and
/// capacity (`install_failed`); its retry reserves them again first, on the server's node or,
/// if that has no room, on another node of its location, in the same transaction as the
/// requeue, so the job is queued exactly when the server holds its place again. No room
/// anywhere: 409 and the job stays as it was.
pub fn retry_job(
    conn: &mut DbConnection,
    registry: &crate::blueprints::Registry,
    id: &JobId,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<jobs::Job, ApiError> {
    jobs::retry(conn, id, actor, meta, |conn, job| {
        let Some(server) = job
            .server_id
            .as_ref()
            .filter(|_| job.kind == JobKind::ServerInstall)
        else {
            return Ok(());
        };
        let current: Option<(String, String)> = servers::table
            .find(server.as_str())
            .select((servers::status, servers::blueprint))
            .first(conn)
            .optional()?;
        // A server deleted meanwhile: the install will find nothing to do.
        let Some((status, slug)) = current.filter(|(status, _)| status == STATUS_INSTALL_FAILED) else {
            return Ok(());
        };
        let blueprint = crate::blueprints::find(conn, registry, &slug)?
            .ok_or_else(|| {
                ApiError::conflict(
                    "blueprint_missing",
                    format!("the server's blueprint {slug} no longer exists"),
                )
            })?
            .blueprint;
        let ports: Vec<_> = blueprint.ports.iter().map(|p| p.protocols.clone()).collect();
        let placed = allocation::reserve_again(conn, server, &ports)?;
        tracing::info!(server.id = %server, node.id = %placed.node_id, was = %status, "install retried; capacity and ports reserved again");
        set_status(conn, server, STATUS_INSTALLING)?;
        Ok(())
    })
}

/// Records an action on a server in the tenant's audit log; call it inside the transaction
/// of the change, if there is one (console commands and tokens change nothing).
pub fn record_action(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    action: &'static str,
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
            resource_type: "server",
            resource_id: Some(server.to_string()),
            metadata,
        },
    )?;
    Ok(())
}

// --- suspension (operators) -----------------------------------------------------------------

/// The outcome of a suspension change.
#[derive(Debug, Clone)]
pub struct Suspension {
    pub server: Server,
    /// Members of the server's tenant, whose console sockets and SFTP sessions on the node
    /// are to be closed.
    pub members: Vec<String>,
    /// The stop job queued by a suspension.
    pub job: Option<JobId>,
}

/// Suspends (or lifts the suspension of) any tenant's server: an operator's action, so no
/// scope. A suspension also queues a stop; the route closes the members' sockets on the node
/// after the commit. Doing it twice changes nothing more (one audit entry per call).
pub fn set_suspended(
    conn: &mut DbConnection,
    server: &ServerId,
    suspend: bool,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<Suspension, ApiError> {
    use crate::db::schema::memberships;
    crate::db::transaction(conn, |conn| {
        let current = row_any_tenant(conn, server)?.ok_or_else(|| ApiError::not_found("server"))?;
        let tenant = TenantId::from_db(current.tenant_id.clone());
        let at = if suspend {
            Some(current.suspended_at.unwrap_or_else(now_ms))
        } else {
            None
        };
        diesel::update(servers::table.find(server.as_str()))
            .set((servers::suspended_at.eq(at), servers::updated_at.eq(now_ms())))
            .execute(conn)?;
        audit::record(
            conn,
            actor,
            meta,
            Event {
                tenant: Some(&tenant),
                action: if suspend {
                    "server.suspend"
                } else {
                    "server.unsuspend"
                },
                resource_type: "server",
                resource_id: Some(server.to_string()),
                metadata: json!({ "was_suspended": current.is_suspended() }),
            },
        )?;
        let job = if suspend && current.status != STATUS_DELETING {
            Some(jobs::enqueue(
                conn,
                Some(&tenant),
                Some(server),
                JobKind::ServerPower,
                &json!({ "action": Power::Stop.as_str() }),
            )?)
        } else {
            None
        };
        let members = memberships::table
            .filter(memberships::tenant_id.eq(tenant.as_str()))
            .select(memberships::user_id)
            .load(conn)?;
        let server = row_any_tenant(conn, server)?
            .ok_or_else(|| ApiError::not_found("server"))?
            .into();
        Ok(Suspension { server, members, job })
    })
}

//! Nodes: the hosts wings runs on, as operators register them. Nodes belong to the
//! operator, not to a tenant, so these functions take no `TenantScope`; the HTTP layer only
//! lets operators (`SuperAdmin`) reach them.
//!
//! A node has a capacity (CPU, memory, disk) and an overallocation percentage: servers may
//! together reserve up to `capacity * (100 + overallocation_percent) / 100`. `is_public`
//! makes a node eligible for automatic placement, `maintenance` takes it out of placement
//! without touching its servers, and decommissioning retires it for good: its allocations
//! and pools are released and it never takes a server again.

use diesel::prelude::*;
use mamba_shared::blueprint::FieldError;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::audit::{self, Actor, Event};
use crate::db::schema::{allocation_pools, allocations, nodes, servers};
use crate::db::{DbConnection, now_ms};
use crate::error::ApiError;
use crate::ids::NodeId;
use crate::pagination::{Page, PageRequest};
use crate::request_meta::RequestMeta;

pub const STATUS_ACTIVE: &str = "active";
pub const STATUS_DECOMMISSIONED: &str = "decommissioned";
/// A node's connectivity (`telemetry` keeps it): never heard from, heartbeating, or silent
/// for longer than `heartbeats.offline_after_secs`.
pub const CONNECTIVITY_NEW: &str = "new";
pub const CONNECTIVITY_ONLINE: &str = "online";
pub const CONNECTIVITY_OFFLINE: &str = "offline";

/// Upper bounds that keep capacity arithmetic far from overflow.
const MAX_CPU_PERCENT: i64 = 100 * 4096;
const MAX_MEMORY_MB: i64 = 1 << 30;
const MAX_DISK_MB: i64 = 1 << 40;
const MAX_OVERALLOCATION_PERCENT: i64 = 1000;

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = nodes)]
pub struct NodeRow {
    pub id: String,
    pub name: String,
    pub fqdn: String,
    pub location: String,
    pub cpu_percent: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
    pub overallocation_percent: i64,
    pub is_public: bool,
    pub maintenance: bool,
    pub status: String,
    pub reservation_seq: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub decommissioned_at: Option<i64>,
    pub api_port: i64,
    pub public_url: String,
    pub sftp_port: i64,
    pub last_heartbeat_at: Option<i64>,
    pub connectivity: String,
}

/// A node as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Node {
    #[schema(value_type = String)]
    pub id: NodeId,
    pub name: String,
    pub fqdn: String,
    pub location: String,
    /// 100 per core.
    pub cpu_percent: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
    pub overallocation_percent: i64,
    pub is_public: bool,
    pub maintenance: bool,
    /// `active` or `decommissioned`.
    pub status: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub decommissioned_at: Option<i64>,
    /// The port of wings' mutual-TLS API, which the panel calls (`https://{fqdn}:{api_port}`).
    pub api_port: u16,
    /// The base URL browsers reach wings' public listener at (console sockets, signed URLs).
    pub public_url: String,
    /// The port wings serves SFTP on.
    pub sftp_port: u16,
    /// When its last heartbeat arrived (ms since the epoch); `null` before the first.
    pub last_heartbeat_at: Option<i64>,
    /// `new` (never heard from), `online`, or `offline` (missed heartbeats for longer than
    /// `heartbeats.offline_after_secs`; placement skips it until it is heard from again).
    pub connectivity: String,
}

impl From<NodeRow> for Node {
    fn from(row: NodeRow) -> Node {
        Node {
            id: NodeId::from_db(row.id),
            name: row.name,
            fqdn: row.fqdn,
            location: row.location,
            cpu_percent: row.cpu_percent,
            memory_mb: row.memory_mb,
            disk_mb: row.disk_mb,
            overallocation_percent: row.overallocation_percent,
            is_public: row.is_public,
            maintenance: row.maintenance,
            status: row.status,
            created_at: row.created_at,
            updated_at: row.updated_at,
            decommissioned_at: row.decommissioned_at,
            api_port: u16::try_from(row.api_port).unwrap_or(DEFAULT_API_PORT),
            public_url: row.public_url,
            sftp_port: u16::try_from(row.sftp_port).unwrap_or(DEFAULT_SFTP_PORT),
            last_heartbeat_at: row.last_heartbeat_at,
            connectivity: row.connectivity,
        }
    }
}

impl Node {
    /// What servers may reserve in total, overallocation included.
    pub fn limits(&self) -> Resources {
        let scale = |v: i64| v.saturating_mul(100 + self.overallocation_percent) / 100;
        Resources {
            cpu_percent: scale(self.cpu_percent),
            memory_mb: scale(self.memory_mb),
            disk_mb: scale(self.disk_mb),
        }
    }
}

/// CPU, memory and disk, as reserved or as allowed.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Resources {
    pub cpu_percent: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
}

impl Resources {
    pub fn fits_within(&self, limit: &Resources) -> bool {
        self.cpu_percent <= limit.cpu_percent
            && self.memory_mb <= limit.memory_mb
            && self.disk_mb <= limit.disk_mb
    }

    pub fn plus(&self, other: &Resources) -> Resources {
        Resources {
            cpu_percent: self.cpu_percent.saturating_add(other.cpu_percent),
            memory_mb: self.memory_mb.saturating_add(other.memory_mb),
            disk_mb: self.disk_mb.saturating_add(other.disk_mb),
        }
    }
}

/// A node with what its servers use.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct NodeDetail {
    #[serde(flatten)]
    pub node: Node,
    /// Capacity with overallocation: what servers may reserve together.
    pub limits: Resources,
    /// What the node's servers reserve.
    pub reserved: Resources,
    pub servers: i64,
    pub pools: i64,
    pub allocations: i64,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewNode {
    pub name: String,
    /// The name or address panel and players reach the node at.
    pub fqdn: String,
    /// A short location code, e.g. `eu-west` or `fra1`.
    pub location: String,
    /// 100 per core.
    pub cpu_percent: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
    #[serde(default)]
    pub overallocation_percent: i64,
    #[serde(default = "yes")]
    pub is_public: bool,
    #[serde(default)]
    pub maintenance: bool,
    /// wings' mutual-TLS API port; default 8080.
    #[serde(default = "default_api_port")]
    pub api_port: u16,
    /// Where browsers reach wings' public listener; default `http://{fqdn}:8081`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// wings' SFTP port; default 2022.
    #[serde(default = "default_sftp_port")]
    pub sftp_port: u16,
}

pub const DEFAULT_API_PORT: u16 = 8080;
pub const DEFAULT_PUBLIC_PORT: u16 = 8081;
pub const DEFAULT_SFTP_PORT: u16 = 2022;

fn default_api_port() -> u16 {
    DEFAULT_API_PORT
}

fn default_sftp_port() -> u16 {
    DEFAULT_SFTP_PORT
}

fn yes() -> bool {
    true
}

/// `http://{fqdn}:8081`, the public listener's default address.
pub fn default_public_url(fqdn: &str) -> String {
    if fqdn.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("http://[{fqdn}]:{DEFAULT_PUBLIC_PORT}")
    } else {
        format!("http://{fqdn}:{DEFAULT_PUBLIC_PORT}")
    }
}

/// An `http` or `https` URL with a host and nothing after it but an optional port; kept
/// without a trailing slash.
pub fn check_public_url(url: &str) -> Result<String, String> {
    let bad = || "must be an http:// or https:// URL of a host (and port), without a path".to_string();
    let parsed = reqwest::Url::parse(url.trim()).map_err(|_| bad())?;
    let plain = matches!(parsed.scheme(), "http" | "https")
        && parsed.host_str().is_some_and(|h| !h.is_empty())
        && parsed.username().is_empty()
        && parsed.password().is_none()
        && parsed.path() == "/"
        && parsed.query().is_none()
        && parsed.fragment().is_none();
    if !plain || url.len() > 255 {
        return Err(bad());
    }
    Ok(parsed.as_str().trim_end_matches('/').to_string())
}

fn check_port(port: u16) -> Result<u16, String> {
    if port == 0 {
        Err("must be between 1 and 65535".into())
    } else {
        Ok(port)
    }
}

/// Fields to change; absent ones stay.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeChanges {
    pub name: Option<String>,
    pub fqdn: Option<String>,
    pub location: Option<String>,
    pub cpu_percent: Option<i64>,
    pub memory_mb: Option<i64>,
    pub disk_mb: Option<i64>,
    pub overallocation_percent: Option<i64>,
    pub is_public: Option<bool>,
    pub maintenance: Option<bool>,
    pub api_port: Option<u16>,
    pub public_url: Option<String>,
    pub sftp_port: Option<u16>,
}

fn check_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    let chars = name.chars().count();
    if chars == 0 || chars > 64 || name.chars().any(char::is_control) {
        return Err("must be 1 to 64 printable characters".into());
    }
    Ok(name.to_string())
}

/// A DNS name (letters, digits, dashes, dots) or an IP address.
pub fn check_fqdn(fqdn: &str) -> Result<String, String> {
    let fqdn = fqdn.trim().trim_end_matches('.').to_ascii_lowercase();
    if fqdn.parse::<std::net::IpAddr>().is_ok() {
        return Ok(fqdn);
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if fqdn.is_empty() || fqdn.len() > 253 || !fqdn.split('.').all(label_ok) {
        return Err("must be a host name (letters, digits, dashes and dots) or an IP address".into());
    }
    Ok(fqdn)
}

fn check_location(location: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&location.len())
        && location
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(location.to_string())
    } else {
        Err("must be 1 to 64 lowercase letters, digits, '-', '_' or '.'".into())
    }
}

fn check_range(value: i64, min: i64, max: i64) -> Result<i64, String> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(format!("must be between {min} and {max}"))
    }
}

struct Errors(Vec<FieldError>);

impl Errors {
    fn take<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(message) => {
                self.0.push(FieldError {
                    field: field.into(),
                    message,
                });
                None
            }
        }
    }

    fn finish(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::validation(self.0))
        }
    }
}

/// Checks every field at once, so one answer names all the bad ones.
pub fn check_new(new: &NewNode) -> Result<NewNode, ApiError> {
    let mut e = Errors(Vec::new());
    let name = e.take("name", check_name(&new.name));
    let fqdn = e.take("fqdn", check_fqdn(&new.fqdn));
    let location = e.take("location", check_location(&new.location));
    e.take("cpu_percent", check_range(new.cpu_percent, 1, MAX_CPU_PERCENT));
    e.take("memory_mb", check_range(new.memory_mb, 1, MAX_MEMORY_MB));
    e.take("disk_mb", check_range(new.disk_mb, 1, MAX_DISK_MB));
    e.take(
        "overallocation_percent",
        check_range(new.overallocation_percent, 0, MAX_OVERALLOCATION_PERCENT),
    );
    e.take("api_port", check_port(new.api_port));
    e.take("sftp_port", check_port(new.sftp_port));
    let public_url = match &new.public_url {
        Some(url) => e.take("public_url", check_public_url(url)),
        None => fqdn.as_deref().map(default_public_url),
    };
    e.finish()?;
    Ok(NewNode {
        name: name.unwrap_or_default(),
        fqdn: fqdn.unwrap_or_default(),
        location: location.unwrap_or_default(),
        public_url,
        ..new.clone()
    })
}

pub fn check_changes(changes: &NodeChanges) -> Result<NodeChanges, ApiError> {
    let mut e = Errors(Vec::new());
    let mut out = changes.clone();
    if let Some(v) = &changes.name {
        out.name = e.take("name", check_name(v));
    }
    if let Some(v) = &changes.fqdn {
        out.fqdn = e.take("fqdn", check_fqdn(v));
    }
    if let Some(v) = &changes.location {
        out.location = e.take("location", check_location(v));
    }
    if let Some(v) = changes.cpu_percent {
        e.take("cpu_percent", check_range(v, 1, MAX_CPU_PERCENT));
    }
    if let Some(v) = changes.memory_mb {
        e.take("memory_mb", check_range(v, 1, MAX_MEMORY_MB));
    }
    if let Some(v) = changes.disk_mb {
        e.take("disk_mb", check_range(v, 1, MAX_DISK_MB));
    }
    if let Some(v) = changes.overallocation_percent {
        e.take(
            "overallocation_percent",
            check_range(v, 0, MAX_OVERALLOCATION_PERCENT),
        );
    }
    if let Some(v) = changes.api_port {
        e.take("api_port", check_port(v));
    }
    if let Some(v) = changes.sftp_port {
        e.take("sftp_port", check_port(v));
    }
    if let Some(v) = &changes.public_url {
        out.public_url = e.take("public_url", check_public_url(v));
    }
    e.finish()?;
    Ok(out)
}

fn name_taken() -> ApiError {
    ApiError::conflict("name_taken", "another node has this name").with_field("name")
}

fn map_unique(e: diesel::result::Error) -> ApiError {
    match e {
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _) => {
            name_taken()
        }
        other => ApiError::from(other),
    }
}

/// Registers a node, with its audit entry. `new` must have passed [`check_new`].
pub fn create(
    conn: &mut DbConnection,
    new: &NewNode,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<Node, ApiError> {
    let id = NodeId::generate();
    let now = now_ms();
    crate::db::transaction(conn, |conn| {
        diesel::insert_into(nodes::table)
            .values((
                nodes::id.eq(id.as_str()),
                nodes::name.eq(&new.name),
                nodes::fqdn.eq(&new.fqdn),
                nodes::location.eq(&new.location),
                nodes::cpu_percent.eq(new.cpu_percent),
                nodes::memory_mb.eq(new.memory_mb),
                nodes::disk_mb.eq(new.disk_mb),
                nodes::overallocation_percent.eq(new.overallocation_percent),
                nodes::is_public.eq(new.is_public),
                nodes::maintenance.eq(new.maintenance),
                nodes::status.eq(STATUS_ACTIVE),
                nodes::reservation_seq.eq(0i64),
                nodes::created_at.eq(now),
                nodes::updated_at.eq(now),
                nodes::api_port.eq(i64::from(new.api_port)),
                nodes::public_url.eq(new
                    .public_url
                    .clone()
                    .unwrap_or_else(|| default_public_url(&new.fqdn))),
                nodes::sftp_port.eq(i64::from(new.sftp_port)),
            ))
            .execute(conn)
            .map_err(map_unique)?;
        audit::record(
            conn,
            actor,
            meta,
            Event {
                tenant: None,
                action: "node.create",
                resource_type: "node",
                resource_id: Some(id.to_string()),
                metadata: json!({
                    "name": new.name, "fqdn": new.fqdn, "location": new.location,
                    "api_port": new.api_port, "public_url": new.public_url, "sftp_port": new.sftp_port,
                }),
            },
        )?;
        Ok(nodes::table
            .find(id.as_str())
            .select(NodeRow::as_select())
            .first(conn)?
            .into())
    })
}

pub fn get(conn: &mut DbConnection, id: &NodeId) -> QueryResult<Option<Node>> {
    Ok(nodes::table
        .find(id.as_str())
        .select(NodeRow::as_select())
        .first(conn)
        .optional()?
        .map(Node::from))
}

/// What a node's servers reserve together. A server whose install gave up
/// (`install_failed`) holds nothing until an operator retries it, which reserves again.
pub fn reserved(conn: &mut DbConnection, id: &NodeId) -> QueryResult<Resources> {
    // SUM of a BIGINT is NUMERIC on PostgreSQL; the cast keeps one type on both backends.
    use diesel::dsl::sql;
    use diesel::sql_types::{BigInt, Nullable};
    let (cpu, memory, disk): (Option<i64>, Option<i64>, Option<i64>) = servers::table
        .filter(servers::node_id.eq(id.as_str()))
        .filter(servers::status.ne(crate::servers::STATUS_INSTALL_FAILED))
        .select((
            sql::<Nullable<BigInt>>("CAST(SUM(cpu_percent) AS BIGINT)"),
            sql::<Nullable<BigInt>>("CAST(SUM(memory_mb) AS BIGINT)"),
            sql::<Nullable<BigInt>>("CAST(SUM(disk_mb) AS BIGINT)"),
        ))
        .first(conn)?;
    Ok(Resources {
        cpu_percent: cpu.unwrap_or(0),
        memory_mb: memory.unwrap_or(0),
        disk_mb: disk.unwrap_or(0),
    })
}

/// The node with its usage, or `None`.
pub fn detail(conn: &mut DbConnection, id: &NodeId) -> QueryResult<Option<NodeDetail>> {
    let Some(node) = get(conn, id)? else {
        return Ok(None);
    };
    let reserved = reserved(conn, id)?;
    let servers: i64 = servers::table
        .filter(servers::node_id.eq(id.as_str()))
        .count()
        .get_result(conn)?;
    let pools: i64 = allocation_pools::table
        .filter(allocation_pools::node_id.eq(id.as_str()))
        .count()
        .get_result(conn)?;
    let allocations: i64 = allocations::table
        .filter(allocations::node_id.eq(id.as_str()))
        .count()
        .get_result(conn)?;
    Ok(Some(NodeDetail {
        limits: node.limits(),
        node,
        reserved,
        servers,
        pools,
        allocations,
    }))
}

/// Filters for the operators' node list; combined with AND.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct NodeFilter {
    pub location: Option<String>,
    /// `active` or `decommissioned`.
    pub status: Option<String>,
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

/// Every node, oldest first, by cursor.
pub fn list(conn: &mut DbConnection, filter: &NodeFilter, page: &PageRequest) -> QueryResult<Page<Node>> {
    let mut query = nodes::table
        .select(NodeRow::as_select())
        .order(nodes::id.asc())
        .into_boxed();
    if let Some(v) = &filter.location {
        query = query.filter(nodes::location.eq(v.clone()));
    }
    if let Some(v) = &filter.status {
        query = query.filter(nodes::status.eq(v.clone()));
    }
    if let Some(after) = &page.after {
        query = query.filter(nodes::id.gt(after.clone()));
    }
    let rows = query.limit(page.fetch()).load(conn)?;
    Ok(Page::from_rows(rows, page, |n| n.id.as_str()).map(Node::from))
}

/// Changes a node, with its audit entry. `changes` must have passed [`check_changes`].
/// A decommissioned node can no longer change.
pub fn update(
    conn: &mut DbConnection,
    id: &NodeId,
    changes: &NodeChanges,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<Node, ApiError> {
    crate::db::transaction(conn, |conn| {
        let node = get(conn, id)?.ok_or_else(|| ApiError::not_found("node"))?;
        if node.status == STATUS_DECOMMISSIONED {
            return Err(ApiError::conflict(
                "node_decommissioned",
                "a decommissioned node cannot change",
            ));
        }
        let target = nodes::table.find(id.as_str());
        diesel::update(target)
            .set((
                nodes::name.eq(changes.name.as_ref().unwrap_or(&node.name)),
                nodes::fqdn.eq(changes.fqdn.as_ref().unwrap_or(&node.fqdn)),
                nodes::location.eq(changes.location.as_ref().unwrap_or(&node.location)),
                nodes::cpu_percent.eq(changes.cpu_percent.unwrap_or(node.cpu_percent)),
                nodes::memory_mb.eq(changes.memory_mb.unwrap_or(node.memory_mb)),
                nodes::disk_mb.eq(changes.disk_mb.unwrap_or(node.disk_mb)),
                nodes::overallocation_percent.eq(changes
                    .overallocation_percent
                    .unwrap_or(node.overallocation_percent)),
                nodes::is_public.eq(changes.is_public.unwrap_or(node.is_public)),
                nodes::maintenance.eq(changes.maintenance.unwrap_or(node.maintenance)),
                nodes::api_port.eq(i64::from(changes.api_port.unwrap_or(node.api_port))),
                nodes::public_url.eq(changes.public_url.as_ref().unwrap_or(&node.public_url)),
                nodes::sftp_port.eq(i64::from(changes.sftp_port.unwrap_or(node.sftp_port))),
                nodes::updated_at.eq(now_ms()),
            ))
            .execute(conn)
            .map_err(map_unique)?;
        audit::record(
            conn,
            actor,
            meta,
            Event {
                tenant: None,
                action: "node.update",
                resource_type: "node",
                resource_id: Some(id.to_string()),
                metadata: json!({
                    "name": changes.name, "fqdn": changes.fqdn, "location": changes.location,
                    "cpu_percent": changes.cpu_percent, "memory_mb": changes.memory_mb,
                    "disk_mb": changes.disk_mb, "overallocation_percent": changes.overallocation_percent,
                    "is_public": changes.is_public, "maintenance": changes.maintenance,
                    "api_port": changes.api_port, "public_url": changes.public_url,
                    "sftp_port": changes.sftp_port,
                }),
            },
        )?;
        Ok(target.select(NodeRow::as_select()).first(conn)?.into())
    })
}

/// What decommissioning released.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Decommissioned {
    pub node: Node,
    pub released_allocations: i64,
    pub removed_pools: i64,
    /// Servers still recorded on the node; they keep their records (and reservations) until
    /// they are deleted or moved, but hold no ports any more.
    pub stranded_servers: i64,
}

/// Retires a node: takes it out of placement for good, releases every allocation on it and
/// removes its pools, in one transaction with its audit entry. Doing it again changes nothing.
pub fn decommission(
    conn: &mut DbConnection,
    id: &NodeId,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<Decommissioned, ApiError> {
    crate::db::transaction(conn, |conn| {
        // The same lock a reservation takes first, so none is halfway through on this node.
        let locked = diesel::update(nodes::table.find(id.as_str()))
            .set(nodes::reservation_seq.eq(nodes::reservation_seq + 1))
            .execute(conn)?;
        if locked == 0 {
            return Err(ApiError::not_found("node"));
        }
        let now = now_ms();
        diesel::update(
            nodes::table
                .find(id.as_str())
                .filter(nodes::status.ne(STATUS_DECOMMISSIONED)),
        )
        .set((
            nodes::status.eq(STATUS_DECOMMISSIONED),
            nodes::maintenance.eq(true),
            nodes::is_public.eq(false),
            nodes::decommissioned_at.eq(now),
            nodes::updated_at.eq(now),
        ))
        .execute(conn)?;
        let released =
            diesel::delete(allocations::table.filter(allocations::node_id.eq(id.as_str()))).execute(conn)?;
        let pools = diesel::delete(allocation_pools::table.filter(allocation_pools::node_id.eq(id.as_str())))
            .execute(conn)?;
        let stranded: i64 = servers::table
            .filter(servers::node_id.eq(id.as_str()))
            .count()
            .get_result(conn)?;
        let released = i64::try_from(released).unwrap_or(i64::MAX);
        let pools = i64::try_from(pools).unwrap_or(i64::MAX);
        audit::record(
            conn,
            actor,
            meta,
            Event {
                tenant: None,
                action: "node.decommission",
                resource_type: "node",
                resource_id: Some(id.to_string()),
                metadata: json!({
                    "released_allocations": released, "removed_pools": pools,
                    "stranded_servers": stranded,
                }),
            },
        )?;
        let node = get(conn, id)?.ok_or_else(|| ApiError::not_found("node"))?;
        Ok(Decommissioned {
            node,
            released_allocations: released,
            removed_pools: pools,
            stranded_servers: stranded,
        })
    })
}

/// Removes a decommissioned node that no server is recorded on any more.
pub fn delete(
    conn: &mut DbConnection,
    id: &NodeId,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<(), ApiError> {
    crate::db::transaction(conn, |conn| {
        let node = get(conn, id)?.ok_or_else(|| ApiError::not_found("node"))?;
        if node.status != STATUS_DECOMMISSIONED {
            return Err(ApiError::conflict(
                "node_active",
                "decommission the node before deleting it",
            ));
        }
        let servers: i64 = servers::table
            .filter(servers::node_id.eq(id.as_str()))
            .count()
            .get_result(conn)?;
        if servers > 0 {
            return Err(ApiError::conflict(
                "node_has_servers",
                format!("{servers} servers are still recorded on this node"),
            ));
        }
        diesel::delete(nodes::table.find(id.as_str())).execute(conn)?;
        audit::record(
            conn,
            actor,
            meta,
            Event {
                tenant: None,
                action: "node.delete",
                resource_type: "node",
                resource_id: Some(id.to_string()),
                metadata: json!({ "name": node.name }),
            },
        )?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fqdns_are_host_names_or_addresses() {
        assert_eq!(check_fqdn("Node1.Example.com.").unwrap(), "node1.example.com");
        assert!(check_fqdn("10.0.0.1").is_ok());
        assert!(check_fqdn("::1").is_ok());
        assert!(check_fqdn("-bad.example").is_err());
        assert!(check_fqdn("a b").is_err());
        assert!(check_fqdn("").is_err());
    }

    #[test]
    fn public_urls_are_plain_http_bases() {
        assert_eq!(
            check_public_url("https://Node1.example.com:8443/").unwrap(),
            "https://node1.example.com:8443"
        );
        assert_eq!(default_public_url("::1"), "http://[::1]:8081");
        assert!(check_public_url("http://[::1]:8081").is_ok());
        for bad in [
            "ftp://x",
            "http://x/path",
            "http://u:p@x",
            "http://x?q=1",
            "x:80",
            "",
        ] {
            assert!(check_public_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overallocation_scales_every_limit() {
        let node = Node {
            id: NodeId::generate(),
            name: "n".into(),
            fqdn: "n".into(),
            location: "l".into(),
            cpu_percent: 400,
            memory_mb: 1000,
            disk_mb: 10_000,
            overallocation_percent: 50,
            is_public: true,
            maintenance: false,
            status: STATUS_ACTIVE.into(),
            created_at: 0,
            updated_at: 0,
            decommissioned_at: None,
            api_port: DEFAULT_API_PORT,
            public_url: default_public_url("n"),
            sftp_port: DEFAULT_SFTP_PORT,
            last_heartbeat_at: None,
            connectivity: CONNECTIVITY_NEW.into(),
        };
        assert_eq!(
            node.limits(),
            Resources {
                cpu_percent: 600,
                memory_mb: 1500,
                disk_mb: 15_000
            }
        );
    }
}

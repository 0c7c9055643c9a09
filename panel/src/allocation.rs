//! Allocation: address pools per node, and the atomic reservation of capacity and ports
//! for a server.
//!
//! A pool is one IP (or CIDR block) times one port range, for TCP, UDP or both. Pools of a
//! node never overlap, so an (ip, port) pair belongs to at most one pool; a wildcard address
//! (`0.0.0.0`, `::`) overlaps every address.
//!
//! **Invariant: a port is never given out twice.** `allocations` has `UNIQUE (node_id, ip,
//! port)`, and a reservation runs in one transaction whose first statement bumps the node's
//! `reservation_seq`. That write takes the node's row lock on PostgreSQL and the database's
//! write lock on SQLite before anything is read, so reservations on one node are serial:
//! each sees every port and every server the previous ones committed, and checks capacity
//! against them. The unique constraint stays as the backstop; a violation (which the lock
//! should make impossible) rolls back and retries.
//!
//! Capacity is the sum of the limits of the servers recorded on the node, compared with the
//! node's capacity scaled by its overallocation; there is no counter to drift.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use diesel::prelude::*;
use ipnet::IpNet;
use mamba_shared::blueprint::Protocol;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::audit::{self, Actor, Event};
use crate::authz::TenantScope;
use crate::db::schema::{allocation_pools, allocations, nodes, servers};
use crate::db::{DbConnection, now_ms};
use crate::error::ApiError;
use crate::ids::{AllocationId, NodeId, PoolId, ServerId};
use crate::nodes::{self as node_data, Resources};
use crate::pagination::{Page, PageRequest};
use crate::request_meta::RequestMeta;

/// The most addresses one pool may span (a /20 of IPv4).
const MAX_POOL_ADDRESSES: u128 = 4096;
/// How often a reservation that hit the unique constraint is tried again.
const UNIQUE_RETRIES: usize = 5;

/// How a pool picks its next free port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// The port after the highest one given out on the address; once the range's top is
    /// reached, the lowest free (ip, port), in address then port order.
    #[default]
    Sequential,
    /// A free (ip, port) picked at random within the pool.
    Random,
}

impl Strategy {
    fn as_str(self) -> &'static str {
        match self {
            Strategy::Sequential => "sequential",
            Strategy::Random => "random",
        }
    }

    fn parse(s: &str) -> Strategy {
        if s == "random" {
            Strategy::Random
        } else {
            Strategy::Sequential
        }
    }
}

/// The addresses of a pool: one address, a block, or every address (a wildcard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpSpec {
    Wildcard(IpAddr),
    Net(IpNet),
}

impl IpSpec {
    pub fn parse(text: &str) -> Result<IpSpec, String> {
        let text = text.trim();
        let net = if let Ok(ip) = text.parse::<IpAddr>() {
            if ip.is_unspecified() {
                return Ok(IpSpec::Wildcard(ip));
            }
            IpNet::from(ip)
        } else {
            text.parse::<IpNet>()
                .map_err(|_| format!("{text:?} is neither an IP address nor a CIDR block"))?
                .trunc()
        };
        if net.addr().is_unspecified() {
            return Err("a wildcard is written as 0.0.0.0 or ::, without a prefix".into());
        }
        let spec = IpSpec::Net(net);
        if spec.count() > MAX_POOL_ADDRESSES {
            return Err(format!("a pool may span at most {MAX_POOL_ADDRESSES} addresses"));
        }
        Ok(spec)
    }

    /// How many usable addresses (an IPv4 block's network and broadcast addresses are not).
    pub fn count(&self) -> u128 {
        match self {
            IpSpec::Wildcard(_) => 1,
            IpSpec::Net(net) => {
                let bits = u32::from(net.max_prefix_len() - net.prefix_len());
                let all = 1u128.checked_shl(bits).unwrap_or(u128::MAX);
                if matches!(net, IpNet::V4(_)) && net.prefix_len() <= 30 {
                    all - 2
                } else {
                    all
                }
            }
        }
    }

    /// The `i`-th usable address (`i < count()`).
    pub fn at(&self, i: u128) -> IpAddr {
        match self {
            IpSpec::Wildcard(ip) => *ip,
            IpSpec::Net(IpNet::V4(net)) => {
                let skip = u128::from(net.prefix_len() <= 30);
                let base = u128::from(u32::from(net.network()));
                let v = u32::try_from(base + skip + i).unwrap_or(u32::MAX);
                IpAddr::V4(v.into())
            }
            IpSpec::Net(IpNet::V6(net)) => IpAddr::V6((u128::from(net.network()) + i).into()),
        }
    }

    /// Whether a port on one could collide with the same port on the other.
    pub fn overlaps(&self, other: &IpSpec) -> bool {
        match (self, other) {
            (IpSpec::Wildcard(_), _) | (_, IpSpec::Wildcard(_)) => true,
            (IpSpec::Net(a), IpSpec::Net(b)) => a.contains(&b.network()) || b.contains(&a.network()),
        }
    }
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = allocation_pools)]
struct PoolRow {
    id: String,
    node_id: String,
    ips: String,
    port_start: i32,
    port_end: i32,
    protocols: String,
    strategy: String,
    created_at: i64,
}

/// A pool as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Pool {
    #[schema(value_type = String)]
    pub id: PoolId,
    #[schema(value_type = String)]
    pub node_id: NodeId,
    /// An address, a CIDR block, or a wildcard (`0.0.0.0`, `::`).
    pub ips: String,
    pub port_start: u16,
    pub port_end: u16,
    #[schema(value_type = Vec<String>)]
    pub protocols: Vec<Protocol>,
    pub strategy: Strategy,
    pub created_at: i64,
}

fn protocols_text(protocols: &[Protocol]) -> String {
    let mut sorted: Vec<Protocol> = protocols.to_vec();
    sorted.sort();
    sorted.dedup();
    sorted
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_protocols(text: &str) -> Vec<Protocol> {
    text.split(',')
        .filter_map(|p| match p {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            _ => None,
        })
        .collect()
}

impl From<PoolRow> for Pool {
    fn from(row: PoolRow) -> Pool {
        Pool {
            id: PoolId::from_db(row.id),
            node_id: NodeId::from_db(row.node_id),
            ips: row.ips,
            port_start: u16::try_from(row.port_start).unwrap_or(0),
            port_end: u16::try_from(row.port_end).unwrap_or(0),
            protocols: parse_protocols(&row.protocols),
            strategy: Strategy::parse(&row.strategy),
            created_at: row.created_at,
        }
    }
}

/// Pools to add to a node: every listed address (or block) times every listed port (or
/// range) becomes one pool.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPools {
    /// Addresses or CIDR blocks, e.g. `["10.0.0.5", "192.0.2.0/28", "0.0.0.0"]`.
    pub ips: Vec<String>,
    /// Ports or inclusive ranges, e.g. `["25565", "27000-27100"]`.
    pub ports: Vec<String>,
    /// Default both.
    #[serde(default = "both")]
    #[schema(value_type = Vec<String>)]
    pub protocols: Vec<Protocol>,
    #[serde(default)]
    pub strategy: Strategy,
}

fn both() -> Vec<Protocol> {
    vec![Protocol::Tcp, Protocol::Udp]
}

/// A port or an inclusive range `a-b`; ports 1 to 65535.
pub fn parse_ports(text: &str) -> Result<(u16, u16), String> {
    let text = text.trim();
    let bad = || format!("{text:?} is not a port (1-65535) or a range like 27000-27100");
    let (a, b) = match text.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (text, text),
    };
    let a: u16 = a.parse().map_err(|_| bad())?;
    let b: u16 = b.parse().map_err(|_| bad())?;
    if a == 0 || b < a {
        return Err(bad());
    }
    Ok((a, b))
}

struct CheckedPool {
    ips: String,
    spec: IpSpec,
    ports: (u16, u16),
}

fn check_new_pools(new: &NewPools) -> Result<Vec<CheckedPool>, ApiError> {
    let mut errors = Vec::new();
    let mut err = |field: String, message: String| {
        errors.push(mamba_shared::blueprint::FieldError { field, message });
    };
    if new.ips.is_empty() || new.ips.len() > 64 {
        err("ips".into(), "list 1 to 64 addresses or blocks".into());
    }
    if new.ports.is_empty() || new.ports.len() > 64 {
        err("ports".into(), "list 1 to 64 ports or ranges".into());
    }
    if new.protocols.is_empty() {
        err("protocols".into(), "at least one of tcp, udp".into());
    }
    let mut specs = Vec::new();
    for (i, ip) in new.ips.iter().enumerate() {
        match IpSpec::parse(ip) {
            Ok(spec) => specs.push((ip.trim().to_string(), spec)),
            Err(m) => err(format!("ips[{i}]"), m),
        }
    }
    let mut ranges = Vec::new();
    for (i, p) in new.ports.iter().enumerate() {
        match parse_ports(p) {
            Ok(r) => ranges.push(r),
            Err(m) => err(format!("ports[{i}]"), m),
        }
    }
    let mut out: Vec<CheckedPool> = Vec::new();
    for (ips, spec) in &specs {
        for &ports in &ranges {
            if out
                .iter()
                .any(|o| o.spec.overlaps(spec) && ranges_overlap(o.ports, ports))
            {
                err(
                    "ports".into(),
                    format!("{ips} {}-{} is listed twice", ports.0, ports.1),
                );
                continue;
            }
            out.push(CheckedPool {
                ips: ips.clone(),
                spec: *spec,
                ports,
            });
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ApiError::validation(errors))
    }
}

fn ranges_overlap(a: (u16, u16), b: (u16, u16)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

fn node_pools(conn: &mut DbConnection, node: &NodeId) -> QueryResult<Vec<Pool>> {
    Ok(allocation_pools::table
        .filter(allocation_pools::node_id.eq(node.as_str()))
        .order(allocation_pools::id.asc())
        .select(PoolRow::as_select())
        .load(conn)?
        .into_iter()
        .map(Pool::from)
        .collect())
}

pub fn list_pools(conn: &mut DbConnection, node: &NodeId) -> Result<Vec<Pool>, ApiError> {
    node_data::get(conn, node)?.ok_or_else(|| ApiError::not_found("node"))?;
    Ok(node_pools(conn, node)?)
}

/// Adds pools to an active node, refusing any that overlaps a pool it already has.
pub fn add_pools(
    conn: &mut DbConnection,
    node: &NodeId,
    new: &NewPools,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<Vec<Pool>, ApiError> {
    let checked = check_new_pools(new)?;
    crate::db::transaction(conn, |conn| {
        lock_node(conn, node)?;
        let existing = node_pools(conn, node)?;
        for c in &checked {
            for e in &existing {
                let Ok(spec) = IpSpec::parse(&e.ips) else { continue };
                if spec.overlaps(&c.spec) && ranges_overlap((e.port_start, e.port_end), c.ports) {
                    return Err(ApiError::conflict(
                        "pool_overlaps",
                        format!(
                            "{} {}-{} overlaps pool {} ({} {}-{})",
                            c.ips, c.ports.0, c.ports.1, e.id, e.ips, e.port_start, e.port_end
                        ),
                    )
                    .with_field("ports"));
                }
            }
        }
        let now = now_ms();
        let mut ids = Vec::new();
        for c in &checked {
            let id = PoolId::generate();
            diesel::insert_into(allocation_pools::table)
                .values((
                    allocation_pools::id.eq(id.as_str()),
                    allocation_pools::node_id.eq(node.as_str()),
                    allocation_pools::ips.eq(&c.ips),
                    allocation_pools::port_start.eq(i32::from(c.ports.0)),
                    allocation_pools::port_end.eq(i32::from(c.ports.1)),
                    allocation_pools::protocols.eq(protocols_text(&new.protocols)),
                    allocation_pools::strategy.eq(new.strategy.as_str()),
                    allocation_pools::created_at.eq(now),
                ))
                .execute(conn)?;
            ids.push(id);
        }
        audit::record(
            conn,
            actor,
            meta,
            Event {
                tenant: None,
                action: "pool.create",
                resource_type: "node",
                resource_id: Some(node.to_string()),
                metadata: json!({
                    "pools": ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "ips": new.ips, "ports": new.ports,
                    "protocols": protocols_text(&new.protocols), "strategy": new.strategy.as_str(),
                }),
            },
        )?;
        let all = node_pools(conn, node)?;
        Ok(all.into_iter().filter(|p| ids.contains(&p.id)).collect())
    })
}

/// Removes a pool that no allocation uses any more.
pub fn delete_pool(
    conn: &mut DbConnection,
    node: &NodeId,
    pool: &PoolId,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<(), ApiError> {
    crate::db::transaction(conn, |conn| {
        lock_node(conn, node)?;
        let used: i64 = allocations::table
            .filter(allocations::pool_id.eq(pool.as_str()))
            .count()
            .get_result(conn)?;
        if used > 0 {
            return Err(ApiError::conflict(
                "pool_in_use",
                format!("{used} allocations still use this pool"),
            ));
        }
        let deleted = diesel::delete(
            allocation_pools::table
                .filter(allocation_pools::id.eq(pool.as_str()))
                .filter(allocation_pools::node_id.eq(node.as_str())),
        )
        .execute(conn)?;
        if deleted == 0 {
            return Err(ApiError::not_found("pool"));
        }
        audit::record(
            conn,
            actor,
            meta,
            Event {
                tenant: None,
                action: "pool.delete",
                resource_type: "node",
                resource_id: Some(node.to_string()),
                metadata: json!({ "pool": pool.to_string() }),
            },
        )?;
        Ok(())
    })
}

/// Takes the node's lock for the rest of the transaction: the first statement of every
/// reservation, so reservations on one node run one after the other. 404 for no node.
pub(crate) fn lock_node(conn: &mut DbConnection, node: &NodeId) -> Result<(), ApiError> {
    let n = diesel::update(nodes::table.find(node.as_str()))
        .set(nodes::reservation_seq.eq(nodes::reservation_seq + 1))
        .execute(conn)?;
    if n == 0 {
        return Err(ApiError::not_found("node"));
    }
    Ok(())
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = allocations)]
struct AllocationRow {
    id: String,
    node_id: String,
    pool_id: String,
    ip: String,
    port: i32,
    protocols: String,
    server_id: String,
    tenant_id: String,
    is_primary: bool,
    created_at: i64,
}

/// One (ip, port) a server holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Allocation {
    #[schema(value_type = String)]
    pub id: AllocationId,
    #[schema(value_type = String)]
    pub node_id: NodeId,
    #[schema(value_type = String)]
    pub pool_id: PoolId,
    pub ip: String,
    pub port: u16,
    #[schema(value_type = Vec<String>)]
    pub protocols: Vec<Protocol>,
    #[schema(value_type = String)]
    pub server_id: ServerId,
    pub tenant_id: String,
    /// The server's first port (its `SERVER_PORT`).
    pub is_primary: bool,
    pub created_at: i64,
}

impl From<AllocationRow> for Allocation {
    fn from(row: AllocationRow) -> Allocation {
        Allocation {
            id: AllocationId::from_db(row.id),
            node_id: NodeId::from_db(row.node_id),
            pool_id: PoolId::from_db(row.pool_id),
            ip: row.ip,
            port: u16::try_from(row.port).unwrap_or(0),
            protocols: parse_protocols(&row.protocols),
            server_id: ServerId::from_db(row.server_id),
            tenant_id: row.tenant_id,
            is_primary: row.is_primary,
            created_at: row.created_at,
        }
    }
}

/// A node's allocations, by cursor.
pub fn list_allocations(
    conn: &mut DbConnection,
    node: &NodeId,
    page: &PageRequest,
) -> Result<Page<Allocation>, ApiError> {
    node_data::get(conn, node)?.ok_or_else(|| ApiError::not_found("node"))?;
    let mut query = allocations::table
        .filter(allocations::node_id.eq(node.as_str()))
        .order(allocations::id.asc())
        .select(AllocationRow::as_select())
        .into_boxed();
    if let Some(after) = &page.after {
        query = query.filter(allocations::id.gt(after.clone()));
    }
    let rows = query.limit(page.fetch()).load(conn)?;
    Ok(Page::from_rows(rows, page, |a| a.id.as_str()).map(Allocation::from))
}

/// A server's allocations, primary first.
pub fn server_allocations(conn: &mut DbConnection, server: &ServerId) -> QueryResult<Vec<Allocation>> {
    Ok(allocations::table
        .filter(allocations::server_id.eq(server.as_str()))
        .order((allocations::is_primary.desc(), allocations::id.asc()))
        .select(AllocationRow::as_select())
        .load(conn)?
        .into_iter()
        .map(Allocation::from)
        .collect())
}

/// What a new server needs from a node.
#[derive(Debug, Clone)]
pub struct Request {
    pub name: String,
    pub blueprint: String,
    pub resources: Resources,
    /// The checked variable values.
    pub variables: BTreeMap<String, String>,
    /// One entry per port the server needs, with the protocols it needs on it. The first is
    /// the primary.
    pub ports: Vec<Vec<Protocol>>,
    /// Only this node.
    pub node: Option<NodeId>,
    /// Only nodes in this location.
    pub location: Option<String>,
}

/// Why a reservation found no place.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    #[error("no such node")]
    NoNode,
    #[error("the node takes no new servers (maintenance, decommissioned, offline, or not heard from yet)")]
    NodeUnavailable,
    #[error("not enough {0} left on the node")]
    NoCapacity(&'static str),
    #[error("no free port for {0} on the node")]
    NoPorts(String),
    #[error("no online node has the capacity and free ports for this server")]
    NoNodeFits,
    #[error("no such server")]
    NoServer,
    #[error(transparent)]
    Db(#[from] diesel::result::Error),
}

impl From<ReserveError> for ApiError {
    fn from(e: ReserveError) -> ApiError {
        match e {
            ReserveError::NoNode => ApiError::not_found("node"),
            ReserveError::NoServer => ApiError::not_found("server"),
            ReserveError::NodeUnavailable => ApiError::conflict("node_unavailable", e.to_string()),
            ReserveError::NoCapacity(_) => ApiError::conflict("insufficient_capacity", e.to_string()),
            ReserveError::NoPorts(_) => ApiError::conflict("no_free_ports", e.to_string()),
            ReserveError::NoNodeFits => ApiError::conflict("no_node_fits", e.to_string()),
            ReserveError::Db(e) => ApiError::from(e),
        }
    }
}

/// A placed server: its record's essentials and its ports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Placed {
    #[schema(value_type = String)]
    pub server_id: ServerId,
    #[schema(value_type = String)]
    pub node_id: NodeId,
    pub allocations: Vec<Allocation>,
}

fn is_unique_violation(e: &diesel::result::Error) -> bool {
    matches!(
        e,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
}

/// Places a new server: on `request.node`, or else on the public, active, online nodes (of
/// `request.location`), most free memory first. A node is online once it has sent a
/// heartbeat and until it falls silent, so a node whose wings never ran takes nothing. Records the server and its allocations,
/// with the audit entry `server.create`, in one transaction per node tried.
pub fn place(
    conn: &mut DbConnection,
    scope: &TenantScope,
    request: &Request,
    meta: &RequestMeta,
) -> Result<Placed, ReserveError> {
    if let Some(node) = &request.node {
        let found = node_data::get(conn, node)?.ok_or(ReserveError::NoNode)?;
        if !found.is_public {
            // A tenant may not aim at a private node; it looks like no node at all.
            return Err(ReserveError::NoNode);
        }
        return reserve_on(conn, scope, node, request, meta);
    }
    let mut query = nodes::table
        .filter(nodes::status.eq(node_data::STATUS_ACTIVE))
        .filter(nodes::is_public.eq(true))
        .filter(nodes::maintenance.eq(false))
        .filter(nodes::connectivity.eq(node_data::CONNECTIVITY_ONLINE))
        .select(node_data::NodeRow::as_select())
        .into_boxed();
    if let Some(location) = &request.location {
        query = query.filter(nodes::location.eq(location.clone()));
    }
    let candidates: Vec<node_data::Node> = query.load(conn)?.into_iter().map(node_data::Node::from).collect();
    let mut ranked = Vec::new();
    for node in candidates {
        let used = node_data::reserved(conn, &node.id)?;
        let free = node.limits().memory_mb - used.memory_mb;
        if free >= request.resources.memory_mb {
            ranked.push((free, node.id));
        }
    }
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    for (_, node) in ranked {
        match reserve_on(conn, scope, &node, request, meta) {
            Ok(placed) => return Ok(placed),
            Err(ReserveError::Db(e)) => return Err(ReserveError::Db(e)),
            Err(_) => continue,
        }
    }
    Err(ReserveError::NoNodeFits)
}

/// Reserves capacity and ports on one node for a new server.
pub fn reserve_on(
    conn: &mut DbConnection,
    scope: &TenantScope,
    node: &NodeId,
    request: &Request,
    meta: &RequestMeta,
) -> Result<Placed, ReserveError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = crate::db::transaction(conn, |conn| reserve_once(conn, scope, node, request, meta));
        match result {
            Err(ReserveError::Db(e)) if is_unique_violation(&e) && attempt < UNIQUE_RETRIES => {
                tracing::warn!(node.id = %node, attempt, "allocation collided; retrying");
            }
            other => return other,
        }
    }
}

fn reserve_once(
    conn: &mut DbConnection,
    scope: &TenantScope,
    node: &NodeId,
    request: &Request,
    meta: &RequestMeta,
) -> Result<Placed, ReserveError> {
    let chosen = lock_and_pick(conn, node, &request.resources, &request.ports)?;
    let server = ServerId::generate();
    let now = now_ms();
    diesel::insert_into(servers::table)
        .values((
            servers::id.eq(server.as_str()),
            servers::tenant_id.eq(scope.tenant().as_str()),
            servers::node_id.eq(node.as_str()),
            servers::name.eq(&request.name),
            servers::blueprint.eq(&request.blueprint),
            servers::memory_mb.eq(request.resources.memory_mb),
            servers::cpu_percent.eq(request.resources.cpu_percent),
            servers::disk_mb.eq(request.resources.disk_mb),
            servers::variables.eq(serde_json::to_string(&request.variables).unwrap_or_default()),
            servers::status.eq("created"),
            servers::created_at.eq(now),
            servers::updated_at.eq(now),
        ))
        .execute(conn)?;
    let allocations = insert_allocations(conn, node, scope.tenant().as_str(), &server, chosen)?;
    audit::record(
        conn,
        scope.actor(),
        meta,
        Event {
            tenant: Some(scope.tenant()),
            action: "server.create",
            resource_type: "server",
            resource_id: Some(server.to_string()),
            metadata: json!({
                "node": node.to_string(), "blueprint": request.blueprint,
                "ports": allocations.iter().map(|a| format!("{}:{}", a.ip, a.port)).collect::<Vec<_>>(),
            }),
        },
    )?;
    Ok(Placed {
        server_id: server,
        node_id: node.clone(),
        allocations,
    })
}

/// One (ip, port) picked for a server, not yet written.
struct Chosen {
    pool: PoolId,
    ip: IpAddr,
    port: u16,
    protocols: String,
}

/// Takes the node's lock (its first statement, see the module docs), checks that `resources`
/// fit beside what the node's servers already hold, and picks a free port for every entry
/// of `ports`. Writes nothing but the lock; call it in a transaction.
fn lock_and_pick(
    conn: &mut DbConnection,
    node: &NodeId,
    resources: &Resources,
    ports: &[Vec<Protocol>],
) -> Result<Vec<Chosen>, ReserveError> {
    let locked = diesel::update(
        nodes::table
            .find(node.as_str())
            .filter(nodes::status.eq(node_data::STATUS_ACTIVE))
            .filter(nodes::maintenance.eq(false))
            // Only a node that heartbeats can install anything: one never heard from is not
            // running wings yet, one gone silent is offline.
            .filter(nodes::connectivity.eq(node_data::CONNECTIVITY_ONLINE)),
    )
    .set(nodes::reservation_seq.eq(nodes::reservation_seq + 1))
    .execute(conn)?;
    if locked == 0 {
        return Err(match node_data::get(conn, node)? {
            None => ReserveError::NoNode,
            Some(_) => ReserveError::NodeUnavailable,
        });
    }
    let found = node_data::get(conn, node)?.ok_or(ReserveError::NoNode)?;
    let limits = found.limits();
    let after = node_data::reserved(conn, node)?.plus(resources);
    if after.memory_mb > limits.memory_mb {
        return Err(ReserveError::NoCapacity("memory"));
    }
    if after.cpu_percent > limits.cpu_percent {
        return Err(ReserveError::NoCapacity("CPU"));
    }
    if after.disk_mb > limits.disk_mb {
        return Err(ReserveError::NoCapacity("disk"));
    }

    let pools = node_pools(conn, node)?;
    let mut chosen: Vec<(&Pool, IpAddr, u16, &Vec<Protocol>)> = Vec::new();
    // First a few indexed lookups per port; only when they find nothing (a full range with
    // holes, a crowded random pool) are all the node's allocations read.
    let mut picked: HashSet<(IpAddr, u16)> = HashSet::new();
    for needs in ports {
        let preferred_ip = chosen.first().map(|c| c.1);
        match quick_pick(conn, node, &pools, needs, preferred_ip, &picked)? {
            Some(pick) => {
                picked.insert((pick.1, pick.2));
                chosen.push((pick.0, pick.1, pick.2, needs));
            }
            None => {
                chosen.clear();
                break;
            }
        }
    }
    if chosen.len() != ports.len() {
        let mut taken: HashSet<(IpAddr, u16)> = allocations::table
            .filter(allocations::node_id.eq(node.as_str()))
            .select((allocations::ip, allocations::port))
            .load::<(String, i32)>(conn)?
            .into_iter()
            .filter_map(|(ip, port)| Some((ip.parse().ok()?, u16::try_from(port).ok()?)))
            .collect();
        for (i, needs) in ports.iter().enumerate() {
            let preferred_ip = chosen.first().map(|c| c.1);
            let pick = pick_port(&pools, &taken, needs, preferred_ip).ok_or_else(|| {
                ReserveError::NoPorts(format!("port {} ({})", i + 1, protocols_text(needs)))
            })?;
            taken.insert((pick.1, pick.2));
            chosen.push((pick.0, pick.1, pick.2, needs));
        }
    }
    Ok(chosen
        .into_iter()
        .map(|(pool, ip, port, needs)| Chosen {
            pool: pool.id.clone(),
            ip,
            port,
            protocols: protocols_text(needs),
        })
        .collect())
}

/// Writes the picked ports as the server's allocations, the first one primary.
fn insert_allocations(
    conn: &mut DbConnection,
    node: &NodeId,
    tenant: &str,
    server: &ServerId,
    chosen: Vec<Chosen>,
) -> QueryResult<Vec<Allocation>> {
    let now = now_ms();
    let mut allocations = Vec::with_capacity(chosen.len());
    for (i, c) in chosen.into_iter().enumerate() {
        let id = AllocationId::generate();
        diesel::insert_into(allocations::table)
            .values((
                allocations::id.eq(id.as_str()),
                allocations::node_id.eq(node.as_str()),
                allocations::pool_id.eq(c.pool.as_str()),
                allocations::ip.eq(c.ip.to_string()),
                allocations::port.eq(i32::from(c.port)),
                allocations::protocols.eq(&c.protocols),
                allocations::server_id.eq(server.as_str()),
                allocations::tenant_id.eq(tenant),
                allocations::is_primary.eq(i == 0),
                allocations::created_at.eq(now),
            ))
            .execute(conn)?;
        allocations.push(Allocation {
            id,
            node_id: node.clone(),
            pool_id: c.pool,
            ip: c.ip.to_string(),
            port: c.port,
            protocols: parse_protocols(&c.protocols),
            server_id: server.clone(),
            tenant_id: tenant.to_string(),
            is_primary: i == 0,
            created_at: now,
        });
    }
    Ok(allocations)
}

/// Reserves capacity and ports again for a server whose install gave up (`install_failed`,
/// no allocations, its capacity no longer counted): on its own node if that still takes it,
/// or else, as a create without a preferred node would, on another public node of the same
/// location, most free memory first. Moves the server to the node found. Call it in a
/// transaction (every node tried runs in its own savepoint); the caller changes the status.
pub fn reserve_again(
    conn: &mut DbConnection,
    server: &ServerId,
    ports: &[Vec<Protocol>],
) -> Result<Placed, ReserveError> {
    let row: Option<(String, String, i64, i64, i64)> = servers::table
        .find(server.as_str())
        .select((
            servers::node_id,
            servers::tenant_id,
            servers::cpu_percent,
            servers::memory_mb,
            servers::disk_mb,
        ))
        .first(conn)
        .optional()?;
    let (home, tenant, cpu_percent, memory_mb, disk_mb) = row.ok_or(ReserveError::NoServer)?;
    let resources = Resources {
        cpu_percent,
        memory_mb,
        disk_mb,
    };
    let home = NodeId::from_db(home);
    let location = node_data::get(conn, &home)?.map(|n| n.location);
    let mut candidates = vec![home.clone()];
    if let Some(location) = location {
        let others: Vec<node_data::Node> = nodes::table
            .filter(nodes::status.eq(node_data::STATUS_ACTIVE))
            .filter(nodes::is_public.eq(true))
            .filter(nodes::maintenance.eq(false))
            .filter(nodes::connectivity.eq(node_data::CONNECTIVITY_ONLINE))
            .filter(nodes::location.eq(location))
            .filter(nodes::id.ne(home.as_str()))
            .select(node_data::NodeRow::as_select())
            .load(conn)?
            .into_iter()
            .map(node_data::Node::from)
            .collect();
        let mut ranked = Vec::new();
        for node in others {
            let free = node.limits().memory_mb - node_data::reserved(conn, &node.id)?.memory_mb;
            if free >= resources.memory_mb {
                ranked.push((free, node.id));
            }
        }
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        candidates.extend(ranked.into_iter().map(|(_, id)| id));
    }
    let mut first_refusal = None;
    for node in candidates {
        let result = crate::db::transaction(conn, |conn| {
            let chosen = lock_and_pick(conn, &node, &resources, ports)?;
            if node != home {
                diesel::update(servers::table.find(server.as_str()))
                    .set(servers::node_id.eq(node.as_str()))
                    .execute(conn)?;
            }
            Ok::<_, ReserveError>(insert_allocations(conn, &node, &tenant, server, chosen)?)
        });
        match result {
            Ok(allocations) => {
                return Ok(Placed {
                    server_id: server.clone(),
                    node_id: node,
                    allocations,
                });
            }
            Err(ReserveError::Db(e)) => return Err(ReserveError::Db(e)),
            // The home node's reason is the one worth telling.
            Err(e) => {
                first_refusal.get_or_insert(e);
            }
        }
    }
    Err(first_refusal.unwrap_or(ReserveError::NoNodeFits))
}

/// How many addresses of a pool, and random probes, the indexed fast path tries.
const QUICK_TRIES: u128 = 8;

/// The fast path of picking a port, with indexed lookups only: for a sequential pool the
/// port after the highest one given out on an address, for a random pool a few random
/// probes. `None` sends the caller to the full scan ([`pick_port`]), which also fills holes.
fn quick_pick<'a>(
    conn: &mut DbConnection,
    node: &NodeId,
    pools: &'a [Pool],
    needs: &[Protocol],
    preferred_ip: Option<IpAddr>,
    picked: &HashSet<(IpAddr, u16)>,
) -> QueryResult<Option<(&'a Pool, IpAddr, u16)>> {
    let mut usable: Vec<(&Pool, IpSpec)> = pools
        .iter()
        .filter(|p| needs.iter().all(|n| p.protocols.contains(n)))
        .filter_map(|p| IpSpec::parse(&p.ips).ok().map(|s| (p, s)))
        .collect();
    let holds = |spec: &IpSpec, ip: IpAddr| match spec {
        IpSpec::Wildcard(w) => *w == ip,
        IpSpec::Net(net) => net.contains(&ip),
    };
    if let Some(ip) = preferred_ip {
        usable.sort_by_key(|(_, spec)| !holds(spec, ip));
    }
    for (pool, spec) in usable {
        let ips: Vec<IpAddr> = match preferred_ip.filter(|ip| holds(&spec, *ip)) {
            Some(ip) => vec![ip],
            None => (0..spec.count().min(QUICK_TRIES)).map(|i| spec.at(i)).collect(),
        };
        let (start, end) = (i32::from(pool.port_start), i32::from(pool.port_end));
        match pool.strategy {
            Strategy::Sequential => {
                for ip in ips {
                    let highest: Option<i32> = allocations::table
                        .filter(allocations::node_id.eq(node.as_str()))
                        .filter(allocations::ip.eq(ip.to_string()))
                        .filter(allocations::port.between(start, end))
                        .select(diesel::dsl::max(allocations::port))
                        .first(conn)?;
                    let mut next = highest.map_or(start, |h| h + 1);
                    while next <= end {
                        let port = u16::try_from(next).unwrap_or(0);
                        if !picked.contains(&(ip, port)) {
                            return Ok(Some((pool, ip, port)));
                        }
                        next += 1;
                    }
                }
            }
            Strategy::Random => {
                let ports = u128::from(pool.port_end - pool.port_start) + 1;
                let preferred = preferred_ip.filter(|ip| holds(&spec, *ip));
                let addresses = if preferred.is_some() { 1 } else { spec.count() };
                for _ in 0..QUICK_TRIES {
                    let k = random_below(addresses * ports);
                    let ip = preferred.unwrap_or_else(|| spec.at(k / ports));
                    let port = pool.port_start + u16::try_from(k % ports).unwrap_or(0);
                    if picked.contains(&(ip, port)) {
                        continue;
                    }
                    let used: i64 = allocations::table
                        .filter(allocations::node_id.eq(node.as_str()))
                        .filter(allocations::ip.eq(ip.to_string()))
                        .filter(allocations::port.eq(i32::from(port)))
                        .count()
                        .get_result(conn)?;
                    if used == 0 {
                        return Ok(Some((pool, ip, port)));
                    }
                }
            }
        }
    }
    Ok(None)
}

/// A free (ip, port) in a pool that serves every protocol in `needs`, on `preferred_ip`
/// when one is free there.
fn pick_port<'a>(
    pools: &'a [Pool],
    taken: &HashSet<(IpAddr, u16)>,
    needs: &[Protocol],
    preferred_ip: Option<IpAddr>,
) -> Option<(&'a Pool, IpAddr, u16)> {
    let usable: Vec<(&Pool, IpSpec)> = pools
        .iter()
        .filter(|p| needs.iter().all(|n| p.protocols.contains(n)))
        .filter_map(|p| IpSpec::parse(&p.ips).ok().map(|s| (p, s)))
        .collect();
    let free = |ip: IpAddr, port: u16| !taken.contains(&(ip, port));
    if let Some(ip) = preferred_ip {
        for (pool, spec) in &usable {
            let same = match spec {
                IpSpec::Wildcard(w) => *w == ip,
                IpSpec::Net(net) => net.contains(&ip),
            };
            if same && let Some(port) = scan_ports(pool, |port| free(ip, port)) {
                return Some((pool, ip, port));
            }
        }
    }
    for (pool, spec) in &usable {
        let ports = u128::from(pool.port_end - pool.port_start) + 1;
        let total = spec.count() * ports;
        let start = match pool.strategy {
            Strategy::Sequential => 0,
            Strategy::Random => random_below(total),
        };
        // Walk the pool once from `start`, wrapping: address-major, port-minor.
        for step in 0..total {
            let k = (start + step) % total;
            let ip = spec.at(k / ports);
            let port = pool.port_start + u16::try_from(k % ports).unwrap_or(0);
            if free(ip, port) {
                return Some((pool, ip, port));
            }
        }
    }
    None
}

fn scan_ports(pool: &Pool, mut free: impl FnMut(u16) -> bool) -> Option<u16> {
    let ports = u32::from(pool.port_end - pool.port_start) + 1;
    let start = match pool.strategy {
        Strategy::Sequential => 0,
        Strategy::Random => u32::try_from(random_below(u128::from(ports))).unwrap_or(0),
    };
    (0..ports)
        .map(|step| pool.port_start + u16::try_from((start + step) % ports).unwrap_or(0))
        .find(|&port| free(port))
}

/// A uniform-enough random number below `n` (n > 0) from the system RNG; 0 if it fails.
fn random_below(n: u128) -> u128 {
    match crate::tokens::random_bytes::<16>() {
        Ok(bytes) if n > 0 => u128::from_le_bytes(bytes) % n,
        _ => 0,
    }
}

/// Deletes a server of the scope's tenant and releases its allocations, with the audit
/// entry `server.delete`, in one transaction. The capacity it held is free at once, since
/// capacity is counted from the servers that exist.
pub fn release_server(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    meta: &RequestMeta,
) -> Result<usize, ApiError> {
    crate::db::transaction(conn, |conn| {
        let node: Option<String> = servers::table
            .filter(servers::id.eq(server.as_str()))
            .filter(servers::tenant_id.eq(scope.tenant().as_str()))
            .select(servers::node_id)
            .first(conn)
            .optional()?;
        let node = node.ok_or_else(|| ApiError::not_found("server"))?;
        lock_node(conn, &NodeId::from_db(node))?;
        let released = diesel::delete(allocations::table.filter(allocations::server_id.eq(server.as_str())))
            .execute(conn)?;
        diesel::delete(servers::table.find(server.as_str())).execute(conn)?;
        audit::record(
            conn,
            scope.actor(),
            meta,
            Event {
                tenant: Some(scope.tenant()),
                action: "server.delete",
                resource_type: "server",
                resource_id: Some(server.to_string()),
                metadata: json!({ "released_allocations": released }),
            },
        )?;
        Ok(released)
    })
}

/// Frees a server's ports and keeps its record (an install that gave up leaves the server
/// as `install_failed`, without ports). Takes the node's lock like every reservation; call
/// it in a transaction. Answers how many allocations were freed.
pub fn release_ports(conn: &mut DbConnection, server: &ServerId) -> Result<usize, ApiError> {
    let node: Option<String> = servers::table
        .find(server.as_str())
        .select(servers::node_id)
        .first(conn)
        .optional()?;
    let Some(node) = node else {
        return Ok(0);
    };
    lock_node(conn, &NodeId::from_db(node))?;
    Ok(
        diesel::delete(allocations::table.filter(allocations::server_id.eq(server.as_str())))
            .execute(conn)?,
    )
}

/// Deletes a server and frees its allocations for the job worker, which acts for the system
/// once the tenant's delete request was checked and audited: writes `server.removed`. A
/// server that is already gone answers 0. One transaction.
pub fn remove_server(
    conn: &mut DbConnection,
    server: &ServerId,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<usize, ApiError> {
    crate::db::transaction(conn, |conn| {
        let tenant: Option<String> = servers::table
            .find(server.as_str())
            .select(servers::tenant_id)
            .first(conn)
            .optional()?;
        let Some(tenant) = tenant else {
            return Ok(0);
        };
        let released = release_ports(conn, server)?;
        diesel::delete(servers::table.find(server.as_str())).execute(conn)?;
        let tenant = crate::ids::TenantId::from_db(tenant);
        audit::record(
            conn,
            actor,
            meta,
            Event {
                tenant: Some(&tenant),
                action: "server.removed",
                resource_type: "server",
                resource_id: Some(server.to_string()),
                metadata: json!({ "released_allocations": released }),
            },
        )?;
        Ok(released)
    })
}

/// What the leak scanner found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct LeakReport {
    /// Allocations whose server no longer exists.
    pub leaked: Vec<Allocation>,
    /// How many of them were released (0 in report mode).
    pub released: usize,
}

/// Finds allocations whose server is gone, and with `release` deletes them (one audit entry
/// `allocation.release_leaked` when any were).
pub fn scan_leaks(
    conn: &mut DbConnection,
    release: bool,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<LeakReport, ApiError> {
    crate::db::transaction(conn, |conn| {
        let orphaned = diesel::dsl::not(diesel::dsl::exists(
            servers::table.filter(servers::id.eq(allocations::server_id)),
        ));
        let leaked: Vec<Allocation> = allocations::table
            .filter(orphaned)
            .order(allocations::id.asc())
            .select(AllocationRow::as_select())
            .load(conn)?
            .into_iter()
            .map(Allocation::from)
            .collect();
        let mut released = 0;
        if release && !leaked.is_empty() {
            let ids: Vec<&str> = leaked.iter().map(|a| a.id.as_str()).collect();
            for chunk in ids.chunks(500) {
                released +=
                    diesel::delete(allocations::table.filter(allocations::id.eq_any(chunk))).execute(conn)?;
            }
            audit::record(
                conn,
                actor,
                meta,
                Event {
                    tenant: None,
                    action: "allocation.release_leaked",
                    resource_type: "allocation",
                    resource_id: None,
                    metadata: json!({
                        "released": released,
                        "allocations": leaked.iter().map(|a| format!("{} {}:{} server {}", a.node_id, a.ip, a.port, a.server_id)).collect::<Vec<_>>(),
                    }),
                },
            )?;
        }
        Ok(LeakReport { leaked, released })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_specs() {
        let net = IpSpec::parse("192.0.2.0/30").unwrap();
        assert_eq!(net.count(), 2);
        assert_eq!(net.at(0).to_string(), "192.0.2.1");
        assert_eq!(net.at(1).to_string(), "192.0.2.2");
        let one = IpSpec::parse("10.0.0.5").unwrap();
        assert_eq!((one.count(), one.at(0).to_string()), (1, "10.0.0.5".into()));
        let v6 = IpSpec::parse("2001:db8::/126").unwrap();
        assert_eq!(v6.count(), 4);
        assert_eq!(v6.at(3).to_string(), "2001:db8::3");
        assert!(matches!(IpSpec::parse("0.0.0.0").unwrap(), IpSpec::Wildcard(_)));
        assert!(IpSpec::parse("0.0.0.0/0").is_err());
        assert!(IpSpec::parse("10.0.0.0/8").is_err(), "too large");
        assert!(IpSpec::parse("nope").is_err());
        // A block given with host bits is its network.
        assert_eq!(IpSpec::parse("192.0.2.3/30").unwrap(), net);
    }

    #[test]
    fn overlaps() {
        let a = IpSpec::parse("192.0.2.0/28").unwrap();
        let b = IpSpec::parse("192.0.2.4").unwrap();
        let c = IpSpec::parse("192.0.2.16").unwrap();
        let any = IpSpec::parse("::").unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
        assert!(any.overlaps(&c) && c.overlaps(&any));
        assert!(ranges_overlap((10, 20), (20, 30)));
        assert!(!ranges_overlap((10, 19), (20, 30)));
    }

    #[test]
    fn ports() {
        assert_eq!(parse_ports("25565").unwrap(), (25565, 25565));
        assert_eq!(parse_ports(" 27000 - 27100 ").unwrap(), (27000, 27100));
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("65536").is_err());
        assert!(parse_ports("20-10").is_err());
        assert!(parse_ports("a-b").is_err());
    }

    fn pool(ips: &str, ports: (u16, u16), protocols: Vec<Protocol>, strategy: Strategy) -> Pool {
        Pool {
            id: PoolId::generate(),
            node_id: NodeId::generate(),
            ips: ips.into(),
            port_start: ports.0,
            port_end: ports.1,
            protocols,
            strategy,
            created_at: 0,
        }
    }

    #[test]
    fn sequential_picks_in_order_and_respects_protocols_and_the_primary_ip() {
        let pools = vec![
            pool("10.0.0.1", (100, 101), vec![Protocol::Tcp], Strategy::Sequential),
            pool("10.0.0.0/30", (200, 201), both(), Strategy::Sequential),
        ];
        let mut taken = HashSet::new();
        let p = pick_port(&pools, &taken, &[Protocol::Tcp], None).unwrap();
        assert_eq!((p.1.to_string(), p.2), ("10.0.0.1".into(), 100));
        taken.insert(("10.0.0.1".parse().unwrap(), 100));
        let p = pick_port(&pools, &taken, &[Protocol::Udp], None).unwrap();
        assert_eq!((p.1.to_string(), p.2), ("10.0.0.1".into(), 200));
        // With a primary on .2, the next port comes from .2 as well.
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        let p = pick_port(&pools, &taken, &[Protocol::Udp], Some(ip)).unwrap();
        assert_eq!((p.1.to_string(), p.2), ("10.0.0.2".into(), 200));
        for k in [(1, 200), (1, 201), (2, 200), (2, 201)] {
            taken.insert((format!("10.0.0.{}", k.0).parse().unwrap(), k.1));
        }
        assert!(pick_port(&pools, &taken, &[Protocol::Udp], None).is_none());
    }

    #[test]
    fn random_stays_in_the_pool_and_finds_the_last_free_port() {
        let pools = vec![pool("10.0.0.9", (3000, 3099), both(), Strategy::Random)];
        let mut taken = HashSet::new();
        for _ in 0..100 {
            let p = pick_port(&pools, &taken, &[Protocol::Tcp], None).unwrap();
            assert!((3000..=3099).contains(&p.2));
            assert!(taken.insert((p.1, p.2)), "never the same port twice");
        }
        assert!(pick_port(&pools, &taken, &[Protocol::Tcp], None).is_none());
    }
}

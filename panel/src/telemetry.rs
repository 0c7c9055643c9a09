//! What nodes tell the panel besides metrics (ADR 0011): heartbeats and the online/offline
//! state they drive, the events wings reports about servers, and the operator's view of a
//! node's utilisation.
//!
//! Node ids always come from the caller (the node's certificate), never from a request body.
//! A node reporting on a server that exists on another node is refused as a whole with 403
//! and nothing is stored (SECURITY-CHECKLIST 26); a server that no longer exists is refused
//! item by item, because wings may still hold reports about a server the panel deleted.

use std::collections::{BTreeMap, BTreeSet};

use diesel::prelude::*;
use mamba_shared::node_api::{
    EventRefusal, EventsReport, Heartbeat, MAX_EVENT_DATA_BYTES, MAX_EVENT_MESSAGE_CHARS,
    MAX_EVENTS_PER_BATCH, MAX_HEARTBEAT_SERVERS, NodeEvent, NodeResources, RefusedEvent,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::audit::{self, Actor, Event};
use crate::authz::TenantScope;
use crate::db::schema::{metric_samples, node_heartbeats, nodes, server_events, servers};
use crate::db::{DbConnection, DbError};
use crate::error::ApiError;
use crate::ids::{NodeId, ServerId};
use crate::nodes::{self as node_data, CONNECTIVITY_OFFLINE, CONNECTIVITY_ONLINE, Resources};
use crate::pagination::{Page, PageRequest};
use crate::request_meta::RequestMeta;

/// Refuses a heartbeat whose fields are out of bounds (a 400, never stored).
pub fn check_heartbeat(hb: &Heartbeat) -> Result<(), ApiError> {
    if hb.version.is_empty() || hb.version.len() > 64 || hb.version.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "version",
            "must be 1 to 64 printable characters",
        ));
    }
    if hb.servers.len() > MAX_HEARTBEAT_SERVERS {
        return Err(ApiError::invalid(
            "servers",
            format!("at most {MAX_HEARTBEAT_SERVERS} servers"),
        ));
    }
    for s in &hb.servers {
        if s.server_id.len() > 64 || s.state.is_empty() || s.state.len() > 32 {
            return Err(ApiError::invalid("servers", "a server id or state is too long"));
        }
    }
    Ok(())
}

/// Records a heartbeat from `node`: the node is online from now on. A node coming back (or
/// heard from for the first time) writes `node.online` to the audit log, in the same
/// transaction.
pub fn record_heartbeat(
    conn: &mut DbConnection,
    node: &NodeId,
    hb: &Heartbeat,
    meta: &RequestMeta,
    now_ms: i64,
) -> Result<(), ApiError> {
    let report = serde_json::to_string(hb).map_err(|e| ApiError::bad_request(e.to_string()))?;
    crate::db::transaction(conn, |conn| {
        let previous: Option<String> = nodes::table
            .find(node.as_str())
            .select(nodes::connectivity)
            .first(conn)
            .optional()?;
        let Some(previous) = previous else {
            // The certificate outlived its node row (deleted): nothing to record.
            return Err(ApiError::not_found("node"));
        };
        diesel::update(nodes::table.find(node.as_str()))
            .set((
                nodes::last_heartbeat_at.eq(now_ms),
                nodes::connectivity.eq(CONNECTIVITY_ONLINE),
            ))
            .execute(conn)?;
        let updated = diesel::update(node_heartbeats::table.find(node.as_str()))
            .set((
                node_heartbeats::received_at.eq(now_ms),
                node_heartbeats::report.eq(&report),
            ))
            .execute(conn)?;
        if updated == 0 {
            diesel::insert_into(node_heartbeats::table)
                .values((
                    node_heartbeats::node_id.eq(node.as_str()),
                    node_heartbeats::received_at.eq(now_ms),
                    node_heartbeats::report.eq(&report),
                ))
                .execute(conn)?;
        }
        if previous != CONNECTIVITY_ONLINE {
            tracing::info!(node.id = %node, from = %previous, "node is online");
            audit::record(
                conn,
                &Actor::System,
                meta,
                Event {
                    tenant: None,
                    action: "node.online",
                    resource_type: "node",
                    resource_id: Some(node.to_string()),
                    metadata: json!({ "from": previous, "version": hb.version }),
                },
            )?;
        }
        Ok(())
    })
}

/// Marks offline every online node not heard from since `now_ms - offline_after_ms`, each
/// with a `node.offline` audit entry. Nodes never heard from stay `new` (they may be
/// enrolling). Safe to run on several replicas at once: the update re-checks the condition,
/// so each transition is made (and audited) once. Returns the nodes marked offline.
pub fn mark_silent_nodes_offline(
    conn: &mut DbConnection,
    offline_after_ms: i64,
    now_ms: i64,
) -> Result<Vec<NodeId>, DbError> {
    let cutoff = now_ms.saturating_sub(offline_after_ms);
    let silent: Vec<(String, Option<i64>)> = nodes::table
        .filter(nodes::connectivity.eq(CONNECTIVITY_ONLINE))
        .filter(nodes::last_heartbeat_at.lt(cutoff))
        .select((nodes::id, nodes::last_heartbeat_at))
        .load(conn)?;
    let mut marked = Vec::new();
    for (id, last) in silent {
        let changed = crate::db::transaction(conn, |conn| {
            let n = diesel::update(
                nodes::table
                    .find(&id)
                    .filter(nodes::connectivity.eq(CONNECTIVITY_ONLINE))
                    .filter(nodes::last_heartbeat_at.lt(cutoff)),
            )
            .set(nodes::connectivity.eq(CONNECTIVITY_OFFLINE))
            .execute(conn)?;
            if n == 1 {
                audit::record(
                    conn,
                    &Actor::System,
                    &RequestMeta::system(),
                    Event {
                        tenant: None,
                        action: "node.offline",
                        resource_type: "node",
                        resource_id: Some(id.clone()),
                        metadata: json!({ "last_heartbeat_at": last, "offline_after_ms": offline_after_ms }),
                    },
                )?;
            }
            Ok::<_, diesel::result::Error>(n == 1)
        })?;
        if changed {
            tracing::warn!(node.id = %id, last_heartbeat_at = ?last, "node missed its heartbeats; marked offline");
            marked.push(NodeId::from_db(id));
        }
    }
    Ok(marked)
}

/// Runs [`mark_silent_nodes_offline`] every `config.check_interval_secs` inside `panel serve`.
pub fn spawn_heartbeat_monitor(db: crate::db::Db, config: &crate::config::HeartbeatsConfig) {
    let period = std::time::Duration::from_secs(config.check_interval_secs.max(1));
    let after_ms = i64::try_from(config.offline_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let result = db
                .run(move |conn| mark_silent_nodes_offline(conn, after_ms, crate::db::now_ms()))
                .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "heartbeat check failed; retrying next period");
            }
        }
    });
}

/// The 403 of SECURITY-CHECKLIST 26: `Err` when any of `ids` is a server on another node.
pub fn refuse_foreign_servers<'a>(
    conn: &mut DbConnection,
    node: &NodeId,
    ids: impl IntoIterator<Item = &'a str>,
) -> Result<(), ApiError> {
    let ids: BTreeSet<&str> = ids
        .into_iter()
        .filter(|id| ServerId::parse(id).is_some())
        .collect();
    let ids: Vec<&str> = ids.into_iter().collect();
    for chunk in ids.chunks(500) {
        let foreign: i64 = servers::table
            .filter(servers::id.eq_any(chunk))
            .filter(servers::node_id.ne(node.as_str()))
            .count()
            .get_result(conn)?;
        if foreign > 0 {
            tracing::warn!(node.id = %node, "node reported on another node's servers; refused");
            return Err(
                ApiError::forbidden("a server in this request is not on this node")
                    .with_code("not_your_server"),
            );
        }
    }
    Ok(())
}

/// The tenant of each of `ids` that is a server of `node` (server id → tenant id), after
/// the 403 of [`refuse_foreign_servers`]; ids that are no server are simply absent.
pub fn tenants_of_own_servers<'a>(
    conn: &mut DbConnection,
    node: &NodeId,
    ids: impl IntoIterator<Item = &'a str>,
) -> Result<BTreeMap<String, String>, ApiError> {
    let ids: BTreeSet<&str> = ids.into_iter().collect();
    refuse_foreign_servers(conn, node, ids.iter().copied())?;
    let ids: Vec<&str> = ids.into_iter().collect();
    let mut owned = BTreeMap::new();
    for chunk in ids.chunks(500) {
        let rows: Vec<(String, String)> = servers::table
            .filter(servers::id.eq_any(chunk))
            .filter(servers::node_id.eq(node.as_str()))
            .select((servers::id, servers::tenant_id))
            .load(conn)?;
        owned.extend(rows);
    }
    Ok(owned)
}

#[derive(Insertable)]
#[diesel(table_name = server_events)]
struct EventRow {
    id: String,
    node_id: String,
    event_id: String,
    server_id: String,
    tenant_id: String,
    kind: String,
    occurred_at: i64,
    received_at: i64,
    message: String,
    data: String,
    notified_at: Option<i64>,
    notify_attempts: i64,
    notify_next_at: i64,
}

/// Stores a batch of events from `node` (the id its certificate names). Re-delivered events
/// (same node, same event id) are counted as duplicates. With `notify`, each stored event
/// waits for the webhook; without, it is stored as already notified.
pub fn ingest_events(
    conn: &mut DbConnection,
    node: &NodeId,
    events: &[NodeEvent],
    notify: bool,
    now_ms: i64,
) -> Result<EventsReport, ApiError> {
    if events.len() > MAX_EVENTS_PER_BATCH {
        return Err(
            ApiError::bad_request(format!("a batch carries at most {MAX_EVENTS_PER_BATCH} events"))
                .with_code("batch_too_large"),
        );
    }
    let mut report = EventsReport::default();
    let refuse = |report: &mut EventsReport, index: usize, e: &NodeEvent, reason| {
        report.refused.push(RefusedEvent {
            index,
            event_id: e.id.clone(),
            reason,
        });
    };
    let mut candidates = Vec::new();
    for (index, e) in events.iter().enumerate() {
        let valid = uuid::Uuid::parse_str(&e.id).is_ok()
            && e.message.chars().count() <= MAX_EVENT_MESSAGE_CHARS
            && serde_json::to_vec(&e.data).is_ok_and(|d| d.len() <= MAX_EVENT_DATA_BYTES)
            && e.at_ms >= 0;
        if !valid {
            refuse(&mut report, index, e, EventRefusal::Invalid);
            continue;
        }
        match ServerId::parse(&e.server_id) {
            Some(server) => candidates.push((index, server, e)),
            None => refuse(&mut report, index, e, EventRefusal::UnknownServer),
        }
    }
    let (stored, accepted, unknown) = crate::db::transaction(conn, |conn| {
        let owned = tenants_of_own_servers(conn, node, candidates.iter().map(|(_, s, _)| s.as_str()))?;
        let mut unknown = Vec::new();
        let mut rows = Vec::new();
        for (index, server, e) in &candidates {
            let Some(tenant) = owned.get(server.as_str()) else {
                unknown.push(*index);
                continue;
            };
            rows.push(EventRow {
                id: uuid::Uuid::now_v7().to_string(),
                node_id: node.to_string(),
                event_id: e.id.to_ascii_lowercase(),
                server_id: server.to_string(),
                tenant_id: tenant.clone(),
                kind: e.kind.as_str().to_string(),
                occurred_at: e.at_ms,
                received_at: now_ms,
                message: e.message.clone(),
                data: e.data.to_string(),
                notified_at: (!notify).then_some(now_ms),
                notify_attempts: 0,
                notify_next_at: now_ms,
            });
        }
        let stored = crate::db::insert_ignoring_conflicts!(conn, server_events::table, rows);
        Ok::<_, ApiError>((stored, rows.len(), unknown))
    })?;
    for index in unknown {
        if let Some(e) = events.get(index) {
            refuse(&mut report, index, e, EventRefusal::UnknownServer);
        }
    }
    report.refused.sort_by_key(|r| r.index);
    report.stored = stored as u64;
    report.duplicates = (accepted - stored) as u64;
    Ok(report)
}

/// An event as a tenant sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServerEvent {
    pub id: String,
    pub server_id: String,
    /// `crashed`, `restarted`, `crash_loop`, `oom_killed`, `install_finished`,
    /// `install_failed`, `backup_progress`, `backup_completed`, `backup_failed`.
    pub kind: String,
    /// When it happened on the node (ms since the epoch).
    pub occurred_at: i64,
    /// When the panel stored it.
    pub received_at: i64,
    pub message: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

type EventTuple = (String, String, String, i64, i64, String, String);

fn to_view(row: EventTuple) -> ServerEvent {
    let (id, server_id, kind, occurred_at, received_at, message, data) = row;
    ServerEvent {
        id,
        server_id,
        kind,
        occurred_at,
        received_at,
        message,
        data: serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
    }
}

/// A server's events, newest first (by arrival), a page at a time; 404 for a server outside
/// the scope's tenant.
pub fn events_of_server(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    page: &PageRequest,
) -> Result<Page<ServerEvent>, ApiError> {
    let tenant = scope.tenant().as_str();
    let exists: Option<String> = servers::table
        .filter(servers::id.eq(server.as_str()))
        .filter(servers::tenant_id.eq(tenant))
        .select(servers::id)
        .first(conn)
        .optional()?;
    if exists.is_none() {
        return Err(ApiError::not_found("server"));
    }
    let mut query = server_events::table
        .filter(server_events::tenant_id.eq(tenant))
        .filter(server_events::server_id.eq(server.as_str()))
        .order(server_events::id.desc())
        .limit(page.fetch())
        .select((
            server_events::id,
            server_events::server_id,
            server_events::kind,
            server_events::occurred_at,
            server_events::received_at,
            server_events::message,
            server_events::data,
        ))
        .into_boxed();
    if let Some(after) = &page.after {
        // Newest first: the next page holds older (smaller) ids.
        query = query.filter(server_events::id.lt(after.clone()));
    }
    let rows: Vec<EventTuple> = query.load(conn)?;
    Ok(Page::from_rows(
        rows.into_iter().map(to_view).collect(),
        page,
        |e| e.id.as_str(),
    ))
}

/// An event as the webhook receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookEvent {
    pub tenant_id: String,
    pub node_id: String,
    #[serde(flatten)]
    pub event: ServerEvent,
}

/// Up to `limit` events waiting for the webhook whose next attempt is due, oldest first.
pub fn due_notifications(
    conn: &mut DbConnection,
    now_ms: i64,
    limit: i64,
) -> Result<Vec<WebhookEvent>, DbError> {
    let rows: Vec<(String, String, EventTuple)> = server_events::table
        .filter(server_events::notified_at.is_null())
        .filter(server_events::notify_next_at.le(now_ms))
        .order(server_events::id.asc())
        .limit(limit)
        .select((
            server_events::tenant_id,
            server_events::node_id,
            (
                server_events::id,
                server_events::server_id,
                server_events::kind,
                server_events::occurred_at,
                server_events::received_at,
                server_events::message,
                server_events::data,
            ),
        ))
        .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|(tenant_id, node_id, row)| WebhookEvent {
            tenant_id,
            node_id,
            event: to_view(row),
        })
        .collect())
}

/// Records the outcome of one delivery attempt: delivered, or retry at `next_at`.
pub fn mark_notification(
    conn: &mut DbConnection,
    id: &str,
    delivered: bool,
    next_at: i64,
    now_ms: i64,
) -> Result<(), DbError> {
    let target = server_events::table.find(id);
    if delivered {
        diesel::update(target)
            .set((
                server_events::notified_at.eq(Some(now_ms)),
                server_events::notify_attempts.eq(server_events::notify_attempts + 1),
            ))
            .execute(conn)?;
    } else {
        diesel::update(target)
            .set((
                server_events::notify_next_at.eq(next_at),
                server_events::notify_attempts.eq(server_events::notify_attempts + 1),
            ))
            .execute(conn)?;
    }
    Ok(())
}

/// Attempts made so far for event `id` (for the retry backoff).
pub fn notify_attempts(conn: &mut DbConnection, id: &str) -> Result<i64, DbError> {
    Ok(server_events::table
        .find(id)
        .select(server_events::notify_attempts)
        .first(conn)
        .optional()?
        .unwrap_or(0))
}

/// Live figures: the node's own report from its last heartbeat, and the sum of its servers'
/// latest samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LiveUsage {
    /// From the last heartbeat; absent before the first.
    #[schema(value_type = Option<Object>)]
    pub host: Option<NodeResources>,
    pub wings_version: Option<String>,
    pub wings_uptime_s: Option<u64>,
    /// Servers the last heartbeat listed, by state.
    #[schema(value_type = Object)]
    pub server_states: BTreeMap<String, u64>,
    /// Sums over the node's servers' latest samples (each within the last 10 minutes).
    pub cpu_millicores: i64,
    pub memory_mb: i64,
    pub disk_bytes: i64,
    pub sampled_servers: i64,
}

/// `GET /api/v1/admin/nodes/{node}/utilisation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Utilisation {
    pub node_id: String,
    pub connectivity: String,
    pub last_heartbeat_at: Option<i64>,
    /// The node's registered capacity.
    pub capacity: Resources,
    /// Capacity with overallocation.
    pub limits: Resources,
    /// What its servers reserve.
    pub reserved: Resources,
    pub live: LiveUsage,
}

/// How far back a server's latest sample still counts as live.
const LIVE_WINDOW_MS: i64 = 10 * 60 * 1000;

pub fn utilisation(
    conn: &mut DbConnection,
    node: &NodeId,
    now_ms: i64,
) -> Result<Option<Utilisation>, DbError> {
    let Some(detail) = node_data::detail(conn, node)? else {
        return Ok(None);
    };
    let heartbeat: Option<String> = node_heartbeats::table
        .find(node.as_str())
        .select(node_heartbeats::report)
        .first(conn)
        .optional()?;
    let heartbeat: Option<Heartbeat> = heartbeat.and_then(|h| serde_json::from_str(&h).ok());
    let mut live = LiveUsage::default();
    if let Some(hb) = heartbeat {
        for s in &hb.servers {
            *live.server_states.entry(s.state.clone()).or_default() += 1;
        }
        live.host = Some(hb.resources);
        live.wings_version = Some(hb.version);
        live.wings_uptime_s = Some(hb.uptime_s);
    }
    // Each of the node's servers' latest sample in the window.
    let since = now_ms.saturating_sub(LIVE_WINDOW_MS);
    let latest: Vec<(String, Option<i64>)> = metric_samples::table
        .filter(metric_samples::node_id.eq(node.as_str()))
        .filter(metric_samples::sampled_at.ge(since))
        .group_by(metric_samples::server_id)
        .select((
            metric_samples::server_id,
            diesel::dsl::max(metric_samples::sampled_at),
        ))
        .load(conn)?;
    for (server, at) in latest {
        let Some(at) = at else { continue };
        let row: Option<(i64, i64, i64)> = metric_samples::table
            .find((server, at))
            .select((
                metric_samples::cpu_millicores,
                metric_samples::memory_mb,
                metric_samples::disk_bytes,
            ))
            .first(conn)
            .optional()?;
        if let Some((cpu, mem, disk)) = row {
            live.cpu_millicores = live.cpu_millicores.saturating_add(cpu);
            live.memory_mb = live.memory_mb.saturating_add(mem);
            live.disk_bytes = live.disk_bytes.saturating_add(disk);
            live.sampled_servers += 1;
        }
    }
    let node = &detail.node;
    Ok(Some(Utilisation {
        node_id: node.id.to_string(),
        connectivity: node.connectivity.clone(),
        last_heartbeat_at: node.last_heartbeat_at,
        capacity: Resources {
            cpu_percent: node.cpu_percent,
            memory_mb: node.memory_mb,
            disk_mb: node.disk_mb,
        },
        limits: detail.limits,
        reserved: detail.reserved,
        live,
    }))
}

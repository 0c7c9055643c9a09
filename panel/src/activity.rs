//! Servers' activity as their nodes report it: who did what to a server's files, through the
//! file manager, a signed-URL upload or SFTP (`mamba_shared::activity`).
//!
//! Ingest follows events (`telemetry::ingest_events`): the node id is the certificate's; a
//! batch naming another node's server is refused whole with 403; an entry is stored once per
//! (node, wings' entry id), so a re-sent batch stores nothing twice. Entries are kept for
//! `activity.retention_days`, then pruned.
//!
//! Actions taken through the panel (power, commands, reinstall, backups) are not copied
//! here: they are in the tenant's audit log (`audit`), written in the transaction of the
//! change. This table holds what only the node sees (ADR 0013).

use diesel::prelude::*;
use mamba_shared::activity::{
    ActivityEntry, ActivityRefusal, ActivityReport, MAX_ACTIVITY_ACTOR_CHARS, MAX_ACTIVITY_EVENT_CHARS,
    MAX_ACTIVITY_IP_CHARS, MAX_ACTIVITY_PER_BATCH, MAX_ACTIVITY_PROPERTIES_BYTES, RefusedActivity,
};
use serde::{Deserialize, Serialize};

use crate::authz::TenantScope;
use crate::db::schema::{server_activity, servers};
use crate::db::{DbConnection, DbError};
use crate::error::ApiError;
use crate::ids::{NodeId, ServerId};
use crate::pagination::{Page, PageRequest};
use crate::telemetry::tenants_of_own_servers;

/// Longest event prefix a tenant may filter by.
const MAX_PREFIX_CHARS: usize = 64;
/// Rows deleted per statement when pruning, so one prune never holds a long lock.
const PRUNE_CHUNK: i64 = 5_000;

#[derive(Insertable)]
#[diesel(table_name = server_activity)]
struct ActivityRow {
    id: String,
    node_id: String,
    entry_id: String,
    server_id: String,
    tenant_id: String,
    event: String,
    actor: String,
    ip: Option<String>,
    properties: String,
    occurred_at: i64,
    received_at: i64,
}

fn printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.chars().count() <= max && !s.chars().any(char::is_control)
}

fn valid(e: &ActivityEntry) -> bool {
    uuid::Uuid::parse_str(&e.id).is_ok()
        && printable(&e.event, MAX_ACTIVITY_EVENT_CHARS)
        && printable(&e.actor, MAX_ACTIVITY_ACTOR_CHARS)
        && e.ip
            .as_deref()
            .is_none_or(|ip| printable(ip, MAX_ACTIVITY_IP_CHARS))
        && serde_json::to_vec(&e.properties).is_ok_and(|d| d.len() <= MAX_ACTIVITY_PROPERTIES_BYTES)
        && e.at_ms >= 0
}

/// Stores a batch of activity from `node` (the id its certificate names).
pub fn ingest(
    conn: &mut DbConnection,
    node: &NodeId,
    entries: &[ActivityEntry],
    now_ms: i64,
) -> Result<ActivityReport, ApiError> {
    if entries.len() > MAX_ACTIVITY_PER_BATCH {
        return Err(ApiError::bad_request(format!(
            "a batch carries at most {MAX_ACTIVITY_PER_BATCH} entries"
        ))
        .with_code("batch_too_large"));
    }
    let mut report = ActivityReport::default();
    let refuse = |report: &mut ActivityReport, index: usize, e: &ActivityEntry, reason| {
        report.refused.push(RefusedActivity {
            index,
            entry_id: e.id.clone(),
            reason,
        });
    };
    let mut candidates = Vec::new();
    for (index, e) in entries.iter().enumerate() {
        if !valid(e) {
            refuse(&mut report, index, e, ActivityRefusal::Invalid);
            continue;
        }
        match ServerId::parse(&e.server_id) {
            Some(server) => candidates.push((index, server, e)),
            None => refuse(&mut report, index, e, ActivityRefusal::UnknownServer),
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
            rows.push(ActivityRow {
                id: uuid::Uuid::now_v7().to_string(),
                node_id: node.to_string(),
                entry_id: e.id.to_ascii_lowercase(),
                server_id: server.to_string(),
                tenant_id: tenant.clone(),
                event: e.event.clone(),
                actor: e.actor.clone(),
                ip: e.ip.clone(),
                properties: e.properties.to_string(),
                occurred_at: e.at_ms,
                received_at: now_ms,
            });
        }
        let stored = crate::db::insert_ignoring_conflicts!(conn, server_activity::table, rows);
        Ok::<_, ApiError>((stored, rows.len(), unknown))
    })?;
    for index in unknown {
        if let Some(e) = entries.get(index) {
            refuse(&mut report, index, e, ActivityRefusal::UnknownServer);
        }
    }
    report.refused.sort_by_key(|r| r.index);
    report.stored = stored as u64;
    report.duplicates = (accepted - stored) as u64;
    Ok(report)
}

/// An activity entry as a tenant sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Activity {
    pub id: String,
    pub server_id: String,
    /// `sftp.login`, `sftp.write`, `sftp.create`, `sftp.delete`, `sftp.rename`,
    /// `sftp.create-directory`, `file.write`, `file.upload`, `file.delete`, `file.rename`,
    /// `file.copy`, `file.create-directory`, `file.chmod`, `file.compress`,
    /// `file.decompress`, `file.pull`.
    pub event: String,
    /// The user's id, or `panel` for the panel acting without a user.
    pub actor: String,
    pub ip: Option<String>,
    #[schema(value_type = Object)]
    pub properties: serde_json::Value,
    /// When it happened on the node (ms since the epoch).
    pub occurred_at: i64,
    /// When the panel stored it.
    pub received_at: i64,
}

type ActivityTuple = (String, String, String, String, Option<String>, String, i64, i64);

fn to_view(row: ActivityTuple) -> Activity {
    let (id, server_id, event, actor, ip, properties, occurred_at, received_at) = row;
    Activity {
        id,
        server_id,
        event,
        actor,
        ip,
        properties: serde_json::from_str(&properties).unwrap_or(serde_json::Value::Null),
        occurred_at,
        received_at,
    }
}

/// Checks an event-name prefix filter: event names are lowercase letters, digits, `.` and `-`,
/// so the prefix needs no escaping in `LIKE`.
pub fn check_prefix(prefix: &str) -> Result<(), ApiError> {
    let ok = !prefix.is_empty()
        && prefix.chars().count() <= MAX_PREFIX_CHARS
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "event",
            format!("must be 1 to {MAX_PREFIX_CHARS} of a-z, 0-9, '.' and '-'"),
        ))
    }
}

/// A server's activity, newest first (by arrival), a page at a time, optionally only events
/// starting with `prefix` (checked with [`check_prefix`]); 404 for a server outside the
/// scope's tenant.
pub fn of_server(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    prefix: Option<&str>,
    page: &PageRequest,
) -> Result<Page<Activity>, ApiError> {
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
    let mut query = server_activity::table
        .filter(server_activity::tenant_id.eq(tenant))
        .filter(server_activity::server_id.eq(server.as_str()))
        .order(server_activity::id.desc())
        .limit(page.fetch())
        .select((
            server_activity::id,
            server_activity::server_id,
            server_activity::event,
            server_activity::actor,
            server_activity::ip,
            server_activity::properties,
            server_activity::occurred_at,
            server_activity::received_at,
        ))
        .into_boxed();
    if let Some(prefix) = prefix {
        check_prefix(prefix)?;
        query = query.filter(server_activity::event.like(format!("{prefix}%")));
    }
    if let Some(after) = &page.after {
        // Newest first: the next page holds older (smaller) ids.
        query = query.filter(server_activity::id.lt(after.clone()));
    }
    let rows: Vec<ActivityTuple> = query.load(conn)?;
    Ok(Page::from_rows(
        rows.into_iter().map(to_view).collect(),
        page,
        |e| e.id.as_str(),
    ))
}

/// Deletes entries the panel received before `before_ms`, in chunks; returns how many.
pub fn prune(conn: &mut DbConnection, before_ms: i64) -> Result<usize, DbError> {
    let mut total = 0;
    loop {
        let ids: Vec<String> = server_activity::table
            .filter(server_activity::received_at.lt(before_ms))
            .select(server_activity::id)
            .limit(PRUNE_CHUNK)
            .load(conn)?;
        if ids.is_empty() {
            return Ok(total);
        }
        total +=
            diesel::delete(server_activity::table.filter(server_activity::id.eq_any(&ids))).execute(conn)?;
    }
}

/// Prunes entries older than `activity.retention_days` every `activity.prune_interval_secs`
/// (inside `panel serve`).
pub fn spawn_pruning(db: crate::db::Db, config: &crate::config::ActivityConfig) {
    let keep_ms = i64::from(config.retention_days) * 24 * 3600 * 1000;
    let period = std::time::Duration::from_secs(config.prune_interval_secs.max(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let before = crate::db::now_ms() - keep_ms;
            match db.run(move |conn| prune(conn, before)).await {
                Ok(n) if n > 0 => tracing::info!(deleted = n, "pruned old server activity"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "activity prune failed; retrying next period"),
            }
        }
    });
}

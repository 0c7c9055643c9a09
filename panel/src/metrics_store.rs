//! Stored server metrics: the raw samples wings reports, their hourly rollups (what billing
//! meters) and the series a tenant reads. (`metrics` is the panel's own Prometheus
//! endpoint; this module is about the servers.)
//!
//! The flow: the node mTLS listener hands each batch to [`ingest_batch`]; a periodic job
//! calls [`rollup`] with the current hour and then [`prune`]; `GET .../metrics?range=`
//! calls [`series`].
//!
//! **Invariant: a node reports only on its own servers.** [`ingest_batch`] takes the
//! reporting node's id from its certificate, never from the batch, and stores a sample only
//! when the `servers` row says the server is on that node; others are refused one by one.
//!
//! Idempotence: samples are keyed by (server, `sampled_at`) and inserted with `ON CONFLICT
//! DO NOTHING`, so a batch delivered twice stores nothing the second time. That only holds
//! while the first copy is still stored, so samples older than the raw retention (whole
//! hours) are refused, and [`prune`] deletes only whole hours behind that same horizon.
//!
//! Rollup: every stored sample marks its (server, hour) dirty in `metric_dirty_hours`.
//! [`rollup`] recomputes each dirty hour before `up_to` from all of its raw samples and
//! replaces its row, so running it twice changes nothing and a late sample of an hour that
//! was already rolled up is counted at the next run. Raw samples of dirty hours are never
//! pruned, so the recomputation always sees the whole hour. A rollup's first statement
//! writes the `metric_rollup_state` row; an ingest first takes that row `FOR SHARE`
//! (PostgreSQL) or writes it (SQLite, which then holds the write lock), so a rollup sees a
//! batch entirely or not at all.
//!
//! Egress is a per-sample delta computed by wings (which sees a container restart reset
//! the counter), so an hour's egress is the plain sum and is right across counter resets.

use std::collections::{BTreeMap, BTreeSet};

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use mamba_shared::metrics::{IngestReport, MetricSample, RefusedSample, SampleRefusal};
use serde::{Deserialize, Serialize};

use crate::authz::TenantScope;
use crate::db::schema::{metric_dirty_hours, metric_hourly, metric_samples, servers};
use crate::db::{DbConnection, DbError};
use crate::error::ApiError;
use crate::ids::{NodeId, ServerId};

pub const HOUR_MS: i64 = 3_600_000;
/// The most samples one batch may carry (a node with 1,000 servers sends 1,000 every 30 s).
pub const MAX_BATCH: usize = 10_000;
/// How far ahead of the panel's clock a sample may be (clock skew between hosts).
pub const MAX_FUTURE_SKEW_MS: i64 = 5 * 60 * 1000;

/// How long raw samples are kept. The same horizon bounds how late a sample may arrive
/// (and so how long wings may buffer), because duplicates are recognised only while the
/// first copy is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub raw_hours: i64,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention { raw_hours: 24 }
    }
}

impl From<&crate::config::ServerMetricsConfig> for Retention {
    fn from(config: &crate::config::ServerMetricsConfig) -> Retention {
        Retention {
            raw_hours: i64::from(config.raw_retention_hours),
        }
    }
}

impl Retention {
    /// The start of the oldest hour still accepted and kept at `now`.
    pub fn horizon(&self, now_ms: i64) -> i64 {
        hour_of(now_ms.saturating_sub(self.raw_hours.max(1).saturating_mul(HOUR_MS)))
    }
}

/// The start of the hour `ms` falls in.
pub fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS) * HOUR_MS
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = metric_samples)]
struct SampleRow {
    server_id: String,
    sampled_at: i64,
    node_id: String,
    tenant_id: String,
    cpu_millicores: i64,
    memory_mb: i64,
    egress_bytes: i64,
    disk_bytes: i64,
    uptime_s: i64,
    received_at: i64,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = metric_dirty_hours)]
struct DirtyRow {
    server_id: String,
    hour_start: i64,
}

fn value(v: u64) -> Option<i64> {
    i64::try_from(v).ok()
}

/// Stores a batch from `node` (the id its certificate names). Returns what was stored, what
/// was already there and what was refused; a batch larger than [`MAX_BATCH`] is refused as
/// a whole.
pub fn ingest_batch(
    conn: &mut DbConnection,
    node: &NodeId,
    samples: &[MetricSample],
    retention: Retention,
    now_ms: i64,
) -> Result<IngestReport, ApiError> {
    if samples.len() > MAX_BATCH {
        return Err(
            ApiError::bad_request(format!("a batch carries at most {MAX_BATCH} samples"))
                .with_code("batch_too_large"),
        );
    }
    let horizon = retention.horizon(now_ms);
    let mut report = IngestReport::default();
    let refuse = |report: &mut IngestReport, index: usize, sample: &MetricSample, reason| {
        report.refused.push(RefusedSample {
            index,
            server_id: sample.server_id.clone(),
            reason,
        });
    };
    // Checks that need no database.
    let mut candidates = Vec::with_capacity(samples.len());
    for (index, sample) in samples.iter().enumerate() {
        let Some(server) = ServerId::parse(&sample.server_id) else {
            refuse(&mut report, index, sample, SampleRefusal::NotOnNode);
            continue;
        };
        if sample.sampled_at_ms < horizon {
            refuse(&mut report, index, sample, SampleRefusal::TooOld);
            continue;
        }
        if sample.sampled_at_ms > now_ms.saturating_add(MAX_FUTURE_SKEW_MS) {
            refuse(&mut report, index, sample, SampleRefusal::InFuture);
            continue;
        }
        let values = [
            sample.cpu_millicores,
            sample.memory_mb,
            sample.egress_bytes,
            sample.disk_bytes,
            sample.uptime_s,
        ];
        if values.iter().any(|v| value(*v).is_none()) {
            refuse(&mut report, index, sample, SampleRefusal::OutOfRange);
            continue;
        }
        candidates.push((index, server, sample));
    }
    if candidates.is_empty() {
        return Ok(report);
    }
    let ids: Vec<String> = candidates
        .iter()
        .map(|(_, s, _)| s.as_str().to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    let (accepted, stored, owned_refusals) = crate::db::transaction(conn, |conn| {
        take_ingest_gate(conn)?;
        // The servers of this node among those named, with their tenants.
        let mut owned: BTreeMap<String, String> = BTreeMap::new();
        for chunk in ids.chunks(crate::db::INSERT_CHUNK) {
            let rows: Vec<(String, String)> = servers::table
                .filter(servers::node_id.eq(node.as_str()))
                .filter(servers::id.eq_any(chunk))
                .select((servers::id, servers::tenant_id))
                .load(conn)?;
            owned.extend(rows);
        }
        let mut refusals = Vec::new();
        let mut rows = Vec::with_capacity(candidates.len());
        let mut dirty = BTreeSet::new();
        for (index, server, sample) in &candidates {
            let Some(tenant) = owned.get(server.as_str()) else {
                refusals.push(*index);
                continue;
            };
            dirty.insert((server.as_str().to_string(), hour_of(sample.sampled_at_ms)));
            rows.push(SampleRow {
                server_id: server.as_str().to_string(),
                sampled_at: sample.sampled_at_ms,
                node_id: node.as_str().to_string(),
                tenant_id: tenant.clone(),
                cpu_millicores: value(sample.cpu_millicores).unwrap_or(i64::MAX),
                memory_mb: value(sample.memory_mb).unwrap_or(i64::MAX),
                egress_bytes: value(sample.egress_bytes).unwrap_or(i64::MAX),
                disk_bytes: value(sample.disk_bytes).unwrap_or(i64::MAX),
                uptime_s: value(sample.uptime_s).unwrap_or(i64::MAX),
                received_at: now_ms,
            });
        }
        // Key order, so two transactions inserting the same keys (a batch and its
        // re-delivery) wait for each other instead of deadlocking.
        rows.sort_by(|a, b| (&a.server_id, a.sampled_at).cmp(&(&b.server_id, b.sampled_at)));
        let stored = crate::db::insert_ignoring_conflicts!(conn, metric_samples::table, rows);
        if stored > 0 {
            let dirty: Vec<DirtyRow> = dirty
                .into_iter()
                .map(|(server_id, hour_start)| DirtyRow {
                    server_id,
                    hour_start,
                })
                .collect();
            crate::db::insert_ignoring_conflicts!(conn, metric_dirty_hours::table, dirty);
        }
        Ok::<_, diesel::result::Error>((rows.len(), stored, refusals))
    })?;
    for index in owned_refusals {
        if let Some(sample) = samples.get(index) {
            refuse(&mut report, index, sample, SampleRefusal::NotOnNode);
        }
    }
    report.refused.sort_by_key(|r| r.index);
    report.stored = stored as u64;
    report.duplicates = (accepted - stored) as u64;
    Ok(report)
}

/// The ingest side of the rollup gate (see the module doc).
fn take_ingest_gate(conn: &mut DbConnection) -> QueryResult<()> {
    match conn {
        DbConnection::Postgres(c) => {
            diesel::sql_query("SELECT id FROM metric_rollup_state WHERE id = 1 FOR SHARE").execute(c)?
        }
        DbConnection::Sqlite(c) => {
            diesel::sql_query("UPDATE metric_rollup_state SET ingests = ingests + 1 WHERE id = 1")
                .execute(c)?
        }
    };
    Ok(())
}

/// Runs `sql` with `$n` placeholders on either backend (SQLite spells them `?n`).
fn execute(conn: &mut DbConnection, sql: &str, binds: &[i64]) -> QueryResult<usize> {
    match conn {
        DbConnection::Postgres(c) => {
            let mut q = diesel::sql_query(sql).into_boxed();
            for b in binds {
                q = q.bind::<BigInt, _>(*b);
            }
            q.execute(c)
        }
        DbConnection::Sqlite(c) => {
            let sql = sql.replace('$', "?");
            let mut q = diesel::sql_query(sql).into_boxed();
            for b in binds {
                q = q.bind::<BigInt, _>(*b);
            }
            q.execute(c)
        }
    }
}

/// What a rollup did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RollupReport {
    /// (server, hour) rows computed or recomputed.
    pub hours: usize,
}

/// Computes the hourly row of every (server, hour) before `up_to_ms` (rounded down to an
/// hour) that gained samples since it was last computed. Idempotent.
pub fn rollup(conn: &mut DbConnection, up_to_ms: i64, now_ms: i64) -> Result<RollupReport, DbError> {
    let up_to = hour_of(up_to_ms);
    let hours = crate::db::transaction(conn, |conn| {
        // First statement: the gate (the row lock, or SQLite's write lock).
        execute(
            conn,
            "UPDATE metric_rollup_state SET runs = runs + 1, rolled_up_to = $1, last_run_at = $2 \
             WHERE id = 1",
            &[up_to, now_ms],
        )?;
        execute(
            conn,
            "DELETE FROM metric_hourly WHERE EXISTS (SELECT 1 FROM metric_dirty_hours d \
             WHERE d.server_id = metric_hourly.server_id AND d.hour_start = metric_hourly.hour_start \
             AND d.hour_start < $1)",
            &[up_to],
        )?;
        let hours = execute(
            conn,
            "INSERT INTO metric_hourly (server_id, hour_start, tenant_id, node_id, sample_count, \
             cpu_millicores_avg, cpu_millicores_max, memory_mb_avg, memory_mb_max, disk_bytes_max, \
             disk_bytes_last, egress_bytes, uptime_s_last, first_sampled_at, last_sampled_at, computed_at) \
             SELECT s.server_id, d.hour_start, MAX(s.tenant_id), MAX(s.node_id), COUNT(*), \
             CAST(ROUND(AVG(s.cpu_millicores)) AS BIGINT), MAX(s.cpu_millicores), \
             CAST(ROUND(AVG(s.memory_mb)) AS BIGINT), MAX(s.memory_mb), MAX(s.disk_bytes), 0, \
             CAST(SUM(s.egress_bytes) AS BIGINT), 0, MIN(s.sampled_at), MAX(s.sampled_at), $2 \
             FROM metric_dirty_hours d JOIN metric_samples s ON s.server_id = d.server_id \
             AND s.sampled_at >= d.hour_start AND s.sampled_at < d.hour_start + $3 \
             WHERE d.hour_start < $1 GROUP BY s.server_id, d.hour_start",
            &[up_to, now_ms, HOUR_MS],
        )?;
        // The values of each hour's last sample.
        execute(
            conn,
            "UPDATE metric_hourly SET \
             disk_bytes_last = (SELECT l.disk_bytes FROM metric_samples l \
               WHERE l.server_id = metric_hourly.server_id AND l.sampled_at = metric_hourly.last_sampled_at), \
             uptime_s_last = (SELECT l.uptime_s FROM metric_samples l \
               WHERE l.server_id = metric_hourly.server_id AND l.sampled_at = metric_hourly.last_sampled_at), \
             node_id = (SELECT l.node_id FROM metric_samples l \
               WHERE l.server_id = metric_hourly.server_id AND l.sampled_at = metric_hourly.last_sampled_at) \
             WHERE EXISTS (SELECT 1 FROM metric_dirty_hours d WHERE d.server_id = metric_hourly.server_id \
             AND d.hour_start = metric_hourly.hour_start AND d.hour_start < $1)",
            &[up_to],
        )?;
        execute(
            conn,
            "DELETE FROM metric_dirty_hours WHERE hour_start < $1",
            &[up_to],
        )?;
        Ok::<_, diesel::result::Error>(hours)
    })?;
    Ok(RollupReport { hours })
}

/// Deletes raw samples of whole hours behind the retention horizon whose hourly row is up to
/// date. Samples not rolled up yet are kept, however old. Returns how many were deleted.
pub fn prune(conn: &mut DbConnection, retention: Retention, now_ms: i64) -> Result<usize, DbError> {
    let horizon = retention.horizon(now_ms);
    Ok(execute(
        conn,
        "DELETE FROM metric_samples WHERE sampled_at < $1 AND NOT EXISTS (SELECT 1 FROM metric_dirty_hours d \
         WHERE d.server_id = metric_samples.server_id \
         AND d.hour_start <= metric_samples.sampled_at AND metric_samples.sampled_at < d.hour_start + $2)",
        &[horizon, HOUR_MS],
    )?)
}

/// One run of the periodic job: roll up every finished hour, then prune. Several panel
/// replicas may run it at once: the rollup gate makes them take turns, and a second run
/// finds nothing left to do.
pub async fn maintain(db: &crate::db::Db, retention: Retention) -> Result<(RollupReport, usize), DbError> {
    db.run(move |conn| {
        let now = crate::db::now_ms();
        let report = rollup(conn, now, now)?;
        let pruned = prune(conn, retention, now)?;
        Ok((report, pruned))
    })
    .await
}

/// Runs [`maintain`] every `config.rollup_interval_secs`, logging failures (the next run
/// catches up: dirty hours stay dirty until a rollup succeeds).
pub fn spawn_maintenance(db: crate::db::Db, config: &crate::config::ServerMetricsConfig) {
    let retention = Retention::from(config);
    let period = std::time::Duration::from_secs(config.rollup_interval_secs.max(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match maintain(&db, retention).await {
                Ok((report, pruned)) => {
                    tracing::debug!(hours = report.hours, pruned, "server metrics rolled up")
                }
                Err(e) => tracing::warn!(error = %e, "server metrics rollup failed; retrying next period"),
            }
        }
    });
}

/// The ranges `GET .../metrics?range=` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Range {
    #[serde(rename = "1h")]
    Hour,
    #[serde(rename = "24h")]
    Day,
    #[serde(rename = "7d")]
    Week,
    #[serde(rename = "30d")]
    Month,
}

impl Range {
    pub fn parse(s: &str) -> Option<Range> {
        match s {
            "1h" => Some(Range::Hour),
            "24h" => Some(Range::Day),
            "7d" => Some(Range::Week),
            "30d" => Some(Range::Month),
            _ => None,
        }
    }

    pub fn millis(self) -> i64 {
        HOUR_MS
            * match self {
                Range::Hour => 1,
                Range::Day => 24,
                Range::Week => 24 * 7,
                Range::Month => 24 * 30,
            }
    }
}

/// Raw samples (1h) or hourly rows (longer ranges).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    Raw,
    Hourly,
}

/// One point of a series: a sample, or an hour's rollup (averages, the last disk value and
/// the egress total).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Point {
    /// The sample's time, or the hour's start (ms since the epoch).
    pub at_ms: i64,
    pub cpu_millicores: i64,
    pub memory_mb: i64,
    pub disk_bytes: i64,
    pub egress_bytes: i64,
    pub uptime_s: i64,
    /// 1 for a raw sample.
    pub samples: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Series {
    pub range: Range,
    pub resolution: Resolution,
    pub points: Vec<Point>,
}

/// A server's series over `range` ending at `now_ms`, oldest first; 404 for a server
/// outside the scope's tenant. Hours not rolled up yet appear only in the 1h range.
pub fn series(
    conn: &mut DbConnection,
    scope: &TenantScope,
    server: &ServerId,
    range: Range,
    now_ms: i64,
) -> Result<Series, ApiError> {
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
    let from = now_ms.saturating_sub(range.millis());
    let points = if range == Range::Hour {
        metric_samples::table
            .filter(metric_samples::server_id.eq(server.as_str()))
            .filter(metric_samples::tenant_id.eq(tenant))
            .filter(metric_samples::sampled_at.ge(from))
            .filter(metric_samples::sampled_at.le(now_ms))
            .order(metric_samples::sampled_at.asc())
            .select((
                metric_samples::sampled_at,
                metric_samples::cpu_millicores,
                metric_samples::memory_mb,
                metric_samples::disk_bytes,
                metric_samples::egress_bytes,
                metric_samples::uptime_s,
            ))
            .load::<(i64, i64, i64, i64, i64, i64)>(conn)?
            .into_iter()
            .map(|(at_ms, cpu, mem, disk, egress, up)| Point {
                at_ms,
                cpu_millicores: cpu,
                memory_mb: mem,
                disk_bytes: disk,
                egress_bytes: egress,
                uptime_s: up,
                samples: 1,
            })
            .collect()
    } else {
        metric_hourly::table
            .filter(metric_hourly::server_id.eq(server.as_str()))
            .filter(metric_hourly::tenant_id.eq(tenant))
            .filter(metric_hourly::hour_start.ge(hour_of(from)))
            .filter(metric_hourly::hour_start.le(now_ms))
            .order(metric_hourly::hour_start.asc())
            .select((
                metric_hourly::hour_start,
                metric_hourly::cpu_millicores_avg,
                metric_hourly::memory_mb_avg,
                metric_hourly::disk_bytes_last,
                metric_hourly::egress_bytes,
                metric_hourly::uptime_s_last,
                metric_hourly::sample_count,
            ))
            .load::<(i64, i64, i64, i64, i64, i64, i64)>(conn)?
            .into_iter()
            .map(|(at_ms, cpu, mem, disk, egress, up, n)| Point {
                at_ms,
                cpu_millicores: cpu,
                memory_mb: mem,
                disk_bytes: disk,
                egress_bytes: egress,
                uptime_s: up,
                samples: n,
            })
            .collect()
    };
    Ok(Series {
        range,
        resolution: if range == Range::Hour {
            Resolution::Raw
        } else {
            Resolution::Hourly
        },
        points,
    })
}

/// An hourly row as billing will read it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Serialize)]
#[diesel(table_name = metric_hourly)]
pub struct HourlyRow {
    pub server_id: String,
    pub hour_start: i64,
    pub tenant_id: String,
    pub node_id: String,
    pub sample_count: i64,
    pub cpu_millicores_avg: i64,
    pub cpu_millicores_max: i64,
    pub memory_mb_avg: i64,
    pub memory_mb_max: i64,
    pub disk_bytes_max: i64,
    pub disk_bytes_last: i64,
    pub egress_bytes: i64,
    pub uptime_s_last: i64,
    pub first_sampled_at: i64,
    pub last_sampled_at: i64,
    pub computed_at: i64,
}

/// Every hourly row of `tenant`'s servers with `from_ms <= hour_start < to_ms`, by server and
/// hour (for billing and operators; no scope, so never reachable from a tenant route).
pub fn hourly_rows_of_tenant(
    conn: &mut DbConnection,
    tenant: &crate::ids::TenantId,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<HourlyRow>, DbError> {
    Ok(metric_hourly::table
        .filter(metric_hourly::tenant_id.eq(tenant.as_str()))
        .filter(metric_hourly::hour_start.ge(from_ms))
        .filter(metric_hourly::hour_start.lt(to_ms))
        .order((metric_hourly::server_id.asc(), metric_hourly::hour_start.asc()))
        .select(HourlyRow::as_select())
        .load(conn)?)
}

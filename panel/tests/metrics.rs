//! Stored server metrics on both backends: a batch delivered twice stores nothing twice; a
//! node's samples for servers that are not on it are refused; the rollup is idempotent and
//! recounts hours that get late samples; pruning keeps what is not rolled up and re-delivery
//! after pruning cannot double count; series ranges; tenant isolation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::TestDb;
use diesel::prelude::*;
use mamba_panel::audit::Actor;
use mamba_panel::authz::{self, TenantScope};
use mamba_panel::db::Db;
use mamba_panel::db::schema::{metric_dirty_hours, metric_samples, servers};
use mamba_panel::ids::{NodeId, ServerId};
use mamba_panel::metrics_store::{
    self, HOUR_MS, HourlyRow, MAX_BATCH, Range, Resolution, Retention, hour_of,
};
use mamba_panel::nodes::{self, NewNode};
use mamba_panel::request_meta::RequestMeta;
use mamba_shared::metrics::{IngestReport, MetricSample, SampleRefusal};

both_backends!(
    a_batch_delivered_twice_stores_nothing_twice,
    samples_for_servers_of_other_nodes_are_refused,
    rollup_is_idempotent_and_recounts_hours_with_late_samples,
    prune_keeps_what_is_not_rolled_up_and_redelivery_cannot_double_count,
    series_ranges_use_raw_samples_for_an_hour_and_hourly_rows_beyond,
    series_are_tenant_scoped,
    rollups_during_parallel_ingests_lose_no_sample,
    the_periodic_job_rolls_up_finished_hours,
);

/// A fixed hour (2026-11-01T00:00Z) so expectations do not depend on the clock.
const H0: i64 = 1_793_491_200_000;

fn meta() -> RequestMeta {
    RequestMeta::system()
}

fn scope(db: &Db, slug: &str) -> TenantScope {
    let mut conn = db.get_blocking().unwrap();
    let user = mamba_panel::users::create(
        &mut conn,
        mamba_panel::users::NewUser {
            email: format!("{slug}@example.com"),
            display_name: slug.into(),
            password_hash: "not-a-real-hash".into(),
            email_verified: true,
            is_super_admin: false,
        },
        &Actor::System,
        &meta(),
    )
    .unwrap();
    let tenant = mamba_panel::tenants::create(&mut conn, &user.id, slug, slug, &meta()).unwrap();
    let row = mamba_panel::users::find(&mut conn, &user.id).unwrap().unwrap();
    authz::authorize(
        &mut conn,
        &row,
        Actor::User(user.id.clone()),
        tenant.id.as_str(),
        None,
    )
    .unwrap()
}

fn node(db: &Db, name: &str) -> NodeId {
    let mut conn = db.get_blocking().unwrap();
    let new = nodes::check_new(&NewNode {
        name: name.into(),
        fqdn: format!("{name}.example.com"),
        location: "test".into(),
        cpu_percent: 100_000,
        memory_mb: 1 << 20,
        disk_mb: 1 << 30,
        overallocation_percent: 0,
        is_public: true,
        maintenance: false,
        api_port: 8080,
        public_url: None,
        sftp_port: 2022,
    })
    .unwrap();
    nodes::create(&mut conn, &new, &Actor::System, &meta())
        .unwrap()
        .id
}

/// A server row of the scope's tenant on `node` (placement is tested elsewhere).
fn server(db: &Db, scope: &TenantScope, node: &NodeId) -> ServerId {
    let id = ServerId::generate();
    let mut conn = db.get_blocking().unwrap();
    diesel::insert_into(servers::table)
        .values((
            servers::id.eq(id.as_str()),
            servers::tenant_id.eq(scope.tenant().as_str()),
            servers::node_id.eq(node.as_str()),
            servers::name.eq("server"),
            servers::blueprint.eq("freeciv"),
            servers::memory_mb.eq(1024_i64),
            servers::cpu_percent.eq(100_i64),
            servers::disk_mb.eq(1024_i64),
            servers::variables.eq("{}"),
            servers::status.eq("running"),
            servers::created_at.eq(H0),
            servers::updated_at.eq(H0),
        ))
        .execute(&mut *conn)
        .unwrap();
    id
}

fn sample(server: &ServerId, at: i64, cpu: u64, memory: u64, egress: u64, disk: u64) -> MetricSample {
    MetricSample {
        server_id: server.to_string(),
        sampled_at_ms: at,
        cpu_millicores: cpu,
        memory_mb: memory,
        egress_bytes: egress,
        disk_bytes: disk,
        uptime_s: u64::try_from((at - H0) / 1000).unwrap_or(0),
    }
}

fn ingest(db: &Db, node: &NodeId, samples: &[MetricSample], retention: Retention, now: i64) -> IngestReport {
    let mut conn = db.get_blocking().unwrap();
    metrics_store::ingest_batch(&mut conn, node, samples, retention, now).unwrap()
}

fn raw_count(db: &Db) -> i64 {
    let mut conn = db.get_blocking().unwrap();
    metric_samples::table.count().get_result(&mut *conn).unwrap()
}

fn hourly(db: &Db, scope: &TenantScope) -> Vec<HourlyRow> {
    let mut conn = db.get_blocking().unwrap();
    metrics_store::hourly_rows_of_tenant(&mut conn, scope.tenant(), 0, i64::MAX).unwrap()
}

fn rollup(db: &Db, up_to: i64, now: i64) -> usize {
    let mut conn = db.get_blocking().unwrap();
    metrics_store::rollup(&mut conn, up_to, now).unwrap().hours
}

/// Every 30 s of `hour`, `n` samples of one server.
fn every_30s(server: &ServerId, hour: i64, n: i64) -> Vec<MetricSample> {
    (0..n)
        .map(|i| sample(server, hour + i * 30_000, 100, 512, 1000, 1 << 20))
        .collect()
}

async fn a_batch_delivered_twice_stores_nothing_twice(t: TestDb) {
    let scope = scope(&t.db, "dupes");
    let n = node(&t.db, "dupes-node");
    let (s1, s2) = (server(&t.db, &scope, &n), server(&t.db, &scope, &n));
    let now = H0 + HOUR_MS;
    let mut batch = every_30s(&s1, H0, 60);
    batch.extend(every_30s(&s2, H0, 60));

    let first = ingest(&t.db, &n, &batch, Retention::default(), now);
    assert_eq!((first.stored, first.duplicates, first.refused.len()), (120, 0, 0));
    let again = ingest(&t.db, &n, &batch, Retention::default(), now);
    assert_eq!((again.stored, again.duplicates, again.refused.len()), (0, 120, 0));
    assert_eq!(raw_count(&t.db), 120);

    // Half old, half new, and one sample twice within the batch.
    let mut overlap = every_30s(&s1, H0 + 30 * 30_000, 60);
    overlap.push(overlap[59].clone());
    let r = ingest(&t.db, &n, &overlap, Retention::default(), now + HOUR_MS);
    assert_eq!((r.stored, r.duplicates), (30, 31));
    assert_eq!(raw_count(&t.db), 150);

    // The rollup sees each sample once.
    rollup(&t.db, now + HOUR_MS, now + HOUR_MS);
    let rows = hourly(&t.db, &scope);
    let total: i64 = rows.iter().map(|r| r.sample_count).sum();
    assert_eq!(total, 150);
    assert_eq!(rows.iter().map(|r| r.egress_bytes).sum::<i64>(), 150 * 1000);
}

async fn samples_for_servers_of_other_nodes_are_refused(t: TestDb) {
    let scope = scope(&t.db, "foreign");
    let (a, b) = (node(&t.db, "node-a"), node(&t.db, "node-b"));
    let on_a = server(&t.db, &scope, &a);
    let on_b = server(&t.db, &scope, &b);
    let now = H0 + 10 * 60_000;
    let unknown = ServerId::generate();
    let batch = vec![
        sample(&on_a, H0, 1, 1, 1, 1),
        sample(&on_b, H0, 2, 2, 2, 2),
        sample(&unknown, H0, 3, 3, 3, 3),
        MetricSample {
            server_id: "../not-an-id".into(),
            ..sample(&on_a, H0 + 1, 4, 4, 4, 4)
        },
        sample(&on_a, H0 - 30 * HOUR_MS, 5, 5, 5, 5),
        sample(&on_a, now + HOUR_MS, 6, 6, 6, 6),
        sample(&on_a, H0 + 2, u64::MAX, 7, 7, 7),
        sample(&on_a, H0 + 3, 8, 8, 8, 8),
    ];
    let r = ingest(&t.db, &a, &batch, Retention::default(), now);
    assert_eq!(r.stored, 2);
    let refused: Vec<(usize, SampleRefusal)> = r.refused.iter().map(|f| (f.index, f.reason)).collect();
    assert_eq!(
        refused,
        vec![
            (1, SampleRefusal::NotOnNode),
            (2, SampleRefusal::NotOnNode),
            (3, SampleRefusal::NotOnNode),
            (4, SampleRefusal::TooOld),
            (5, SampleRefusal::InFuture),
            (6, SampleRefusal::OutOfRange),
        ]
    );
    assert_eq!(r.refused[0].server_id, on_b.to_string());
    {
        let mut conn = t.db.get_blocking().unwrap();
        let stored: Vec<String> = metric_samples::table
            .select(metric_samples::server_id)
            .load(&mut *conn)
            .unwrap();
        assert!(stored.iter().all(|s| s == on_a.as_str()), "{stored:?}");
    }
    // Node B may report on its own server, and not on A's.
    let r = ingest(
        &t.db,
        &b,
        &[sample(&on_b, H0, 2, 2, 2, 2), sample(&on_a, H0 + 4, 9, 9, 9, 9)],
        Retention::default(),
        now,
    );
    assert_eq!(r.stored, 1);
    assert_eq!(r.refused.len(), 1);
    assert_eq!(r.refused[0].reason, SampleRefusal::NotOnNode);
    assert_eq!(raw_count(&t.db), 3);

    // A batch over the limit is refused whole.
    let huge = every_30s(&on_a, H0, i64::try_from(MAX_BATCH).unwrap() + 1);
    let mut conn = t.db.get_blocking().unwrap();
    let err = metrics_store::ingest_batch(&mut conn, &a, &huge, Retention::default(), now).unwrap_err();
    assert_eq!(err.status.as_u16(), 400);
    drop(conn);
    assert_eq!(raw_count(&t.db), 3);
}

async fn rollup_is_idempotent_and_recounts_hours_with_late_samples(t: TestDb) {
    let scope = scope(&t.db, "rollup");
    let n = node(&t.db, "rollup-node");
    let s = server(&t.db, &scope, &n);
    let now = H0 + 2 * HOUR_MS + 10 * 60_000;
    // Hour 0: four samples; egress deltas around a container restart (wings sends deltas).
    let batch = vec![
        sample(&s, H0 + 60_000, 100, 10, 5, 1000),
        sample(&s, H0 + 120_000, 200, 20, 6, 3000),
        sample(&s, H0 + 180_000, 300, 30, 7, 2000),
        sample(&s, H0 + 600_000, 400, 41, 8, 1500),
        // Hour 1: two samples; hour 2 is the current hour.
        sample(&s, H0 + HOUR_MS, 1000, 100, 50, 10),
        sample(&s, H0 + HOUR_MS + 60_000, 3000, 300, 70, 20),
        sample(&s, H0 + 2 * HOUR_MS, 1, 1, 1, 1),
    ];
    assert_eq!(ingest(&t.db, &n, &batch, Retention::default(), now).stored, 7);
    assert_eq!(rollup(&t.db, now, now), 2);
    let rows = hourly(&t.db, &scope);
    assert_eq!(rows.len(), 2, "the current hour is not rolled up");
    let h0 = &rows[0];
    assert_eq!(h0.hour_start, H0);
    assert_eq!(h0.server_id, s.as_str());
    assert_eq!(h0.tenant_id, scope.tenant().as_str());
    assert_eq!(h0.node_id, n.as_str());
    assert_eq!(h0.sample_count, 4);
    assert_eq!(h0.cpu_millicores_avg, 250);
    assert_eq!(h0.cpu_millicores_max, 400);
    assert_eq!(h0.memory_mb_avg, 25, "25.25 rounds to 25");
    assert_eq!(h0.memory_mb_max, 41);
    assert_eq!(h0.disk_bytes_max, 3000);
    assert_eq!(h0.disk_bytes_last, 1500);
    assert_eq!(h0.egress_bytes, 26);
    assert_eq!(h0.uptime_s_last, 600);
    assert_eq!(
        (h0.first_sampled_at, h0.last_sampled_at),
        (H0 + 60_000, H0 + 600_000)
    );
    let h1 = &rows[1];
    assert_eq!(h1.hour_start, H0 + HOUR_MS);
    assert_eq!(
        (h1.sample_count, h1.cpu_millicores_avg, h1.egress_bytes),
        (2, 2000, 120)
    );

    // Running again (later) changes nothing, not even computed_at.
    assert_eq!(rollup(&t.db, now, now + 1000), 0);
    assert_eq!(hourly(&t.db, &scope), rows);
    // Re-delivery of a rolled-up batch changes nothing either.
    assert_eq!(ingest(&t.db, &n, &batch, Retention::default(), now).duplicates, 7);
    assert_eq!(rollup(&t.db, now, now + 2000), 0);
    assert_eq!(hourly(&t.db, &scope), rows);

    // A late sample of hour 0 (wings was cut off for a while) is counted at the next run;
    // hour 1 keeps its row.
    let late = sample(&s, H0 + 1_800_000, 800, 50, 100, 9000);
    assert_eq!(ingest(&t.db, &n, &[late], Retention::default(), now).stored, 1);
    assert_eq!(rollup(&t.db, now, now + 3000), 1);
    let after = hourly(&t.db, &scope);
    let h0 = &after[0];
    assert_eq!(h0.sample_count, 5);
    assert_eq!(h0.cpu_millicores_avg, 360);
    assert_eq!(h0.egress_bytes, 126);
    assert_eq!(h0.disk_bytes_max, 9000);
    assert_eq!(h0.disk_bytes_last, 9000, "the late sample is now the hour's last");
    assert_eq!(h0.computed_at, now + 3000);
    assert_eq!(after[1], rows[1]);

    // The current hour is rolled up once it is over.
    assert_eq!(rollup(&t.db, H0 + 3 * HOUR_MS, now + 4000), 1);
    assert_eq!(hourly(&t.db, &scope).len(), 3);
}

async fn prune_keeps_what_is_not_rolled_up_and_redelivery_cannot_double_count(t: TestDb) {
    let scope = scope(&t.db, "prune");
    let n = node(&t.db, "prune-node");
    let s = server(&t.db, &scope, &n);
    let retention = Retention { raw_hours: 2 };
    let mut batch = every_30s(&s, H0, 10);
    batch.extend(every_30s(&s, H0 + HOUR_MS, 10));
    batch.extend(every_30s(&s, H0 + 2 * HOUR_MS, 10));
    assert_eq!(
        ingest(&t.db, &n, &batch, retention, H0 + 2 * HOUR_MS + 600_000).stored,
        30
    );
    // Only hour 0 is rolled up.
    assert_eq!(rollup(&t.db, H0 + HOUR_MS, H0 + 3 * HOUR_MS), 1);

    // Hours 0-2 are all behind the horizon (hour 3) at 5:10; only hour 0's samples go.
    let later = H0 + 5 * HOUR_MS + 600_000;
    let mut conn = t.db.get_blocking().unwrap();
    assert_eq!(metrics_store::prune(&mut conn, retention, later).unwrap(), 10);
    drop(conn);
    assert_eq!(raw_count(&t.db), 20);
    {
        let mut conn = t.db.get_blocking().unwrap();
        let dirty: i64 = metric_dirty_hours::table.count().get_result(&mut *conn).unwrap();
        assert_eq!(dirty, 2);
    }

    // Rolled up late, they are complete, and then pruned.
    assert_eq!(rollup(&t.db, later, later), 2);
    let rows = hourly(&t.db, &scope);
    assert_eq!(
        rows.iter().map(|r| r.sample_count).collect::<Vec<_>>(),
        vec![10, 10, 10]
    );
    let mut conn = t.db.get_blocking().unwrap();
    assert_eq!(metrics_store::prune(&mut conn, retention, later).unwrap(), 20);
    drop(conn);
    assert_eq!(raw_count(&t.db), 0);

    // The batch delivered again now cannot be told from new samples, so it is refused.
    let r = ingest(&t.db, &n, &batch, retention, later);
    assert_eq!(r.stored, 0);
    assert!(r.refused.iter().all(|f| f.reason == SampleRefusal::TooOld));
    assert_eq!(r.refused.len(), 30);
    assert_eq!(rollup(&t.db, later, later + 1), 0);
    assert_eq!(hourly(&t.db, &scope), rows);
}

async fn series_ranges_use_raw_samples_for_an_hour_and_hourly_rows_beyond(t: TestDb) {
    let scope = scope(&t.db, "series");
    let n = node(&t.db, "series-node");
    let s = server(&t.db, &scope, &n);
    let now = H0 + 40 * 24 * HOUR_MS + 20 * 60_000;
    let retention = Retention { raw_hours: 41 * 24 };
    // One sample 10 minutes into every hour of 40 days, and every 30 s of the last hour
    // (offset by a second, so the two never share a time).
    let start = H0;
    let mut samples: Vec<MetricSample> = (0..40 * 24)
        .map(|h| sample(&s, start + h * HOUR_MS + 600_000, 10, 10, 10, 10))
        .collect();
    samples.extend((1..=120).map(|i| sample(&s, now - i * 30_000 + 1000, 20, 20, 20, 20)));
    for chunk in samples.chunks(500) {
        let r = ingest(&t.db, &n, chunk, retention, now);
        assert!(r.refused.is_empty(), "{r:?}");
    }
    rollup(&t.db, now, now);

    let mut conn = t.db.get_blocking().unwrap();
    let mut get = |range| metrics_store::series(&mut conn, &scope, &s, range, now).unwrap();
    let hour = get(Range::Hour);
    assert_eq!(hour.resolution, Resolution::Raw);
    // The 120 samples of the last hour; the hourly one of the previous hour (at its 0:10)
    // is more than an hour before now (0:20 of this hour).
    assert_eq!(hour.points.len(), 120);
    assert!(hour.points.windows(2).all(|w| w[0].at_ms < w[1].at_ms));
    assert!(
        hour.points
            .iter()
            .all(|p| p.at_ms >= now - HOUR_MS && p.samples == 1)
    );

    for (range, hours) in [(Range::Day, 24), (Range::Week, 7 * 24), (Range::Month, 30 * 24)] {
        let series = get(range);
        assert_eq!(series.resolution, Resolution::Hourly);
        // Hours fully rolled up from the range's start; the current hour is not yet.
        assert_eq!(series.points.len(), hours, "{range:?}");
        assert_eq!(series.points[0].at_ms, hour_of(now - range.millis()));
        assert!(
            series
                .points
                .windows(2)
                .all(|w| w[1].at_ms - w[0].at_ms == HOUR_MS)
        );
    }
    // The last full hour holds its hourly sample plus the 30 s ones after 23:20 of it.
    let day = get(Range::Day);
    let last = day.points.last().unwrap();
    assert_eq!(last.at_ms, hour_of(now) - HOUR_MS);
    assert_eq!(last.samples, 1 + 80);
    assert_eq!(last.egress_bytes, 10 + 80 * 20);

    assert_eq!(Range::parse("24h"), Some(Range::Day));
    assert_eq!(Range::parse("2h"), None);
}

async fn series_are_tenant_scoped(t: TestDb) {
    let (alpha, beta) = (scope(&t.db, "alpha"), scope(&t.db, "beta"));
    let n = node(&t.db, "shared-node");
    let (sa, sb) = (server(&t.db, &alpha, &n), server(&t.db, &beta, &n));
    let now = H0 + HOUR_MS + 60_000;
    let mut batch = every_30s(&sa, H0, 120);
    batch.extend(every_30s(&sb, H0 + 30 * 60_000, 10));
    ingest(&t.db, &n, &batch, Retention::default(), now);
    rollup(&t.db, now, now);

    let mut conn = t.db.get_blocking().unwrap();
    for range in [Range::Hour, Range::Day] {
        let err = metrics_store::series(&mut conn, &beta, &sa, range, now).unwrap_err();
        assert_eq!(err.status.as_u16(), 404);
        let err = metrics_store::series(&mut conn, &alpha, &sb, range, now).unwrap_err();
        assert_eq!(err.status.as_u16(), 404);
        let err = metrics_store::series(&mut conn, &alpha, &ServerId::generate(), range, now).unwrap_err();
        assert_eq!(err.status.as_u16(), 404);
    }
    let own = metrics_store::series(&mut conn, &beta, &sb, Range::Day, now).unwrap();
    assert_eq!(own.points.len(), 1);
    assert_eq!(own.points[0].samples, 10);
    drop(conn);
    let rows = hourly(&t.db, &beta);
    assert_eq!(rows.len(), 1);
    assert!(rows.iter().all(|r| r.server_id == sb.as_str()));
    assert_eq!(hourly(&t.db, &alpha).len(), 1);
    assert_eq!(hourly(&t.db, &alpha)[0].sample_count, 120);
}

/// Eight nodes deliver (and re-deliver) batches in parallel while rollups run; afterwards
/// the hourly rows hold every stored sample exactly once. (A rollup that read a batch only
/// in part, or dropped a dirty mark it had not seen the samples of, would lose some.)
async fn rollups_during_parallel_ingests_lose_no_sample(t: TestDb) {
    let scope = scope(&t.db, "parallel");
    let now = H0 + 3 * HOUR_MS;
    let db = Db::connect(&t.url, 16, std::time::Duration::from_secs(60)).unwrap();
    let mut tasks = Vec::new();
    for n in 0..8 {
        let node = node(&t.db, &format!("parallel-{n}"));
        let servers: Vec<ServerId> = (0..5).map(|_| server(&t.db, &scope, &node)).collect();
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            // 30 batches per node, spread over hours 0 to 2, each sent twice.
            for round in 0..30_i64 {
                let at = H0 + round * 6 * 60_000;
                let batch: Vec<MetricSample> =
                    servers.iter().map(|s| sample(s, at, 100, 100, 7, 100)).collect();
                for _ in 0..2 {
                    let (node, batch) = (node.clone(), batch.clone());
                    db.run(move |conn| {
                        metrics_store::ingest_batch(conn, &node, &batch, Retention::default(), now)
                    })
                    .await
                    .unwrap();
                }
            }
        }));
    }
    let rollups = {
        let db = db.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                db.run(move |conn| metrics_store::rollup(conn, now, now + i))
                    .await
                    .unwrap();
            }
        })
    };
    for task in tasks {
        task.await.unwrap();
    }
    rollups.await.unwrap();
    rollup(&t.db, now, now + 100);
    let rows = hourly(&t.db, &scope);
    assert_eq!(raw_count(&t.db), 8 * 5 * 30);
    assert_eq!(rows.iter().map(|r| r.sample_count).sum::<i64>(), 8 * 5 * 30);
    assert_eq!(rows.iter().map(|r| r.egress_bytes).sum::<i64>(), 8 * 5 * 30 * 7);
    assert_eq!(rows.len(), 40 * 3);
}

/// `maintain` (what `panel serve` runs periodically) on the real clock: finished hours are
/// rolled up, the current one is not, and nothing inside the retention is pruned.
async fn the_periodic_job_rolls_up_finished_hours(t: TestDb) {
    let scope = scope(&t.db, "periodic");
    let n = node(&t.db, "periodic-node");
    let s = server(&t.db, &scope, &n);
    let now = mamba_panel::db::now_ms();
    let previous = hour_of(now) - HOUR_MS;
    let batch = vec![
        sample(&s, previous + 1000, 100, 100, 100, 100),
        sample(&s, previous + 2000, 300, 300, 300, 300),
        sample(&s, now - 1, 1, 1, 1, 1),
    ];
    assert_eq!(ingest(&t.db, &n, &batch, Retention::default(), now).stored, 3);
    let (report, pruned) = metrics_store::maintain(&t.db, Retention::default())
        .await
        .unwrap();
    // (Should the hour turn between the ingest and the job, the current hour is finished too.)
    let turned = usize::from(hour_of(mamba_panel::db::now_ms()) != hour_of(now));
    assert_eq!((report.hours, pruned), (1 + turned, 0));
    let rows = hourly(&t.db, &scope);
    assert_eq!(rows.len(), 1 + turned);
    assert_eq!(
        (rows[0].hour_start, rows[0].sample_count, rows[0].egress_bytes),
        (previous, 2, 400)
    );
    assert_eq!(raw_count(&t.db), 3);
}

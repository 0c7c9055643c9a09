//! Metrics ingest: `--nodes` simulated nodes, each owning `--servers` servers, send one
//! batch per round (one sample of each of their servers, as wings does every 30 s) into
//! `metrics_store::ingest_batch`, all nodes at once, for `--rounds` rounds. Next to it, in
//! the same process and on the same pool, the baseline: the same rows and batches as plain
//! multi-row INSERTs into a table without keys (no ownership check, no idempotence, no
//! rollup bookkeeping). Then one rollup of everything ingested.
//!
//! CPU is measured from `/proc`: this process's utime+stime (with SQLite that includes the
//! database work), and on PostgreSQL also the server backends serving this database (their
//! process titles name it). Prints one JSON line.
//!
//! Used by `scripts/bench/metrics_ingest.sh`; see docs/BENCHMARKS.md.

#![allow(clippy::print_stdout, clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use mamba_panel::audit::Actor;
use mamba_panel::db::schema::servers;
use mamba_panel::db::{Db, DbConnection, DbError};
use mamba_panel::ids::{NodeId, ServerId};
use mamba_panel::metrics_store::{self, HOUR_MS, Retention};
use mamba_panel::nodes::{self, NewNode};
use mamba_panel::request_meta::RequestMeta;
use mamba_shared::metrics::MetricSample;

diesel::table! {
    metric_samples_baseline (server_id, sampled_at) {
        server_id -> Text,
        sampled_at -> BigInt,
        node_id -> Text,
        tenant_id -> Text,
        cpu_millicores -> BigInt,
        memory_mb -> BigInt,
        egress_bytes -> BigInt,
        disk_bytes -> BigInt,
        uptime_s -> BigInt,
        received_at -> BigInt,
    }
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = metric_samples_baseline)]
struct BaselineRow {
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

struct Args {
    url: String,
    label: String,
    nodes: usize,
    servers: usize,
    rounds: usize,
}

fn args() -> Args {
    let mut a = Args {
        url: String::new(),
        label: "db".into(),
        nodes: 50,
        servers: 1000,
        rounds: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().expect("every flag takes a value");
        match flag.as_str() {
            "--url" => a.url = value,
            "--label" => a.label = value,
            "--nodes" => a.nodes = value.parse().expect("--nodes is a number"),
            "--servers" => a.servers = value.parse().expect("--servers is a number"),
            "--rounds" => a.rounds = value.parse().expect("--rounds is a number"),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(!a.url.is_empty(), "--url is required");
    a
}

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

fn cpu_ticks(stat: &str) -> Option<u64> {
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn own_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    cpu_ticks(&stat).unwrap() as f64 / TICKS
}

/// CPU ticks of every PostgreSQL backend serving `database`, by pid.
fn backend_ticks(database: &str) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.starts_with("postgres: ") || !cmdline.split(' ').any(|w| w == database) {
            continue;
        }
        if let Some(t) = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| cpu_ticks(&s))
        {
            out.insert(pid, t);
        }
    }
    out
}

fn backend_cpu_s(before: &BTreeMap<u32, u64>, after: &BTreeMap<u32, u64>) -> f64 {
    after
        .iter()
        .map(|(pid, t)| t.saturating_sub(*before.get(pid).unwrap_or(&0)))
        .sum::<u64>() as f64
        / TICKS
}

struct Fleet {
    tenant: String,
    /// Each node with its servers.
    nodes: Vec<(NodeId, Vec<ServerId>)>,
}

fn setup(db: &Db, args: &Args) -> Fleet {
    let meta = RequestMeta::system();
    let mut conn = db.get_blocking().unwrap();
    let user = mamba_panel::users::create(
        &mut conn,
        mamba_panel::users::NewUser {
            email: "bench@example.com".into(),
            display_name: "bench".into(),
            password_hash: "not-a-real-hash".into(),
            email_verified: true,
            is_super_admin: false,
        },
        &Actor::System,
        &meta,
    )
    .unwrap();
    let tenant = mamba_panel::tenants::create(&mut conn, &user.id, "bench", "bench", &meta)
        .unwrap()
        .id
        .to_string();
    let mut fleet = Fleet {
        tenant: tenant.clone(),
        nodes: Vec::new(),
    };
    for n in 0..args.nodes {
        let new = nodes::check_new(&NewNode {
            name: format!("node-{n}"),
            fqdn: format!("node-{n}.example.com"),
            location: "bench".into(),
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
        let node = nodes::create(&mut conn, &new, &Actor::System, &meta).unwrap().id;
        let ids: Vec<ServerId> = (0..args.servers).map(|_| ServerId::generate()).collect();
        conn.transaction(|conn| {
            for id in &ids {
                diesel::insert_into(servers::table)
                    .values((
                        servers::id.eq(id.as_str()),
                        servers::tenant_id.eq(&tenant),
                        servers::node_id.eq(node.as_str()),
                        servers::name.eq("server"),
                        servers::blueprint.eq("freeciv"),
                        servers::memory_mb.eq(1024_i64),
                        servers::cpu_percent.eq(100_i64),
                        servers::disk_mb.eq(1024_i64),
                        servers::variables.eq("{}"),
                        servers::status.eq("running"),
                        servers::created_at.eq(0_i64),
                        servers::updated_at.eq(0_i64),
                    ))
                    .execute(conn)?;
            }
            Ok::<_, diesel::result::Error>(())
        })
        .unwrap();
        fleet.nodes.push((node, ids));
    }
    diesel::sql_query(
        "CREATE TABLE metric_samples_baseline (server_id TEXT NOT NULL, sampled_at BIGINT NOT NULL, \
         node_id TEXT NOT NULL, tenant_id TEXT NOT NULL, cpu_millicores BIGINT NOT NULL, \
         memory_mb BIGINT NOT NULL, egress_bytes BIGINT NOT NULL, disk_bytes BIGINT NOT NULL, \
         uptime_s BIGINT NOT NULL, received_at BIGINT NOT NULL)",
    )
    .execute(&mut *conn)
    .unwrap();
    fleet
}

fn batch(servers: &[ServerId], at: i64, round: usize) -> Vec<MetricSample> {
    servers
        .iter()
        .enumerate()
        .map(|(i, s)| MetricSample {
            server_id: s.to_string(),
            sampled_at_ms: at,
            cpu_millicores: (i * 7 + round) as u64 % 4000,
            memory_mb: 512 + (i % 1024) as u64,
            egress_bytes: 10_000 + i as u64,
            disk_bytes: 1 << 30,
            uptime_s: 30 * round as u64,
        })
        .collect()
}

/// Inserts like the data layer would, minus everything that makes it safe.
fn baseline_insert(conn: &mut DbConnection, node: &NodeId, tenant: &str, samples: &[MetricSample]) -> usize {
    let rows: Vec<BaselineRow> = samples
        .iter()
        .map(|s| BaselineRow {
            server_id: s.server_id.clone(),
            sampled_at: s.sampled_at_ms,
            node_id: node.to_string(),
            tenant_id: tenant.to_string(),
            cpu_millicores: s.cpu_millicores as i64,
            memory_mb: s.memory_mb as i64,
            egress_bytes: s.egress_bytes as i64,
            disk_bytes: s.disk_bytes as i64,
            uptime_s: s.uptime_s as i64,
            received_at: 0,
        })
        .collect();
    conn.transaction(|conn| {
        let mut n = 0;
        for chunk in rows.chunks(500) {
            let insert = diesel::insert_into(metric_samples_baseline::table).values(chunk);
            n += match conn {
                DbConnection::Postgres(c) => insert.execute(c)?,
                DbConnection::Sqlite(c) => insert.execute(c)?,
            };
        }
        Ok::<_, diesel::result::Error>(n)
    })
    .unwrap()
}

struct Run {
    samples: usize,
    seconds: f64,
    own_cpu_s: f64,
    db_cpu_s: f64,
}

/// Every node sends `rounds` batches, all nodes at once; `work` stores one batch.
async fn run<F>(db: &Db, fleet: &Fleet, rounds: usize, base: i64, database: &str, work: F) -> Run
where
    F: Fn(&mut DbConnection, &NodeId, &str, &[MetricSample]) -> usize + Send + Sync + Clone + 'static,
{
    let (cpu0, db0) = (own_cpu_s(), backend_ticks(database));
    let start = Instant::now();
    let tasks: Vec<_> = fleet
        .nodes
        .iter()
        .map(|(node, servers)| {
            let (db, work, node, servers, tenant) = (
                db.clone(),
                work.clone(),
                node.clone(),
                servers.clone(),
                fleet.tenant.clone(),
            );
            tokio::spawn(async move {
                let mut stored = 0;
                for round in 0..rounds {
                    let samples = batch(&servers, base + round as i64 * 30_000, round);
                    let (work, node, tenant) = (work.clone(), node.clone(), tenant.clone());
                    stored += db
                        .run(move |conn| Ok::<_, DbError>(work(conn, &node, &tenant, &samples)))
                        .await
                        .unwrap();
                }
                stored
            })
        })
        .collect();
    let mut samples = 0;
    for t in tasks {
        samples += t.await.unwrap();
    }
    let seconds = start.elapsed().as_secs_f64();
    Run {
        samples,
        seconds,
        own_cpu_s: own_cpu_s() - cpu0,
        db_cpu_s: backend_cpu_s(&db0, &backend_ticks(database)),
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round4(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    let db = Db::connect(&args.url, 16, Duration::from_secs(120)).unwrap();
    db.migrate().await.unwrap();
    let database = args.url.rsplit('/').next().unwrap_or_default().to_string();
    let fleet = setup(&db, &args);
    let now = mamba_panel::db::now_ms();
    // Samples of the previous hour, 30 s apart, so one rollup covers them all.
    assert!(
        args.rounds <= 120,
        "at most 120 rounds (one hour of 30 s samples)"
    );
    let base = metrics_store::hour_of(now) - HOUR_MS;

    let store = run(
        &db,
        &fleet,
        args.rounds,
        base,
        &database,
        |conn, node, _tenant, samples| {
            let report = metrics_store::ingest_batch(
                conn,
                node,
                samples,
                Retention::default(),
                mamba_panel::db::now_ms(),
            )
            .unwrap();
            assert!(report.refused.is_empty(), "{:?}", report.refused.first());
            usize::try_from(report.stored).unwrap()
        },
    )
    .await;
    // The same batches again: a re-delivery stores nothing.
    let again = run(&db, &fleet, 1, base, &database, |conn, node, _tenant, samples| {
        let report = metrics_store::ingest_batch(
            conn,
            node,
            samples,
            Retention::default(),
            mamba_panel::db::now_ms(),
        )
        .unwrap();
        usize::try_from(report.stored).unwrap()
    })
    .await;
    assert_eq!(again.samples, 0, "a re-delivered batch stored samples");
    let baseline = run(&db, &fleet, args.rounds, base, &database, baseline_insert).await;
    assert_eq!(store.samples, baseline.samples);

    let (cpu0, db0) = (own_cpu_s(), backend_ticks(&database));
    let start = Instant::now();
    let rollup = db
        .run(move |conn| metrics_store::rollup(conn, base + HOUR_MS, now))
        .await
        .unwrap();
    let rollup_s = start.elapsed().as_secs_f64();
    let rollup_cpu = own_cpu_s() - cpu0 + backend_cpu_s(&db0, &backend_ticks(&database));

    let per_s = |r: &Run| r.samples as f64 / r.seconds;
    // CPU seconds per second at 1,000 samples/s = cores.
    let cores_per_1000 = |cpu: f64, r: &Run| cpu / r.samples as f64 * 1000.0;
    let out = serde_json::json!({
        "backend": args.label,
        "samples": store.samples,
        "store_per_s": per_s(&store).round(),
        "baseline_per_s": per_s(&baseline).round(),
        "ratio": round2(per_s(&store) / per_s(&baseline)),
        "store_panel_cores_per_1000": round4(cores_per_1000(store.own_cpu_s, &store)),
        "store_db_cores_per_1000": round4(cores_per_1000(store.db_cpu_s, &store)),
        "baseline_panel_cores_per_1000": round4(cores_per_1000(baseline.own_cpu_s, &baseline)),
        "baseline_db_cores_per_1000": round4(cores_per_1000(baseline.db_cpu_s, &baseline)),
        "cpu_ratio": round2(
            (store.own_cpu_s + store.db_cpu_s) / (baseline.own_cpu_s + baseline.db_cpu_s).max(1e-9)
        ),
        "redelivery_s": round2(again.seconds),
        "rollup_hours": rollup.hours,
        "rollup_s": round2(rollup_s),
        "rollup_cpu_s": round2(rollup_cpu),
    });
    println!("{out}");
}

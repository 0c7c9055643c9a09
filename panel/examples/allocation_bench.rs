//! Allocation under contention: `--clients` concurrent clients each place `--ops` servers
//! (capacity check + one port + the server row + its audit entry, in one transaction that
//! takes the node's lock), next to the baseline of the same shape: the same clients each
//! running `--ops` transactions of one plain single-row INSERT. Both run on the same pool,
//! in the same process, one after the other. Prints one JSON line.
//!
//! Used by `scripts/bench/allocation.sh`; see docs/BENCHMARKS.md.

#![allow(clippy::print_stdout, clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use diesel::RunQueryDsl;
use mamba_panel::allocation::{self, NewPools, Request, Strategy};
use mamba_panel::audit::Actor;
use mamba_panel::db::{Db, DbError};
use mamba_panel::nodes::{self, NewNode, Resources};
use mamba_panel::request_meta::RequestMeta;
use mamba_shared::blueprint::Protocol;

struct Args {
    url: String,
    label: String,
    clients: usize,
    ops: usize,
}

fn args() -> Args {
    let mut a = Args {
        url: String::new(),
        label: "db".into(),
        clients: 50,
        ops: 40,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().expect("every flag takes a value");
        match flag.as_str() {
            "--url" => a.url = value,
            "--label" => a.label = value,
            "--clients" => a.clients = value.parse().expect("--clients is a number"),
            "--ops" => a.ops = value.parse().expect("--ops is a number"),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(!a.url.is_empty(), "--url is required");
    a
}

/// Runs `clients` tasks of `ops` calls each; returns (successes, seconds).
async fn contend<F>(db: &Db, clients: usize, ops: usize, work: F) -> (usize, f64)
where
    F: Fn(&mut mamba_panel::db::DbConnection) -> bool + Send + Sync + Clone + 'static,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (db, work) = (db.clone(), work.clone());
            tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..ops {
                    let work = work.clone();
                    if db.run(move |conn| Ok::<_, DbError>(work(conn))).await.unwrap() {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    (ok, start.elapsed().as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let db = Db::connect(&a.url, 64, Duration::from_secs(120)).unwrap();
    db.migrate().await.unwrap();
    let meta = RequestMeta::system();

    // A tenant and its owner's scope, a node with room for everything, and ports enough.
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
    let tenant = mamba_panel::tenants::create(&mut conn, &user.id, "bench", "bench", &meta).unwrap();
    let row = mamba_panel::users::find(&mut conn, &user.id).unwrap().unwrap();
    let scope = mamba_panel::authz::authorize(
        &mut conn,
        &row,
        Actor::User(user.id.clone()),
        tenant.id.as_str(),
        None,
    )
    .unwrap();
    let make_node = |conn: &mut mamba_panel::db::DbConnection, name: &str| {
        let new = nodes::check_new(&NewNode {
            name: name.into(),
            fqdn: format!("{name}.example.com"),
            location: "bench".into(),
            cpu_percent: 400_000,
            memory_mb: 1 << 29,
            disk_mb: 1 << 39,
            overallocation_percent: 0,
            is_public: true,
            maintenance: false,
            api_port: 8080,
            public_url: None,
            sftp_port: 2022,
        })
        .unwrap();
        let node = nodes::create(conn, &new, &Actor::System, &meta).unwrap();
        allocation::add_pools(
            conn,
            &node.id,
            &NewPools {
                ips: vec!["0.0.0.0".into()],
                ports: vec!["10000-60000".into()],
                protocols: vec![Protocol::Tcp, Protocol::Udp],
                strategy: Strategy::Sequential,
            },
            &Actor::System,
            &meta,
        )
        .unwrap();
        // Placement takes only nodes that have been heard from.
        let heartbeat = mamba_shared::node_api::Heartbeat {
            version: "bench".into(),
            uptime_s: 1,
            resources: Default::default(),
            servers: Vec::new(),
        };
        mamba_panel::telemetry::record_heartbeat(
            conn,
            &node.id,
            &heartbeat,
            &meta,
            mamba_panel::db::now_ms(),
        )
        .unwrap();
        node.id
    };
    let node = make_node(&mut conn, "bench-node");
    let spread: Vec<_> = (0..10)
        .map(|i| make_node(&mut conn, &format!("bench-spread-{i}")))
        .collect();
    diesel::sql_query("CREATE TABLE bench_rows (id TEXT PRIMARY KEY NOT NULL, n BIGINT NOT NULL)")
        .execute(&mut *conn)
        .unwrap();
    drop(conn);

    // Baseline: one plain INSERT per transaction.
    let (base_ok, base_secs) = contend(&db, a.clients, a.ops, |conn| {
        use diesel::Connection;
        conn.transaction(|conn| {
            diesel::sql_query(format!(
                "INSERT INTO bench_rows (id, n) VALUES ('{}', 1)",
                uuid::Uuid::now_v7()
            ))
            .execute(conn)
        })
        .is_ok()
    })
    .await;

    // Reservations: a server with one port on the node, as placement makes it.
    let request = Request {
        name: "bench".into(),
        blueprint: "bench".into(),
        resources: Resources {
            cpu_percent: 1,
            memory_mb: 1,
            disk_mb: 1,
        },
        variables: BTreeMap::new(),
        ports: vec![vec![Protocol::Tcp]],
        node: Some(node.clone()),
        location: None,
    };
    let (res_ok, res_secs) = {
        let (scope, request) = (scope.clone(), request.clone());
        contend(&db, a.clients, a.ops, move |conn| {
            allocation::place(conn, &scope, &request, &RequestMeta::system()).is_ok()
        })
        .await
    };

    // The same load spread over ten nodes: reservations on different nodes do not wait
    // for each other's lock.
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (spread_ok, spread_secs) = contend(&db, a.clients, a.ops, move |conn| {
        let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut request = request.clone();
        request.node = Some(spread[i % spread.len()].clone());
        allocation::place(conn, &scope, &request, &RequestMeta::system()).is_ok()
    })
    .await;

    // The invariant still holds after the storm.
    let mut conn = db.get_blocking().unwrap();
    let distinct: HashSet<_> = {
        use diesel::prelude::*;
        use mamba_panel::db::schema::allocations;
        let rows: Vec<(String, String, i32)> = allocations::table
            .select((allocations::node_id, allocations::ip, allocations::port))
            .load(&mut *conn)
            .unwrap();
        assert_eq!(rows.len(), res_ok + spread_ok);
        rows.into_iter().collect()
    };
    assert_eq!(distinct.len(), res_ok + spread_ok, "a port was given out twice");

    #[allow(clippy::cast_precision_loss)]
    let (res_rate, base_rate, spread_rate) = (
        res_ok as f64 / res_secs,
        base_ok as f64 / base_secs,
        spread_ok as f64 / spread_secs,
    );
    println!(
        "{}",
        serde_json::json!({
            "backend": a.label,
            "clients": a.clients,
            "ops_per_client": a.ops,
            "reservations": res_ok,
            "reservations_per_s": (res_rate * 10.0).round() / 10.0,
            "baseline_inserts": base_ok,
            "baseline_per_s": (base_rate * 10.0).round() / 10.0,
            "ratio": (res_rate / base_rate * 1000.0).round() / 1000.0,
            "spread_reservations": spread_ok,
            "spread_per_s": (spread_rate * 10.0).round() / 10.0,
            "spread_ratio": (spread_rate / base_rate * 1000.0).round() / 1000.0,
            "distinct_ports": distinct.len(),
        })
    );
}

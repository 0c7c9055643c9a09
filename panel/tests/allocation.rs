//! Allocation on both backends: 200 parallel reservations never share a port and succeed
//! exactly as often as ports or capacity allow (SECURITY-CHECKLIST 22); pools refuse
//! overlaps; deleting a server and decommissioning a node release what they held; the leak
//! scanner reports and releases allocations whose server is gone; variables are checked
//! against the blueprint's rules at create and at every startup change.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::TestDb;
use diesel::prelude::*;
use mamba_panel::allocation::{self, NewPools, Request, ReserveError, Strategy};
use mamba_panel::audit::Actor;
use mamba_panel::authz::{self, TenantScope};
use mamba_panel::db::Db;
use mamba_panel::ids::{NodeId, ServerId};
use mamba_panel::nodes::{self, NewNode, Resources};
use mamba_panel::request_meta::RequestMeta;
use mamba_panel::servers::{self, NewServer};
use mamba_shared::blueprint::{Blueprint, Protocol};

both_backends!(
    parallel_reservations_never_share_a_port_and_stop_at_the_last_port,
    parallel_reservations_stop_exactly_at_capacity_with_overallocation,
    pools_refuse_overlaps_and_in_use_deletes,
    release_on_delete_and_decommission_and_the_leak_scanner,
    variables_are_checked_at_create_and_at_every_startup_change,
);

fn meta() -> RequestMeta {
    RequestMeta::system()
}

/// A tenant with an owner, and the owner's scope in it.
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

fn node(db: &Db, name: &str, memory_mb: i64, overallocation_percent: i64) -> NodeId {
    let mut conn = db.get_blocking().unwrap();
    let new = nodes::check_new(&NewNode {
        name: name.into(),
        fqdn: format!("{name}.example.com"),
        location: "test".into(),
        cpu_percent: 100_000,
        memory_mb,
        disk_mb: 1 << 30,
        overallocation_percent,
        is_public: true,
        maintenance: false,
        api_port: 8080,
        public_url: None,
        sftp_port: 2022,
    })
    .unwrap();
    let node = nodes::create(&mut conn, &new, &Actor::System, &meta())
        .unwrap()
        .id;
    common::heartbeat(db, &node);
    node
}

fn pools(db: &Db, node: &NodeId, ips: &[&str], ports: &[&str], strategy: Strategy) {
    let mut conn = db.get_blocking().unwrap();
    allocation::add_pools(
        &mut conn,
        node,
        &NewPools {
            ips: ips.iter().map(ToString::to_string).collect(),
            ports: ports.iter().map(ToString::to_string).collect(),
            protocols: vec![Protocol::Tcp, Protocol::Udp],
            strategy,
        },
        &Actor::System,
        &meta(),
    )
    .unwrap();
}

fn request(memory_mb: i64, ports: usize) -> Request {
    Request {
        name: "server".into(),
        blueprint: "freeciv".into(),
        resources: Resources {
            cpu_percent: 1,
            memory_mb,
            disk_mb: 1,
        },
        variables: BTreeMap::new(),
        ports: vec![vec![Protocol::Tcp]; ports],
        node: None,
        location: None,
    }
}

/// A pool wide enough for real contention (SQLite caps its own at 4 connections).
fn wide_pool(t: &TestDb) -> Db {
    Db::connect(&t.url, 32, Duration::from_secs(60)).unwrap()
}

/// Runs `n` reservations at once; returns the successes and the failures.
async fn reserve_in_parallel(
    db: &Db,
    scope: &TenantScope,
    request: &Request,
    n: usize,
) -> (Vec<allocation::Placed>, Vec<ReserveError>) {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (db, scope, request) = (db.clone(), scope.clone(), request.clone());
            tokio::spawn(async move {
                db.run(move |conn| {
                    Ok::<_, mamba_panel::db::DbError>(allocation::place(conn, &scope, &request, &meta()))
                })
                .await
                .unwrap()
            })
        })
        .collect();
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for task in tasks {
        match task.await.unwrap() {
            Ok(placed) => ok.push(placed),
            Err(e) => failed.push(e),
        }
    }
    (ok, failed)
}

fn all_ports(db: &Db) -> Vec<(String, String, i32)> {
    use mamba_panel::db::schema::allocations;
    let mut conn = db.get_blocking().unwrap();
    allocations::table
        .select((allocations::node_id, allocations::ip, allocations::port))
        .load(&mut *conn)
        .unwrap()
}

fn server_count(db: &Db) -> i64 {
    use mamba_panel::db::schema::servers;
    let mut conn = db.get_blocking().unwrap();
    servers::table.count().get_result(&mut *conn).unwrap()
}

async fn parallel_reservations_never_share_a_port_and_stop_at_the_last_port(t: TestDb) {
    let scope = scope(&t.db, "ports");
    // Two addresses times 60 ports: 120 ports; memory is plentiful.
    let n = node(&t.db, "ports-node", 1 << 20, 0);
    pools(&t.db, &n, &["192.0.2.0/30"], &["30000-30059"], Strategy::Random);
    let db = wide_pool(&t);
    let (ok, failed) = reserve_in_parallel(&db, &scope, &request(64, 1), 200).await;
    assert_eq!(ok.len(), 120, "every port is used once");
    assert_eq!(failed.len(), 80);
    assert!(
        failed.iter().all(|e| matches!(e, ReserveError::NoNodeFits)),
        "{failed:?}"
    );
    let ports = all_ports(&t.db);
    assert_eq!(ports.len(), 120);
    let distinct: HashSet<_> = ports.iter().collect();
    assert_eq!(distinct.len(), 120, "no port twice");
    assert!(
        ports
            .iter()
            .all(|(_, ip, p)| (ip == "192.0.2.1" || ip == "192.0.2.2") && (30000..=30059).contains(p))
    );
    assert_eq!(server_count(&t.db), 120);

    // Servers needing two ports get them on one address.
    let n2 = node(&t.db, "pairs-node", 1 << 20, 0);
    pools(
        &t.db,
        &n2,
        &["198.51.100.7", "198.51.100.8"],
        &["40000-40003"],
        Strategy::Sequential,
    );
    let mut two = request(64, 2);
    two.node = Some(n2.clone());
    let mut conn = t.db.get_blocking().unwrap();
    for _ in 0..4 {
        let placed = allocation::place(&mut conn, &scope, &two, &meta()).unwrap();
        assert_eq!(placed.allocations.len(), 2);
        assert!(placed.allocations[0].is_primary && !placed.allocations[1].is_primary);
        assert_eq!(placed.allocations[0].ip, placed.allocations[1].ip);
    }
    let err = allocation::place(&mut conn, &scope, &two, &meta()).unwrap_err();
    assert!(matches!(err, ReserveError::NoPorts(_)), "{err:?}");
}

async fn parallel_reservations_stop_exactly_at_capacity_with_overallocation(t: TestDb) {
    let scope = scope(&t.db, "capacity");
    // 1000 MB with 50% overallocation: 1500 MB, so 150 servers of 10 MB; 200 ports.
    let n = node(&t.db, "capacity-node", 1000, 50);
    pools(&t.db, &n, &["0.0.0.0"], &["41000-41199"], Strategy::Sequential);
    let db = wide_pool(&t);
    let (ok, failed) = reserve_in_parallel(&db, &scope, &request(10, 1), 200).await;
    assert_eq!(ok.len(), 150);
    assert_eq!(failed.len(), 50);
    let ports = all_ports(&t.db);
    let distinct: HashSet<_> = ports.iter().collect();
    assert_eq!((ports.len(), distinct.len()), (150, 150));
    // Sequential: the lowest ports, in order.
    let mut used: Vec<i32> = ports.iter().map(|p| p.2).collect();
    used.sort_unstable();
    assert_eq!(used, (41000..41150).collect::<Vec<_>>());
    let mut conn = t.db.get_blocking().unwrap();
    let detail = nodes::detail(&mut conn, &n).unwrap().unwrap();
    assert_eq!(detail.reserved.memory_mb, 1500);
    assert_eq!(detail.limits.memory_mb, 1500);
    // Aimed at the full node, the refusal says why.
    let mut aimed = request(10, 1);
    aimed.node = Some(n.clone());
    let err = allocation::place(&mut conn, &scope, &aimed, &meta()).unwrap_err();
    assert!(matches!(err, ReserveError::NoCapacity("memory")), "{err:?}");
    // Maintenance takes the node out of placement.
    nodes::update(
        &mut conn,
        &n,
        &nodes::NodeChanges {
            maintenance: Some(true),
            memory_mb: Some(1 << 20),
            ..Default::default()
        },
        &Actor::System,
        &meta(),
    )
    .unwrap();
    let err = allocation::place(&mut conn, &scope, &aimed, &meta()).unwrap_err();
    assert!(matches!(err, ReserveError::NodeUnavailable), "{err:?}");
}

async fn pools_refuse_overlaps_and_in_use_deletes(t: TestDb) {
    let n = node(&t.db, "pool-node", 4096, 0);
    let mut conn = t.db.get_blocking().unwrap();
    let add = |conn: &mut mamba_panel::db::DbConnection, ips: &[&str], ports: &[&str]| {
        allocation::add_pools(
            conn,
            &n,
            &NewPools {
                ips: ips.iter().map(ToString::to_string).collect(),
                ports: ports.iter().map(ToString::to_string).collect(),
                protocols: vec![Protocol::Udp],
                strategy: Strategy::Sequential,
            },
            &Actor::System,
            &meta(),
        )
    };
    let made = add(&mut conn, &["192.0.2.0/29"], &["25565", "27000-27010"]).unwrap();
    assert_eq!(made.len(), 2);
    // Same block, overlapping ports; an address inside the block; a wildcard.
    for (ips, ports) in [
        (["192.0.2.0/29"], ["27010-27020"]),
        (["192.0.2.3"], ["25565"]),
        (["0.0.0.0"], ["27005"]),
    ] {
        let err = add(&mut conn, &ips, &ports).unwrap_err();
        assert_eq!(err.code, "pool_overlaps", "{ips:?} {ports:?}");
    }
    // Elsewhere is fine; bad input names its field.
    add(&mut conn, &["192.0.2.8"], &["25565"]).unwrap();
    let err = add(&mut conn, &["10.0.0.0/8", "x"], &["0", "5-1"]).unwrap_err();
    let fields: Vec<&str> = err.details.iter().map(|d| d.field.as_str()).collect();
    assert_eq!(fields, ["ips[0]", "ips[1]", "ports[0]", "ports[1]"]);

    // A UDP-only pool serves no TCP port.
    let scope = scope(&t.db, "pools");
    let mut tcp = request(1, 1);
    tcp.node = Some(n.clone());
    let err = allocation::place(&mut conn, &scope, &tcp, &meta()).unwrap_err();
    assert!(matches!(err, ReserveError::NoPorts(_)), "{err:?}");
    let mut udp = tcp.clone();
    udp.ports = vec![vec![Protocol::Udp]];
    let placed = allocation::place(&mut conn, &scope, &udp, &meta()).unwrap();
    let pool = placed.allocations[0].pool_id.clone();
    let err = allocation::delete_pool(&mut conn, &n, &pool, &Actor::System, &meta()).unwrap_err();
    assert_eq!(err.code, "pool_in_use");
    servers::delete(&mut conn, &scope, &placed.server_id, &meta()).unwrap();
    allocation::delete_pool(&mut conn, &n, &pool, &Actor::System, &meta()).unwrap();
}

async fn release_on_delete_and_decommission_and_the_leak_scanner(t: TestDb) {
    use mamba_panel::db::schema::servers as servers_table;
    let scope = scope(&t.db, "release");
    let other = scope_other(&t.db);
    let n = node(&t.db, "release-node", 100, 0);
    pools(
        &t.db,
        &n,
        &["203.0.113.5"],
        &["50000-50002"],
        Strategy::Sequential,
    );
    let mut conn = t.db.get_blocking().unwrap();
    let mut req = request(50, 1);
    req.node = Some(n.clone());
    let a = allocation::place(&mut conn, &scope, &req, &meta()).unwrap();
    let b = allocation::place(&mut conn, &scope, &req, &meta()).unwrap();
    assert!(
        allocation::place(&mut conn, &scope, &req, &meta()).is_err(),
        "memory is full"
    );

    // Another tenant cannot delete it: it does not exist for them.
    let err = servers::delete(&mut conn, &other, &a.server_id, &meta()).unwrap_err();
    assert_eq!(err.status.as_u16(), 404);
    // Deleting frees its port and its memory at once.
    assert_eq!(
        servers::delete(&mut conn, &scope, &a.server_id, &meta()).unwrap(),
        1
    );
    let c = allocation::place(&mut conn, &scope, &req, &meta()).unwrap();
    assert_eq!(
        c.allocations[0].port, 50002,
        "sequential goes on after the highest port"
    );

    // A server that vanished without releasing (as a deleted tenant's would) leaks its port:
    // its memory is free again, its port is not.
    diesel::delete(servers_table::table.find(b.server_id.as_str()))
        .execute(&mut *conn)
        .unwrap();
    let d = allocation::place(&mut conn, &scope, &req, &meta()).unwrap();
    assert_eq!(
        d.allocations[0].port, 50000,
        "at the top of the range, holes are filled"
    );
    let report = allocation::scan_leaks(&mut conn, false, &Actor::System, &meta()).unwrap();
    assert_eq!(report.released, 0);
    assert_eq!(report.leaked.len(), 1);
    assert_eq!(report.leaked[0].server_id, b.server_id);
    assert_eq!(report.leaked[0].port, 50001);
    assert_eq!(all_ports(&t.db).len(), 3, "report mode changes nothing");
    let report = allocation::scan_leaks(&mut conn, true, &Actor::System, &meta()).unwrap();
    assert_eq!((report.leaked.len(), report.released), (1, 1));
    assert!(
        allocation::scan_leaks(&mut conn, false, &Actor::System, &meta())
            .unwrap()
            .leaked
            .is_empty()
    );
    assert_eq!(all_ports(&t.db).len(), 2);

    // Decommissioning releases every allocation and pool, and the node takes nothing more.
    let done = nodes::decommission(&mut conn, &n, &Actor::System, &meta()).unwrap();
    assert_eq!(
        (
            done.released_allocations,
            done.removed_pools,
            done.stranded_servers
        ),
        (2, 1, 2)
    );
    assert!(all_ports(&t.db).is_empty());
    assert!(
        allocation::server_allocations(&mut conn, &c.server_id)
            .unwrap()
            .is_empty()
    );
    let err = allocation::reserve_on(&mut conn, &scope, &n, &req, &meta()).unwrap_err();
    assert!(matches!(err, ReserveError::NodeUnavailable), "{err:?}");
    // Tenants aiming at it see no node at all: it is no longer public.
    let err = allocation::place(&mut conn, &scope, &req, &meta()).unwrap_err();
    assert!(matches!(err, ReserveError::NoNode), "{err:?}");
    let again = nodes::decommission(&mut conn, &n, &Actor::System, &meta()).unwrap();
    assert_eq!(again.released_allocations, 0);
    // The stranded server keeps the node from being deleted until it is gone.
    assert_eq!(
        nodes::delete(&mut conn, &n, &Actor::System, &meta())
            .unwrap_err()
            .code,
        "node_has_servers"
    );
    servers::delete(&mut conn, &scope, &c.server_id, &meta()).unwrap();
    servers::delete(&mut conn, &scope, &d.server_id, &meta()).unwrap();
    nodes::delete(&mut conn, &n, &Actor::System, &meta()).unwrap();
}

fn scope_other(db: &Db) -> TenantScope {
    scope(db, "elsewhere")
}

fn freeciv() -> Blueprint {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../blueprints/freeciv.yaml");
    Blueprint::from_yaml("freeciv.yaml", &std::fs::read_to_string(path).unwrap()).unwrap()
}

async fn variables_are_checked_at_create_and_at_every_startup_change(t: TestDb) {
    let scope = scope(&t.db, "vars");
    let n = node(&t.db, "vars-node", 4096, 0);
    pools(&t.db, &n, &["192.0.2.50"], &["7000-7010"], Strategy::Sequential);
    let blueprint = freeciv();
    let mut conn = t.db.get_blocking().unwrap();
    let new = |vars: &[(&str, &str)]| NewServer {
        name: "civ".into(),
        blueprint: "freeciv".into(),
        variables: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    let err = servers::create(
        &mut conn,
        &scope,
        &blueprint,
        &new(&[
            ("AI_PLAYERS", "99"),
            ("NOPE", "1"),
            ("SERVER_IDENTITY", "bad;name"),
        ]),
        &meta(),
    )
    .unwrap_err();
    assert_eq!(err.status.as_u16(), 422);
    let fields: Vec<&str> = err.details.iter().map(|d| d.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "variables.NOPE",
            "variables.SERVER_IDENTITY",
            "variables.AI_PLAYERS"
        ]
    );
    assert_eq!(server_count(&t.db), 0, "nothing was reserved");

    let placed = servers::create(
        &mut conn,
        &scope,
        &blueprint,
        &new(&[("AI_PLAYERS", "7")]),
        &meta(),
    )
    .unwrap();
    assert_eq!(placed.allocations.len(), 1);
    let (_, vars) = servers::variables(&mut conn, &scope, &placed.server_id).unwrap();
    assert_eq!(vars["AI_PLAYERS"], "7");
    assert_eq!(vars["SERVER_IDENTITY"], "mamba", "defaults are filled in");

    let change = |k: &str, v: &str| -> BTreeMap<String, String> { [(k.to_string(), v.to_string())].into() };
    let err = servers::update_startup(
        &mut conn,
        &scope,
        &placed.server_id,
        &blueprint,
        &change("TURN_TIMEOUT", "-5"),
        &meta(),
    )
    .unwrap_err();
    assert_eq!(err.details[0].field, "variables.TURN_TIMEOUT");
    let ok = servers::update_startup(
        &mut conn,
        &scope,
        &placed.server_id,
        &blueprint,
        &change("TURN_TIMEOUT", "60"),
        &meta(),
    )
    .unwrap();
    assert_eq!(ok.variables["TURN_TIMEOUT"], "60");
    assert_eq!(ok.variables["AI_PLAYERS"], "7", "other values stay");
    // A server id of another tenant, or none at all, is the same 404.
    let other = scope_other(&t.db);
    let err = servers::update_startup(
        &mut conn,
        &other,
        &placed.server_id,
        &blueprint,
        &change("TURN_TIMEOUT", "1"),
        &meta(),
    )
    .unwrap_err();
    assert_eq!(err.status.as_u16(), 404);
    let err = servers::update_startup(
        &mut conn,
        &scope,
        &ServerId::generate(),
        &blueprint,
        &change("TURN_TIMEOUT", "1"),
        &meta(),
    )
    .unwrap_err();
    assert_eq!(err.status.as_u16(), 404);
}

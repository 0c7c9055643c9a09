//! Servers through the panel's API, on both backends: create (placed, quota-checked, with its
//! install job in the same transaction), list, get, update, delete, power, reinstall, console
//! tokens (verified by wings' own verifier), metrics; suspension; per-tenant quotas under 50
//! parallel creates; tenant B never sees tenant A's server (404) and every route checks its
//! permission; and every action is audited (SECURITY-CHECKLIST 17, 22).
//! Console commands and tokens are also driven against a real wings enrolled to the panel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use actix_web::http::{Method, StatusCode};
use actix_web::{test, web};
use common::node::{PanelWithListener, WingsNode, blueprint_json, free_port};
use common::{Answer, TestDb, send};
use diesel::prelude::*;
use mamba_panel::allocation::{self, NewPools, Strategy};
use mamba_panel::audit::Actor;
use mamba_panel::authz;
use mamba_panel::config::{Config, QuotaConfig};
use mamba_panel::http::{AppState, app};
use mamba_panel::ids::{JobId, NodeId, ServerId};
use mamba_panel::jobs::{self, JobKind, JobStatus};
use mamba_panel::nodes::{self, NewNode};
use mamba_panel::request_meta::RequestMeta;
use mamba_panel::servers::{self, NewServer};
use mamba_shared::blueprint::Protocol;
use serde_json::{Value, json};

both_backends!(
    create_list_get_update_and_delete,
    power_reinstall_and_suspension,
    other_tenants_get_404_and_permissions_are_checked,
    quotas_hold_under_50_parallel_creates,
    console_tokens_are_what_wings_verifies,
    a_dead_install_frees_its_place_and_an_operator_retry_takes_one_again,
    two_hundred_parallel_api_creates_fill_one_node_exactly,
);

const IP: &str = "198.51.100.70";
const PASSWORD: &str = "servers test passphrase";

/// A blueprints folder with the small test game (one TCP port, busybox image).
fn blueprints_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    std::fs::copy(
        root.join("wings/tests/fixtures/testbox.yaml"),
        dir.path().join("testbox.yaml"),
    )
    .unwrap();
    dir
}

fn config(t: &TestDb, blueprints: &tempfile::TempDir) -> Config {
    let mut config = t.config();
    config.blueprints.dir = blueprints.path().display().to_string();
    config
}

fn node(t: &TestDb, name: &str, ports: &str) -> NodeId {
    node_sized(t, name, ports, 1 << 20)
}

/// A public node in location `test` that has sent its first heartbeat, with `memory_mb` of
/// memory (and CPU and disk to spare) and one pool on 10.0.0.1.
fn node_sized(t: &TestDb, name: &str, ports: &str, memory_mb: i64) -> NodeId {
    let new = nodes::check_new(&NewNode {
        name: name.into(),
        fqdn: format!("{name}.example.com"),
        location: "test".into(),
        cpu_percent: 100_000,
        memory_mb,
        disk_mb: 1 << 30,
        overallocation_percent: 0,
        is_public: true,
        maintenance: false,
        api_port: 8080,
        public_url: None,
        sftp_port: 2022,
    })
    .unwrap();
    let mut conn = t.db.get_blocking().unwrap();
    let node = nodes::create(&mut conn, &new, &Actor::System, &RequestMeta::system())
        .unwrap()
        .id;
    add_pool(t, &node, "10.0.0.1", ports);
    common::heartbeat(&t.db, &node);
    node
}

fn add_pool(t: &TestDb, node: &NodeId, ip: &str, ports: &str) {
    let mut conn = t.db.get_blocking().unwrap();
    allocation::add_pools(
        &mut conn,
        node,
        &NewPools {
            ips: vec![ip.into()],
            ports: vec![ports.into()],
            protocols: vec![Protocol::Tcp, Protocol::Udp],
            strategy: Strategy::Sequential,
        },
        &Actor::System,
        &RequestMeta::system(),
    )
    .unwrap();
}

async fn call<S, B>(svc: &S, method: Method, uri: &str, bearer: &str, body: Option<Value>) -> Answer
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let mut req = test::TestRequest::default()
        .method(method)
        .uri(uri)
        .peer_addr(common::peer(IP))
        .insert_header(("authorization", bearer.to_string()));
    if let Some(body) = body {
        req = req.set_json(body);
    }
    send(svc, req.to_request()).await
}

/// Makes a tenant owned by a new user through the API; answers (bearer, tenant id).
async fn owner<S, B>(svc: &S, t: &TestDb, email: &str, admin: bool) -> (String, String)
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let bearer = common::login_new_user(svc, t, email, PASSWORD, admin, IP).await;
    let slug = format!("tenant-{}", email.split('@').next().unwrap().replace('.', "-"));
    let a = call(
        svc,
        Method::POST,
        "/api/v1/tenants",
        &bearer,
        Some(json!({"slug": slug, "name": slug})),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    (bearer, a.body["id"].as_str().unwrap().to_string())
}

fn set_status(t: &TestDb, server: &str, status: &str) {
    use mamba_panel::db::schema::servers;
    let mut conn = t.db.get_blocking().unwrap();
    diesel::update(servers::table.find(server))
        .set(servers::status.eq(status))
        .execute(&mut conn)
        .unwrap();
}

fn jobs_of(body: &Value) -> String {
    body["jobs"].to_string()
}

async fn create_list_get_update_and_delete(t: TestDb) {
    let bp = blueprints_dir();
    let state = t.state_with(config(&t, &bp));
    let svc = test::init_service(app(state.clone(), common::metrics())).await;
    let (bearer, tenant) = owner(&svc, &t, "alice@example.test", false).await;
    let node = node(&t, "n1", "30000-30009");
    let base = format!("/api/v1/tenants/{tenant}/servers");

    // Bad input: unknown blueprint, a variable breaking its rule, an unknown image, bad JSON.
    let a = call(
        &svc,
        Method::POST,
        &base,
        &bearer,
        Some(json!({"name": "x", "blueprint": "nope"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{a:?}");
    let a = call(
        &svc,
        Method::POST,
        &base,
        &bearer,
        Some(json!({"name": "x", "blueprint": "testbox", "variables": {"GREETING": "NOT LOWER"}})),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{a:?}");
    assert_eq!(a.body["error"]["details"][0]["field"], "variables.GREETING");
    let a = call(
        &svc,
        Method::POST,
        &base,
        &bearer,
        Some(json!({"name": "x", "blueprint": "testbox", "image": "other:latest"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{a:?}");
    let a = call(&svc, Method::POST, &base, &bearer, Some(json!({"name": 3}))).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");

    // Created: placed, installing, with its install job.
    let a = call(
        &svc,
        Method::POST,
        &base,
        &bearer,
        Some(
            json!({"name": "first box", "blueprint": "testbox", "variables": {"GREETING": "hey"},
            "limits": {"cpu_percent": 50, "memory_mb": 64, "disk_mb": 100}}),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    let first = a.body["server"]["id"].as_str().unwrap().to_string();
    assert_eq!(a.body["server"]["status"], "installing");
    assert_eq!(a.body["server"]["node_id"], node.as_str());
    assert_eq!(a.body["server"]["limits"]["memory_mb"], 64);
    assert_eq!(a.body["allocations"].as_array().unwrap().len(), 1);
    assert_eq!(a.body["allocations"][0]["port"], 30000);
    assert!(a.body["job"].is_string());
    assert_eq!(common::audit_entries(&t, "server.create", &first), 1);

    let a = call(
        &svc,
        Method::POST,
        &base,
        &bearer,
        Some(json!({"name": "second", "blueprint": "testbox", "image": "busybox"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    let second = a.body["server"]["id"].as_str().unwrap().to_string();
    assert_eq!(a.body["server"]["image"], "mamba/testbox:latest");

    // List: all, filtered, paginated.
    let a = call(&svc, Method::GET, &base, &bearer, None).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["items"].as_array().unwrap().len(), 2);
    let a = call(&svc, Method::GET, &format!("{base}?name=first"), &bearer, None).await;
    assert_eq!(a.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(a.body["items"][0]["id"], first.as_str());
    let a = call(&svc, Method::GET, &format!("{base}?name=%25"), &bearer, None).await;
    assert_eq!(a.body["items"].as_array().unwrap().len(), 0, "% is literal");
    let a = call(
        &svc,
        Method::GET,
        &format!("{base}?status=running"),
        &bearer,
        None,
    )
    .await;
    assert_eq!(a.body["items"].as_array().unwrap().len(), 0);
    let a = call(
        &svc,
        Method::GET,
        &format!("{base}?node={node}&limit=1"),
        &bearer,
        None,
    )
    .await;
    assert_eq!(a.body["items"][0]["id"], first.as_str());
    let cursor = a.body["next_cursor"].as_str().unwrap().to_string();
    let a = call(
        &svc,
        Method::GET,
        &format!("{base}?limit=1&cursor={cursor}"),
        &bearer,
        None,
    )
    .await;
    assert_eq!(a.body["items"][0]["id"], second.as_str());
    assert!(a.body["next_cursor"].is_null());
    let a = call(&svc, Method::GET, &format!("{base}?limit=0"), &bearer, None).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);

    // Get: ports, blueprint, variables, jobs, metrics.
    let a = call(&svc, Method::GET, &format!("{base}/{first}"), &bearer, None).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["blueprint"], "testbox");
    assert_eq!(a.body["blueprint_name"], "Test box");
    assert_eq!(a.body["variables"]["GREETING"], "hey");
    assert_eq!(a.body["allocations"][0]["port"], 30000);
    assert!(jobs_of(&a.body).contains("server_install"), "{}", a.body);
    assert!(a.body["metrics"].is_null());
    let a = call(&svc, Method::GET, &format!("{base}/not-an-id"), &bearer, None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = call(
        &svc,
        Method::GET,
        &format!("{base}/{}", ServerId::generate()),
        &bearer,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);

    // Metrics: ranges checked.
    let a = call(
        &svc,
        Method::GET,
        &format!("{base}/{first}/metrics?range=7d"),
        &bearer,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["resolution"], "hourly");
    let a = call(
        &svc,
        Method::GET,
        &format!("{base}/{first}/metrics?range=2y"),
        &bearer,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{a:?}");

    // Update: limits and variables, with the update job.
    let a = call(
        &svc,
        Method::PATCH,
        &format!("{base}/{first}"),
        &bearer,
        Some(
            json!({"name": "renamed", "limits": {"cpu_percent": 100, "memory_mb": 128, "disk_mb": 200},
            "variables": {"GREETING": "hello again"}}),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    assert_eq!(a.body["server"]["name"], "renamed");
    assert_eq!(a.body["server"]["limits"]["memory_mb"], 128);
    assert_eq!(common::audit_entries(&t, "server.update", &first), 1);
    let a = call(&svc, Method::GET, &format!("{base}/{first}"), &bearer, None).await;
    assert_eq!(a.body["variables"]["GREETING"], "hello again");
    assert!(jobs_of(&a.body).contains("server_update"), "{}", a.body);
    let a = call(
        &svc,
        Method::PATCH,
        &format!("{base}/{first}"),
        &bearer,
        Some(json!({})),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    let a = call(
        &svc,
        Method::PATCH,
        &format!("{base}/{first}"),
        &bearer,
        Some(json!({"limits": {"cpu_percent": 0, "memory_mb": 1, "disk_mb": 1}})),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{a:?}");

    // Delete: deleting, with the delete job; twice is a conflict.
    let a = call(&svc, Method::DELETE, &format!("{base}/{second}"), &bearer, None).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    assert_eq!(a.body["server"]["status"], "deleting");
    let a = call(&svc, Method::DELETE, &format!("{base}/{second}"), &bearer, None).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    let a = call(&svc, Method::GET, &format!("{base}/{second}"), &bearer, None).await;
    assert!(jobs_of(&a.body).contains("server_delete"), "{}", a.body);
    assert_eq!(common::audit_entries(&t, "server.delete_request", &second), 1);
    // Nothing can be done to a server being deleted.
    let a = call(
        &svc,
        Method::PATCH,
        &format!("{base}/{second}"),
        &bearer,
        Some(json!({"name": "late"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
}

async fn power_reinstall_and_suspension(t: TestDb) {
    let bp = blueprints_dir();
    let state = t.state_with(config(&t, &bp));
    let svc = test::init_service(app(state.clone(), common::metrics())).await;
    let (bearer, tenant) = owner(&svc, &t, "bob@example.test", false).await;
    let (operator, _) = owner(&svc, &t, "op@example.test", true).await;
    node(&t, "n1", "30000-30009");
    let base = format!("/api/v1/tenants/{tenant}/servers");
    let a = call(
        &svc,
        Method::POST,
        &base,
        &bearer,
        Some(json!({"name": "p", "blueprint": "testbox"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    let id = a.body["server"]["id"].as_str().unwrap().to_string();
    let power = |action: &'static str| json!({ "action": action });

    // Installing: cannot start; stopping is accepted (it settles whatever the node has).
    let a = call(
        &svc,
        Method::POST,
        &format!("{base}/{id}/power"),
        &bearer,
        Some(power("start")),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    assert_eq!(a.body["error"]["code"], "not_installed");
    let a = call(
        &svc,
        Method::POST,
        &format!("{base}/{id}/power"),
        &bearer,
        Some(power("fly")),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");

    set_status(&t, &id, "offline");
    let a = call(
        &svc,
        Method::POST,
        &format!("{base}/{id}/power"),
        &bearer,
        Some(power("start")),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    assert!(a.body["job"].is_string());
    assert_eq!(common::audit_entries(&t, "server.power", &id), 1);
    let a = call(&svc, Method::GET, &format!("{base}/{id}"), &bearer, None).await;
    assert!(jobs_of(&a.body).contains("server_power"), "{}", a.body);

    // Commands need a running server.
    let a = call(
        &svc,
        Method::POST,
        &format!("{base}/{id}/commands"),
        &bearer,
        Some(json!({"commands": ["say hi"]})),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    assert_eq!(a.body["error"]["code"], "not_running");
    set_status(&t, &id, "running");
    for bad in [json!({"commands": []}), json!({"commands": ["a\nb"]})] {
        let a = call(
            &svc,
            Method::POST,
            &format!("{base}/{id}/commands"),
            &bearer,
            Some(bad),
        )
        .await;
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{a:?}");
    }

    // Suspension: operators only.
    let uri = format!("/api/v1/admin/servers/{id}/suspend");
    let a = call(&svc, Method::POST, &uri, &bearer, None).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{a:?}");
    let a = call(&svc, Method::POST, &uri, &operator, None).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert!(a.body["server"]["suspended_at"].is_i64());
    // A stop was queued; the node (unreachable here) could not confirm closing sockets.
    assert!(a.body["job"].is_string());
    assert_eq!(a.body["sockets_closed"], false);
    assert_eq!(common::audit_entries(&t, "server.suspend", &id), 1);
    let a = call(
        &svc,
        Method::POST,
        &format!("/api/v1/admin/servers/{}/suspend", ServerId::generate()),
        &operator,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{a:?}");

    // Suspended: no start, restart, reinstall, console or commands; stop and kill still go.
    for action in ["start", "restart"] {
        let a = call(
            &svc,
            Method::POST,
            &format!("{base}/{id}/power"),
            &bearer,
            Some(power(action)),
        )
        .await;
        assert_eq!(a.status, StatusCode::CONFLICT, "{action}: {a:?}");
        assert_eq!(a.body["error"]["code"], "server_suspended");
    }
    for action in ["stop", "kill"] {
        let a = call(
            &svc,
            Method::POST,
            &format!("{base}/{id}/power"),
            &bearer,
            Some(power(action)),
        )
        .await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{action}: {a:?}");
    }
    let a = call(
        &svc,
        Method::POST,
        &format!("{base}/{id}/reinstall"),
        &bearer,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    let a = call(&svc, Method::GET, &format!("{base}/{id}/console"), &bearer, None).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    let a = call(
        &svc,
        Method::POST,
        &format!("{base}/{id}/commands"),
        &bearer,
        Some(json!({"commands": ["say hi"]})),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");

    let a = call(
        &svc,
        Method::POST,
        &format!("/api/v1/admin/servers/{id}/unsuspend"),
        &operator,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert!(a.body["server"]["suspended_at"].is_null());
    assert_eq!(common::audit_entries(&t, "server.unsuspend", &id), 1);
    set_status(&t, &id, "offline");
    let a = call(
        &svc,
        Method::POST,
        &format!("{base}/{id}/power"),
        &bearer,
        Some(power("restart")),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");

    // Reinstall: installing again, with its job.
    let a = call(
        &svc,
        Method::POST,
        &format!("{base}/{id}/reinstall"),
        &bearer,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    assert_eq!(a.body["server"]["status"], "installing");
    assert_eq!(common::audit_entries(&t, "server.reinstall", &id), 1);
    let a = call(&svc, Method::GET, &format!("{base}/{id}"), &bearer, None).await;
    assert!(jobs_of(&a.body).contains("server_reinstall"), "{}", a.body);
}

async fn other_tenants_get_404_and_permissions_are_checked(t: TestDb) {
    let bp = blueprints_dir();
    let state = t.state_with(config(&t, &bp));
    let svc = test::init_service(app(state.clone(), common::metrics())).await;
    let (alice, tenant_a) = owner(&svc, &t, "a@example.test", false).await;
    let (bob, tenant_b) = owner(&svc, &t, "b@example.test", false).await;
    node(&t, "n1", "30000-30009");
    let base_a = format!("/api/v1/tenants/{tenant_a}/servers");
    let a = call(
        &svc,
        Method::POST,
        &base_a,
        &alice,
        Some(json!({"name": "a", "blueprint": "testbox"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    let id = a.body["server"]["id"].as_str().unwrap().to_string();
    set_status(&t, &id, "running");

    // Bob, owner of tenant B, with A's server id under his own tenant: 404 on every route,
    // exactly as for an id that does not exist; under A's tenant: 404 for the tenant.
    let base_b = format!("/api/v1/tenants/{tenant_b}/servers");
    let routes: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, String::new(), None),
        (Method::PATCH, String::new(), Some(json!({"name": "mine"}))),
        (Method::DELETE, String::new(), None),
        (Method::POST, "/power".into(), Some(json!({"action": "stop"}))),
        (
            Method::POST,
            "/commands".into(),
            Some(json!({"commands": ["say hi"]})),
        ),
        (Method::POST, "/reinstall".into(), None),
        (Method::GET, "/console".into(), None),
        (Method::GET, "/metrics".into(), None),
    ];
    for (method, suffix, body) in &routes {
        for base in [&base_b, &base_a] {
            let a = call(
                &svc,
                method.clone(),
                &format!("{base}/{id}{suffix}"),
                &bob,
                body.clone(),
            )
            .await;
            assert_eq!(
                a.status,
                StatusCode::NOT_FOUND,
                "{method} {base}/{id}{suffix}: {a:?}"
            );
        }
    }
    let a = call(&svc, Method::GET, &base_b, &bob, None).await;
    assert_eq!(a.body["items"].as_array().unwrap().len(), 0);
    // Nothing changed, nothing was queued or audited for Bob.
    let a = call(&svc, Method::GET, &format!("{base_a}/{id}"), &alice, None).await;
    assert_eq!(a.body["name"], "a");
    assert_eq!(a.body["status"], "running");
    assert_eq!(common::audit_entries(&t, "server.power", &id), 0);

    // A support member of A: reads, opens the console (without power), but changes nothing.
    let support = common::new_member(&svc, &t, ("s@example.test", PASSWORD, IP), &tenant_a, "SUPPORT").await;
    let a = call(&svc, Method::GET, &format!("{base_a}/{id}"), &support, None).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert!(a.body["variables"].is_object(), "support has startup.read");
    let forbidden: Vec<(Method, String, Option<Value>)> = vec![
        (
            Method::POST,
            String::new(),
            Some(json!({"name": "s", "blueprint": "testbox"})),
        ),
        (Method::PATCH, format!("/{id}"), Some(json!({"name": "mine"}))),
        (
            Method::PATCH,
            format!("/{id}"),
            Some(json!({"limits": {"cpu_percent": 1, "memory_mb": 1, "disk_mb": 1}})),
        ),
        (Method::DELETE, format!("/{id}"), None),
        (
            Method::POST,
            format!("/{id}/power"),
            Some(json!({"action": "stop"})),
        ),
        (Method::POST, format!("/{id}/reinstall"), None),
    ];
    for (method, suffix, body) in &forbidden {
        let a = call(
            &svc,
            method.clone(),
            &format!("{base_a}{suffix}"),
            &support,
            body.clone(),
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{method} {suffix}: {a:?}");
    }
    let a = call(
        &svc,
        Method::GET,
        &format!("{base_a}/{id}/console"),
        &support,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let granted: Vec<&str> = a.body["permissions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(granted.contains(&"websocket.connect") && granted.contains(&"control.console"));
    assert!(!granted.contains(&"control.start") && !granted.contains(&"control.stop"));

    // A plain member may power the server but not change its limits or delete it.
    let plain = common::new_member(&svc, &t, ("m@example.test", PASSWORD, IP), &tenant_a, "MEMBER").await;
    let a = call(
        &svc,
        Method::POST,
        &format!("{base_a}/{id}/power"),
        &plain,
        Some(json!({"action": "stop"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    let a = call(&svc, Method::DELETE, &format!("{base_a}/{id}"), &plain, None).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{a:?}");
}

async fn quotas_hold_under_50_parallel_creates(t: TestDb) {
    let bp = blueprints_dir();
    let state = t.state_with(config(&t, &bp));
    let svc = test::init_service(app(state.clone(), common::metrics())).await;
    let (alice, tenant) = owner(&svc, &t, "q@example.test", false).await;
    let (operator, _) = owner(&svc, &t, "qop@example.test", true).await;
    let node = node(&t, "n1", "30000-30199");

    // The defaults apply until an operator sets the tenant's own quota.
    let a = call(
        &svc,
        Method::GET,
        &format!("/api/v1/tenants/{tenant}/quota"),
        &alice,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["quota"]["max_servers"], QuotaConfig::default().max_servers);
    let uri = format!("/api/v1/admin/tenants/{tenant}/quota");
    let a = call(&svc, Method::PUT, &uri, &alice, Some(json!({"max_servers": 100}))).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{a:?}");
    let a = call(
        &svc,
        Method::PUT,
        &uri,
        &operator,
        Some(json!({"max_servers": -1})),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{a:?}");
    const N: i64 = 7;
    let a = call(
        &svc,
        Method::PUT,
        &uri,
        &operator,
        Some(json!({"max_servers": N, "max_memory_mb": 100_000})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["quota"]["max_servers"], N);
    assert_eq!(
        a.body["quota"]["max_cpu_percent"],
        QuotaConfig::default().max_cpu_percent
    );

    // 50 creates at once, each on its own connection: exactly N succeed, no port twice.
    let scope = {
        let mut conn = t.db.get_blocking().unwrap();
        let user = mamba_panel::users::find_by_email(&mut conn, "q@example.test")
            .unwrap()
            .unwrap();
        authz::authorize(
            &mut conn,
            &user,
            Actor::User(mamba_panel::ids::UserId::from_db(user.id.clone())),
            &tenant,
            None,
        )
        .unwrap()
    };
    let blueprint = state.blueprints.file("testbox").unwrap().clone();
    let quotas = state.config.quotas.clone();
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let (db, scope, blueprint, quotas) =
                (t.db.clone(), scope.clone(), blueprint.clone(), quotas.clone());
            std::thread::spawn(move || {
                let mut conn = db.get_blocking().unwrap();
                let new = NewServer {
                    name: format!("s{i}"),
                    blueprint: "testbox".into(),
                    ..Default::default()
                };
                servers::create_and_install(
                    &mut conn,
                    &scope,
                    &blueprint,
                    &new,
                    &quotas,
                    &RequestMeta::system(),
                )
            })
        })
        .collect();
    let mut ok = Vec::new();
    for h in handles {
        match h.join().unwrap() {
            Ok(created) => ok.push(created),
            Err(e) => assert_eq!(e.code, "quota_exceeded", "{e:?}"),
        }
    }
    assert_eq!(ok.len() as i64, N);
    let ports: HashSet<u16> = ok.iter().map(|c| c.allocations[0].port).collect();
    assert_eq!(ports.len() as i64, N, "no port twice");
    {
        use mamba_panel::db::schema::{allocations, servers as s};
        let mut conn = t.db.get_blocking().unwrap();
        let rows: i64 = s::table
            .filter(s::tenant_id.eq(&tenant))
            .count()
            .get_result(&mut conn)
            .unwrap();
        assert_eq!(rows, N);
        let taken: i64 = allocations::table
            .filter(allocations::node_id.eq(node.as_str()))
            .count()
            .get_result(&mut conn)
            .unwrap();
        assert_eq!(taken, N);
    }
    let a = call(
        &svc,
        Method::GET,
        &format!("/api/v1/tenants/{tenant}/quota"),
        &alice,
        None,
    )
    .await;
    assert_eq!(a.body["servers"], N);

    // Resources count too: memory left for one more small server only.
    let used = a.body["used"]["memory_mb"].as_i64().unwrap();
    let a = call(
        &svc,
        Method::PUT,
        &uri,
        &operator,
        Some(json!({"max_servers": 20, "max_memory_mb": used + 100})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let base = format!("/api/v1/tenants/{tenant}/servers");
    let small = json!({"name": "small", "blueprint": "testbox",
        "limits": {"cpu_percent": 10, "memory_mb": 100, "disk_mb": 10}});
    let a = call(&svc, Method::POST, &base, &alice, Some(small.clone())).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    let small_id = a.body["server"]["id"].as_str().unwrap().to_string();
    let a = call(&svc, Method::POST, &base, &alice, Some(small)).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    assert_eq!(a.body["error"]["code"], "quota_exceeded");
    assert_eq!(a.body["error"]["details"][0]["field"], "max_memory_mb");
    // Growing a server's limits counts against the quota as well; shrinking always works.
    let a = call(
        &svc,
        Method::PATCH,
        &format!("{base}/{small_id}"),
        &alice,
        Some(json!({"limits": {"cpu_percent": 10, "memory_mb": 101, "disk_mb": 10}})),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    let a = call(
        &svc,
        Method::PATCH,
        &format!("{base}/{small_id}"),
        &alice,
        Some(json!({"limits": {"cpu_percent": 10, "memory_mb": 50, "disk_mb": 10}})),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    assert_eq!(common::audit_entries(&t, "tenant.quota_update", &tenant), 2);
}

async fn console_tokens_are_what_wings_verifies(t: TestDb) {
    let bp = blueprints_dir();
    let state = t.state_with(config(&t, &bp));
    let svc = test::init_service(app(state.clone(), common::metrics())).await;
    let (bearer, tenant) = owner(&svc, &t, "c@example.test", false).await;
    node(&t, "n1", "30000-30009");
    let base = format!("/api/v1/tenants/{tenant}/servers");
    let a = call(
        &svc,
        Method::POST,
        &base,
        &bearer,
        Some(json!({"name": "c", "blueprint": "testbox"})),
    )
    .await;
    let id = a.body["server"]["id"].as_str().unwrap().to_string();
    let a = call(&svc, Method::GET, &format!("{base}/{id}/console"), &bearer, None).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(
        a.body["socket"],
        format!("ws://n1.example.com:8081/api/servers/{id}/ws")
    );
    assert_eq!(common::audit_entries(&t, "server.console_token", &id), 1);

    // wings' own verifier, holding the panel's public key as enrollment stores it.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("panel-token.pub");
    std::fs::write(&key, &state.pki.token_public_pem).unwrap();
    let tokens = mamba_wings::config::TokensConfig {
        panel_public_key_file: key.display().to_string(),
        ..Default::default()
    };
    let verifier = mamba_wings::tokens::TokenVerifier::new(&tokens, dir.path()).unwrap();
    let token = a.body["token"].as_str().unwrap();
    let wings_id = mamba_shared::ids::ServerId::new(id.clone()).unwrap();
    let claims = verifier.verify(token, &wings_id).unwrap();
    assert_eq!(claims.scope, "websocket");
    assert!(claims.can("control.console") && claims.can("control.start"));
    assert!(claims.exp - claims.iat <= 900);
    assert_eq!(claims.exp, a.body["expires_at"].as_u64().unwrap());
    // Bound to its server.
    let other = mamba_shared::ids::ServerId::new(ServerId::generate().to_string()).unwrap();
    assert!(verifier.verify(token, &other).is_err());
    // Deauthorizing the user on the node refuses it (what suspension does).
    verifier.deauthorize(&wings_id, &claims.sub).unwrap();
    assert!(verifier.verify(token, &wings_id).is_err());
}

// --- against a real wings --------------------------------------------------------------------

/// A server created through the panel and put on a real node the way the install job does
/// (this test does not run the jobs worker); then console commands through the panel reach
/// the game, a console token opens the node's socket for a real WebSocket client, and a
/// suspension closes that socket and refuses the token afterwards.
#[actix_web::test]
async fn commands_and_console_reach_a_real_node() {
    let t = TestDb::new(common::Kind::Sqlite).unwrap();
    let panel = PanelWithListener::start(&t);
    let bp = blueprints_dir();
    // The panel's app with the node-listening state, but the test blueprints.
    let mut config = (*panel.state.config).clone();
    config.blueprints.dir = bp.path().display().to_string();
    let wings = WingsNode::start(&t, &panel, "real-node").await;
    let state = web::Data::new(rebuild_state(&panel.state, config));
    let svc = test::init_service(app(state.clone(), common::metrics())).await;
    let (bearer, tenant) = owner(&svc, &t, "real@example.test", false).await;
    let (operator, _) = owner(&svc, &t, "realop@example.test", true).await;
    let port = free_port();
    add_pool(&t, &wings.node.id, "127.0.0.1", &port.to_string());
    let base = format!("/api/v1/tenants/{tenant}/servers");
    let a = call(
        &svc,
        Method::POST,
        &base,
        &bearer,
        Some(json!({"name": "real", "blueprint": "testbox", "node": wings.node.id.to_string()})),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    let id = a.body["server"]["id"].as_str().unwrap().to_string();
    assert_eq!(a.body["allocations"][0]["port"], port);

    // What the install job does: push the server to its node and wait until it runs.
    let client = mamba_panel::wings_client::WingsClient::new(&state.pki, &wings.node).unwrap();
    let request = mamba_shared::wings_api::CreateServerRequest {
        id: mamba_shared::ids::ServerId::new(id.clone()).unwrap(),
        blueprint: serde_json::from_value(blueprint_json("wings/tests/fixtures/testbox.yaml")).unwrap(),
        variables: Default::default(),
        limits: None,
        allocations: mamba_shared::wings_api::Allocations {
            default: mamba_shared::wings_api::Allocation {
                ip: "127.0.0.1".parse().unwrap(),
                port,
            },
            additional: Vec::new(),
        },
        image: None,
        start_on_completion: true,
        skip_install: false,
    };
    client.create_server(&request).await.unwrap();
    let sid = ServerId::parse(&id).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while client.server(&sid).await.unwrap().state != mamba_shared::wings_api::ServerState::Running {
        assert!(Instant::now() < deadline, "the server never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    set_status(&t, &id, "running");

    // Commands through the panel reach the game's console.
    let a = call(
        &svc,
        Method::POST,
        &format!("{base}/{id}/commands"),
        &bearer,
        Some(json!({"commands": ["say through the panel"]})),
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "{a:?}");
    assert_eq!(common::audit_entries(&t, "server.command", &id), 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines = client.logs(&sid, 200).await.unwrap().lines;
        if lines.iter().any(|l| l.contains("[say] through the panel")) {
            break;
        }
        assert!(Instant::now() < deadline, "{lines:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A member removed from the tenant loses their live socket: the panel's revocation
    // (AccessRevoked on the event bus) tells the node to deauthorize them.
    mamba_panel::revocation::spawn(&state.events, state.db.clone(), state.pki.clone());
    let helper = common::new_member(&svc, &t, ("helper@example.test", PASSWORD, IP), &tenant, "MEMBER").await;
    let a = call(&svc, Method::GET, &format!("{base}/{id}/console"), &helper, None).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let helper_token = a.body["token"].as_str().unwrap().to_string();
    let scenario = json!({
        "url": a.body["socket"],
        "steps": [
            {"send": {"event": "auth", "args": [helper_token]}},
            {"expect": {"event": "auth success"}},
            {"send": {"event": "send command", "args": ["say helper here"]}},
            {"expect_close": 4003, "timeout": 90},
        ]
    });
    let remove = async {
        // Without the command in the log, nothing is removed and the socket's own output
        // (printed below) says what went wrong.
        logged(&client, &sid, "[say] helper here").await?;
        let membership: String = {
            use mamba_panel::db::schema::{memberships, users};
            let mut conn = t.db.get_blocking().unwrap();
            memberships::table
                .inner_join(users::table.on(users::id.eq(memberships::user_id)))
                .filter(users::email.eq("helper@example.test"))
                .select(memberships::id)
                .first(&mut conn)
                .unwrap()
        };
        Ok::<_, Vec<String>>(
            call(
                &svc,
                Method::DELETE,
                &format!("/api/v1/tenants/{tenant}/members/{membership}"),
                &bearer,
                None,
            )
            .await,
        )
    };
    let ((ok, out), a) = tokio::join!(ws_client(&scenario), remove);
    let a = a.unwrap_or_else(|lines| panic!("the helper's command never arrived: {lines:?}\n{out}"));
    assert_eq!(a.status, StatusCode::NO_CONTENT, "{a:?}");
    assert!(ok, "the removed member's socket stayed open: {out}");

    // The console token opens the node's socket for a real client, which sends a command.
    let a = call(&svc, Method::GET, &format!("{base}/{id}/console"), &bearer, None).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["socket"], wings.ws_url(&id));
    let token = a.body["token"].as_str().unwrap().to_string();
    let scenario = json!({
        "url": a.body["socket"],
        "steps": [
            {"send": {"event": "auth", "args": [token]}},
            {"expect": {"event": "auth success"}},
            {"send": {"event": "send command", "args": ["say over the socket"]}},
            {"expect": {"event": "console output", "contains": "over the socket"}},
            // Suspended while connected: the node closes the socket (access revoked).
            {"expect_close": 4003, "timeout": 90},
        ]
    });
    let suspend = async {
        // Once the socket's command has reached the game, the socket is live: suspend.
        logged(&client, &sid, "[say] over the socket").await?;
        Ok::<_, Vec<String>>(
            call(
                &svc,
                Method::POST,
                &format!("/api/v1/admin/servers/{id}/suspend"),
                &operator,
                None,
            )
            .await,
        )
    };
    let ((ok, out), a) = tokio::join!(ws_client(&scenario), suspend);
    let a = a.unwrap_or_else(|lines| panic!("the socket's command never arrived: {lines:?}\n{out}"));
    assert!(ok, "{out}");
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["sockets_closed"], true);
    // The same token is refused from now on, and the panel signs no new one.
    let scenario = json!({
        "url": wings.ws_url(&id),
        "steps": [
            {"send": {"event": "auth", "args": [token]}},
            {"expect": {"event": "jwt error", "contains": "revoked"}},
        ]
    });
    let (ok, out) = ws_client(&scenario).await;
    assert!(ok, "{out}");
    let a = call(&svc, Method::GET, &format!("{base}/{id}/console"), &bearer, None).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    client.delete_server(&sid).await.unwrap();
}

/// Waits (up to 60 s, a loaded machine's Python start included) for `needle` in the
/// server's console log; the last lines seen when it never comes.
async fn logged(
    client: &mamba_panel::wings_client::WingsClient,
    sid: &ServerId,
    needle: &str,
) -> Result<(), Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines = client.logs(sid, 200).await.unwrap().lines;
        if lines.iter().any(|l| l.contains(needle)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(lines);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn rebuild_state(state: &AppState, config: Config) -> AppState {
    let mut fresh = AppState::new(
        config.clone(),
        state.db.clone(),
        &mamba_panel::keys::MasterKey::from_bytes([42; 32]),
    )
    .unwrap();
    fresh.pki = state.pki.clone();
    fresh.blueprints = std::sync::Arc::new(
        mamba_panel::blueprints::Registry::load(std::path::Path::new(&config.blueprints.dir)).unwrap(),
    );
    fresh
}

/// Runs wings' test WebSocket client (Python `websockets`) on a scenario.
async fn ws_client(scenario: &Value) -> (bool, String) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scenario.json");
    std::fs::write(&path, scenario.to_string()).unwrap();
    let out = tokio::process::Command::new("python3")
        .arg(root.join("wings/tests/ws_client.py"))
        .arg("script")
        .arg(&path)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Simulates the job worker giving up on a server's install: claims its queued install job
/// (finishing other servers' jobs on the way: no worker runs here), undoes it as
/// `Provisioner::give_up` does after removing it from the node, and marks it dead.
fn give_up_install(t: &TestDb, server: &str) -> JobId {
    let mut conn = t.db.get_blocking().unwrap();
    let job = loop {
        let job = jobs::claim(&mut conn, "test-worker", Duration::from_secs(60))
            .unwrap()
            .expect("the install job is claimable");
        if job.server_id.as_ref().map(|s| s.as_str()) == Some(server) {
            break job;
        }
        assert!(jobs::succeed(&mut conn, &job.id, "test-worker").unwrap());
    };
    assert_eq!(job.kind, JobKind::ServerInstall);
    jobs::record_step(&mut conn, &job.id, "test-worker", "pushed", &json!({})).unwrap();
    servers::install_gave_up(&mut conn, &ServerId::from_db(server.to_string())).unwrap();
    let outcome = jobs::fail(&mut conn, &job.id, "test-worker", "node unreachable", None, true).unwrap();
    assert_eq!(outcome, jobs::Outcome::Dead);
    job.id
}

fn server_row(t: &TestDb, server: &str) -> (String, String) {
    use mamba_panel::db::schema::servers as s;
    let mut conn = t.db.get_blocking().unwrap();
    s::table
        .find(server)
        .select((s::node_id, s::status))
        .first(&mut conn)
        .unwrap()
}

fn ports_of(t: &TestDb, server: &str) -> Vec<(String, i32)> {
    use mamba_panel::db::schema::allocations;
    let mut conn = t.db.get_blocking().unwrap();
    allocations::table
        .filter(allocations::server_id.eq(server))
        .select((allocations::node_id, allocations::port))
        .load(&mut conn)
        .unwrap()
}

async fn a_dead_install_frees_its_place_and_an_operator_retry_takes_one_again(t: TestDb) {
    let bp = blueprints_dir();
    let state = t.state_with(config(&t, &bp));
    let svc = test::init_service(app(state.clone(), common::metrics())).await;
    let (alice, tenant) = owner(&svc, &t, "dead@example.test", false).await;
    let (operator, _) = owner(&svc, &t, "deadop@example.test", true).await;
    // Room for exactly one server of 64 MB.
    let home = node_sized(&t, "home", "30000-30009", 64);
    let base = format!("/api/v1/tenants/{tenant}/servers");
    let small = |name: &str| {
        json!({"name": name, "blueprint": "testbox",
            "limits": {"cpu_percent": 10, "memory_mb": 64, "disk_mb": 10}})
    };
    let a = call(&svc, Method::POST, &base, &alice, Some(small("a"))).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    let first = a.body["server"]["id"].as_str().unwrap().to_string();
    let a = call(&svc, Method::POST, &base, &alice, Some(small("b"))).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "the node is full: {a:?}");

    // The install dies: its port and its capacity go back to the node.
    let job = give_up_install(&t, &first);
    assert_eq!(
        server_row(&t, &first),
        (home.to_string(), "install_failed".into())
    );
    assert!(ports_of(&t, &first).is_empty());
    let a = call(&svc, Method::POST, &base, &alice, Some(small("b"))).await;
    assert_eq!(
        a.status,
        StatusCode::ACCEPTED,
        "the freed capacity is usable: {a:?}"
    );
    let second = a.body["server"]["id"].as_str().unwrap().to_string();
    assert_eq!(ports_of(&t, &second), vec![(home.to_string(), 30000)]);
    // A reinstall cannot bring it back: it holds no ports.
    let a = call(
        &svc,
        Method::POST,
        &format!("{base}/{first}/reinstall"),
        &alice,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    assert_eq!(a.body["error"]["code"], "install_failed");

    // The operator's retry must reserve again: no room anywhere is a 409 and changes nothing.
    let retry = format!("/api/v1/admin/jobs/{job}/retry");
    let a = call(&svc, Method::POST, &retry, &alice, None).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{a:?}");
    let a = call(&svc, Method::POST, &retry, &operator, None).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    assert_eq!(a.body["error"]["code"], "insufficient_capacity", "{a:?}");
    {
        let mut conn = t.db.get_blocking().unwrap();
        assert_eq!(
            jobs::get(&mut conn, &job).unwrap().unwrap().status,
            JobStatus::Dead
        );
    }
    assert_eq!(server_row(&t, &first).1, "install_failed");
    assert!(ports_of(&t, &first).is_empty());

    // With a node of the same location that has room, the retry places it there.
    let other = node_sized(&t, "other", "31000-31009", 64);
    let a = call(&svc, Method::POST, &retry, &operator, None).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["status"], "queued");
    assert_eq!(a.body["attempts"], 0);
    assert!(
        a.body["step"].is_null(),
        "a retry starts from the first step: {a:?}"
    );
    assert_eq!(server_row(&t, &first), (other.to_string(), "installing".into()));
    assert_eq!(ports_of(&t, &first), vec![(other.to_string(), 31000)]);
    let a = call(&svc, Method::POST, &retry, &operator, None).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    assert_eq!(a.body["error"]["code"], "job_not_retryable");

    // Dead again: the retry now finds room on the server's own node and keeps it there.
    let job = give_up_install(&t, &first);
    assert_eq!(server_row(&t, &first).1, "install_failed");
    let a = call(
        &svc,
        Method::POST,
        &format!("/api/v1/admin/jobs/{job}/retry"),
        &operator,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(server_row(&t, &first), (other.to_string(), "installing".into()));
    assert_eq!(ports_of(&t, &first), vec![(other.to_string(), 31000)]);
    assert_eq!(
        common::audit_entries(&t, "job.retry", job.as_str()),
        2,
        "one entry per retry that went through"
    );
}

async fn two_hundred_parallel_api_creates_fill_one_node_exactly(t: TestDb) {
    const N: usize = 20;
    const CREATES: usize = 200;
    let bp = blueprints_dir();
    let mut config = config(&t, &bp);
    config.quotas.max_servers = 1000;
    config.quotas.max_memory_mb = 1 << 30;
    config.quotas.max_cpu_percent = 1 << 30;
    config.quotas.max_disk_mb = 1 << 40;
    // More connections, and patience for them: 200 requests queue for the pool at once.
    let db = mamba_panel::db::Db::connect(&t.url, 8, Duration::from_secs(300)).unwrap();
    let state = web::Data::new(
        AppState::new(config, db, &mamba_panel::keys::MasterKey::from_bytes([42; 32])).unwrap(),
    );
    let svc = test::init_service(app(state.clone(), common::metrics())).await;
    let (alice, tenant) = owner(&svc, &t, "rush@example.test", false).await;
    // Memory for exactly N servers of 64 MB; ports for all of them and more.
    let node = node_sized(&t, "rush", "30000-30499", 64 * N as i64);

    // The panel's real HTTP server, so the creates arrive on several workers at once.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = state.clone();
    let server = actix_web::HttpServer::new(move || app(served.clone(), common::metrics()))
        .workers(4)
        .listen(listener)
        .unwrap()
        .run();
    let handle = server.handle();
    actix_web::rt::spawn(server);

    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let uri = format!("{url}/api/v1/tenants/{tenant}/servers");
    let creates = (0..CREATES).map(|i| {
        let (client, uri, alice) = (client.clone(), uri.clone(), alice.clone());
        async move {
            let answer = client
                .post(&uri)
                .header("authorization", alice)
                .json(&json!({"name": format!("rush {i}"), "blueprint": "testbox",
                    "limits": {"cpu_percent": 10, "memory_mb": 64, "disk_mb": 10}}))
                .send()
                .await
                .unwrap();
            let status = answer.status().as_u16();
            (status, answer.json::<Value>().await.unwrap())
        }
    });
    let answers = futures_util::future::join_all(creates).await;
    handle.stop(true).await;

    let mut created = HashSet::new();
    for (status, body) in &answers {
        match status {
            202 => {
                created.insert(body["server"]["id"].as_str().unwrap().to_string());
            }
            409 => assert!(
                ["no_node_fits", "insufficient_capacity"].contains(&body["error"]["code"].as_str().unwrap()),
                "{body}"
            ),
            _ => panic!("unexpected answer {status}: {body}"),
        }
    }
    assert_eq!(
        created.len(),
        N,
        "exactly as many servers as the node has room for"
    );

    use mamba_panel::db::schema::{allocations, servers as s};
    let mut conn = t.db.get_blocking().unwrap();
    let rows: Vec<String> = s::table
        .filter(s::node_id.eq(node.as_str()))
        .select(s::id)
        .load(&mut conn)
        .unwrap();
    assert_eq!(rows.into_iter().collect::<HashSet<_>>(), created);
    let ports: Vec<(String, i32)> = allocations::table
        .filter(allocations::node_id.eq(node.as_str()))
        .select((allocations::ip, allocations::port))
        .load(&mut conn)
        .unwrap();
    assert_eq!(ports.len(), N);
    assert_eq!(
        ports.iter().collect::<HashSet<_>>().len(),
        N,
        "no port given out twice: {ports:?}"
    );
}

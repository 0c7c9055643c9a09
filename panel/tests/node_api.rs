//! What nodes report, on both backends, through the panel's real mutual-TLS node listener and
//! wings' real enrollment: heartbeats bring a node online and the periodic check marks a
//! silent one offline (placement skips it, as it skips one never heard from) until it is heard from again; metrics and events
//! about another node's servers are refused with 403 and store nothing (SECURITY-CHECKLIST
//! 26); replays store nothing twice; a revoked certificate is refused; events are listed to
//! the server's tenant only and reach the webhook, signed, at least once, across a failed
//! first attempt.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use common::{TestDb, send};
use diesel::prelude::*;
use mamba_panel::audit::Actor;
use mamba_panel::db::schema::{
    audit_log, metric_samples, nodes as nodes_table, server_activity, server_events, servers,
};
use mamba_panel::http::{AppState, app};
use mamba_panel::ids::{NodeId, ServerId, TenantId, UserId};
use mamba_panel::nodes::{self, NewNode};
use mamba_panel::request_meta::RequestMeta;
use mamba_shared::activity::{ACTIVITY_PATH, ActivityBatch, ActivityEntry, ActivityReport};
use mamba_shared::metrics::{IngestReport, MetricSample, MetricsBatch};
use mamba_shared::node_api::{
    EVENTS_PATH, EventKind, EventRefusal, EventsBatch, EventsReport, HEARTBEAT_PATH, Heartbeat,
    HeartbeatServer, METRICS_PATH, NodeEvent, NodeResources,
};
use mamba_wings::node_identity::NodeIdentity;
use serde_json::json;

both_backends!(
    reports_count_only_for_the_certificates_own_servers,
    a_revoked_certificate_is_refused,
    a_silent_node_goes_offline_and_comes_back_by_itself,
    events_are_listed_to_their_tenant_and_reach_the_webhook_signed,
    activity_is_stored_once_for_the_nodes_own_servers_and_listed_to_its_tenant,
);

const IP: &str = "198.51.100.70";
const PASSWORD: &str = "node api test passphrase";
const SECRET: &str = "webhook-secret-for-tests";

fn meta() -> RequestMeta {
    RequestMeta::system()
}

/// A panel with its node listener on a real port.
struct Panel {
    state: web::Data<AppState>,
    url: String,
    data: tempfile::TempDir,
}

impl Panel {
    fn start(t: &TestDb, adjust: impl FnOnce(&mut mamba_panel::config::Config)) -> Panel {
        let mut config = t.config();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        config.node_listener.public_url = url.clone();
        adjust(&mut config);
        let state = t.state_with(config);
        let server = mamba_panel::http::node_pki::node_server(state.clone(), listener).unwrap();
        actix_web::rt::spawn(server);
        Panel {
            state,
            url,
            data: tempfile::tempdir().unwrap(),
        }
    }

    fn node(&self, name: &str) -> NodeId {
        let mut conn = self.state.db.get_blocking().unwrap();
        let new = nodes::check_new(&NewNode {
            name: name.into(),
            fqdn: format!("{name}.example.com"),
            location: "test".into(),
            cpu_percent: 400,
            memory_mb: 8192,
            disk_mb: 100_000,
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

    /// Enrolls `node` with wings' real enrollment code; answers its mTLS client.
    async fn enroll(&self, node: &NodeId) -> (NodeIdentity, reqwest::Client) {
        let pki = self.state.pki.clone();
        let id = node.to_string();
        let (token, _) = self
            .state
            .db
            .run(move |conn| {
                mamba_panel::node_pki::create_enrollment_token(conn, &pki, &id, &Actor::System, &meta())
                    .map_err(|e| mamba_panel::db::DbError::Config(e.to_string()))
            })
            .await
            .unwrap();
        let dir = self.data.path().join(node.as_str());
        std::fs::create_dir_all(&dir).unwrap();
        let identity = NodeIdentity::enroll(&dir, &self.url, &token.to_string())
            .await
            .unwrap();
        let client = identity.panel_client().unwrap();
        (identity, client)
    }

    async fn post<T: serde::Serialize>(
        &self,
        client: &reqwest::Client,
        path: &str,
        body: &T,
    ) -> (u16, serde_json::Value) {
        let r = client
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// A tenant owned by a new user; answers (tenant, owner's email).
    fn tenant(&self, slug: &str) -> (TenantId, String) {
        let email = format!("{slug}@example.test");
        let hash = self.state.hasher.hash(PASSWORD).unwrap();
        let mut conn = self.state.db.get_blocking().unwrap();
        let user = mamba_panel::users::create(
            &mut conn,
            mamba_panel::users::NewUser {
                email: email.clone(),
                display_name: slug.into(),
                password_hash: hash,
                email_verified: true,
                is_super_admin: false,
            },
            &Actor::System,
            &meta(),
        )
        .unwrap();
        let tenant = mamba_panel::tenants::create(&mut conn, &user.id, slug, slug, &meta()).unwrap();
        (TenantId::from_db(tenant.id), email)
    }

    fn server(&self, tenant: &TenantId, node: &NodeId) -> ServerId {
        let id = ServerId::generate();
        let mut conn = self.state.db.get_blocking().unwrap();
        diesel::insert_into(servers::table)
            .values((
                servers::id.eq(id.as_str()),
                servers::tenant_id.eq(tenant.as_str()),
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
            .execute(&mut conn)
            .unwrap();
        id
    }

    fn count_samples(&self, server: &ServerId) -> i64 {
        let mut conn = self.state.db.get_blocking().unwrap();
        metric_samples::table
            .filter(metric_samples::server_id.eq(server.as_str()))
            .count()
            .get_result(&mut conn)
            .unwrap()
    }

    fn count_events(&self, server: &ServerId) -> i64 {
        let mut conn = self.state.db.get_blocking().unwrap();
        server_events::table
            .filter(server_events::server_id.eq(server.as_str()))
            .count()
            .get_result(&mut conn)
            .unwrap()
    }

    fn audit_count(&self, action: &str, node: &NodeId) -> i64 {
        let mut conn = self.state.db.get_blocking().unwrap();
        audit_log::table
            .filter(audit_log::action.eq(action))
            .filter(audit_log::resource_id.eq(node.as_str()))
            .count()
            .get_result(&mut conn)
            .unwrap()
    }

    fn connectivity(&self, node: &NodeId) -> (String, Option<i64>) {
        let mut conn = self.state.db.get_blocking().unwrap();
        nodes_table::table
            .find(node.as_str())
            .select((nodes_table::connectivity, nodes_table::last_heartbeat_at))
            .first(&mut conn)
            .unwrap()
    }
}

fn sample(server: &ServerId, at: i64) -> MetricSample {
    MetricSample {
        server_id: server.to_string(),
        sampled_at_ms: at,
        cpu_millicores: 250,
        memory_mb: 512,
        egress_bytes: 1000,
        disk_bytes: 4096,
        uptime_s: 60,
    }
}

fn event(server: &ServerId, kind: EventKind) -> NodeEvent {
    NodeEvent {
        id: uuid::Uuid::now_v7().to_string(),
        server_id: server.to_string(),
        kind,
        at_ms: mamba_panel::db::now_ms(),
        message: "the server exited unexpectedly with code 137".into(),
        data: json!({"exit_code": 137, "oom_killed": true}),
    }
}

fn heartbeat(servers: &[&ServerId]) -> Heartbeat {
    Heartbeat {
        version: "0.0.0-test".into(),
        uptime_s: 12,
        resources: NodeResources {
            cpu_cores: 4,
            load_1m_milli: 500,
            memory_total_mb: 8000,
            memory_available_mb: 6000,
            disk_total_mb: 100_000,
            disk_free_mb: 50_000,
        },
        servers: servers
            .iter()
            .map(|s| HeartbeatServer {
                server_id: s.to_string(),
                state: "running".into(),
            })
            .collect(),
    }
}

async fn reports_count_only_for_the_certificates_own_servers(t: TestDb) {
    let panel = Panel::start(&t, |_| {});
    let (tenant, _) = panel.tenant("acme");
    let a = panel.node("alpha");
    let b = panel.node("bravo");
    let on_a = panel.server(&tenant, &a);
    let on_b = panel.server(&tenant, &b);
    let (_ida, client_a) = panel.enroll(&a).await;
    let now = mamba_panel::db::now_ms();

    // Node A reporting node B's server: 403, and nothing is stored, not even A's own sample
    // in the same batch.
    let mixed = MetricsBatch {
        samples: vec![sample(&on_a, now), sample(&on_b, now)],
    };
    let (status, body) = panel.post(&client_a, METRICS_PATH, &mixed).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "not_your_server");
    assert_eq!(panel.count_samples(&on_a), 0);
    assert_eq!(panel.count_samples(&on_b), 0);
    let (status, _) = panel
        .post(
            &client_a,
            EVENTS_PATH,
            &EventsBatch {
                events: vec![event(&on_b, EventKind::Crashed)],
            },
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(panel.count_events(&on_b), 0);

    // Its own server: stored; the same batch again stores nothing more.
    let own = MetricsBatch {
        samples: vec![sample(&on_a, now - 30_000), sample(&on_a, now)],
    };
    let (status, body) = panel.post(&client_a, METRICS_PATH, &own).await;
    assert_eq!(status, 200, "{body}");
    let report: IngestReport = serde_json::from_value(body).unwrap();
    assert_eq!((report.stored, report.duplicates), (2, 0));
    let (_, body) = panel.post(&client_a, METRICS_PATH, &own).await;
    let report: IngestReport = serde_json::from_value(body).unwrap();
    assert_eq!((report.stored, report.duplicates), (0, 2));
    assert_eq!(panel.count_samples(&on_a), 2);

    // Events: stored once however often they are delivered; a deleted server's event is
    // refused on its own, not the batch.
    let gone = ServerId::generate();
    let batch = EventsBatch {
        events: vec![
            event(&on_a, EventKind::Crashed),
            event(&gone, EventKind::Restarted),
        ],
    };
    let (status, body) = panel.post(&client_a, EVENTS_PATH, &batch).await;
    assert_eq!(status, 200, "{body}");
    let report: EventsReport = serde_json::from_value(body).unwrap();
    assert_eq!((report.stored, report.duplicates), (1, 0));
    assert_eq!(report.refused.len(), 1);
    assert_eq!(report.refused[0].index, 1);
    assert_eq!(report.refused[0].reason, EventRefusal::UnknownServer);
    for _ in 0..2 {
        let (_, body) = panel.post(&client_a, EVENTS_PATH, &batch).await;
        let report: EventsReport = serde_json::from_value(body).unwrap();
        assert_eq!((report.stored, report.duplicates), (0, 1));
    }
    assert_eq!(panel.count_events(&on_a), 1);

    // Bad input is a 4xx envelope, never a 500.
    let r = client_a
        .post(format!("{}{EVENTS_PATH}", panel.url))
        .header("content-type", "application/json")
        .body("{\"events\": [{\"kind\": \"exploded\"}]}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let mut hb = heartbeat(&[&on_a]);
    hb.version = String::new();
    let (status, _) = panel.post(&client_a, HEARTBEAT_PATH, &hb).await;
    assert_eq!(status, 422);

    // A heartbeat names the node from its certificate.
    let (status, body) = panel.post(&client_a, HEARTBEAT_PATH, &heartbeat(&[&on_a])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["node_id"], a.as_str());
    assert_eq!(panel.connectivity(&a).0, "online");
    assert_eq!(panel.connectivity(&b).0, "new");

    // The operator sees it: online, last heartbeat, and utilisation with live figures.
    let svc = actix_web::test::init_service(app(panel.state.clone(), common::metrics())).await;
    let bearer = common::login_new_user(&svc, &t, "op@example.test", PASSWORD, true, IP).await;
    let got = send(
        &svc,
        common::get(&format!("/api/v1/admin/nodes/{a}"), IP)
            .insert_header(("authorization", bearer.clone()))
            .to_request(),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.body["connectivity"], "online");
    assert!(got.body["last_heartbeat_at"].as_i64().is_some());
    let u = send(
        &svc,
        common::get(&format!("/api/v1/admin/nodes/{a}/utilisation"), IP)
            .insert_header(("authorization", bearer.clone()))
            .to_request(),
    )
    .await;
    assert_eq!(u.status, StatusCode::OK, "{u:?}");
    assert_eq!(u.body["capacity"]["memory_mb"], 8192);
    assert_eq!(u.body["reserved"]["memory_mb"], 1024);
    assert_eq!(u.body["live"]["memory_mb"], 512);
    assert_eq!(u.body["live"]["sampled_servers"], 1);
    assert_eq!(u.body["live"]["host"]["memory_available_mb"], 6000);
    assert_eq!(u.body["live"]["server_states"]["running"], 1);
    let missing = send(
        &svc,
        common::get(
            &format!("/api/v1/admin/nodes/{}/utilisation", uuid::Uuid::now_v7()),
            IP,
        )
        .insert_header(("authorization", bearer))
        .to_request(),
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

async fn a_revoked_certificate_is_refused(t: TestDb) {
    let panel = Panel::start(&t, |_| {});
    let (tenant, _) = panel.tenant("acme");
    let a = panel.node("alpha");
    let on_a = panel.server(&tenant, &a);
    let (_identity, client) = panel.enroll(&a).await;
    let (status, _) = panel.post(&client, HEARTBEAT_PATH, &heartbeat(&[&on_a])).await;
    assert_eq!(status, 200);

    let pki = panel.state.pki.clone();
    let id = a.to_string();
    panel
        .state
        .db
        .run(move |conn| {
            mamba_panel::node_pki::revoke(conn, &pki, &id, &Actor::System, &meta())
                .map_err(|e| mamba_panel::db::DbError::Config(e.to_string()))
        })
        .await
        .unwrap();
    // On the connection it already has (401) or a new handshake (refused): nothing stored.
    let batch = MetricsBatch {
        samples: vec![sample(&on_a, mamba_panel::db::now_ms())],
    };
    for path in [METRICS_PATH, HEARTBEAT_PATH] {
        let r = client
            .post(format!("{}{path}", panel.url))
            .json(&batch)
            .send()
            .await;
        if let Ok(r) = r {
            assert_eq!(r.status().as_u16(), 401, "{path}");
        }
    }
    let r = client
        .post(format!("{}{EVENTS_PATH}", panel.url))
        .json(&EventsBatch {
            events: vec![event(&on_a, EventKind::Crashed)],
        })
        .send()
        .await;
    assert!(r.map(|r| r.status().as_u16() == 401).unwrap_or(true));
    assert_eq!(panel.count_samples(&on_a), 0);
    assert_eq!(panel.count_events(&on_a), 0);
}

/// Polls an async condition every 50 ms until it holds, failing after `timeout`.
async fn wait_for(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_silent_node_goes_offline_and_comes_back_by_itself(t: TestDb) {
    let panel = Panel::start(&t, |c| {
        c.heartbeats.offline_after_secs = 1;
        c.heartbeats.check_interval_secs = 1;
    });
    let (tenant, _) = panel.tenant("acme");
    let a = panel.node("alpha");
    let (_identity, client) = panel.enroll(&a).await;
    mamba_panel::telemetry::spawn_heartbeat_monitor(panel.state.db.clone(), &panel.state.config.heartbeats);

    let scope = {
        let mut conn = panel.state.db.get_blocking().unwrap();
        let owner = mamba_panel::users::find_by_email(&mut conn, "acme@example.test")
            .unwrap()
            .unwrap();
        mamba_panel::authz::authorize(
            &mut conn,
            &owner,
            Actor::User(UserId::from_db(owner.id.clone())),
            tenant.as_str(),
            None,
        )
        .unwrap()
    };
    let request = |node: Option<NodeId>| mamba_panel::allocation::Request {
        name: "srv".into(),
        blueprint: "freeciv".into(),
        variables: Default::default(),
        resources: mamba_panel::nodes::Resources {
            cpu_percent: 100,
            memory_mb: 512,
            disk_mb: 1024,
        },
        ports: Vec::new(),
        node,
        location: None,
    };
    let unplaceable = |why: &str| {
        let mut conn = panel.state.db.get_blocking().unwrap();
        let aimed = mamba_panel::allocation::place(&mut conn, &scope, &request(Some(a.clone())), &meta());
        assert!(
            matches!(aimed, Err(mamba_panel::allocation::ReserveError::NodeUnavailable)),
            "{why}: {aimed:?}"
        );
        let auto = mamba_panel::allocation::place(&mut conn, &scope, &request(None), &meta());
        assert!(
            matches!(auto, Err(mamba_panel::allocation::ReserveError::NoNodeFits)),
            "{why}: {auto:?}"
        );
    };

    // Never heard from: `new`, and not placeable (its wings is not running yet).
    assert_eq!(panel.connectivity(&a).0, "new");
    unplaceable("a node never heard from");
    let (status, _) = panel.post(&client, HEARTBEAT_PATH, &heartbeat(&[])).await;
    assert_eq!(status, 200);
    assert_eq!(panel.connectivity(&a).0, "online");
    assert_eq!(panel.audit_count("node.online", &a), 1);

    // Silent for longer than offline_after_secs: the periodic check marks it offline.
    wait_for(Duration::from_secs(30), "the node to be marked offline", || {
        panel.connectivity(&a).0 == "offline"
    })
    .await;
    assert_eq!(panel.audit_count("node.offline", &a), 1);

    // Placement skips it, whether aimed at or automatic.
    unplaceable("an offline node");

    // Its next heartbeat brings it back, audited, and placement uses it again.
    let (status, _) = panel.post(&client, HEARTBEAT_PATH, &heartbeat(&[])).await;
    assert_eq!(status, 200);
    assert_eq!(panel.connectivity(&a).0, "online");
    assert_eq!(panel.audit_count("node.online", &a), 2);
    let mut conn = panel.state.db.get_blocking().unwrap();
    let placed = mamba_panel::allocation::place(&mut conn, &scope, &request(None), &meta()).unwrap();
    assert_eq!(placed.node_id, a);
}

/// A webhook receiver: answers 500 to the first delivery, 200 afterwards, and keeps every
/// (signature header, body) it got.
/// (signature header, raw body) of each delivery.
type Deliveries = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

struct Receiver {
    url: String,
    got: Deliveries,
}

fn start_receiver() -> Receiver {
    let got: Deliveries = Arc::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = got.clone();
    let server = HttpServer::new(move || {
        let seen = seen.clone();
        App::new().route(
            "/hook",
            web::post().to(move |req: HttpRequest, body: web::Bytes| {
                let seen = seen.clone();
                async move {
                    let sig = req
                        .headers()
                        .get(mamba_panel::notify::SIGNATURE_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let mut seen = seen.lock().unwrap();
                    seen.push((sig, body.to_vec()));
                    if seen.len() == 1 {
                        HttpResponse::InternalServerError().finish()
                    } else {
                        HttpResponse::NoContent().finish()
                    }
                }
            }),
        )
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    actix_web::rt::spawn(server);
    Receiver { url, got }
}

async fn events_are_listed_to_their_tenant_and_reach_the_webhook_signed(t: TestDb) {
    let receiver = start_receiver();
    let hook = receiver.url.clone();
    let panel = Panel::start(&t, |c| {
        c.notifications.webhook_url = hook;
        c.notifications.webhook_secret = SECRET.into();
        c.notifications.max_backoff_secs = 1;
    });
    mamba_panel::notify::spawn_webhook_delivery(
        panel.state.db.clone(),
        panel.state.config.notifications.clone(),
        panel.state.telemetry_wake.clone(),
    );
    let (tenant, owner) = panel.tenant("acme");
    let (_other_tenant, outsider) = panel.tenant("other");
    let a = panel.node("alpha");
    let on_a = panel.server(&tenant, &a);
    let (_identity, client) = panel.enroll(&a).await;

    let crashed = event(&on_a, EventKind::OomKilled);
    let (status, body) = panel
        .post(
            &client,
            EVENTS_PATH,
            &EventsBatch {
                events: vec![crashed.clone()],
            },
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // Refused once (500), then delivered: at least once, each copy validly signed.
    wait_for(
        Duration::from_secs(30),
        "the webhook to get the event twice",
        || receiver.got.lock().unwrap().len() >= 2,
    )
    .await;
    let got = receiver.got.lock().unwrap().clone();
    for (sig, body) in &got {
        assert!(
            mamba_panel::notify::verify(SECRET, sig, body),
            "bad signature {sig}"
        );
        assert!(!mamba_panel::notify::verify("another-secret-entirely", sig, body));
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["kind"], "oom_killed");
        assert_eq!(v["server_id"], on_a.as_str());
        assert_eq!(v["tenant_id"], tenant.as_str());
        assert_eq!(v["data"]["exit_code"], 137);
    }
    assert_eq!(got[0].1, got[1].1, "a retry sends the same event");
    wait_for(Duration::from_secs(10), "the delivery to be recorded", || {
        let mut conn = panel.state.db.get_blocking().unwrap();
        server_events::table
            .filter(server_events::notified_at.is_null())
            .count()
            .get_result::<i64>(&mut conn)
            .unwrap()
            == 0
    })
    .await;

    // The tenant sees the event; another tenant's member cannot even see the server.
    let svc = actix_web::test::init_service(app(panel.state.clone(), common::metrics())).await;
    let login = |email: String| {
        common::post(
            "/api/v1/auth/login",
            json!({"email": email, "password": PASSWORD, "client": "api"}),
            IP,
        )
        .to_request()
    };
    let a1 = send(&svc, login(owner)).await;
    let bearer = format!("Bearer {}", a1.body["tokens"]["access_token"].as_str().unwrap());
    let uri = format!("/api/v1/tenants/{tenant}/servers/{on_a}/events?limit=10");
    let list = send(
        &svc,
        common::get(&uri, IP)
            .insert_header(("authorization", bearer.clone()))
            .to_request(),
    )
    .await;
    assert_eq!(list.status, StatusCode::OK, "{list:?}");
    let items = list.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["kind"], "oom_killed");
    assert_eq!(items[0]["occurred_at"], crashed.at_ms);
    let bad = send(
        &svc,
        common::get(&format!("{uri}&cursor=nope"), IP)
            .insert_header(("authorization", bearer))
            .to_request(),
    )
    .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}");
    let a2 = send(&svc, login(outsider)).await;
    let other = format!("Bearer {}", a2.body["tokens"]["access_token"].as_str().unwrap());
    let denied = send(
        &svc,
        common::get(&uri, IP)
            .insert_header(("authorization", other))
            .to_request(),
    )
    .await;
    assert_eq!(denied.status, StatusCode::NOT_FOUND, "{denied:?}");
}

fn activity(server: &ServerId, event: &str, n: usize) -> ActivityEntry {
    ActivityEntry {
        id: uuid::Uuid::now_v7().to_string(),
        server_id: server.to_string(),
        event: event.into(),
        actor: "user-1".into(),
        ip: Some("203.0.113.9".into()),
        properties: json!({"file": format!("world/{n}.sav")}),
        at_ms: mamba_panel::db::now_ms(),
    }
}

/// Ingest over the node listener (dedupe on re-send, 403 for another node's server), then the
/// tenant's list: pages, the event-prefix filter, a key without `activity.read`, another
/// tenant, and the retention prune.
async fn activity_is_stored_once_for_the_nodes_own_servers_and_listed_to_its_tenant(t: TestDb) {
    let panel = Panel::start(&t, |_| {});
    let (tenant, owner) = panel.tenant("acme");
    let (_other_tenant, outsider) = panel.tenant("other");
    let a = panel.node("alpha");
    let b = panel.node("beta");
    let on_a = panel.server(&tenant, &a);
    let on_b = panel.server(&tenant, &b);
    let (_identity, client) = panel.enroll(&a).await;
    let count = |server: &ServerId| -> i64 {
        let mut conn = panel.state.db.get_blocking().unwrap();
        server_activity::table
            .filter(server_activity::server_id.eq(server.as_str()))
            .count()
            .get_result(&mut conn)
            .unwrap()
    };

    let batch = ActivityBatch {
        entries: vec![
            activity(&on_a, "sftp.login", 0),
            activity(&on_a, "sftp.write", 1),
            activity(&on_a, "file.delete", 2),
        ],
    };
    let (status, body) = panel.post(&client, ACTIVITY_PATH, &batch).await;
    assert_eq!(status, 200, "{body}");
    let report: ActivityReport = serde_json::from_value(body).unwrap();
    assert_eq!((report.stored, report.duplicates), (3, 0), "{report:?}");
    assert!(report.refused.is_empty(), "{report:?}");
    // The outbox re-sends a batch whose answer was lost: nothing is stored twice.
    let (status, body) = panel.post(&client, ACTIVITY_PATH, &batch).await;
    assert_eq!(status, 200, "{body}");
    let report: ActivityReport = serde_json::from_value(body).unwrap();
    assert_eq!((report.stored, report.duplicates), (0, 3), "{report:?}");
    assert_eq!(count(&on_a), 3);

    // One entry about node B's server refuses the whole batch.
    let mixed = ActivityBatch {
        entries: vec![
            activity(&on_a, "sftp.rename", 3),
            activity(&on_b, "sftp.delete", 4),
        ],
    };
    let (status, body) = panel.post(&client, ACTIVITY_PATH, &mixed).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "not_your_server");
    assert_eq!((count(&on_a), count(&on_b)), (3, 0));
    // Malformed entries are refused one by one; the rest is stored.
    let mut bad = activity(&on_a, "file.write", 5);
    bad.id = "not-a-uuid".into();
    let mut control = activity(&on_a, "file.write", 6);
    control.actor = "a\nb".into();
    let (status, body) = panel
        .post(
            &client,
            ACTIVITY_PATH,
            &ActivityBatch {
                entries: vec![bad, control, activity(&on_a, "file.write", 7)],
            },
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let report: ActivityReport = serde_json::from_value(body).unwrap();
    assert_eq!(report.stored, 1, "{report:?}");
    assert_eq!(
        report.refused.iter().map(|r| r.index).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert_eq!(count(&on_a), 4);

    // The tenant's list: newest first, a page at a time, filtered by prefix.
    let svc = actix_web::test::init_service(app(panel.state.clone(), common::metrics())).await;
    let login = |email: String| {
        common::post(
            "/api/v1/auth/login",
            json!({"email": email, "password": PASSWORD, "client": "api"}),
            IP,
        )
        .to_request()
    };
    let a1 = send(&svc, login(owner)).await;
    let bearer = format!("Bearer {}", a1.body["tokens"]["access_token"].as_str().unwrap());
    let get = |uri: String, auth: String| {
        common::get(&uri, IP)
            .insert_header(("authorization", auth))
            .to_request()
    };
    let base = format!("/api/v1/tenants/{tenant}/servers/{on_a}/activity");
    let first = send(&svc, get(format!("{base}?limit=3"), bearer.clone())).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let items = first.body["items"].as_array().unwrap();
    let events: Vec<&str> = items.iter().map(|i| i["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["file.write", "file.delete", "sftp.write"]);
    assert_eq!(items[0]["actor"], "user-1");
    assert_eq!(items[0]["ip"], "203.0.113.9");
    assert_eq!(items[0]["properties"]["file"], "world/7.sav");
    let cursor = first.body["next_cursor"].as_str().unwrap();
    let second = send(
        &svc,
        get(format!("{base}?limit=3&cursor={cursor}"), bearer.clone()),
    )
    .await;
    assert_eq!(second.status, StatusCode::OK, "{second:?}");
    let items = second.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["event"], "sftp.login");
    assert!(second.body["next_cursor"].is_null());
    let sftp = send(&svc, get(format!("{base}?event=sftp."), bearer.clone())).await;
    assert_eq!(sftp.status, StatusCode::OK, "{sftp:?}");
    let events: Vec<&str> = sftp.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["sftp.write", "sftp.login"]);
    let wild = send(&svc, get(format!("{base}?event=%25"), bearer.clone())).await;
    assert_eq!(wild.status, StatusCode::UNPROCESSABLE_ENTITY, "{wild:?}");

    // A key of the same tenant without `activity.read` is refused.
    let key = send(
        &svc,
        common::post(
            &format!("/api/v1/tenants/{tenant}/api-keys"),
            json!({"memo": "reader", "scopes": ["server.read"]}),
            IP,
        )
        .insert_header(("authorization", bearer.clone()))
        .to_request(),
    )
    .await;
    assert_eq!(key.status, StatusCode::CREATED, "{key:?}");
    let key = format!("Bearer {}", key.body["key"].as_str().unwrap());
    let refused = send(&svc, get(base.clone(), key)).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{refused:?}");
    // Another tenant's member cannot even see the server.
    let a2 = send(&svc, login(outsider)).await;
    let other = format!("Bearer {}", a2.body["tokens"]["access_token"].as_str().unwrap());
    let hidden = send(&svc, get(base.clone(), other)).await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND, "{hidden:?}");

    // Retention: entries received before the horizon go, newer ones stay.
    let mut conn = panel.state.db.get_blocking().unwrap();
    diesel::update(server_activity::table.filter(server_activity::event.eq("sftp.login")))
        .set(server_activity::received_at.eq(1_000_i64))
        .execute(&mut conn)
        .unwrap();
    let pruned = mamba_panel::activity::prune(&mut conn, mamba_panel::db::now_ms() - 3_600_000).unwrap();
    assert_eq!(pruned, 1);
    drop(conn);
    assert_eq!(count(&on_a), 3);
}

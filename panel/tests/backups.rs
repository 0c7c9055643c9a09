//! Backups through the panel's API against a real wings on real Docker, on both backends:
//! one server (the testbox image) created through the API and installed by the jobs worker;
//! a marker file written through wings' file API; an encrypted backup made by the
//! `server_backup` job (completed with size and SHA-256); its single-use download URL
//! fetched and hashed; the marker changed and an extra file added, then a restore with
//! `truncate` brings the marker back and removes the extra file (and the server cannot be
//! deleted while the restore is queued); the per-server limit; tenant B gets 404; a member
//! without `backup.create` gets 403; a delete removes the archive on the node; every action
//! is audited; deleting the server takes its backups along.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::{Method, StatusCode};
use actix_web::test;
use common::node::{PanelWithListener, WingsNode, free_port};
use common::{Answer, TestDb, send};
use diesel::prelude::*;
use mamba_panel::allocation::{self, NewPools, Strategy};
use mamba_panel::audit::Actor;
use mamba_panel::http::app;
use mamba_panel::ids::{NodeId, ServerId};
use mamba_panel::jobs;
use mamba_panel::provisioning::Provisioner;
use mamba_panel::request_meta::RequestMeta;
use mamba_shared::blueprint::Protocol;
use serde_json::{Value, json};
use sha2::Digest as _;

both_backends!(backups_through_the_panel_with_a_real_node);

const IP: &str = "198.51.100.71";
const PASSWORD: &str = "backups test passphrase";
const WAIT: Duration = Duration::from_secs(120);

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

/// Polls `check` until it answers `Some`, or fails after `WAIT` naming `what`.
macro_rules! wait_for {
    ($what:expr, $check:expr) => {{
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = $check {
                break v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {}", $what);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }};
}

/// A new user owning a new tenant; answers (bearer, tenant id).
async fn owner<S, B>(svc: &S, t: &TestDb, email: &str) -> (String, String)
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let bearer = common::login_new_user(svc, t, email, PASSWORD, false, IP).await;
    let slug = format!("tenant-{}", email.split('@').next().unwrap());
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

fn add_pool(t: &TestDb, node: &NodeId, port: u16) {
    let mut conn = t.db.get_blocking().unwrap();
    allocation::add_pools(
        &mut conn,
        node,
        &NewPools {
            ips: vec!["127.0.0.1".into()],
            ports: vec![port.to_string()],
            protocols: vec![Protocol::Tcp, Protocol::Udp],
            strategy: Strategy::Sequential,
        },
        &Actor::System,
        &RequestMeta::system(),
    )
    .unwrap();
}

/// wings' file API, over the panel's own mutual TLS (the panel has no file routes yet).
struct Files {
    http: reqwest::Client,
    base: String,
}

impl Files {
    fn new(panel: &PanelWithListener, wings: &WingsNode, server: &str) -> Files {
        let tls = panel.state.pki.client_for_node(wings.node.id.as_str()).unwrap();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .build()
            .unwrap();
        Files {
            http,
            base: format!("https://127.0.0.1:{}/api/servers/{server}/files", wings.api_port),
        }
    }

    async fn write(&self, file: &str, text: &str) {
        let r = self
            .http
            .post(format!("{}/write?file={file}", self.base))
            .body(text.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{:?}", r.text().await);
    }

    /// The file's text, or `None` when it does not exist.
    async fn read(&self, file: &str) -> Option<String> {
        let r = self
            .http
            .get(format!("{}/contents?file={file}", self.base))
            .send()
            .await
            .unwrap();
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            return None;
        }
        assert!(r.status().is_success(), "{:?}", r.status());
        Some(r.text().await.unwrap())
    }
}

struct Workers {
    stop: tokio::sync::watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Workers {
    fn start(state: &mamba_panel::http::AppState) -> Workers {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let handles = jobs::worker::spawn(
            state.db.clone(),
            jobs::Settings::from_config(&state.config.jobs),
            Arc::new(Provisioner::from_state(state)),
            1,
            rx,
            state.jobs_wake.clone(),
        );
        Workers { stop, handles }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for h in self.handles {
            let _ = h.await;
        }
    }
}

async fn backups_through_the_panel_with_a_real_node(t: TestDb) {
    let blueprints = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    std::fs::copy(
        root.join("wings/tests/fixtures/testbox.yaml"),
        blueprints.path().join("testbox.yaml"),
    )
    .unwrap();
    let mut config = t.config();
    config.blueprints.dir = blueprints.path().display().to_string();
    config.backups.encrypt = true;
    config.quotas.max_backups_per_server = 2;
    config.jobs.poll_interval_ms = 100;
    config.jobs.backoff_base_ms = 200;
    let panel = PanelWithListener::start_with(&t, config);
    let wings = WingsNode::start(&t, &panel, "backup-node").await;
    let state = panel.state.clone();
    let svc = test::init_service(app(state.clone(), common::metrics())).await;
    let mut workers = Workers::start(&state);

    let (bearer, tenant) = owner(&svc, &t, "backupowner@example.test").await;
    let (other, other_tenant) = owner(&svc, &t, "stranger@example.test").await;
    let support = common::new_member(
        &svc,
        &t,
        ("support@example.test", PASSWORD, IP),
        &tenant,
        "SUPPORT",
    )
    .await;
    add_pool(&t, &wings.node.id, free_port());

    // One server, installed and started by the jobs worker.
    let servers = format!("/api/v1/tenants/{tenant}/servers");
    let a = call(
        &svc,
        Method::POST,
        &servers,
        &bearer,
        Some(json!({"name": "backed up", "blueprint": "testbox", "node": wings.node.id.to_string()})),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    let server = a.body["server"]["id"].as_str().unwrap().to_string();
    let server_url = format!("{servers}/{server}");
    wait_for!("the server to run", {
        let a = call(&svc, Method::GET, &server_url, &bearer, None).await;
        (a.body["status"] == "running").then_some(())
    });
    let base = format!("{server_url}/backups");
    let files = Files::new(&panel, &wings, &server);
    files.write("marker.txt", "before the backup").await;
    files.write("skip.log", "left out by the ignore list").await;

    // Refusals before anything is made: a member without backup.create, another tenant,
    // malformed input.
    let a = call(&svc, Method::POST, &base, &support, Some(json!({"name": "x"}))).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{a:?}");
    assert!(a.body["error"]["code"].is_string());
    let a = call(
        &svc,
        Method::POST,
        &format!("/api/v1/tenants/{other_tenant}/servers/{server}/backups"),
        &other,
        Some(json!({})),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{a:?}");
    let a = call(
        &svc,
        Method::POST,
        &base,
        &bearer,
        Some(json!({"ignore": ["a\nb"]})),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{a:?}");
    let a = call(&svc, Method::POST, &base, &bearer, Some(json!({"nme": "typo"}))).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");

    // A backup: pending with its job, then completed by the worker with size and checksum.
    let a = call(
        &svc,
        Method::POST,
        &base,
        &bearer,
        Some(json!({"name": "first", "ignore": ["*.log"]})),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    assert_eq!(a.body["backup"]["status"], "pending");
    assert_eq!(a.body["backup"]["adapter"], "local");
    assert_eq!(a.body["backup"]["encrypted"], true);
    assert!(a.body["job"].is_string());
    let first = a.body["backup"]["id"].as_str().unwrap().to_string();
    assert_eq!(common::audit_entries(&t, "backup.create", &first), 1);
    let done = wait_for!("the backup to complete", {
        let a = call(&svc, Method::GET, &format!("{base}/{first}"), &bearer, None).await;
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
        assert_ne!(a.body["status"], "failed", "{a:?}");
        (a.body["status"] == "completed").then_some(a.body)
    });
    let size = done["size_bytes"].as_i64().unwrap();
    let sha256 = done["sha256"].as_str().unwrap().to_string();
    assert!(size > 0);
    assert_eq!(sha256.len(), 64);
    assert_eq!(done["ignore"], json!(["*.log"]));
    assert!(done["completed_at"].is_i64());
    // The node has it under the same id, encrypted, with the same figures.
    let client = mamba_panel::wings_client::WingsClient::new(&state.pki, &wings.node).unwrap();
    let sid = ServerId::parse(&server).unwrap();
    let on_node = client.backup(&sid, &first).await.unwrap();
    assert!(on_node.encrypted);
    assert_eq!(on_node.sha256.as_deref(), Some(sha256.as_str()));
    assert_eq!(on_node.size, Some(size as u64));
    // The key is stored sealed, never as the base64 the node was given.
    let sealed: Option<String> = {
        use mamba_panel::db::schema::server_backups;
        let mut conn = t.db.get_blocking().unwrap();
        server_backups::table
            .find(&first)
            .select(server_backups::sealed_key)
            .first(&mut conn)
            .unwrap()
    };
    assert!(sealed.is_some_and(|s| s.len() > 60));

    // List and get: the support member may read; tenant B may not see it.
    let a = call(&svc, Method::GET, &base, &support, None).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(a.body["items"][0]["id"], first.as_str());
    assert_eq!(a.body["items"][0]["status"], "completed");
    assert_eq!(a.body["items"][0]["sha256"], sha256.as_str());
    for uri in [
        format!("/api/v1/tenants/{other_tenant}/servers/{server}/backups/{first}"),
        format!("/api/v1/tenants/{other_tenant}/servers/{server}/backups"),
        format!("/api/v1/tenants/{other_tenant}/servers/{server}/backups/{first}/download"),
        format!("{base}/{first}"),
    ] {
        let a = call(&svc, Method::GET, &uri, &other, None).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{uri}: {a:?}");
    }
    let a = call(
        &svc,
        Method::DELETE,
        &format!("/api/v1/tenants/{other_tenant}/servers/{server}/backups/{first}"),
        &other,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{a:?}");
    let a = call(&svc, Method::DELETE, &format!("{base}/{first}"), &support, None).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{a:?}");

    // Download: a single-use URL on the node, whose body hashes to the recorded checksum.
    let a = call(
        &svc,
        Method::GET,
        &format!("{base}/{first}/download"),
        &bearer,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let url = a.body["url"].as_str().unwrap().to_string();
    assert!(url.starts_with(&format!(
        "http://127.0.0.1:{}/download/backup?token=",
        wings.public_port
    )));
    assert_eq!(common::audit_entries(&t, "backup.download", &first), 1);
    let plain = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = plain.get(&url).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len() as i64, size);
    assert_eq!(hex::encode(sha2::Sha256::digest(&body)), sha256);
    let r = plain.get(&url).send().await.unwrap();
    assert_eq!(
        r.status(),
        reqwest::StatusCode::FORBIDDEN,
        "a used URL is refused"
    );

    // Change the files, then restore with truncate. While the restore is queued the server
    // cannot be deleted, nor the backup.
    files.write("marker.txt", "changed after the backup").await;
    files.write("extra.txt", "not in the backup").await;
    workers.stop().await;
    let a = call(
        &svc,
        Method::POST,
        &format!("{base}/{first}/restore"),
        &bearer,
        Some(json!({"truncate": true})),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    assert_eq!(a.body["backup"]["status"], "restoring");
    assert_eq!(common::audit_entries(&t, "backup.restore", &first), 1);
    let a = call(&svc, Method::DELETE, &server_url, &bearer, None).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    assert_eq!(a.body["error"]["code"], "backup_restoring");
    let a = call(&svc, Method::DELETE, &format!("{base}/{first}"), &bearer, None).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    let a = call(
        &svc,
        Method::POST,
        &format!("{base}/{first}/restore"),
        &bearer,
        Some(json!({"truncate": false})),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    workers = Workers::start(&state);
    let restored = wait_for!("the restore to finish", {
        let a = call(&svc, Method::GET, &format!("{base}/{first}"), &bearer, None).await;
        (a.body["status"] == "completed").then_some(a.body)
    });
    assert!(restored["error"].is_null(), "{restored}");
    assert_eq!(
        files.read("marker.txt").await.as_deref(),
        Some("before the backup")
    );
    assert_eq!(
        files.read("extra.txt").await,
        None,
        "truncate emptied the folder first"
    );
    assert_eq!(files.read("skip.log").await, None, "ignored by the backup");
    let r = client.backup(&sid, &first).await.unwrap().restore.unwrap();
    assert_eq!(r.state, mamba_shared::wings_api::RestoreState::Complete);
    assert!(r.truncate);
    // The node started the server again after the extract.
    wait_for!("the server to run again", {
        let a = call(&svc, Method::GET, &server_url, &bearer, None).await;
        (a.body["status"] == "running").then_some(())
    });

    // The limit: two backups per server here; the third is refused.
    let a = call(&svc, Method::POST, &base, &bearer, Some(json!({}))).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    let second = a.body["backup"]["id"].as_str().unwrap().to_string();
    assert!(
        a.body["backup"]["name"]
            .as_str()
            .unwrap()
            .starts_with("Backup 20")
    );
    let a = call(&svc, Method::POST, &base, &bearer, Some(json!({"name": "third"}))).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    assert_eq!(a.body["error"]["code"], "quota_exceeded");
    assert_eq!(a.body["error"]["details"][0]["field"], "max_backups_per_server");
    let a = call(&svc, Method::GET, &format!("{base}?limit=1"), &bearer, None).await;
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

    // Delete: the archive goes on the node, then the backup in the panel.
    wait_for!("the second backup to complete", {
        let a = call(&svc, Method::GET, &format!("{base}/{second}"), &bearer, None).await;
        (a.body["status"] == "completed").then_some(())
    });
    let a = call(&svc, Method::DELETE, &format!("{base}/{first}"), &bearer, None).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    assert_eq!(a.body["backup"]["status"], "deleting");
    assert_eq!(common::audit_entries(&t, "backup.delete", &first), 1);
    wait_for!("the backup to be deleted", {
        let a = call(&svc, Method::GET, &format!("{base}/{first}"), &bearer, None).await;
        (a.status == StatusCode::NOT_FOUND).then_some(())
    });
    assert!(client.backup(&sid, &first).await.unwrap_err().is_not_found());
    let a = call(&svc, Method::POST, &base, &bearer, Some(json!({"name": "third"}))).await;
    assert_eq!(
        a.status,
        StatusCode::ACCEPTED,
        "room again after the delete: {a:?}"
    );

    // Deleting the server takes its backups along, on the node and in the panel.
    let a = call(&svc, Method::DELETE, &server_url, &bearer, None).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    wait_for!("the server to be removed", {
        let a = call(&svc, Method::GET, &server_url, &bearer, None).await;
        (a.status == StatusCode::NOT_FOUND).then_some(())
    });
    let left: i64 = {
        use mamba_panel::db::schema::server_backups;
        let mut conn = t.db.get_blocking().unwrap();
        server_backups::table
            .filter(server_backups::server_id.eq(&server))
            .count()
            .get_result(&mut conn)
            .unwrap()
    };
    assert_eq!(left, 0);
    workers.stop().await;
    assert!(wings.containers().is_empty(), "{:?}", wings.containers());
}

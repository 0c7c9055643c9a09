//! The reporter against a real panel process (SQLite) and a real wings process enrolled with
//! `wings enroll`: heartbeats bring the node online, samples and a crash event arrive over
//! mutual TLS; with the panel killed, wings keeps samples in its on-disk outbox and delivers
//! every one of them, once and in order, after the panel is back; a small outbox never grows
//! past its bound (SECURITY-CHECKLIST 39); what a user does over SFTP (paramiko) while the
//! panel is down waits in the outbox and reaches the server's activity log once, in order.
//!
//! The panel binary is not a dependency of wings (wings never depends on the panel): the test
//! runs the `panel` that `cargo test --workspace` builds into the same target folder, and
//! builds it there when it is missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{docker, free_port, testbox, wait_for, workspace_root};
use serde_json::{Value, json};

const MASTER_KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

fn panel_binary() -> PathBuf {
    let wings = PathBuf::from(env!("CARGO_BIN_EXE_wings"));
    let panel = wings.with_file_name("panel");
    if !panel.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace_root())
            .args(["build", "--locked", "-p", "mamba-panel", "--bin", "panel"])
            .status()
            .unwrap();
        assert!(status.success(), "cannot build the panel binary");
    }
    assert!(panel.exists(), "no panel binary at {}", panel.display());
    panel
}

/// A real panel process on SQLite, restartable on the same database and ports.
struct Panel {
    child: Option<Child>,
    dir: tempfile::TempDir,
    api: u16,
    nodes: u16,
    http: reqwest::Client,
    bearer: String,
    /// The operator's password (`op@example.test`), who owns the test's tenant.
    password: String,
}

impl Panel {
    async fn start() -> Panel {
        // ring is the process's TLS provider (reqwest is built without one).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::Builder::new()
            .prefix("mamba-reporter-panel")
            .tempdir()
            .unwrap();
        let mut panel = Panel {
            child: None,
            dir,
            api: free_port(),
            nodes: free_port(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            bearer: String::new(),
            password: String::new(),
        };
        let out = panel
            .command()
            .args(["admin", "create-user", "--email", "op@example.test"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let password = text
            .lines()
            .find_map(|l| l.strip_prefix("password:"))
            .unwrap()
            .trim()
            .to_string();
        panel.spawn().await;
        let login = panel
            .http
            .post(panel.url("/api/v1/auth/login"))
            .json(&json!({"email": "op@example.test", "password": password, "client": "api"}))
            .send()
            .await
            .unwrap();
        let body: Value = login.json().await.unwrap();
        panel.bearer = format!("Bearer {}", body["tokens"]["access_token"].as_str().unwrap());
        panel.password = password;
        panel
    }

    fn db_path(&self) -> PathBuf {
        self.dir.path().join("panel.db")
    }

    fn node_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.nodes)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.api)
    }

    fn command(&self) -> Command {
        let mut c = Command::new(panel_binary());
        c.current_dir(workspace_root())
            .env("DATABASE_URL", format!("sqlite://{}", self.db_path().display()))
            .env("PANEL_MASTER_KEY", MASTER_KEY)
            .env("PANEL_HTTP__LISTEN", format!("127.0.0.1:{}", self.api))
            .env("PANEL_NODE_LISTENER__LISTEN", format!("127.0.0.1:{}", self.nodes))
            .env("PANEL_NODE_LISTENER__PUBLIC_URL", self.node_url())
            .env("PANEL_AUTH__ARGON2_MEMORY_KIB", "8192")
            .env("PANEL_AUTH__ARGON2_ITERATIONS", "1")
            .env("PANEL_HEARTBEATS__OFFLINE_AFTER_SECS", "5")
            .env("PANEL_HEARTBEATS__CHECK_INTERVAL_SECS", "1")
            .env_remove("REDIS_URL")
            .env("RUST_LOG", "info");
        c
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("panel.log"))
            .unwrap();
        let child = self
            .command()
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let (http, url) = (self.http.clone(), self.url("/healthz"));
        wait_for("the panel to answer /healthz", Duration::from_secs(60), || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                http.get(&url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            }
        })
        .await;
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self
            .http
            .request(method, self.url(path))
            .header("authorization", &self.bearer);
        if let Some(body) = body {
            r = r.json(&body);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Runs SQL on the panel's SQLite file (Python's sqlite3, an independent client).
    fn sql(&self, query: &str, params: Value) -> Value {
        let script = "import json,sqlite3,sys\n\
             c=sqlite3.connect(sys.argv[1], timeout=30)\n\
             cur=c.execute(sys.argv[2], json.loads(sys.argv[3]))\n\
             rows=cur.fetchall()\n\
             c.commit()\n\
             print(json.dumps(rows))\n";
        let out = Command::new("python3")
            .args(["-c", script])
            .arg(self.db_path())
            .arg(query)
            .arg(params.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("panel.log")).unwrap_or_default()
    }
}

impl Drop for Panel {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- panel log ---\n{}", self.log());
        }
    }
}

/// A wings process run from a config file in its own folder.
struct Node {
    child: Option<Child>,
    dir: tempfile::TempDir,
    api: u16,
    public: u16,
    /// SFTP's port, when it is served (logins checked by the panel).
    sftp: Option<u16>,
}

impl Node {
    fn new() -> Node {
        Node {
            child: None,
            dir: tempfile::Builder::new()
                .prefix("mamba-reporter-wings")
                .tempdir()
                .unwrap(),
            api: free_port(),
            public: free_port(),
            sftp: None,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn outbox(&self) -> PathBuf {
        self.data_dir().join("outbox")
    }

    fn write_config(&self, reporter: &str) -> PathBuf {
        let path = self.dir.path().join("wings.toml");
        // A long grant cache, so a user logged in once gets in again while the panel is down.
        let sftp = match self.sftp {
            Some(port) => {
                format!("listen = \"127.0.0.1:{port}\"\nauth = \"panel\"\npanel_cache_secs = 600")
            }
            None => "enabled = false".into(),
        };
        std::fs::write(
            &path,
            format!(
                "[api]\nlisten = \"127.0.0.1:{}\"\npublic_listen = \"127.0.0.1:{}\"\n\n\
                 [system]\ndata_dir = \"{}\"\n\n[sftp]\n{sftp}\n\n[reporter]\n{reporter}\n",
                self.api,
                self.public,
                self.data_dir().display()
            ),
        )
        .unwrap();
        path
    }

    async fn spawn(&mut self, reporter: &str, health_url: String) {
        let config = self.write_config(reporter);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("wings.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_wings"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info,mamba_wings=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let http = reqwest::Client::new();
        wait_for("wings to answer /healthz", Duration::from_secs(60), || {
            let (http, url) = (http.clone(), health_url.clone());
            async move {
                http.get(&url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            }
        })
        .await;
    }

    /// Before the real enrollment: the server is created under a throwaway identity (the
    /// harness' test CA), which is then wiped with everything its reporter queued, so the
    /// panel hears of the node only once it is enrolled.
    async fn create_server(&mut self, id: &str) {
        let pki = common::TestPki::new();
        pki.enroll(&self.data_dir());
        self.spawn("", format!("http://127.0.0.1:{}/healthz", self.public))
            .await;
        let http = pki.panel_client();
        let port = free_port();
        let r = http
            .post(format!("https://127.0.0.1:{}/api/servers", self.api))
            .json(&json!({
                "id": id,
                "blueprint": testbox(),
                "variables": {},
                "allocations": {"default": {"ip": "127.0.0.1", "port": port}},
                "start_on_completion": true,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap_or_default());
        let url = format!("https://127.0.0.1:{}/api/servers/{id}", self.api);
        wait_for("the server to run", Duration::from_secs(120), || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
                (v["state"] == "running").then_some(())
            }
        })
        .await;
        self.terminate();
        std::fs::remove_dir_all(self.data_dir().join("pki")).unwrap();
        let _ = std::fs::remove_dir_all(self.outbox());
    }

    fn enroll(&self, panel_url: &str, token: &str) {
        let out = Command::new(env!("CARGO_BIN_EXE_wings"))
            .arg("--config")
            .arg(self.dir.path().join("wings.toml"))
            .args(["enroll", "--panel", panel_url, "--token", token])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// Enrolled: the public listener answers /healthz over plain HTTP.
    async fn serve_enrolled(&mut self, reporter: &str) {
        let url = format!("http://127.0.0.1:{}/healthz", self.public);
        self.spawn(reporter, url).await;
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()
                .unwrap();
            child.wait().unwrap();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("wings.log")).unwrap_or_default()
    }

    fn containers(&self) -> Vec<String> {
        let filter = format!("label=mamba.data-dir={}", self.data_dir().display());
        let (_, out) = docker(&["ps", "-aq", "--filter", &filter]);
        out.lines().map(str::to_string).collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for id in self.containers() {
            let _ = docker(&["rm", "-f", &id]);
        }
        if std::thread::panicking() {
            eprintln!("--- wings log ---\n{}", self.log());
        }
    }
}

/// Every (server, sampled_at) in the outbox's segment files, in file order.
fn outbox_samples(dir: &Path) -> Vec<(String, i64)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for line in text.lines() {
            let Ok(record) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if record["kind"] != "metrics" {
                continue;
            }
            for s in record["batch"]["samples"].as_array().into_iter().flatten() {
                out.push((
                    s["server_id"].as_str().unwrap().to_string(),
                    s["sampled_at_ms"].as_i64().unwrap(),
                ));
            }
        }
    }
    out
}

fn outbox_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A panel with a node, a tenant and the server's row, and a wings enrolled as that node,
/// its server running (created before enrollment, recovered by the enrolled wings).
async fn setup(reporter: &str) -> (Panel, Node, String, String) {
    setup_with(reporter, false).await
}

/// [`setup`], with SFTP served when `sftp` is set.
async fn setup_with(reporter: &str, sftp: bool) -> (Panel, Node, String, String) {
    let panel = Panel::start().await;
    let (status, node) = panel
        .api(
            reqwest::Method::POST,
            "/api/v1/admin/nodes",
            Some(
                json!({"name": "reporter", "fqdn": "127.0.0.1", "location": "test",
                "cpu_percent": 400, "memory_mb": 8192, "disk_mb": 100000}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{node}");
    let node_id = node["id"].as_str().unwrap().to_string();
    let (status, tenant) = panel
        .api(
            reqwest::Method::POST,
            "/api/v1/tenants",
            Some(json!({"slug": "acme", "name": "Acme"})),
        )
        .await;
    assert_eq!(status, 201, "{tenant}");
    let server_id = uuid::Uuid::now_v7().to_string();
    panel.sql(
        "INSERT INTO servers (id, tenant_id, node_id, name, blueprint, memory_mb, cpu_percent, disk_mb, \
         variables, status, created_at, updated_at) VALUES (?, ?, ?, 'srv', 'testbox', 128, 100, 256, '{}', 'running', 0, 0)",
        json!([server_id, tenant["id"], node_id]),
    );
    let (status, token) = panel
        .api(
            reqwest::Method::POST,
            &format!("/api/v1/admin/nodes/{node_id}/enrollment-token"),
            None,
        )
        .await;
    assert_eq!(status, 201, "{token}");

    let mut wings = Node::new();
    wings.sftp = sftp.then(free_port);
    wings.create_server(&server_id).await;
    wings.enroll(&panel.node_url(), token["token"].as_str().unwrap());
    wings.serve_enrolled(reporter).await;
    (panel, wings, node_id, server_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_survive_a_panel_outage_and_arrive_once_in_order() {
    let (mut panel, wings, node_id, server_id) =
        setup("heartbeat_interval_secs = 1\nsample_interval_secs = 1\nretry_max_secs = 1\n").await;

    // Heartbeats: online. Samples and a crash event arrive.
    wait_for("the node to be online", Duration::from_secs(60), || {
        let v = panel.sql("SELECT connectivity FROM nodes WHERE id = ?", json!([node_id]));
        async move { (v[0][0] == "online").then_some(()) }
    })
    .await;
    wait_for("samples to arrive", Duration::from_secs(60), || {
        let v = panel.sql(
            "SELECT COUNT(*) FROM metric_samples WHERE server_id = ? AND uptime_s > 0",
            json!([server_id]),
        );
        async move { (v[0][0].as_i64().unwrap() >= 2).then_some(()) }
    })
    .await;
    let (ok, _) = docker(&["kill", &format!("mamba-{server_id}")]);
    assert!(ok);
    wait_for("the crash event to arrive", Duration::from_secs(60), || {
        let v = panel.sql(
            "SELECT COUNT(*) FROM server_events WHERE server_id = ? AND kind = 'crashed'",
            json!([server_id]),
        );
        async move { (v[0][0].as_i64().unwrap() >= 1).then_some(()) }
    })
    .await;

    // The panel dies. wings keeps sampling into its outbox.
    panel.kill9();
    let outbox = wings.outbox();
    wait_for("samples to wait in the outbox", Duration::from_secs(60), || {
        let n = outbox_samples(&outbox).len();
        async move { (n >= 5).then_some(()) }
    })
    .await;
    let buffered = outbox_samples(&outbox);
    assert!(
        wings.log().contains("reports wait in the outbox"),
        "{}",
        wings.log()
    );

    // Back: every buffered sample arrives, once, in the order it was taken.
    panel.spawn().await;
    let keys: BTreeSet<(String, i64)> = buffered.iter().cloned().collect();
    assert_eq!(keys.len(), buffered.len(), "the outbox held a sample twice");
    let newest = buffered.iter().map(|(_, at)| *at).max().unwrap();
    wait_for("the buffered samples to arrive", Duration::from_secs(120), || {
        let v = panel.sql(
            "SELECT COUNT(*) FROM metric_samples WHERE server_id = ? AND sampled_at <= ?",
            json!([server_id, newest]),
        );
        let oldest = buffered.iter().map(|(_, at)| *at).min().unwrap();
        let w = panel.sql(
            "SELECT COUNT(*) FROM metric_samples WHERE server_id = ? AND sampled_at >= ? AND sampled_at <= ?",
            json!([server_id, oldest, newest]),
        );
        let want = buffered.len() as i64;
        async move { (v[0][0].as_i64().unwrap() > 0 && w[0][0].as_i64().unwrap() == want).then_some(()) }
    })
    .await;
    let rows = panel.sql(
        "SELECT sampled_at, received_at FROM metric_samples WHERE server_id = ? ORDER BY sampled_at",
        json!([server_id]),
    );
    let rows: Vec<(i64, i64)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_i64().unwrap(), r[1].as_i64().unwrap()))
        .collect();
    for (_, at) in &buffered {
        assert_eq!(
            rows.iter().filter(|(s, _)| s == at).count(),
            1,
            "sample {at} stored once"
        );
    }
    // Delivered in order: a later sample was never received before an earlier one.
    assert!(
        rows.windows(2).all(|w| w[0].1 <= w[1].1),
        "samples arrived out of order: {rows:?}"
    );
    // And the node is online again (its heartbeats resumed by themselves).
    wait_for("the node to be online again", Duration::from_secs(60), || {
        let v = panel.sql("SELECT connectivity FROM nodes WHERE id = ?", json!([node_id]));
        async move { (v[0][0] == "online").then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_never_passes_its_bound() {
    let bound: u64 = 4096;
    let (mut panel, wings, _node_id, _server_id) = setup(&format!(
        "heartbeat_interval_secs = 1\nsample_interval_secs = 1\nretry_max_secs = 1\n\
         outbox_max_bytes = {bound}\noutbox_segment_bytes = 1024\n"
    ))
    .await;
    panel.kill9();
    let outbox = wings.outbox();
    // Until wings has dropped old records to stay within the bound, and a little beyond.
    wait_for(
        "the outbox to drop its oldest records",
        Duration::from_secs(180),
        || {
            let bytes = outbox_bytes(&outbox);
            assert!(
                bytes <= bound,
                "the outbox holds {bytes} bytes, over its bound of {bound}"
            );
            let full = wings.log().matches("outbox full: dropped the oldest").count();
            async move { (full >= 3).then_some(()) }
        },
    )
    .await;
    assert!(outbox_bytes(&outbox) <= bound);
    // What is kept is the newest, in order.
    let kept = outbox_samples(&outbox);
    assert!(!kept.is_empty());
    assert!(kept.windows(2).all(|w| w[0].1 < w[1].1), "{kept:?}");
}

/// paramiko in another process (`sftp_client.py`) logs in with the operator's password and
/// runs `ops`; every one must succeed.
fn sftp_ops(wings: &Node, login: &str, password: &str, ops: Value) {
    let out = Command::new("python3")
        .arg(workspace_root().join("wings/tests/sftp_client.py"))
        .arg(wings.sftp.unwrap().to_string())
        .arg(login)
        .args(["--password", password, "ops"])
        .arg(ops.to_string())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !printed.is_empty() && printed.lines().all(|l| l.contains("\"ok\": true")),
        "{printed} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Activity lines in the outbox's segment files.
fn outbox_activity(dir: &Path) -> usize {
    let mut n = 0;
    for file in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(file.path()).unwrap_or_default();
        n += text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["kind"] == "activity")
            .map(|r| r["batch"]["entries"].as_array().map_or(0, Vec::len))
            .sum::<usize>();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_activity_waits_out_a_panel_outage_and_arrives_once_in_order() {
    let (mut panel, wings, _node_id, server_id) = setup_with(
        "heartbeat_interval_secs = 1\nsample_interval_secs = 60\nretry_max_secs = 1\n",
        true,
    )
    .await;
    let login = format!("op@example.test.{}", &server_id[..8]);
    let count = |panel: &Panel, event: &str| {
        panel.sql(
            "SELECT COUNT(*) FROM server_activity WHERE server_id = ? AND event = ?",
            json!([server_id, event]),
        )[0][0]
            .as_i64()
            .unwrap()
    };

    // With the panel up: the login is checked by the panel, and its activity arrives.
    sftp_ops(
        &wings,
        &login,
        &panel.password,
        json!([{"op": "put", "path": "/before.txt", "data": "a"}]),
    );
    wait_for("the first session's activity", Duration::from_secs(60), || {
        let n = count(&panel, "sftp.create");
        async move { (n == 1).then_some(()) }
    })
    .await;

    // The panel dies; the user gets in on wings' cached grant, and what they do waits on disk.
    panel.kill9();
    sftp_ops(
        &wings,
        &login,
        &panel.password,
        json!([
            {"op": "put", "path": "/during.sav", "data": "0123456789", "repeat": 10_000},
            {"op": "mkdir", "path": "/saves"},
            {"op": "rename", "from": "/during.sav", "to": "/saves/during.sav"},
        ]),
    );
    let outbox = wings.outbox();
    wait_for(
        "the activity to wait in the outbox",
        Duration::from_secs(60),
        || {
            let n = outbox_activity(&outbox);
            async move { (n >= 4).then_some(()) }
        },
    )
    .await;

    // Back: each entry arrives once, in the order it happened.
    panel.spawn().await;
    wait_for(
        "the buffered activity to arrive",
        Duration::from_secs(120),
        || {
            let n = count(&panel, "sftp.rename");
            async move { (n >= 1).then_some(()) }
        },
    )
    .await;
    let rows = panel.sql(
        "SELECT event, properties, actor FROM server_activity WHERE server_id = ? ORDER BY id",
        json!([server_id]),
    );
    let events: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "sftp.login",
            "sftp.create",
            "sftp.login",
            "sftp.create",
            "sftp.create-directory",
            "sftp.rename"
        ],
        "{rows}"
    );
    let written: Value = serde_json::from_str(rows[3][1].as_str().unwrap()).unwrap();
    assert_eq!(written["file"], "during.sav");
    assert_eq!(written["bytes_written"], 100_000);
    let owner = panel.sql(
        "SELECT user_id FROM memberships WHERE tenant_id = (SELECT tenant_id FROM servers WHERE id = ?)",
        json!([server_id]),
    );
    assert!(
        rows.as_array().unwrap().iter().all(|r| r[2] == owner[0][0]),
        "{rows} {owner}"
    );
}

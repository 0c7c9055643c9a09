//! End to end, as an operator and a tenant meet the system: a real `panel serve` process and
//! two real `wings` processes enrolled to it through the admin API's one-time tokens, and a
//! freeciv server created with one API call, placed, installed and running on real Docker;
//! its console reached by a real WebSocket client with the panel's token; its metrics
//! reported by the node and rolled up into hourly rows; a file written over SFTP by the
//! tenant's user in its activity log; stopped, deleted and everything released. On SQLite and
//! PostgreSQL.
//!
//! Needs the `wings` binary next to this test (`cargo test --workspace` builds it) and the
//! `mamba/freeciv` image (`scripts/images.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic by design

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::node::{free_port, wings_binary};
use common::{Kind, TestDb};
use diesel::prelude::*;
use mamba_panel::db::schema::{metric_dirty_hours, metric_samples};
use serde_json::{Value, json};

const INSTALL: Duration = Duration::from_secs(300);
const T: Duration = Duration::from_secs(60);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn docker_ok() -> bool {
    Command::new("docker")
        .args(["image", "inspect", "mamba/freeciv:latest"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A child process killed (and its log shown on failure) when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Proc { child, log }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log());
        }
    }
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
}

async fn wait<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Node {
    id: String,
    wings: Proc,
    data_dir: PathBuf,
    public_port: u16,
    sftp_port: u16,
}

/// Registers a node through the admin API, enrolls a fresh wings with its one-time token
/// (`wings enroll`) and starts it.
async fn enroll_node(api: &Api, dir: &Path, name: &str, node_listener: &str, game_ports: &str) -> Node {
    let (api_port, public_port, sftp_port) = (free_port(), free_port(), free_port());
    let (status, node) = api
        .post(
            "/api/v1/admin/nodes",
            json!({"name": name, "fqdn": "127.0.0.1", "location": "test",
                   "cpu_percent": 400, "memory_mb": 8192, "disk_mb": 50000,
                   "api_port": api_port, "public_url": format!("http://127.0.0.1:{public_port}"),
                   "sftp_port": sftp_port}),
        )
        .await;
    assert_eq!(status, 201, "{node}");
    let id = node["id"].as_str().unwrap().to_string();
    let (status, pools) = api
        .post(
            &format!("/api/v1/admin/nodes/{id}/pools"),
            json!({"ips": ["127.0.0.1"], "ports": [game_ports]}),
        )
        .await;
    assert_eq!(status, 201, "{pools}");
    let (status, token) = api
        .post(&format!("/api/v1/admin/nodes/{id}/enrollment-token"), json!({}))
        .await;
    assert!(status == 200 || status == 201, "{token}");

    let home = dir.join(name);
    let data_dir = home.join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let config = home.join("wings.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\nlisten = \"127.0.0.1:{api_port}\"\npublic_listen = \"127.0.0.1:{public_port}\"\n\n\
             [sftp]\nlisten = \"127.0.0.1:{sftp_port}\"\n\n[system]\ndata_dir = \"{}\"\n\n\
             [reporter]\nheartbeat_interval_secs = 1\nsample_interval_secs = 1\n",
            data_dir.display()
        ),
    )
    .unwrap();
    let enrolled = Command::new(wings_binary())
        .arg("--config")
        .arg(&config)
        .args(["enroll", "--panel", node_listener])
        .env("WINGS_ENROLL_TOKEN", token["token"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(
        enrolled.status.success(),
        "wings enroll: {}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    let mut cmd = Command::new(wings_binary());
    cmd.arg("--config").arg(&config).env("RUST_LOG", "info");
    let mut wings = Proc::spawn(cmd, home.join("wings.log"));
    let health = format!("http://127.0.0.1:{public_port}/healthz");
    let plain = reqwest::Client::new();
    let mut up = false;
    let deadline = Instant::now() + T;
    while !up {
        assert!(wings.alive(), "wings {name} exited:\n{}", wings.log());
        assert!(
            Instant::now() < deadline,
            "wings {name} did not start:\n{}",
            wings.log()
        );
        up = plain
            .get(&health)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if !up {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Node {
        id,
        wings,
        data_dir,
        public_port,
        sftp_port,
    }
}

fn containers(node: &Node) -> Vec<String> {
    let filter = format!("label=mamba.data-dir={}", node.data_dir.display());
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &filter])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

async fn ws_script(scenario: &Value) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scenario.json");
    std::fs::write(&path, scenario.to_string()).unwrap();
    let out = tokio::process::Command::new("python3")
        .arg(workspace().join("wings/tests/ws_client.py"))
        .arg("script")
        .arg(&path)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn a_server_through_the_panel_on_one_of_two_nodes(kind: Kind) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if !docker_ok() {
        assert!(
            std::env::var_os("CI").is_none(),
            "mamba/freeciv is missing: run scripts/images.sh"
        );
        eprintln!("skipped: the mamba/freeciv image is missing (scripts/images.sh)");
        return;
    }
    let Some(t) = TestDb::new(kind) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (http_port, node_port) = (free_port(), free_port());
    let node_listener = format!("https://127.0.0.1:{node_port}");
    let master = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";
    let panel_cmd = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_panel"));
        cmd.args(args)
            .current_dir(workspace())
            .env("DATABASE_URL", &t.url)
            .env("PANEL_MASTER_KEY", master)
            .env("PANEL_HTTP__LISTEN", format!("127.0.0.1:{http_port}"))
            .env("PANEL_HTTP__PUBLIC_URL", format!("http://127.0.0.1:{http_port}"))
            .env("PANEL_NODE_LISTENER__LISTEN", format!("127.0.0.1:{node_port}"))
            .env("PANEL_NODE_LISTENER__PUBLIC_URL", &node_listener)
            .env("PANEL_AUTH__ARGON2_MEMORY_KIB", "8192")
            .env("PANEL_AUTH__ARGON2_ITERATIONS", "1")
            .env("PANEL_JOBS__POLL_INTERVAL_MS", "100")
            .env("PANEL_SERVER_METRICS__ROLLUP_INTERVAL_SECS", "10")
            .env("RUST_LOG", "info");
        cmd
    };
    let created = panel_cmd(&["admin", "create-user", "--email", "operator@example.test"])
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let printed = String::from_utf8_lossy(&created.stdout).to_string();
    let password = printed
        .lines()
        .find_map(|l| l.strip_prefix("password:"))
        .unwrap()
        .trim()
        .to_string();
    let mut panel = Proc::spawn(panel_cmd(&["serve"]), dir.path().join("panel.log"));
    let http = reqwest::Client::builder().timeout(T).build().unwrap();
    let base = format!("http://127.0.0.1:{http_port}");
    let deadline = Instant::now() + T;
    loop {
        assert!(panel.alive(), "the panel exited:\n{}", panel.log());
        assert!(
            Instant::now() < deadline,
            "the panel did not start:\n{}",
            panel.log()
        );
        if http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let login: Value = http
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"email": "operator@example.test", "password": password, "client": "api"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let api = Api {
        http,
        base,
        token: login["tokens"]["access_token"].as_str().unwrap().to_string(),
    };

    // Two nodes, each with its own data folder, ports and certificate.
    let first_port = free_port();
    let a = enroll_node(
        &api,
        dir.path(),
        "node-a",
        &node_listener,
        &first_port.to_string(),
    )
    .await;
    let second_port = free_port();
    let b = enroll_node(
        &api,
        dir.path(),
        "node-b",
        &node_listener,
        &second_port.to_string(),
    )
    .await;
    for node in [&a, &b] {
        wait("the node's first heartbeat", T, || async {
            let (_, n) = api.get(&format!("/api/v1/admin/nodes/{}", node.id)).await;
            (n["connectivity"] == "online").then_some(())
        })
        .await;
    }

    let (status, tenant) = api
        .post(
            "/api/v1/tenants",
            json!({"slug": "e2e-guild", "name": "E2E guild"}),
        )
        .await;
    assert_eq!(status, 201, "{tenant}");
    let servers = format!("/api/v1/tenants/{}/servers", tenant["id"].as_str().unwrap());

    // One API call: placed on node B (asked for), its port from B's pool.
    let (status, created) = api
        .post(
            &servers,
            json!({"name": "e2e-freeciv", "blueprint": "freeciv",
                   "variables": {"SERVER_IDENTITY": "mamba-e2e"}, "node": b.id}),
        )
        .await;
    assert_eq!(status, 202, "{created}");
    let id = created["server"]["id"].as_str().unwrap().to_string();
    assert_eq!(created["server"]["node_id"], b.id.as_str());
    assert_eq!(created["allocations"][0]["port"], second_port);
    let server = format!("{servers}/{id}");

    let running = wait("the server to be installed and running", INSTALL, || async {
        let (_, s) = api.get(&server).await;
        assert_ne!(s["status"], "install_failed", "{s}");
        (s["status"] == "running").then_some(s)
    })
    .await;
    assert_eq!(running["jobs"][0]["status"], "succeeded", "{running}");
    assert_eq!(containers(&b).len(), 1, "exactly one container on node B");
    assert!(containers(&a).is_empty(), "nothing on node A");

    // The console: the panel's token opens node B's socket for a real client.
    let (status, console) = api.get(&format!("{server}/console")).await;
    assert_eq!(status, 200, "{console}");
    assert_eq!(
        console["socket"],
        format!("ws://127.0.0.1:{}/api/servers/{id}/ws", b.public_port)
    );
    let (ok, out) = ws_script(&json!({
        "url": console["socket"],
        "steps": [
            {"send": {"event": "auth", "args": [console["token"]]}},
            {"expect": {"event": "auth success"}},
            {"send": {"event": "send command", "args": ["set timeout 42"]}},
            {"expect": {"event": "console output", "contains": "'timeout' has been set to 42"}},
        ]
    }))
    .await;
    assert!(ok, "{out}");

    // Metrics reported by node B reach the server's chart.
    wait("metrics from the node", T, || async {
        let (_, m) = api.get(&format!("{server}/metrics?range=1h")).await;
        m["points"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
            .then_some(())
    })
    .await;

    // An hour passes for the samples so far: they are moved back an hour and their hours
    // marked as ingest marks them; the panel's rollup job (every 10 s here) turns them into
    // the hourly rows that the 24h range reads.
    let moved = {
        let id = id.clone();
        t.db.run(move |conn| {
            // (Not one transaction: the rollup job meanwhile only misses an hour until its next run.)
            const HOUR: i64 = 3_600_000;
            let current_hour = mamba_panel::db::now_ms() / HOUR * HOUR;
            let ours = metric_samples::table
                .filter(metric_samples::server_id.eq(&id))
                .filter(metric_samples::sampled_at.lt(current_hour));
            let moved = diesel::update(
                metric_samples::table
                    .filter(metric_samples::server_id.eq(&id))
                    .filter(metric_samples::sampled_at.ge(current_hour)),
            )
            .set(metric_samples::sampled_at.eq(metric_samples::sampled_at - HOUR))
            .execute(conn)?;
            let hours: Vec<i64> = ours.select(metric_samples::sampled_at).load::<i64>(conn)?;
            let hours: std::collections::BTreeSet<i64> =
                hours.into_iter().map(|at| at / HOUR * HOUR).collect();
            for hour in hours {
                diesel::delete(
                    metric_dirty_hours::table
                        .filter(metric_dirty_hours::server_id.eq(&id))
                        .filter(metric_dirty_hours::hour_start.eq(hour)),
                )
                .execute(conn)?;
                diesel::insert_into(metric_dirty_hours::table)
                    .values((
                        metric_dirty_hours::server_id.eq(&id),
                        metric_dirty_hours::hour_start.eq(hour),
                    ))
                    .execute(conn)?;
            }
            Ok::<_, mamba_panel::db::DbError>(moved as i64)
        })
        .await
        .unwrap()
    };
    assert!(moved > 0);
    let rolled = wait("the hourly rollup", T, || async {
        let (_, m) = api.get(&format!("{server}/metrics?range=24h")).await;
        let samples: i64 = m["points"]
            .as_array()?
            .iter()
            .map(|p| p["samples"].as_i64().unwrap_or(0))
            .sum();
        (samples >= moved).then_some(m)
    })
    .await;
    assert_eq!(rolled["resolution"], "hourly", "{rolled}");
    assert!(
        rolled["points"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["memory_mb"].as_i64() > Some(0)),
        "the hours of a running server show its memory: {rolled}"
    );

    // A file written over SFTP by the tenant's user reaches the server's activity log.
    let login = format!("operator@example.test.{}", &id[..8]);
    let out = Command::new("python3")
        .arg(workspace().join("wings/tests/sftp_client.py"))
        .arg(b.sftp_port.to_string())
        .arg(&login)
        .args(["--password", &password, "ops"])
        .arg(json!([{"op": "put", "path": "/e2e-note.txt", "data": "written over sftp"}]).to_string())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && printed.contains("\"ok\": true"),
        "{printed} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let activity = wait("the SFTP write in the activity log", T, || async {
        let (_, a) = api.get(&format!("{server}/activity?event=sftp.")).await;
        a["items"]
            .as_array()?
            .iter()
            .find(|i| i["event"] == "sftp.create")
            .cloned()
    })
    .await;
    assert_eq!(activity["properties"]["file"], "e2e-note.txt", "{activity}");
    assert_eq!(activity["ip"], "127.0.0.1", "{activity}");

    // Stop, then delete: the container, the port and the record are gone.
    let (status, body) = api
        .post(&format!("{server}/power"), json!({"action": "stop"}))
        .await;
    assert_eq!(status, 202, "{body}");
    wait("the server to stop", T, || async {
        let (_, s) = api.get(&server).await;
        (s["status"] == "offline").then_some(())
    })
    .await;
    let (status, body) = api.call(reqwest::Method::DELETE, &server, None).await;
    assert_eq!(status, 202, "{body}");
    wait("the server to be deleted", T, || async {
        let (status, _) = api.get(&server).await;
        (status == 404).then_some(())
    })
    .await;
    assert!(containers(&b).is_empty(), "the container is gone");
    let (_, allocations) = api
        .get(&format!("/api/v1/admin/nodes/{}/allocations", b.id))
        .await;
    assert_eq!(allocations["items"], json!([]), "the port is released");
    assert!(panel.alive() && [a, b].iter_mut().all(|n| n.wings.alive()));
}

#[tokio::test(flavor = "multi_thread")]
async fn e2e_sqlite() {
    a_server_through_the_panel_on_one_of_two_nodes(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn e2e_postgres() {
    a_server_through_the_panel_on_one_of_two_nodes(Kind::Postgres).await;
}

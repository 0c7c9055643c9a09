//! SECURITY-CHECKLIST 37: the panel killed (`kill -9`) in the middle of an install resumes
//! the job after its restart, and the server ends up installed and running with exactly one
//! container and its one allocation; deleting it afterwards removes both.
//!
//! Real processes: `panel serve` (this package's binary) on a SQLite file, and `wings`
//! enrolled through the panel's CA with `wings enroll`, on real Docker with the testbox
//! image (`bash scripts/images.sh`). The test process reads and writes the same database to
//! set the scene (node, pool, tenant, server and its job, in the transaction a route uses)
//! and to watch the job. The wings binary comes from the same target folder: build it first
//! (`cargo build -p mamba-wings`, as scripts/test.sh does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::node::{free_port, wings_binary};
use diesel::prelude::*;
use mamba_panel::audit::Actor;
use mamba_panel::authz;
use mamba_panel::db::Db;
use mamba_panel::db::schema::{allocations, servers};
use mamba_panel::ids::{JobId, ServerId};
use mamba_panel::jobs::{self, JobKind, JobStatus};
use mamba_panel::keys::MasterKey;
use mamba_panel::request_meta::RequestMeta;
use serde_json::json;

const MASTER_KEY: [u8; 32] = [7; 32];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Containers (any state) of one server.
fn containers_of(server: &ServerId) -> Vec<String> {
    docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=mamba.server={server}"),
        "--format",
        "{{.Names}}",
    ])
    .lines()
    .map(str::to_string)
    .filter(|l| !l.is_empty())
    .collect()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    common::wait_until(timeout, what, &mut f);
}

fn master_b64() -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, MASTER_KEY)
}

/// The testbox game whose install takes a few seconds, so the panel can be killed during it.
fn write_slow_blueprint(dir: &Path) {
    let text = std::fs::read_to_string(workspace_root().join("wings/tests/fixtures/testbox.yaml")).unwrap();
    let text = text
        .replace("slug: testbox", "slug: slowbox")
        .replace("name: Test box", "name: Slow test box")
        .replace(
            "    echo \"install done\"",
            "    sleep 6\n    echo \"install done\"",
        );
    assert!(
        text.contains("sleep 6"),
        "the fixture changed; adjust the install script edit"
    );
    std::fs::write(dir.join("slowbox.yaml"), text).unwrap();
}

struct Proc {
    child: Child,
    log: PathBuf,
    name: &'static str,
}

impl Proc {
    fn kill9(&mut self) {
        // std's kill is SIGKILL on Unix: no chance to release leases or finish anything.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {} log ---\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

struct Scene {
    dir: tempfile::TempDir,
    /// Keeps a PostgreSQL test database alive (dropped with the scene).
    _db: common::TestDb,
    db_url: String,
    panel_config: PathBuf,
    panel_http: u16,
    node_listener: u16,
    wings_api: u16,
    wings_data: PathBuf,
}

impl Scene {
    /// `None` when the backend is not available outside CI (see `TestDb::new`).
    fn new(kind: common::Kind) -> Option<Scene> {
        let dir = tempfile::Builder::new()
            .prefix("mamba-jobs-recovery")
            .tempdir()
            .unwrap();
        let blueprints = dir.path().join("blueprints");
        std::fs::create_dir_all(&blueprints).unwrap();
        write_slow_blueprint(&blueprints);
        let test_db = common::TestDb::new(kind)?;
        let db_url = test_db.url.clone();
        let (panel_http, node_listener) = (free_port(), free_port());
        let panel_config = dir.path().join("panel.toml");
        std::fs::write(
            &panel_config,
            format!(
                "[http]\nlisten = \"127.0.0.1:{panel_http}\"\n\n\
                 [database]\nurl = \"{db_url}\"\n\n\
                 [auth]\nargon2_memory_kib = 8192\nargon2_iterations = 1\n\n\
                 [blueprints]\ndir = \"{}\"\n\n\
                 [node_listener]\nlisten = \"127.0.0.1:{node_listener}\"\npublic_url = \"https://127.0.0.1:{node_listener}\"\n\n\
                 [jobs]\nworkers = 1\npoll_interval_ms = 100\nlease_secs = 3\nbackoff_base_ms = 200\nbackoff_cap_secs = 2\n",
                blueprints.display()
            ),
        )
        .unwrap();
        let wings_data = dir.path().join("wings-data");
        Some(Scene {
            _db: test_db,
            db_url,
            panel_config,
            panel_http,
            node_listener,
            wings_api: free_port(),
            wings_data,
            dir,
        })
    }

    fn start_panel(&self, run: u32) -> Proc {
        let log = self.dir.path().join(format!("panel-{run}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_panel"))
            .arg("--config")
            .arg(&self.panel_config)
            .arg("serve")
            .env("PANEL_MASTER_KEY", master_b64())
            .env("RUST_LOG", "info,mamba_panel=debug")
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let proc = Proc {
            child,
            log,
            name: "panel",
        };
        let port = self.panel_http;
        wait_until("the panel answers /healthz", Duration::from_secs(60), || {
            http_ok(port, "/healthz")
        });
        proc
    }

    fn wings_config(&self) -> PathBuf {
        let path = self.dir.path().join("wings.toml");
        std::fs::write(
            &path,
            format!(
                "[api]\nlisten = \"127.0.0.1:{}\"\npublic_listen = \"127.0.0.1:{}\"\n\
                 token = \"test-token-0123456789abcdef0123456789\"\n\n[system]\ndata_dir = \"{}\"\n",
                self.wings_api,
                free_port(),
                self.wings_data.display()
            ),
        )
        .unwrap();
        path
    }

    fn enroll_and_start_wings(&self, token: &str) -> Proc {
        let config = self.wings_config();
        let out = Command::new(wings_binary())
            .arg("--config")
            .arg(&config)
            .args([
                "enroll",
                "--panel",
                &format!("https://127.0.0.1:{}", self.node_listener),
            ])
            .arg("--token")
            .arg(token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "wings enroll: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = self.dir.path().join("wings.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(wings_binary())
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("WINGS_SFTP__LISTEN", format!("127.0.0.1:{}", free_port()))
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let proc = Proc {
            child,
            log,
            name: "wings",
        };
        let port = self.wings_api;
        wait_until("wings listens", Duration::from_secs(60), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        proc
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        // Whatever the test left on Docker (it only ever touches this wings' containers).
        let label = format!("label=mamba.data-dir={}", self.wings_data.display());
        if let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &label])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
    }
}

fn http_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

fn job(db: &Db, id: &JobId) -> jobs::Job {
    let mut conn = db.get_blocking().unwrap();
    jobs::get(&mut conn, id).unwrap().unwrap()
}

fn server_status(db: &Db, id: &ServerId) -> Option<String> {
    let mut conn = db.get_blocking().unwrap();
    servers::table
        .find(id.as_str())
        .select(servers::status)
        .first(&mut conn)
        .optional()
        .unwrap()
}

fn allocation_count(db: &Db) -> i64 {
    let mut conn = db.get_blocking().unwrap();
    allocations::table.count().get_result(&mut conn).unwrap()
}

#[test]
fn a_panel_killed_during_an_install_resumes_the_job_without_duplicates_sqlite() {
    a_panel_killed_during_an_install_resumes_the_job_without_duplicates(common::Kind::Sqlite);
}

#[test]
fn a_panel_killed_during_an_install_resumes_the_job_without_duplicates_postgres() {
    a_panel_killed_during_an_install_resumes_the_job_without_duplicates(common::Kind::Postgres);
}

fn a_panel_killed_during_an_install_resumes_the_job_without_duplicates(kind: common::Kind) {
    if Command::new("docker")
        .arg("info")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        common::missing_tool("docker");
        return;
    }
    if docker(&["images", "-q", "mamba/testbox:latest"]).is_empty() {
        common::missing_tool("the mamba/testbox image (bash scripts/images.sh)");
        return;
    }
    let Some(scene) = Scene::new(kind) else {
        return;
    };
    let mut panel = scene.start_panel(1);
    let db = Db::connect(&scene.db_url, 2, Duration::from_secs(10)).unwrap();
    let meta = RequestMeta::system();
    let master = MasterKey::from_bytes(MASTER_KEY);
    let pki =
        mamba_panel::node_pki::PanelPki::load_or_create(&db, &master, Duration::from_secs(86_400)).unwrap();

    // The operator's part: a node on this host, a pool of five ports, an enrollment token.
    let base = mamba_shared_port_base();
    let mut conn = db.get_blocking().unwrap();
    let new = mamba_panel::nodes::check_new(&mamba_panel::nodes::NewNode {
        name: "local".into(),
        fqdn: "127.0.0.1".into(),
        location: "test".into(),
        cpu_percent: 400,
        memory_mb: 4096,
        disk_mb: 10_000,
        overallocation_percent: 0,
        is_public: true,
        maintenance: false,
        api_port: scene.wings_api,
        public_url: None,
        sftp_port: 2022,
    })
    .unwrap();
    let node = mamba_panel::nodes::create(&mut conn, &new, &Actor::System, &meta).unwrap();
    // Placement takes only nodes that have been heard from, and the panel that receives
    // wings' heartbeats starts only later here: record the first one as it would.
    common::heartbeat(&db, &node.id);
    mamba_panel::allocation::add_pools(
        &mut conn,
        &node.id,
        &mamba_panel::allocation::NewPools {
            ips: vec!["127.0.0.1".into()],
            ports: vec![format!("{base}-{}", base + 4)],
            protocols: vec![mamba_shared::blueprint::Protocol::Tcp],
            strategy: mamba_panel::allocation::Strategy::Sequential,
        },
        &Actor::System,
        &meta,
    )
    .unwrap();
    let (token, _) = mamba_panel::node_pki::create_enrollment_token(
        &mut conn,
        &pki,
        node.id.as_str(),
        &Actor::System,
        &meta,
    )
    .unwrap();
    drop(conn);
    let _wings = scene.enroll_and_start_wings(&token.to_string());

    // The tenant's part, as the create route does it: the server and its install job in one
    // transaction.
    let scope = tenant_scope(&db);
    let registry = mamba_panel::blueprints::Registry::load(&scene.dir.path().join("blueprints")).unwrap();
    let blueprint = registry.file("slowbox").unwrap().clone();
    let mut conn = db.get_blocking().unwrap();
    let (server, install) = conn
        .transaction(|conn| {
            let placed = mamba_panel::servers::create(
                conn,
                &scope,
                &blueprint,
                &mamba_panel::servers::NewServer {
                    name: "Slow box".into(),
                    blueprint: "slowbox".into(),
                    ..Default::default()
                },
                &meta,
            )?;
            let job = jobs::enqueue(
                conn,
                Some(scope.tenant()),
                Some(&placed.server_id),
                JobKind::ServerInstall,
                &json!({}),
            )?;
            Ok::<_, mamba_panel::error::ApiError>((placed.server_id, job))
        })
        .unwrap();
    drop(conn);
    assert_eq!(allocation_count(&db), 1);

    // Kill the panel while wings runs the install it was given.
    wait_until("the install container runs", Duration::from_secs(60), || {
        containers_of(&server)
            .iter()
            .any(|c| c.starts_with("mamba-install-"))
    });
    let before = job(&db, &install);
    assert_eq!(before.status, JobStatus::Running, "{before:?}");
    panel.kill9();
    let orphaned = job(&db, &install);
    assert_eq!(
        orphaned.status,
        JobStatus::Running,
        "nobody finished the job: {orphaned:?}"
    );
    assert_eq!(orphaned.attempts, 1);

    // A new panel process takes the job over once the dead one's lease ran out.
    let _panel = scene.start_panel(2);
    wait_until("the resumed install succeeds", Duration::from_secs(120), || {
        let j = job(&db, &install);
        assert!(
            !matches!(j.status, JobStatus::Failed | JobStatus::Dead),
            "the install gave up: {j:?}"
        );
        j.status == JobStatus::Succeeded
    });
    let done = job(&db, &install);
    assert_eq!(done.attempts, 2, "resumed exactly once: {done:?}");
    assert_eq!(server_status(&db, &server).as_deref(), Some("running"));
    let containers = containers_of(&server);
    assert_eq!(
        containers,
        vec![format!("mamba-{server}")],
        "exactly one container"
    );
    assert_eq!(allocation_count(&db), 1, "no duplicate or leaked allocation");

    // Delete through a job, as the delete route does: container, ports and row go.
    let mut conn = db.get_blocking().unwrap();
    let delete = conn
        .transaction(|conn| {
            diesel::update(servers::table.find(server.as_str()))
                .set(servers::status.eq("deleting"))
                .execute(conn)?;
            jobs::enqueue(
                conn,
                Some(scope.tenant()),
                Some(&server),
                JobKind::ServerDelete,
                &json!({}),
            )
        })
        .unwrap();
    drop(conn);
    wait_until("the delete job succeeds", Duration::from_secs(120), || {
        job(&db, &delete).status == JobStatus::Succeeded
    });
    assert!(containers_of(&server).is_empty(), "the container is gone");
    assert_eq!(allocation_count(&db), 0, "the port is released");
    assert_eq!(server_status(&db, &server), None, "the record is gone");
}

/// Five free TCP ports in a row for the pool.
fn mamba_shared_port_base() -> u16 {
    loop {
        let base = free_port();
        if base > 65_000 {
            continue;
        }
        if (0..5).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
}

fn tenant_scope(db: &Db) -> authz::TenantScope {
    let meta = RequestMeta::system();
    let mut conn = db.get_blocking().unwrap();
    let user = mamba_panel::users::create(
        &mut conn,
        mamba_panel::users::NewUser {
            email: "tenant@example.com".into(),
            display_name: "Tenant".into(),
            password_hash: "not-a-real-hash".into(),
            email_verified: true,
            is_super_admin: false,
        },
        &Actor::System,
        &meta,
    )
    .unwrap();
    let tenant = mamba_panel::tenants::create(&mut conn, &user.id, "jobs", "jobs", &meta).unwrap();
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

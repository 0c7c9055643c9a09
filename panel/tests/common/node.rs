//! A panel with its real node listener, and real `wings` processes enrolled to it through
//! the panel's own CA and enrollment tokens (wings' real enrollment code), for tests of
//! everything the panel does with a node.
//!
//! The `wings` binary is taken from the target folder this test runs from
//! (`cargo test --workspace` builds it; alone, run `cargo build -p mamba-wings --bin wings`
//! first).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actix_web::web;
use mamba_panel::audit::Actor;
use mamba_panel::http::AppState;
use mamba_panel::nodes::{self, NewNode, Node};
use mamba_panel::request_meta::RequestMeta;
use mamba_wings::node_identity::NodeIdentity;

use super::TestDb;

/// A port free for TCP and UDP on 127.0.0.1 right now, and not handed out before in this
/// process: the kernel may offer a released port again while the test that got it has not
/// bound it yet.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if !handed_out.contains(&port) && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return port;
        }
    }
}

/// The panel's state with its node listener serving on a real port.
pub struct PanelWithListener {
    pub state: web::Data<AppState>,
    /// The node listener's URL, as nodes reach it.
    pub url: String,
}

impl PanelWithListener {
    /// Must run inside an actix system (the listener is spawned on it).
    pub fn start(t: &TestDb) -> PanelWithListener {
        Self::start_with(t, t.config())
    }

    /// As [`PanelWithListener::start`], with this configuration (the listener's URL is set).
    pub fn start_with(t: &TestDb, mut config: mamba_panel::config::Config) -> PanelWithListener {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        config.node_listener.public_url = url.clone();
        let state = t.state_with(config);
        let server = mamba_panel::http::node_pki::node_server(state.clone(), listener).unwrap();
        actix_web::rt::spawn(server);
        PanelWithListener { state, url }
    }
}

/// Registers a node at 127.0.0.1 whose API and public listener are on the given ports.
pub fn register_node(t: &TestDb, name: &str, api_port: u16, public_port: u16) -> Node {
    let new = nodes::check_new(&NewNode {
        name: name.into(),
        fqdn: "127.0.0.1".into(),
        location: "test".into(),
        cpu_percent: 800,
        memory_mb: 16_384,
        disk_mb: 100_000,
        overallocation_percent: 0,
        is_public: true,
        maintenance: false,
        api_port,
        public_url: Some(format!("http://127.0.0.1:{public_port}")),
        sftp_port: free_port(),
    })
    .unwrap();
    let mut conn = t.db.get_blocking().unwrap();
    nodes::create(&mut conn, &new, &Actor::System, &RequestMeta::system()).unwrap()
}

/// The `wings` binary next to this test's executable.
pub fn wings_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/wings
    let bin = exe.parent().unwrap().parent().unwrap().join("wings");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p mamba-wings --bin wings`",
        bin.display()
    );
    bin
}

/// A real `wings serve`, enrolled to the panel.
pub struct WingsNode {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub node: Node,
    pub api_port: u16,
    pub public_port: u16,
}

impl WingsNode {
    /// Registers node `name`, enrolls a data folder with a fresh token and starts wings on it.
    pub async fn start(t: &TestDb, panel: &PanelWithListener, name: &str) -> WingsNode {
        let (api_port, public_port) = (free_port(), free_port());
        let node = register_node(t, name, api_port, public_port);
        let dir = tempfile::Builder::new()
            .prefix("mamba-panel-wings")
            .tempdir()
            .unwrap();
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let token = {
            let mut conn = t.db.get_blocking().unwrap();
            let (token, _) = mamba_panel::node_pki::create_enrollment_token(
                &mut conn,
                &panel.state.pki,
                node.id.as_str(),
                &Actor::System,
                &RequestMeta::system(),
            )
            .unwrap();
            token.to_string()
        };
        NodeIdentity::enroll(&data_dir, &panel.url, &token).await.unwrap();
        let config = format!(
            "[api]\nlisten = \"127.0.0.1:{api_port}\"\npublic_listen = \"127.0.0.1:{public_port}\"\n\n\
             [system]\ndata_dir = \"{}\"\n",
            data_dir.display()
        );
        std::fs::write(dir.path().join("wings.toml"), config).unwrap();
        let mut wings = WingsNode {
            child: None,
            dir,
            node,
            api_port,
            public_port,
        };
        wings.spawn().await;
        // Placement takes only nodes that have been heard from; wings sends its first
        // heartbeat as it starts.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let connectivity = {
                let mut conn = t.db.get_blocking().unwrap();
                nodes::get(&mut conn, &wings.node.id)
                    .unwrap()
                    .unwrap()
                    .connectivity
            };
            if connectivity == nodes::CONNECTIVITY_ONLINE {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "wings sent no heartbeat:\n{}",
                wings.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        wings
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("wings.log"))
            .unwrap();
        let child = Command::new(wings_binary())
            .arg("--config")
            .arg(self.dir.path().join("wings.toml"))
            .env("RUST_LOG", "info,mamba_wings=debug")
            .env("WINGS_SFTP__LISTEN", format!("127.0.0.1:{}", self.node.sftp_port))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let health = format!("http://127.0.0.1:{}/healthz", self.public_port);
        let plain = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = plain
                .get(&health)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if up {
                return;
            }
            assert!(
                self.child.as_mut().unwrap().try_wait().unwrap().is_none(),
                "wings exited:\n{}",
                self.log()
            );
            assert!(Instant::now() < deadline, "wings did not start:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("wings.log")).unwrap_or_default()
    }

    /// The console socket URL of a server on this node's public listener.
    pub fn ws_url(&self, server: &str) -> String {
        format!("ws://127.0.0.1:{}/api/servers/{server}/ws", self.public_port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// Containers this wings made.
    pub fn containers(&self) -> Vec<String> {
        let filter = format!("label=mamba.data-dir={}", self.data_dir().display());
        let out = Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for WingsNode {
    fn drop(&mut self) {
        self.stop();
        for id in self.containers() {
            let _ = Command::new("docker").args(["rm", "-f", &id]).output();
        }
        if std::thread::panicking() {
            eprintln!("--- wings log ---\n{}", self.log());
        }
    }
}

/// A blueprint file of the workspace, as the JSON document wings takes.
pub fn blueprint_json(path: &str) -> serde_json::Value {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = std::fs::read_to_string(root.join(path)).unwrap();
    serde_norway::from_str(&text).unwrap()
}

//! Test harness: a real `wings` process with its own ports, data folder and Docker network
//! name prefix, enrolled with a throwaway CA (see [`TestPki`]) and driven as the panel drives
//! it: over mutual TLS with the panel's certificate. Console sockets and signed URLs go to the
//! public listener, as browsers do. Everything it made is removed on drop.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mamba_shared::node_api::CertificateResponse;
use mamba_shared::pki::{self, CertSlot, CertificateAuthority, Identity, IssuedKeyPair};
use mamba_wings::node_identity::{NodeIdentity, NodeRecord};
use serde_json::{Value, json};

pub mod console;

const DAY: Duration = Duration::from_secs(86_400);

/// A throwaway copy of the panel's PKI for one test wings: the CA, the panel's client
/// certificate, and the node id the node's certificate names.
pub struct TestPki {
    pub ca: CertificateAuthority,
    pub node_id: String,
    pub panel: IssuedKeyPair,
}

impl TestPki {
    pub fn new() -> TestPki {
        // reqwest's plain clients need the process-wide provider; ours name ring themselves.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = CertificateAuthority::generate("mamba test CA", DAY).unwrap();
        let panel = ca.issue(&Identity::Panel, DAY).unwrap();
        TestPki {
            ca,
            node_id: unique_id("node"),
            panel,
        }
    }

    /// Writes the node's identity into `data_dir` the way `wings enroll` stores it: a key made
    /// on the node, its certificate from the CA, the CA, and the panel's token-signing key
    /// (the test key pair in `fixtures/jwt`, so console and file tokens signed with
    /// `panel.key.pem` are accepted without further configuration).
    pub fn enroll(&self, data_dir: &Path) {
        let (key_pem, csr_pem) = pki::generate_key_and_csr().unwrap();
        let cert = self
            .ca
            .sign_csr(&csr_pem, &Identity::node(&self.node_id).unwrap(), DAY)
            .unwrap();
        let token_key = std::fs::read_to_string(console::fixture("panel.pub.pem")).unwrap();
        let issued = CertificateResponse {
            node_id: self.node_id.clone(),
            certificate_pem: cert.pem,
            ca_pem: self.ca.cert_pem().to_string(),
            token_public_key_pem: token_key,
            not_after: cert.info.not_after,
        };
        let record = NodeRecord {
            node_id: self.node_id.clone(),
            // Nothing listens there: these nodes never call the panel.
            panel_url: "https://127.0.0.1:9/".into(),
        };
        NodeIdentity::install(data_dir, record, &issued, &key_pem).unwrap();
    }

    /// A client presenting `client` (`CertSlot::empty()` for none) that accepts only this node.
    pub fn client_with(&self, client: Arc<CertSlot>) -> reqwest::Client {
        self.client_for(client, &self.node_id)
    }

    /// A client presenting `client` that accepts only node `node_id` from this CA.
    pub fn client_for(&self, client: Arc<CertSlot>, node_id: &str) -> reqwest::Client {
        let tls = pki::client_config(self.ca.cert_pem(), client, Identity::node(node_id).unwrap()).unwrap();
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
    }

    /// The panel's client: its certificate from this CA.
    pub fn panel_client(&self) -> reqwest::Client {
        self.client_with(CertSlot::new(&self.panel.cert.pem, &self.panel.key_pem).unwrap())
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

pub struct Wings {
    child: Option<Child>,
    /// The panel's API: mutual TLS.
    pub port: u16,
    /// Console sockets and signed URLs: plain HTTP.
    pub public_port: u16,
    /// Every test wings serves SFTP on its own port too.
    pub sftp_port: u16,
    pub dir: tempfile::TempDir,
    pub pki: TestPki,
    /// The panel's client (mutual TLS), for `url()`.
    pub http: reqwest::Client,
    /// A plain client, for `public_url()`: what a browser uses.
    pub public: reqwest::Client,
    extra_config: String,
}

/// A port that is free for both TCP and UDP on 127.0.0.1 right now, and not handed out
/// before in this process: the kernel may offer a released port again while the test that
/// got it has not bound it yet (Docker then says "port is already allocated").
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if !handed_out.contains(&port) && UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], port))).is_ok() {
            handed_out.push(port);
            return port;
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A blueprint file as the JSON document the panel would send.
pub fn blueprint(path: &str) -> Value {
    let text = std::fs::read_to_string(workspace_root().join(path)).unwrap();
    serde_norway::from_str(&text).unwrap()
}

pub fn testbox() -> Value {
    blueprint("wings/tests/fixtures/testbox.yaml")
}

pub fn unique_id(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

impl Wings {
    pub async fn start() -> Wings {
        Self::start_with("").await
    }

    /// `extra_config` is appended to the config file (TOML sections).
    pub async fn start_with(extra_config: &str) -> Wings {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::Builder::new()
            .prefix("mamba-wings-test")
            .tempdir()
            .unwrap();
        let pki = TestPki::new();
        let mut wings = Wings {
            child: None,
            port: free_port(),
            public_port: free_port(),
            sftp_port: free_port(),
            dir,
            http: pki.panel_client(),
            public: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            pki,
            extra_config: extra_config.to_string(),
        };
        wings.pki.enroll(&wings.data_dir());
        wings.write_client_files();
        wings.spawn().await;
        wings
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("wings.toml")
    }

    /// The panel's client certificate, its key and the CA as PEM files, for the Python
    /// clients: `(cert, key, ca)`.
    pub fn client_files(&self) -> (PathBuf, PathBuf, PathBuf) {
        let dir = self.dir.path();
        (dir.join("panel.crt"), dir.join("panel.key"), dir.join("ca.crt"))
    }

    fn write_client_files(&self) {
        let (cert, key, ca) = self.client_files();
        std::fs::write(cert, &self.pki.panel.cert.pem).unwrap();
        std::fs::write(key, &self.pki.panel.key_pem).unwrap();
        std::fs::write(ca, self.pki.ca.cert_pem()).unwrap();
    }

    async fn spawn(&mut self) {
        // The test's own sections come first so that later keys can extend them.
        let config = format!(
            "[api]\nlisten = \"127.0.0.1:{}\"\npublic_listen = \"127.0.0.1:{}\"\n\n\
             [system]\ndata_dir = \"{}\"\n\n{}\n",
            self.port,
            self.public_port,
            self.data_dir().display(),
            self.extra_config
        );
        std::fs::write(self.config_path(), config).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("wings.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_wings"))
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "info,mamba_wings=debug")
            .env("WINGS_SFTP__LISTEN", format!("127.0.0.1:{}", self.sftp_port))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        for (http, url) in [
            (self.http.clone(), self.url("/healthz")),
            (self.public.clone(), self.public_url("/healthz")),
        ] {
            wait_for(&format!("wings to answer {url}"), Duration::from_secs(30), || {
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
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("wings.log")).unwrap_or_default()
    }

    /// Whether the wings process is still running.
    pub fn try_alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no chance to clean up or save anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        self.child = None;
        status
    }

    pub async fn restart(&mut self) {
        self.spawn().await;
    }

    /// A URL on the panel's (mutual-TLS) listener; use it with `http`.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{}", self.port, path)
    }

    /// A URL on the public listener; use it with `public`.
    pub fn public_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.public_port, path)
    }

    /// Sends as the panel; answers the status and the JSON body (null if none).
    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let r = request.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.post(self.url(path)).json(&body)).await
    }

    pub async fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let request = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        self.send(request).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.put(self.url(path)).json(&body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(self.http.delete(self.url(path))).await
    }

    pub async fn create(&self, id: &str, blueprint: Value, variables: Value, port: u16) -> Value {
        let (status, body) = self
            .post(
                "/api/servers",
                json!({
                    "id": id,
                    "blueprint": blueprint,
                    "variables": variables,
                    "allocations": {"default": {"ip": "127.0.0.1", "port": port}},
                    "start_on_completion": true,
                }),
            )
            .await;
        assert_eq!(status, 202, "create {id}: {body}");
        body
    }

    pub async fn server(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/api/servers/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn state(&self, id: &str) -> String {
        self.server(id).await["state"].as_str().unwrap().to_string()
    }

    pub async fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        wait_for(&format!("{id} to be {state}"), timeout, || async move {
            let server = self.server(id).await;
            (server["state"] == state).then_some(server)
        })
        .await
    }

    pub async fn logs(&self, id: &str) -> Vec<String> {
        let (_, body) = self.get(&format!("/api/servers/{id}/logs?lines=500")).await;
        body["lines"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|l| l.as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub async fn wait_log(&self, id: &str, needle: &str, timeout: Duration) -> Vec<String> {
        wait_for(&format!("{id} to log {needle:?}"), timeout, || async move {
            let lines = self.logs(id).await;
            lines.iter().any(|l| l.contains(needle)).then_some(lines)
        })
        .await
    }

    pub async fn power(&self, id: &str, action: &str) -> (u16, Value) {
        self.post(&format!("/api/servers/{id}/power"), json!({"action": action}))
            .await
    }

    pub async fn command(&self, id: &str, command: &str) {
        let (status, body) = self
            .post(
                &format!("/api/servers/{id}/commands"),
                json!({"commands": [command]}),
            )
            .await;
        assert_eq!(status, 204, "{body}");
    }

    /// Containers wings made for this test's data folder.
    pub fn containers(&self) -> Vec<String> {
        let filter = format!("label=mamba.data-dir={}", self.data_dir().display());
        let (_, out) = docker(&["ps", "-aq", "--filter", &filter]);
        out.lines().map(str::to_string).collect()
    }
}

impl Drop for Wings {
    fn drop(&mut self) {
        self.kill9();
        for id in self.containers() {
            let _ = docker(&["rm", "-f", &id]);
        }
        if std::thread::panicking() {
            eprintln!("--- wings log ---\n{}", self.log());
        }
    }
}
